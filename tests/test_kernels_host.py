"""Chapter 10's CUDA kernels run on the CPU from their exact source (kvlib.gpu.host).

Every kernel of kvlib/kernels runs through the launch plan of kvlib.gpu.kernels and equals the
reference over a grid of shapes, in two thread interleavings (forward, reversed) that must
give identical bytes (a missing barrier shows as a difference). The plain build runs the whole
grid; a representative subset runs under AddressSanitizer and UBSan. Mutation tests: a broken
copy of a kernel (a string edit of the real source) is caught, one per rule of the GPU.
"""

import re
import shutil

import numpy as np
import pytest
import torch

from kvlib.errors import KernelFaultError, KVLibValueError, ToolchainError
from kvlib.gpu import emulate as em
from kvlib.gpu import host
from kvlib.gpu import kernels as gk
from kvlib.gpu.nvrtc import KERNEL_FILES, kernel_names, kernel_source

GEMM_SHAPES = [(16, 16, 16), (32, 32, 32), (50, 33, 70), (1, 5, 300), (64, 48, 17), (33, 1, 2)]
# (seq_lens, H, K, D, P, T, num_splits)
ATTENTION_CASES = [
    ([37, 5, 64], 8, 2, 64, 16, 1, 1),  # GQA G = 4, lengths not a multiple of P
    ([37, 5, 64], 8, 2, 64, 16, 2, 3),  # T = 2, three partitions
    ([100, 17], 4, 4, 32, 8, 1, 4),  # MHA, P = 8
    ([50, 33], 32, 2, 16, 8, 2, 2),  # G*T = 32 rows: two WMMA tiles
    ([40], 8, 1, 128, 32, 3, 5),  # MQA, 3 query tokens, 2 blocks over 5 splits: 3 empty
    ([300, 129], 4, 1, 256, 32, 1, 2),  # D = 256, more than one 128-key chunk
    ([5, 3], 2, 1, 48, 1, 1, 8),  # P = 1, empty partitions, D = 48
    ([20], 6, 3, 16, 16, 4, 2),  # G = 2, T = 4: 8 rows in a tile; the second split empty
]


def _case_id(c):
    return f"lens{'-'.join(map(str, c[0]))}_H{c[1]}K{c[2]}D{c[3]}P{c[4]}T{c[5]}NS{c[6]}"


def _gemm_inputs(shape, seed=0):
    M, R, N = shape
    gen = torch.Generator().manual_seed(seed + M * 7 + N)
    return torch.randn(M, R, generator=gen).half(), torch.randn(R, N, generator=gen).half()


def _assert_close(out, ref, what, atol=2e-3, rtol=2e-3):
    """fp16 tolerance: the output is rounded to half (1 ulp = 2**-10 relative)."""
    out, ref = (x.double() if isinstance(x, torch.Tensor) else torch.from_numpy(
        np.array(x, np.float64)) for x in (out, ref))  # fmt: skip
    diff = (out - ref).abs()
    ok = bool((diff <= atol + rtol * ref.abs()).all())
    assert ok, f"{what}: max diff {diff.max().item():.2e} (atol {atol}, rtol {rtol})"


def _attention(case, method, **options):
    lens, H, K, D, P, T, NS = case
    inp = em.random_paged_inputs(lens, H, K, D, P, T=T, seed=H + D + T)
    out = host.paged_decode_attention(**inp, method=method, num_splits=NS, **options)
    return inp, out


def test_the_host_compiler_is_there():
    assert shutil.which("g++"), "g++ runs chapter 10's kernels on the CPU; install it"


def test_every_kernel_is_covered():
    """A new kernel in kvlib/kernels must be added to these tests."""
    covered = {"gemm_naive", "gemm_tiled", "gemm_wmma", "paged_attention_cuda_core",
               "paged_attention_wmma", "split_kv_reduce"}  # fmt: skip
    found = {k for f in KERNEL_FILES for k in kernel_names(kernel_source(f))}
    assert found == covered, f"kernels {found ^ covered} are new or gone: test them here"


# ---- every kernel equals its reference, in two interleavings ------------------------------------
@pytest.mark.parametrize("method", gk.GEMM_METHODS)
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_matches_torch_in_both_orders(method, shape):
    a, b = _gemm_inputs(shape)
    fwd = host.gemm(a, b, method=method)
    rev = host.gemm(a, b, method=method, order="reverse")
    ref = a.float() @ b.float()
    diff = (fwd - ref).abs().max().item()
    assert diff < 1e-4 * shape[1] ** 0.5, f"gemm_{method} {shape}: max diff {diff:.2e} vs torch"
    assert torch.equal(fwd, rev), f"gemm_{method} {shape}: forward and reversed runs differ"


@pytest.mark.parametrize("method", gk.ATTENTION_METHODS)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=_case_id)
def test_paged_attention_matches_reference_in_both_orders(method, case):
    if method == "wmma" and case[3] % 16:
        pytest.skip("the Tensor Core kernel takes D a multiple of 16")
    inp, fwd = _attention(case, method)
    _, rev = _attention(case, method, order="reverse")
    ref = em.paged_reference(**inp)
    _assert_close(fwd.float(), ref, f"{method} {_case_id(case)} vs kvlib reference")
    assert torch.equal(fwd, rev), f"{method} {_case_id(case)}: forward and reversed runs differ"


@pytest.mark.parametrize("method", gk.ATTENTION_METHODS)
def test_partials_of_empty_partitions_and_the_reduce(method):
    """The attention kernel's (m, l, o) per split equal the emulation's, empty splits included
    (m = -inf, l = 0, o = 0); split_kv_reduce merges them as the emulation does."""
    lens, H, K, D, P, T, NS = [40, 3], 8, 2, 32, 8, 2, 7  # 5 and 1 blocks over 7 splits
    inp = em.random_paged_inputs(lens, H, K, D, P, T=T, seed=3)
    _, launches = gk.paged_decode_launches(**inp, method=method, num_splits=NS)
    attn, reduce = launches
    got = host.launch(attn.file, attn.kernel, attn.grid, attn.block, list(attn.args),
                      attn.shared_mem)  # fmt: skip
    m, l, o = em.paged_attention_partials(**inp, num_splits=NS, kernel=method)
    empty = np.isneginf(m)
    assert empty.sum() > 0 and (~empty).sum() > 0, "the case must have empty and full splits"
    assert np.array_equal(np.isneginf(got["part_m"]), empty), "empty partitions differ"
    assert not got["part_l"][empty].any() and not got["part_o"][empty].any()
    _assert_close(got["part_m"][~empty], m[~empty], f"{method} part_m")
    _assert_close(got["part_l"][~empty], l[~empty], f"{method} part_l", rtol=1e-3)
    _assert_close(got["part_o"], o, f"{method} part_o", atol=5e-3)
    args = [got["part_m"], got["part_l"], got["part_o"], *reduce.args[3:]]
    out = host.launch(reduce.file, reduce.kernel, reduce.grid, reduce.block, args)["out"]
    _assert_close(out, em.split_kv_reduce(m, l, o), f"{method} split_kv_reduce")


def test_a_query_that_sees_nothing_gets_zeros():
    """split_kv_reduce on partitions that are all empty writes zeros, not NaN."""
    B, H, T, NS, D = 1, 2, 1, 3, 16
    part_m = np.full((B, H, T, NS), -np.inf, np.float32)  # (B, H, T, NS)
    part_l = np.zeros_like(part_m)
    part_o = np.zeros((B, H, T, NS, D), np.float32)  # (B, H, T, NS, D)
    out = np.full((B, H, T, D), np.nan, np.float16)  # (B, H, T, D)
    got = host.launch("paged_attention.cu", "split_kv_reduce", (B * H * T,), (128,),
                      [part_m, part_l, part_o, out, NS, D])["out"]  # fmt: skip
    assert not got.any() and not np.isnan(got).any(), f"expected zeros, got {got.ravel()[:4]}"


# ---- under AddressSanitizer and UBSan: a representative subset ----------------------------------
@pytest.mark.parametrize("method", gk.GEMM_METHODS)
def test_gemm_under_sanitizers(method):
    a, b = _gemm_inputs((50, 33, 70))
    out = host.gemm(a, b, method=method, sanitize=True)
    diff = (out - a.float() @ b.float()).abs().max().item()
    assert diff < 1e-3, f"gemm_{method} under ASan/UBSan: max diff {diff:.2e}"


@pytest.mark.parametrize("method", gk.ATTENTION_METHODS)
@pytest.mark.parametrize("case", [ATTENTION_CASES[1], ATTENTION_CASES[4]], ids=_case_id)
def test_paged_attention_under_sanitizers(method, case):
    inp, out = _attention(case, method, sanitize=True)
    _assert_close(out.float(), em.paged_reference(**inp), f"{method} under ASan/UBSan")


# ---- the launch plan is the one the GPU path uses -----------------------------------------------
def test_launches_follow_the_launch_plan():
    a, b = _gemm_inputs((50, 33, 70))
    for method in gk.GEMM_METHODS:
        plan = gk.gemm_plan(method, 50, 70)
        (ln,) = gk.gemm_launches(a, b, method)[1]
        assert (ln.kernel, ln.grid, ln.block) == (plan["kernel"], plan["grid"], plan["block"])
    inp = em.random_paged_inputs([37, 5], 8, 2, 64, 16, T=2)
    for method in gk.ATTENTION_METHODS:
        plan = gk.launch_plan(method, 2, 8, 2, 2, 64, 3)
        attn = gk.paged_decode_launches(**inp, method=method, num_splits=3)[1][0]
        assert (attn.kernel, attn.grid, attn.block, attn.shared_mem) == (
            plan["kernel"], plan["grid"], plan["block"], plan["shared_mem"])  # fmt: skip


def test_a_wrong_launch_plan_is_caught(monkeypatch):
    """One WMMA tile row too few in the grid: rows of the output are never written."""
    inp = em.random_paged_inputs([50, 33], 32, 2, 16, 8, T=2, seed=1)  # G*T = 32: two tiles
    real = gk.launch_plan

    def short(*args):
        plan = real(*args)
        return dict(plan, grid=(plan["grid"][0], plan["grid"][1] - 1, plan["grid"][2]))

    monkeypatch.setattr(gk, "launch_plan", short)
    out = host.paged_decode_attention(**inp, method="wmma", num_splits=2)
    ref = em.paged_reference(**inp)
    with pytest.raises(AssertionError, match="max diff"):
        _assert_close(out.float(), ref, "short grid")


def test_dynamic_shared_memory_short_by_one_element_is_caught(monkeypatch):
    """The launch gives 4 bytes (one float) less than paged_attention_wmma uses."""
    inp = em.random_paged_inputs([37, 5], 8, 2, 32, 16, T=1, seed=2)
    real = gk.launch_plan
    monkeypatch.setattr(gk, "launch_plan", lambda *a: dict(real(*a), shared_mem=real(*a)[
        "shared_mem"] - 4))  # fmt: skip
    with pytest.raises(KernelFaultError, match="AddressSanitizer: use-after-poison"):
        host.paged_decode_attention(**inp, method="wmma", sanitize=True)
    with pytest.raises(KernelFaultError, match="wrote byte .* the launch gave"):
        host.paged_decode_attention(**inp, method="wmma")  # the plain build's canary


# ---- mutations: a broken copy of each kernel is caught -----------------------------------------
# (name, file, real text, broken text, runner, sanitize, what catches it)
GEMM = "gemm.cu"
ATTN = "paged_attention.cu"
MUTATIONS = [
    ("index-off-by-one-global", GEMM, "if (row >= M || col >= N) return;",
     "if (row > M || col >= N) return;", "naive", True,
     "AddressSanitizer: heap-buffer-overflow"),
    ("index-off-by-one-output", ATTN, "for (int d = lane; d < D; d += 32) part_o",
     "for (int d = lane; d <= D; d += 32) part_o", "wmma", True,
     "AddressSanitizer: heap-buffer-overflow"),
    ("static-shared-one-short", ATTN, "__shared__ float p_s[CHUNK];",
     "__shared__ float p_s[CHUNK - 1];", "cuda_core", True,
     r"runtime error: index 127 out of bounds for type 'float \[127\]'"),
    ("dynamic-shared-layout-past-end", ATTN, "long long* off_s = (long long*)(a_s + WT);",
     "long long* off_s = (long long*)(a_s + WT + 2);", "wmma", True,
     "AddressSanitizer: use-after-poison"),
    ("misaligned-fragment-load", ATTN, "wmma::load_matrix_sync(q_frag, q_s + d0, D);",
     "wmma::load_matrix_sync(q_frag, q_s + d0 + 8, D);", "wmma", False,
     r"load_matrix_sync: pointer .* is not 256-bit \(32-byte\) aligned"),
    ("fragment-ldm", GEMM, "wmma::load_matrix_sync(b_frag, &Bs[0][wx * WM], BM);",
     "wmma::load_matrix_sync(b_frag, &Bs[0][wx * WM], BM - 4);", "wmma", False,
     "ldm 28 is not a multiple of 8 elements"),
    ("fragment-pointer-differs-by-lane", GEMM,
     "wmma::load_matrix_sync(a_frag, &As[wy * WM][0], WM);",
     "wmma::load_matrix_sync(a_frag, &As[wy * WM][0] + (threadIdx.x % 32 == 3) * 16, WM);",
     "wmma", False, "lane 3 passes pointer"),
    ("shuffle-mask-without-caller", ATTN, "x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));",
     "x = fmaxf(x, __shfl_xor_sync(0x0000ffffu, x, o));", "cuda_core", False,
     "mask 0x0000ffff, which does not name the calling lane 16"),
    ("shuffle-lane-missing", ATTN, "for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(",
     "for (int o = 16; o > 0 && threadIdx.x % 32 != 5; o >>= 1) x += __shfl_xor_sync(",
     "cuda_core", False, "a lane named in the mask is elsewhere"),
    ("shuffle-reads-lane-outside-mask", ATTN,
     "x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));",
     "x = fmaxf(x, __shfl_xor_sync(threadIdx.x % 32 < 16 ? 0xffffu : 0xffff0000u, x, o));",
     "cuda_core", False, r"reads lane \d+, which the mask does not name"),
    ("barrier-in-divergent-branch", ATTN, "    __syncthreads();\n\n    for (int c0 = begin;",
     "    if (tid < 64) __syncthreads();\n\n    for (int c0 = begin;", "cuda_core", False,
     "the threads of a block wait at different barriers"),
    ("return-before-barrier", GEMM, "    float acc = 0.0f;\n    for (int r0 = 0; r0 < R;",
     "    float acc = 0.0f;\n    if (row >= M) return;\n    for (int r0 = 0; r0 < R;",
     "tiled", False, "__syncthreads must be reached by every thread of the block"),
]  # fmt: skip


def _run_broken(file, runner, source, sanitize, order="forward"):
    if file == GEMM:
        a, b = _gemm_inputs((50, 33, 70))
        return host.gemm(a, b, method=runner, source=source, sanitize=sanitize, order=order)
    case = ([300, 37], 8, 2, 32, 16, 2, 2)  # 300 keys: more than one 128-key chunk
    return _attention(case, runner, source=source, sanitize=sanitize, order=order)[1]


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m[0])
def test_mutation_is_caught(mutation):
    name, file, real, broken, runner, sanitize, catch = mutation
    source = kernel_source(file)
    assert source.count(real) == 1, f"{name}: the text to break is not in {file} once"
    with pytest.raises(KernelFaultError, match=catch):
        _run_broken(file, runner, source.replace(real, broken), sanitize)


def test_shared_memory_starts_as_nan_in_every_block():
    """A tile entry left unwritten (no zero past R) reads the block's fresh shared memory: NaN,
    as the garbage a GPU leaves there would be, instead of a zero that would hide the bug."""
    real = "As[ty][tx] = (row < M && r0 + tx < R) ? __half2float(A[row * R + r0 + tx]) : 0.0f;"
    broken = "if (row < M && r0 + tx < R) As[ty][tx] = __half2float(A[row * R + r0 + tx]);"
    source = kernel_source(GEMM)
    assert source.count(real) == 1, "the tile load is not in gemm.cu once"
    a, b = _gemm_inputs((50, 5, 70))  # R < 16: one tile, partly past R
    c = host.gemm(a, b, method="tiled", source=source.replace(real, broken))
    assert torch.isnan(c).all(), f"{int(torch.isnan(c).sum())} of {c.numel()} outputs are NaN"


# A removed barrier faults nowhere: it is a race, which the two interleavings expose.
REMOVED_BARRIERS = [
    ("gemm_tiled", GEMM, "        __syncthreads();  // before the next tile", "tiled"),
    ("attention_cuda_core", ATTN, "        __syncthreads();  // before the next chunk",
     "cuda_core"),
    ("attention_wmma", ATTN, "        __syncwarp();\n\n        for (int i = lane; i < WT * D; i",
     "wmma"),
]  # fmt: skip


@pytest.mark.parametrize("mutation", REMOVED_BARRIERS, ids=lambda m: m[0])
def test_removed_barrier_changes_the_result_between_interleavings(mutation):
    name, file, real, runner = mutation
    source = kernel_source(file)
    assert source.count(real) == 1, f"{name}: the barrier is not in {file} once"
    broken = source.replace(real, real.replace("__syncthreads();", "").replace("__syncwarp();", ""))
    fwd = _run_broken(file, runner, broken, False)
    rev = _run_broken(file, runner, broken, False, order="reverse")
    assert not torch.equal(fwd, rev), f"{name}: removing the barrier went unnoticed"


# ---- the harness's own rules and errors ----------------------------------------------------------
def test_launch_limits_are_those_of_a_gpu():
    args = [np.zeros(1, np.float32)] * 3 + [np.zeros(1, np.float16), 1, 1]
    with pytest.raises(KernelFaultError, match="dynamic shared memory, above 49152"):
        host.launch(ATTN, "split_kv_reduce", (1,), (128,), args, shared_mem=49153)
    with pytest.raises(KernelFaultError, match="a block holds 1..1024 threads"):
        host.launch(ATTN, "split_kv_reduce", (1,), (1025,), args)


def test_launch_checks_its_arguments():
    a = np.zeros((4, 4), np.float16)
    c = np.zeros((4, 4), np.float32)
    with pytest.raises(KVLibValueError, match="takes 6 arguments"):
        host.launch(GEMM, "gemm_naive", (1,), (16, 16), [a, a, c])
    with pytest.raises(KVLibValueError, match="B must be float16, got float32"):
        host.launch(GEMM, "gemm_naive", (1,), (16, 16), [a, c, c, 4, 4, 4])
    with pytest.raises(KVLibValueError, match="order must be one of"):
        host.launch(GEMM, "gemm_naive", (1,), (16, 16), [a, a, c, 4, 4, 4], order="random")
    with pytest.raises(KVLibValueError, match="has no kernel 'gemm_fast'"):
        host.launch(GEMM, "gemm_fast", (1,), (16, 16), [a, a, c, 4, 4, 4])


def test_kernel_params_are_read_from_the_source():
    params = host.kernel_params(kernel_source(ATTN))
    assert "".join(p.kind for p in params["split_kv_reduce"]) == "ppppii"
    gemm = host.kernel_params(kernel_source(GEMM))["gemm_wmma"]
    assert [(p.name, p.kind) for p in gemm][:3] == [("A", "p"), ("B", "p"), ("C", "p")]
    assert gemm[2].dtype is np.float32 and gemm[0].dtype is np.float16


def test_a_missing_compiler_is_named(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.raises(ToolchainError, match="needs g\\+\\+"):
        host.build(GEMM)


def test_a_compile_error_shows_the_compiler_output():
    with pytest.raises(ToolchainError, match="failed on gemm.cu"):
        host.build(GEMM, source=kernel_source(GEMM).replace("acc = 0.0f;", "acc = ;", 1))


def test_cpu_run_rejects_gpu_tensors_and_wrong_inputs():
    a, b = _gemm_inputs((4, 8, 4))
    with pytest.raises(ValueError, match="do not chain"):
        host.gemm(a, a)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="the CPU run takes CPU tensors"):
            host.gemm(a.cuda(), b.cuda())


def test_sources_are_unmodified_cuda():
    """The host build includes the shipped .cu text itself; only headers stand in for CUDA's."""
    for file in KERNEL_FILES:
        src = kernel_source(file)
        assert "kvhost" not in src and "__CUDACC__" not in src, f"{file} is not plain CUDA"
        assert re.search(r"#include <cuda_fp16\.h>", src), f"{file} includes CUDA's headers"


# ---- the execution model itself, on small kernels of the tests' own ------------------------------
PRIMITIVES = r"""
#include <cuda_fp16.h>
#include <mma.h>
using namespace nvcuda;

// out[4 * 32 * blk + 32 * op + lane]: idx, up, down, xor shuffles of in[lane] with `width`
extern "C" __global__ void shuffles(const int* in, int* out, int arg, int width) {
    int lane = threadIdx.x, v = in[lane], base = 4 * 32 * blockIdx.x;
    out[base + lane] = __shfl_sync(0xffffffffu, v, arg, width);
    out[base + 32 + lane] = __shfl_up_sync(0xffffffffu, v, arg, width);
    out[base + 64 + lane] = __shfl_down_sync(0xffffffffu, v, arg, width);
    out[base + 96 + lane] = __shfl_xor_sync(0xffffffffu, v, arg, width);
}

// halves of the warp reduce on their own, with their own masks: legal, and run as such
extern "C" __global__ void half_warps(const float* in, float* out) {
    int lane = threadIdx.x;
    unsigned mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
    float v = in[lane];
    for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(mask, v, o, 16);
    __syncwarp(mask);
    out[lane] = v;
}

// a (2, 64) block: warp w = threadIdx.y holds rows w * 16..; D = A B + C with A col-major,
// C loaded and D stored col-major
extern "C" __global__ void wmma_layouts(const half* a, const half* b, const float* c, float* d) {
    __shared__ __align__(32) half as[2][256];
    int w = threadIdx.y, lane = threadIdx.x % 32;
    for (int i = threadIdx.x; i < 256; i += blockDim.x) as[w][i] = a[w * 256 + i];
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::col_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::row_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
    if (threadIdx.x < 32) {  // one warp per row of the block
        wmma::load_matrix_sync(fa, as[w], 16);
        wmma::load_matrix_sync(fb, b, 16);
        wmma::load_matrix_sync(fc, c + w * 256, 16, wmma::mem_col_major);
        wmma::mma_sync(fc, fa, fb, fc);
        wmma::store_matrix_sync(d + w * 256, fc, 16, wmma::mem_col_major);
    }
    (void)lane;
}
"""


def _cuda_shuffles(v, arg, width):
    """CUDA's four shuffles as the programming guide defines them, lane by lane."""
    idx, up, down, xor = [], [], [], []
    for lane in range(32):
        seg = lane // width * width
        idx.append(v[seg + arg % width])
        up.append(v[lane - arg] if lane - seg >= arg else v[lane])
        down.append(v[lane + arg] if lane - seg + arg < width else v[lane])
        xor.append(v[lane ^ arg] if (lane ^ arg) < seg + width else v[lane])
    return np.array(idx + up + down + xor, np.int32)


@pytest.mark.parametrize(("arg", "width"), [(1, 32), (5, 32), (3, 8), (9, 16), (31, 4)])
def test_shuffles_follow_the_programming_guide(arg, width):
    v = np.arange(100, 132, dtype=np.int32)
    out = np.zeros(4 * 32, np.int32)
    got = host.launch("p.cu", "shuffles", (1,), (32,), [v, out, arg, width], source=PRIMITIVES)
    want = _cuda_shuffles(v.tolist(), arg, width)
    assert np.array_equal(got["out"], want), f"arg {arg} width {width}: {got['out']} vs {want}"


def test_separate_masks_for_the_two_half_warps_are_legal():
    x = np.arange(32, dtype=np.float32)
    out = np.zeros(32, np.float32)
    for order in host.ORDERS:
        got = host.launch("p.cu", "half_warps", (1,), (32,), [x, out], order=order,
                          source=PRIMITIVES)["out"]  # fmt: skip
        want = np.repeat([x[:16].sum(), x[16:].sum()], 16)
        assert np.array_equal(got, want), f"{order}: {got} vs {want}"


def test_wmma_layouts_and_warps_of_a_2d_block():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 16, 16)).astype(np.float16)  # (2, 16, 16) stored col-major
    b = rng.standard_normal((16, 16)).astype(np.float16)
    c = rng.standard_normal((2, 16, 16)).astype(np.float32)  # col-major too
    d = np.zeros((2, 16, 16), np.float32)
    got = host.launch("p.cu", "wmma_layouts", (1,), (64, 2), [a, b, c, d], source=PRIMITIVES)
    for w in range(2):
        A, C = a[w].T.astype(np.float64), c[w].T.astype(np.float64)  # col-major: transpose
        want = A @ b.astype(np.float64) + C
        diff = np.abs(got["d"][w].T - want).max()
        assert diff < 1e-4, f"warp {w}: max diff {diff:.2e}"


def test_a_full_mask_in_a_partial_warp_is_reported():
    v, out = np.zeros(32, np.int32), np.zeros(4 * 32, np.int32)
    with pytest.raises(KernelFaultError, match="names lane 16 .* which this block does not have"):
        host.launch("p.cu", "shuffles", (1,), (16,), [v, out, 1, 32], source=PRIMITIVES)


def test_the_headers_ship_with_the_package():
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    assert "kernels/host/*.h" in pyproject["tool"]["setuptools"]["package-data"]["kvlib"]
    for header in host.HEADERS:
        assert (root / "kvlib" / "kernels" / "host" / header).is_file(), header
