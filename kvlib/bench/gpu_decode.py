"""The decode attention figure: chapter 10's paged kernels and torch SDPA per cache length S.

One decode step (T = 1) over S cached tokens, for S from 1k to 64k: `paged_decode_attention`
for each method x split setting, and torch's `scaled_dot_product_attention` (enable_gqa=True)
on the same K/V laid out contiguously (`kvlib.bench.problems.decode_inputs`); achieved
bandwidth, as a fraction of the measured copy bandwidth and of the datasheet bandwidth.

Bandwidth convention. Every figure counts the bytes that must cross the memory interface,
reads and writes alike: a copy of n bytes moves 2 n (read n, write n); one decode step moves

    bytes = 2 B K S D b  (read K and V of every cached token)  +  2 B H T D b  (read q, write out)

(`kvlib.gpu.roofline.decode_attention_bytes` summed over rows and kv heads, b bytes per
element). Traffic that is the kernels' own overhead (block tables, split-KV partials) is not
counted: every contender is credited with the same bytes, so fractions compare times.

Two timings of the paged kernels: "kernels" calls the function `paged_decode_launcher`
returns (the attention and split-KV reduction kernels, inputs checked once beforehand; checked
to give bit-identical output); "call" times the public `paged_decode_attention`, whose input
checks copy seq_lens and block_tables to the host on every call. The target uses "kernels":
Tensor Core split-KV decode attention at >= 70% of the copy bandwidth at S >= 16k.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch

from kvlib.bench.gpu_timing import copy_bandwidth, cuda_device, time_cuda
from kvlib.bench.problems import REL_TOL, decode_inputs, output_error, reference_decode
from kvlib.bench.report import target
from kvlib.errors import BenchError, KVLibError, KVLibValueError, check_int
from kvlib.gpu import kernels as gk
from kvlib.gpu.roofline import decode_attention_bytes
from kvlib.timing import check_reps, median

LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
QUICK_LENGTHS = (1024, 2048, 4096, 8192, 16384)
ATTENTION_TARGET = 0.7  # Tensor Core split-KV decode attention >= 70% of the copy bandwidth ...
ATTENTION_TARGET_S = 16384  # ... at S >= 16k
BLOCKS_PER_SM = 2  # "auto" split-KV: at least this many thread blocks per SM


def auto_splits(
    n_blocks_per_split1: int, sm_count: int, n_kv_blocks: int, blocks_per_sm: int = BLOCKS_PER_SM
) -> int:
    """Split-KV partitions so the grid gives every SM at least `blocks_per_sm` thread blocks.

    n_blocks_per_split1: thread blocks of the grid with one partition (rows x kv heads x tiles
    for the Tensor Core kernel). The answer, ceil(blocks_per_sm * sm_count /
    n_blocks_per_split1), is at least 1 and at most n_kv_blocks (a partition holds whole
    blocks of the cache; more would be empty).
    """
    for name, v in (
        ("n_blocks_per_split1", n_blocks_per_split1),
        ("sm_count", sm_count),
        ("n_kv_blocks", n_kv_blocks),
        ("blocks_per_sm", blocks_per_sm),
    ):
        check_int(name, v)
    want = -(-blocks_per_sm * sm_count // n_blocks_per_split1)
    return max(1, min(want, n_kv_blocks))


def attention_row(
    times: list[float],
    nbytes: int,
    copy_bytes_per_s: float,
    spec_bytes_per_s: float | None,
    error: dict,
    **info: object,
) -> dict:
    """One decode attention contender at one S: bandwidth and its fractions of copy and spec."""
    t = median(times)
    if not t > 0 or not copy_bytes_per_s > 0:
        raise BenchError(
            f"times and copy bandwidth must be positive, got {t!r}, {copy_bytes_per_s!r}"
        )
    bw = nbytes / t
    return {
        **info,
        "median_s": t,
        "bytes_per_s": bw,
        "fraction_of_copy": bw / copy_bytes_per_s,
        "fraction_of_spec": None if spec_bytes_per_s is None else bw / spec_bytes_per_s,
        **error,
        "times_s": list(times),
    }


def attention_bytes(
    B: int, H: int, K: int, S: int, D: int, T: int = 1, dtype: torch.dtype = torch.float16
) -> int:
    """Bytes one decode step must move: K, V of every cached token read, q read, out written."""
    check_int("B", B)
    check_int("K", K)
    if H % K:
        raise KVLibValueError(f"H={H} must be a multiple of K={K}")
    return B * K * decode_attention_bytes(H // K, S, D, T, dtype)


def _splits_list(splits: Iterable[int | str]) -> list[int | str]:
    out = list(splits)
    for s in out:
        if s == "auto":
            continue
        try:
            check_int("splits", s)
        except KVLibError:
            raise BenchError(f"splits must be ints >= 1 or 'auto', got {s!r}") from None
    if not out:
        raise BenchError("splits must name at least one setting, e.g. (1, 'auto')")
    return out


def _bench_one_length(
    dev: torch.device,
    S: int,
    *,
    B: int,
    H: int,
    K: int,
    D: int,
    block_size: int,
    methods: list[str],
    splits: list[int | str],
    reps: int,
    sm_count: int,
    copy_bytes_per_s: float,
    spec_bytes_per_s: float | None,
) -> dict:
    """One row of `bench_decode_attention`: every contender at cache length S."""
    inp = decode_inputs(B, S, H, K, D, block_size, dev, seed=S)
    q, k, v = inp["q"], inp["k"], inp["v"]
    paged = {n: inp[n] for n in ("q", "k_pool", "v_pool", "block_tables", "seq_lens")}
    ref = reference_decode(q, k, v)  # (B, H, 1, D) fp32
    nbytes = attention_bytes(B, H, K, S, D)
    n_kv_blocks = -(-S // block_size)
    makers: dict[str, Callable[[], torch.Tensor]] = {}
    info: dict[str, dict] = {}
    for method in methods:
        per_split1 = gk.launch_plan(method, B, H, K, 1, D, 1)["blocks_per_split"]
        for setting in splits:
            ns = auto_splits(per_split1, sm_count, n_kv_blocks) if setting == "auto" else setting
            name = f"{method}/{setting}"
            # the public call first: its warm-up checks the inputs before the bare launches run
            makers[f"{name}/call"] = functools.partial(
                gk.paged_decode_attention, **paged, method=method, num_splits=ns
            )
            makers[name] = gk.paged_decode_launcher(**paged, method=method, num_splits=ns)
            for key, timing in ((f"{name}/call", "call"), (name, "kernels")):
                info[key] = {
                    "method": method,
                    "splits": setting,
                    "num_splits": ns,
                    "timing": timing,
                }
    makers["sdpa"] = functools.partial(
        torch.nn.functional.scaled_dot_product_attention, q, k, v, enable_gqa=True
    )
    info["sdpa"] = {"method": "sdpa", "splits": None, "num_splits": None, "timing": "torch"}
    outs: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[[], None]:
        return lambda: outs.__setitem__(name, makers[name]())

    times = time_cuda({name: keep(name) for name in makers}, reps, dev)
    contenders = {}
    for name in makers:
        row = attention_row(
            times[name],
            nbytes,
            copy_bytes_per_s,
            spec_bytes_per_s,
            output_error(outs[name], ref),
            **info[name],
        )
        if f"{name}/call" in outs:  # the kernels-only launch must reproduce the public call
            row["equals_call"] = bool(torch.equal(outs[name], outs[f"{name}/call"]))
        contenders[name] = row
    return {"S": S, "bytes": nbytes, "n_kv_blocks": n_kv_blocks, "contenders": contenders}


def bench_decode_attention(
    device: torch.device | str,
    lengths: Iterable[int] = LENGTHS,
    B: int = 4,
    H: int = 32,
    K: int = 8,
    D: int = 128,
    block_size: int = 16,
    splits: Iterable[int | str] = (1, "auto"),
    reps: int = 10,
    methods: Iterable[str] = gk.ATTENTION_METHODS,
    copy: dict | None = None,
    spec_bytes_per_s: float | None = None,
    progress: Callable[[], None] | None = None,
) -> dict:
    """Decode attention bandwidth per cache length S: kvlib's kernels and torch SDPA.

    For each S: random fp16 K/V (B rows of S tokens, K heads of D dims), contiguous for SDPA
    and in a pool of shuffled blocks for the paged kernels; every output is checked against
    `reference_decode` (fp32). copy: a `copy_bandwidth` result (measured when None);
    spec_bytes_per_s: the datasheet bandwidth (fraction_of_spec is None without it).
    """
    lengths = list(lengths)
    for S in lengths:
        check_int("S", S)
    methods = list(methods)
    if not methods or set(methods) - set(gk.ATTENTION_METHODS):
        raise BenchError(
            f"methods must be a non-empty subset of {gk.ATTENTION_METHODS}, got {methods}"
        )
    splits = _splits_list(splits)
    reps = check_reps(reps)
    dev = cuda_device(device)
    copy = copy_bandwidth(dev, reps=reps) if copy is None else copy
    sm_count = torch.cuda.get_device_properties(dev).multi_processor_count
    common = dict(
        B=B, H=H, K=K, D=D, block_size=block_size, methods=methods, splits=splits, reps=reps,
        sm_count=sm_count, copy_bytes_per_s=copy["bytes_per_s"], spec_bytes_per_s=spec_bytes_per_s,
    )  # fmt: skip
    rows = []
    for S in lengths:
        rows.append(_bench_one_length(dev, S, **common))
        torch.cuda.empty_cache()  # this length's K/V are gone: give the memory back
        if progress:
            progress()
    return {
        "shape": {"B": B, "H": H, "K": K, "D": D, "T": 1, "block_size": block_size},
        "dtype": "float16",
        "sm_count": sm_count,
        "splits": splits,
        "rel_tol": REL_TOL,
        "copy_bytes_per_s": copy["bytes_per_s"],
        "spec_bytes_per_s": spec_bytes_per_s,
        "rows": rows,
    }


def attention_targets(figure: dict) -> list[dict]:
    """At each S >= ATTENTION_TARGET_S: the best kernels-only wmma row whose split setting is
    not 1 (the split-KV ones), as a fraction of the copy bandwidth."""
    out = []
    for row in figure["rows"]:
        if row["S"] < ATTENTION_TARGET_S:
            continue
        split_kv = {
            name: c
            for name, c in row["contenders"].items()
            if c["method"] == "wmma" and c["timing"] == "kernels" and c["splits"] != 1
        }
        if not split_kv:
            continue
        name, best = max(split_kv.items(), key=lambda kv: kv[1]["fraction_of_copy"])
        note = f"{name}: {best['num_splits']} splits"
        if not best["ok"]:
            note += ", OUTPUT WRONG"
        out.append(
            target(
                "Tensor Core decode attention",
                f"fraction of copy bandwidth at S={row['S']}",
                best["fraction_of_copy"],
                ">=",
                ATTENTION_TARGET,
                note,
            )
        )
    return out
