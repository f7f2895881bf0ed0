"""Checks for chapter 9 (memory analysis at scale); expected answers come from kvlib.memory."""

from __future__ import annotations

import torch

from kvlib.exercises import correct, expect
from kvlib.memory import GB, get_model, kv_bytes_per_token, kv_cache_bytes, max_batch


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_max_batch(n_seqs: int) -> None:
    """Llama-3-8B on an A100-80, fp16 weights and cache, 10% reserved, 8192-token sequences."""
    want = max_batch("Llama-3-8B", "A100-80", 8192, torch.float16, reserved_fraction=0.1)
    no_reserve = max_batch("Llama-3-8B", "A100-80", 8192, torch.float16)
    expect(_is_int(n_seqs), f"n_seqs should be a whole number of sequences, got {n_seqs!r}")
    expect(
        n_seqs != no_reserve or want == no_reserve,
        "that ignores the reserve: take 10% of the GPU's memory off before dividing",
    )
    expect(
        n_seqs != want + 1,
        "one too many: round the number of sequences down (floor), a partial one does not fit",
    )
    expect(
        n_seqs == want,
        "not quite: free = memory - weights - reserve (memory is 80 GiB = 80 * 2**30 bytes), "
        "then divide by one sequence's cache, 8192 * kv_bytes_per_token('Llama-3-8B')",
    )
    correct(
        "your number of 8192-token sequences for Llama-3-8B on an A100-80 matches "
        "kvlib.memory.max_batch"
    )


def check_tp_bytes(per_gpu_bytes: int) -> None:
    """Per-GPU KV bytes of one 32768-token Llama-3-70B sequence in bf16 with tp=16."""
    want = kv_cache_bytes("Llama-3-70B", 32768, 1, torch.bfloat16, tp=16)
    total = kv_cache_bytes("Llama-3-70B", 32768, 1, torch.bfloat16)
    expect(_is_int(per_gpu_bytes), f"per_gpu_bytes should be an int, got {per_gpu_bytes!r}")
    expect(
        per_gpu_bytes != total // 16,
        "your answer is half the right one: Llama-3-70B has only 8 kv heads, 16 GPUs cannot "
        "split them 16 ways, each GPU keeps one whole kv head (replicated twice)",
    )
    expect(
        per_gpu_bytes != total,
        "that is the whole cache: each GPU holds a share of the heads",
    )
    expect(
        per_gpu_bytes == want,
        f"not quite: one kv head per GPU, 2 * L * 1 * D * 2 bytes per token (got "
        f"{per_gpu_bytes / GB:.3f} GB)",
    )
    correct(
        "your per-GPU bytes match kvlib.memory: with 8 kv heads on 16 GPUs, every kv head is "
        "stored twice"
    )


def check_mla(mla_bytes: int, ratio: float) -> None:
    """DeepSeek-V2: MLA bytes per token (bf16) and how many times smaller than its MHA form."""
    want = kv_bytes_per_token("DeepSeek-V2", torch.bfloat16)
    mha = get_model("DeepSeek-V2").kv_bytes_per_token(torch.bfloat16)
    expect(_is_int(mla_bytes), f"mla_bytes should be an int, got {mla_bytes!r}")
    expect(
        mla_bytes != mha,
        "that is the MHA cache (2 * L * H * D * 2): MLA caches d_c + d_r numbers per layer",
    )
    expect(
        mla_bytes == want,
        "not quite: MLA caches L * (kv_lora_rank + rope_head_dim) numbers of 2 bytes per token",
    )
    expect(
        isinstance(ratio, (int, float)) and abs(ratio - mha / want) < 0.01,
        f"the ratio should be MHA bytes / MLA bytes per token, got {ratio!r}",
    )
    correct(
        "your MLA bytes per token and your ratio to multi-head attention both match kvlib.memory"
    )
