"""The problems the benchmarks measure, built the same way for the CPU and the GPU bench.

    decode_problem   one decode step: q (B, H, 1, D) and contiguous k, v (B, K, S, D)
    scatter_blocks   the same K or V cut into blocks of P tokens, stored in shuffled pool slots
    paged_copy       k, v put into a `kvlib.paged.BlockAllocator` pool: (pool, tables, seq_lens)
    decode_inputs    one decode step's inputs for the GPU kernels: contiguous and paged
    reference_decode decode attention in fp32, the reference a GPU kernel's output is checked
                     against (`output_error`: within REL_TOL of it, relative to its largest value)
    generation_config, model_125m   the model configs the CPU bench generates with

Everything is seeded: the same arguments give the same tensors on any machine.
"""

from __future__ import annotations

import math

import torch

from kvlib.attention import grouped_attention
from kvlib.blocks import BlockAllocator
from kvlib.config import ModelConfig
from kvlib.errors import KVLibValueError, check_int

REL_TOL = 1e-2  # max |out - ref| / max |ref| allowed against the fp32 reference


def decode_problem(
    B: int,
    H: int,
    K: int,
    S: int,
    D: int,
    dtype: torch.dtype,
    device: torch.device | str,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode step: q (B, H, 1, D) and contiguous k, v (B, K, S, D), drawn on `device`."""
    for name, value in (("B", B), ("H", H), ("K", K), ("S", S), ("D", D)):
        check_int(name, value)
    if H % K:
        raise KVLibValueError(f"H={H} must be a multiple of K={K}")
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=g, device=device, dtype=dtype)  # (B, H, T=1, D)
    k = torch.randn(B, K, S, D, generator=g, device=device, dtype=dtype)  # (B, K, S, D)
    v = torch.randn(B, K, S, D, generator=g, device=device, dtype=dtype)  # (B, K, S, D)
    return q, k, v


def shuffled_slots(B: int, M: int, seed: int, device: torch.device | str) -> torch.Tensor:
    """(B, M) pool slots: block m of row b lives in slot [b, m]; every slot used once."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(B * M, generator=g).reshape(B, M).to(device)  # (B, M)


def scatter_blocks(x: torch.Tensor, block_size: int, slots: torch.Tensor) -> torch.Tensor:
    """x (B, K, S, D) cut into M = ceil(S / P) blocks of P tokens per row, block m of row b
    stored at pool[slots[b, m]]; zeros past S. Returns the pool (B*M, K, P, D)."""
    B, K, S, D = x.shape
    P = check_int("block_size", block_size)
    M = -(-S // P)
    if tuple(slots.shape) != (B, M):
        raise KVLibValueError(f"slots must be (B, M) = ({B}, {M}), got {tuple(slots.shape)}")
    x = torch.nn.functional.pad(x, (0, 0, 0, M * P - S))  # (B, K, M*P, D)
    x = x.reshape(B, K, M, P, D).permute(0, 2, 1, 3, 4)  # (B, M, K, P, D)
    pool = torch.empty(B * M, K, P, D, dtype=x.dtype, device=x.device)  # (N=B*M, K, P, D)
    pool[slots.reshape(-1)] = x.reshape(B * M, K, P, D)
    return pool


def paged_copy(
    k: torch.Tensor, v: torch.Tensor, block_size: int, seed: int
) -> tuple[BlockAllocator, torch.Tensor, torch.Tensor]:
    """Put k, v (B, K, S, D) into a one-layer pool of shuffled blocks.

    Returns (pool, block tables (B, M) long, seq_lens (B,) long, all S): the arguments
    `kvlib.paged.paged_attention` reads layer 0 of.
    """
    B, K, S, D = k.shape
    M = -(-S // block_size)
    pool = BlockAllocator(1, B * M, block_size, K, D, dtype=k.dtype, device=k.device)
    tables = shuffled_slots(B, M, seed, k.device)  # (B, M)
    pool.k_pool[0].copy_(scatter_blocks(k, block_size, tables))
    pool.v_pool[0].copy_(scatter_blocks(v, block_size, tables))
    seq_lens = torch.full((B,), S, dtype=torch.long, device=k.device)  # (B,)
    return pool, tables, seq_lens


def decode_inputs(
    B: int,
    S: int,
    H: int,
    K: int,
    D: int,
    block_size: int,
    device: torch.device | str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """One decode step's inputs made on `device`: the same K/V contiguous and paged.

    Returns q (B, H, 1, D); k, v (B, K, S, D); k_pool, v_pool (B*M, K, P, D) holding the
    M = ceil(S / P) blocks of every row in a random order (zeros past S); block_tables (B, M)
    int32 with token s of row b in block block_tables[b, s // P], slot s % P; seq_lens (B,)
    int32, all S.
    """
    check_int("block_size", block_size)
    q, k, v = decode_problem(B, H, K, S, D, dtype, device, seed)
    slots = shuffled_slots(B, -(-S // block_size), seed, k.device)  # (B, M)
    return {
        "q": q,
        "k": k,
        "v": v,
        "k_pool": scatter_blocks(k, block_size, slots),
        "v_pool": scatter_blocks(v, block_size, slots),
        "block_tables": slots.to(torch.int32),  # (B, M)
        "seq_lens": torch.full((B,), S, dtype=torch.int32, device=k.device),  # (B,)
    }


def reference_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Decode attention in fp32, row by row: q (B, H, 1, D), k, v (B, K, S, D) -> (B, H, 1, D).

    `kvlib.attention.grouped_attention` (query head h reads kv head h // G), one row at a
    time so the fp32 copy of K/V stays small.
    """
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise KVLibValueError(
            f"expected q (B, H, 1, D) and k, v (B, K, S, D), got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, H, T, D = q.shape
    K = k.shape[1]
    if T != 1 or k.shape[0] != B or k.shape[3] != D or H % K:
        raise KVLibValueError(
            f"q {tuple(q.shape)} does not match k {tuple(k.shape)}: expected T = 1, equal B "
            "and D, and H a multiple of K"
        )
    out = torch.empty(B, H, 1, D, dtype=torch.float32, device=q.device)  # (B, H, 1, D)
    for b in range(B):  # kvlib's attention on one row at a time, in fp32
        rows = slice(b, b + 1)
        out[rows] = grouped_attention(q[rows].float(), k[rows].float(), v[rows].float(), None)
    return out


def output_error(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """max |out - ref|, and that over max |ref| (scale-free: a zero output scores 1)."""
    if out.shape != ref.shape:
        raise KVLibValueError(f"output {tuple(out.shape)} and reference {tuple(ref.shape)} differ")
    diff = (out.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
    return {"max_abs_diff": diff, "rel_err": rel, "ok": bool(rel <= REL_TOL)}


def generation_config(max_new_tokens: int, prompt_len: int = 16) -> ModelConfig:
    """A small GQA model whose max_seq_len admits prompt + max_new_tokens (for cached/uncached)."""
    return ModelConfig(
        vocab_size=512,
        dim=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=prompt_len + max_new_tokens,
        name="bench-small",
    )


def model_125m(max_seq_len: int = 512) -> ModelConfig:
    """A 125M-class model (GPT-2 small / Llama shapes, GQA), where matmuls dominate a step."""
    return ModelConfig(
        vocab_size=32000,
        dim=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=4,
        ffn_dim=2048,
        max_seq_len=max_seq_len,
        name="125m",
    )
