"""Every kernel compiles to PTX with NVRTC and assembles with ptxas, on a machine without a GPU.

Needs the gpu extra's wheels (cupy-cuda12x, nvidia-cuda-nvrtc/runtime/nvcc-cu12); skipped
cleanly without them.
"""

import pytest

pytest.importorskip("cupy")
pytest.importorskip("nvidia.cuda_nvrtc")
pytest.importorskip("nvidia.cuda_runtime")
pytest.importorskip("nvidia.cuda_nvcc")

from kvlib.gpu import nvrtc  # noqa: E402

FILES = {name: nvrtc.kernel_names(nvrtc.kernel_source(name)) for name in nvrtc.KERNEL_FILES}


def test_sources_ship_as_package_data_and_name_their_kernels():
    assert FILES["gemm.cu"] == ["gemm_naive", "gemm_tiled", "gemm_wmma"]
    assert FILES["paged_attention.cu"] == [
        "paged_attention_cuda_core",
        "paged_attention_wmma",
        "split_kv_reduce",
    ]
    every = {k for names in FILES.values() for k in names}
    assert set(nvrtc.TENSOR_CORE_KERNELS) <= every


@pytest.mark.parametrize("arch", nvrtc.ARCHS)
@pytest.mark.parametrize("name", nvrtc.KERNEL_FILES)
def test_compiles_to_ptx_with_tensor_core_instructions_where_expected(name, arch):
    ptx = nvrtc.compile_ptx(nvrtc.kernel_source(name), arch, name)
    assert f".target sm_{arch}" in ptx
    for kernel in FILES[name]:
        body = nvrtc.ptx_entry(ptx, kernel)
        has_mma = "wmma.mma.sync" in body
        expected = kernel in nvrtc.TENSOR_CORE_KERNELS
        assert has_mma == expected, f"{kernel} sm_{arch}: wmma.mma.sync present={has_mma}"


@pytest.mark.parametrize("arch", nvrtc.ARCHS)
@pytest.mark.parametrize("name", nvrtc.KERNEL_FILES)
def test_ptxas_assembles_and_reports_registers(name, arch):
    res = nvrtc.assemble(nvrtc.compile_ptx(nvrtc.kernel_source(name), arch, name), arch)
    assert sorted(r.kernel for r in res) == sorted(FILES[name])
    for r in res:
        assert r.arch == arch
        assert 8 <= r.registers <= 255, r
        assert r.spill_bytes == 0, f"{r.kernel} spills {r.spill_bytes} bytes on sm_{arch}"


def test_register_table_has_every_kernel_and_arch():
    table = nvrtc.register_table()
    assert set(table) == {k for names in FILES.values() for k in names}
    for kernel, per_arch in table.items():
        assert sorted(per_arch) == list(nvrtc.ARCHS), kernel
    print({k: v for k, v in table.items()})


def test_parse_ptxas_log():
    log = (
        "ptxas info    : Compiling entry function 'foo' for 'sm_80'\n"
        "ptxas info    : Function properties for foo\n"
        "    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 40 registers, used 0 barriers, 2048 bytes smem, 380 bytes cmem[0]\n"
    )
    (r,) = nvrtc.parse_ptxas_log(log)
    assert (r.kernel, r.arch, r.registers, r.shared_bytes, r.spill_bytes) == (
        "foo",
        80,
        40,
        2048,
        12,
    )


def test_errors_are_clear():
    with pytest.raises(nvrtc.ToolchainError, match="NVRTC failed on broken.cu"):
        nvrtc.compile_ptx('extern "C" __global__ void k() { nope; }', 80, "broken.cu")
    with pytest.raises(ValueError, match="below 75"):
        nvrtc.compile_ptx("", 70)
    with pytest.raises(TypeError, match="arch must be an int"):
        nvrtc.compile_ptx("", "sm_80")
    with pytest.raises(ValueError, match="unknown kernel file"):
        nvrtc.kernel_source("gemm.cpp")
    with pytest.raises(ValueError, match="not in this PTX"):
        nvrtc.ptx_entry(nvrtc.compile_ptx(nvrtc.kernel_source("gemm.cu"), 80, "gemm.cu"), "x")
    with pytest.raises(nvrtc.ToolchainError, match="ptxas failed"):
        nvrtc.assemble("this is not ptx", 80)
