"""kvlib.memory: published figures, invariants, the formulas against real tensors, misuse."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlib.config import dtype_bytes, tiny
from kvlib.errors import UnknownNameError
from kvlib.kv_cache import KVCache
from kvlib.memory import (
    EXTRAS,
    GB,
    GPUS,
    MODELS,
    SOURCES,
    DoesNotFitError,
    GiB,
    KiB,
    KVQuant,
    attention_kind,
    cached_tokens,
    extras,
    format_bytes,
    get_gpu,
    get_model,
    kv_bytes_per_token,
    kv_cache_bytes,
    kv_heads_per_gpu,
    max_batch,
    max_context,
    memory_budget,
    n_params,
    weight_bytes,
)
from kvlib.registry import gpt_n_params

BIB = Path(__file__).resolve().parent.parent / "book" / "references.bib"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# ---- published figures (units stated in each assertion) ----------------------------------


@pytest.mark.parametrize("name", ["OPT-13B", "LLaMA-13B", "Llama-2-13B"])
def test_13b_bytes_per_token_vllm(name):
    # vLLM paper, section 3: 2 (K and V) * 5120 (hidden) * 40 (layers) * 2 (fp16 bytes) = "800 KB".
    config = get_model(name)
    by_hand = 2 * config.dim * config.n_layers * 2
    got = kv_bytes_per_token(name, torch.float16)
    assert got == by_hand == 819_200, f"{name}: {got} bytes per token, by hand {by_hand}"
    assert got / KiB == 800, f"{got / KiB} KiB: the paper's '800 KB' is binary (KiB)"


def test_13b_sequence_of_2048_tokens():
    # "up to 2048 tokens ... as much as 1.6 GB": 1.68e9 bytes, i.e. 1.7 GB or 1.6 GiB.
    got = kv_cache_bytes("LLaMA-13B", 2048, 1, torch.float16)
    assert round(got / GB, 1) == 1.7, f"{got / GB} GB"
    assert round(got / GiB, 1) == 1.6, f"{got / GiB} GiB"


def test_mha_vs_gqa_at_32k_bf16():
    # A 4096-dim, 32-layer model at 32768 tokens in bf16: MHA 17.18 GB, GQA with 8 kv heads 4.29 GB.
    mha = kv_cache_bytes("Llama-2-7B", 32768, 1, torch.bfloat16)
    gqa = kv_cache_bytes("Llama-3-8B", 32768, 1, torch.bfloat16)
    assert (get_model("Llama-2-7B").dim, get_model("Llama-3-8B").n_kv_heads) == (4096, 8)
    assert round(mha / GB, 2) == 17.18, f"MHA {mha / GB} GB"
    assert round(gqa / GB, 2) == 4.29, f"GQA {gqa / GB} GB"
    assert mha == 4 * gqa, f"G = 4 should cut the cache 4x, got {mha / gqa}"


def test_llama2_13b_at_8192_bf16():
    got = kv_cache_bytes("Llama-2-13B", 8192, 1, torch.bfloat16)
    assert round(got / GB, 1) == 6.7, f"{got / GB} GB"


def test_7b_on_h100_claims():
    # "A 7B model on an H100-80GB holds ~121K tokens at batch 1, ~30K per sequence at batch 4"
    # holds for Llama-2-7B (MHA), fp16 weights and cache, 80 GiB, 10% reserved (vLLM's 0.9).
    kwargs = dict(reserved_fraction=0.1)
    b1 = max_context("Llama-2-7B", "H100-80", 1, torch.float16, **kwargs)
    b4 = max_context("Llama-2-7B", "H100-80", 4, torch.float16, **kwargs)
    assert b1 // 1000 == 121, f"batch 1: {b1} tokens"
    assert b4 // 1000 == 30, f"batch 4: {b4} tokens per sequence"
    # The same budget with a GQA 8B model holds about 4x more: the claim is about MHA.
    gqa = max_context("Llama-3-8B", "H100-80", 1, torch.float16, **kwargs)
    assert gqa > 3 * b1, f"Llama-3-8B {gqa} vs Llama-2-7B {b1}"


def test_mistral_rolling_buffer_saves_8x_at_32k():
    # Mistral 7B paper: a 4096-token window cuts cache memory 8x on a 32k-token sequence.
    full = kv_cache_bytes("Mistral-7B", 32768, window=None)
    rolling = kv_cache_bytes("Mistral-7B", 32768)
    assert full == 8 * rolling, f"full {full} vs rolling {rolling} bytes"


def test_deepseek_v2_mla_cache():
    # DeepSeek-V2 Table 1: MLA caches (d_c + d_r) * l ~= 9/2 * d_h * l numbers per token.
    config, mla = get_model("DeepSeek-V2"), extras("DeepSeek-V2").mla
    per_token = kv_bytes_per_token("DeepSeek-V2", torch.bfloat16) // 2
    assert per_token == (mla.kv_lora_rank + mla.rope_head_dim) * config.n_layers
    assert per_token == 9 * config.head_dim * config.n_layers // 2, per_token
    assert attention_kind("DeepSeek-V2") == "MLA"
    # Against DeepSeek 67B in bf16, MLA alone saves 82%; with ~6-bit elements 93.3%,
    # the reduction the paper reports.
    base = kv_bytes_per_token("DeepSeek-LLM-67B", torch.bfloat16)
    six_bit = kv_bytes_per_token(
        "DeepSeek-V2", quant=KVQuant(6, mla.elements_per_token_per_layer, 0)
    )
    assert round(100 * (1 - per_token * 2 / base)) == 82
    assert round(100 * (1 - six_bit / base), 1) == 93.3, six_bit / base


def test_published_parameter_counts():
    assert round(n_params("Llama-2-7B") / 1e9, 2) == 6.74
    assert round(n_params("GPT-2") / 1e6) == 124
    assert round(n_params("GPT-2-XL") / 1e9, 2) == 1.56
    assert weight_bytes("Llama-2-7B", torch.float16) == 2 * n_params("Llama-2-7B")


# ---- formulas against reference implementations -------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    n_layers=st.integers(1, 3),
    n_kv_heads=st.sampled_from([1, 2, 4]),
    group=st.sampled_from([1, 2]),
    head_dim=st.sampled_from([2, 8, 16]),
    batch=st.integers(1, 3),
    seq_len=st.integers(1, 40),
    dtype=st.sampled_from(DTYPES),
)
def test_formula_matches_allocated_cache(
    n_layers, n_kv_heads, group, head_dim, batch, seq_len, dtype
):
    config = tiny(
        n_layers=n_layers,
        n_heads=n_kv_heads * group,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        max_seq_len=seq_len,
    )
    cache = KVCache.from_config(config, batch, seq_len, dtype=dtype)
    formula = kv_cache_bytes(config, seq_len, batch, dtype)
    assert formula == cache.nbytes_allocated, (
        f"formula {formula} vs allocated {cache.nbytes_allocated}: "
        f"max diff {abs(formula - cache.nbytes_allocated)} bytes"
    )


def test_gpt_parameter_formula_matches_transformers():
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    )
    got = sum(p.numel() for p in gpt2.parameters())
    want = gpt_n_params(64, 32, 2, 4 * 32, 16)
    assert got == want, f"GPT-2: transformers {got} vs formula {want}, diff {got - want}"
    opt = transformers.OPTForCausalLM(
        transformers.OPTConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=4,
            max_position_embeddings=16,
            word_embed_proj_dim=32,
        )
    )
    got = sum(p.numel() for p in opt.parameters())
    want = gpt_n_params(64, 32, 2, 64, 16 + 2)
    assert got == want, f"OPT: transformers {got} vs formula {want}, diff {got - want}"


def test_quant_16_bits_without_overhead_equals_fp16():
    for name in MODELS:
        plain = kv_bytes_per_token(name, torch.float16)
        quant = kv_bytes_per_token(name, quant=KVQuant(16, 64, 0))
        assert plain == quant, f"{name}: fp16 {plain} vs 16-bit quant {quant}"


def test_quant_overhead_per_group():
    # int4 with an fp16 scale and zero point per 32 numbers: 0.5 + 4/32 = 0.625 bytes each.
    q = KVQuant(4, 32, 4)
    got = kv_bytes_per_token("Llama-3-8B", quant=q)
    elements = get_model("Llama-3-8B").kv_elements_per_token
    assert got * 8 == elements * 5, f"{got} bytes for {elements} numbers"


# ---- invariants --------------------------------------------------------------------------

names = st.sampled_from(sorted(MODELS))


@settings(max_examples=60, deadline=None)
@given(name=names, s=st.integers(0, 10**6), b=st.integers(1, 64), k=st.integers(2, 5))
def test_linear_in_length_and_batch(name, s, b, k):
    one = kv_cache_bytes(name, s, 1, window=None)
    assert kv_cache_bytes(name, s, b, window=None) == b * one
    assert kv_cache_bytes(name, k * s, 1, window=None) == k * one
    assert one == s * kv_bytes_per_token(name)


@settings(max_examples=60, deadline=None)
@given(name=names, s=st.integers(0, 10**6), w=st.integers(1, 10**5))
def test_window_caps_the_cache(name, s, w):
    assert cached_tokens(name, s, w) == min(s, w)
    assert kv_cache_bytes(name, s, window=w) == kv_cache_bytes(name, min(s, w), window=None)


@pytest.mark.parametrize("name", ["Llama-2-7B", "Llama-3-70B", "Qwen2.5-7B", "DeepSeek-V2"])
@pytest.mark.parametrize("tp", [1, 2, 4, 8, 16])
def test_tensor_parallel_split_and_replication(name, tp):
    config = get_model(name)
    total = kv_bytes_per_token(name)
    per_gpu = kv_bytes_per_token(name, tp=tp)
    if extras(name).mla is not None:
        assert per_gpu == total, "an MLA latent is replicated on every GPU"
    elif tp <= config.n_kv_heads:
        assert per_gpu * tp == total, f"{per_gpu} * {tp} != {total}"
    else:  # one kv head per GPU, each replicated tp / K times
        assert kv_heads_per_gpu(name, tp) == 1
        assert per_gpu * config.n_kv_heads == total
        assert per_gpu * tp > total


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(["Llama-2-7B", "Llama-3-8B", "Qwen2.5-7B", "GPT-2", "OPT-13B"]),
    gpu=st.sampled_from(["A100-80", "H100-80", "H200-141", "MI300X"]),
    batch=st.integers(1, 32),
    reserved=st.floats(0.0, 0.3),
)
def test_max_context_is_the_largest_that_fits(name, gpu, batch, reserved):
    n = max_context(name, gpu, batch, reserved_fraction=reserved)
    free = memory_budget(name, gpu, reserved_fraction=reserved).kv
    assert kv_cache_bytes(name, n, batch) <= free
    assert kv_cache_bytes(name, n + 1, batch) > free
    assert max_context(name, gpu, batch + 1, reserved_fraction=reserved) <= n
    if n > 0:
        assert max_batch(name, gpu, n, reserved_fraction=reserved) >= batch


def test_max_batch_boundary():
    b = max_batch("Llama-3-8B", "A100-80", 8192, reserved_fraction=0.1)
    free = memory_budget("Llama-3-8B", "A100-80", reserved_fraction=0.1).kv
    assert kv_cache_bytes("Llama-3-8B", 8192, b) <= free < kv_cache_bytes("Llama-3-8B", 8192, b + 1)


def test_window_that_fits_gives_unbounded_context():
    assert max_context("Mistral-7B", "A100-80") == math.inf
    finite = max_context("Mistral-7B", "A100-80", window=None)
    assert finite > get_model("Mistral-7B").max_seq_len, finite


def test_budget_adds_up():
    b = memory_budget("Llama-2-13B", "A100-40", reserved_bytes=2 * GiB, reserved_fraction=0.05)
    assert b.weights + b.reserved + b.kv == b.memory == get_gpu("A100-40").memory_bytes
    assert b.reserved == 2 * GiB + int(0.05 * b.memory)


# ---- registries --------------------------------------------------------------------------


def test_registries_are_consistent():
    assert set(SOURCES) == set(MODELS), set(SOURCES) ^ set(MODELS)
    assert set(EXTRAS) <= set(MODELS), set(EXTRAS) - set(MODELS)
    for name, config in MODELS.items():
        assert config.name == name
    for name, gpu in GPUS.items():
        assert gpu.name == name
        assert gpu.bandwidth > 0 and gpu.peak_flops > 0
        # datasheets write "80 GB" for 80 GiB of memory
        published = float(re.match(r"[\d.]+", gpu.memory_published).group())
        assert gpu.memory_bytes == published * GiB, f"{name}: {gpu.memory_bytes} bytes"


def test_sources_are_in_the_bibliography():
    keys = set(re.findall(r"@\w+\{([^,\s]+),", BIB.read_text()))
    cited = set(SOURCES.values()) | {g.source for g in GPUS.values()}
    assert cited <= keys, f"missing from {BIB.name}: {sorted(cited - keys)}"


def test_modified_config_drops_published_extras():
    changed = get_model("Mistral-7B").replace(n_kv_heads=32)
    assert extras(changed).sliding_window is None
    assert extras("Mistral-7B").sliding_window == 4096


def test_lookups_are_case_insensitive():
    assert get_model("llama-2-7b") is MODELS["Llama-2-7B"]
    assert get_gpu("h100-80") is GPUS["H100-80"]


def test_format_bytes_shows_both_units():
    assert format_bytes(1_677_721_600) == "1.68 GB (1.56 GiB)"
    assert format_bytes(819_200) == "819.20 KB (800.00 KiB)"


# ---- misuse ------------------------------------------------------------------------------


def test_unknown_model_suggests_closest():
    with pytest.raises(UnknownNameError, match=r"unknown model 'Llama-2-7b-chat'.*Llama-2-7B"):
        get_model("Llama-2-7b-chat")
    with pytest.raises(KeyError, match="did you mean"):
        kv_bytes_per_token("Mistral7B")


def test_unknown_gpu_suggests_closest():
    with pytest.raises(UnknownNameError, match=r"unknown GPU 'H100'; did you mean H100-80"):
        max_context("Llama-2-7B", "H100")


def test_weights_that_do_not_fit():
    with pytest.raises(DoesNotFitError, match="Llama-2-70B does not fit on T4"):
        max_context("Llama-2-70B", "T4")
    with pytest.raises(DoesNotFitError, match="does not fit on A100-80"):
        max_batch("Llama-2-7B", "A100-80", 1024, reserved_fraction=0.9)
    # ... and fits once split over 8 GPUs
    assert max_context("Llama-2-70B", "A100-80", tp=8) > 0


def test_negative_length_and_bad_batch():
    with pytest.raises(ValueError, match="seq_len must be an int >= 0, got -1"):
        kv_cache_bytes("Llama-2-7B", -1)
    with pytest.raises(ValueError, match="batch must be an int >= 1, got 0"):
        kv_cache_bytes("Llama-2-7B", 10, 0)
    with pytest.raises(ValueError, match="batch must be an int >= 1, got 0"):
        max_context("Llama-2-7B", "A100-80", 0)
    with pytest.raises(ValueError, match="seq_len must be an int >= 1, got 0"):
        max_batch("Llama-2-7B", "A100-80", 0)
    with pytest.raises(TypeError, match="seq_len must be an int"):
        kv_cache_bytes("Llama-2-7B", 10.5)
    with pytest.raises(TypeError, match="batch must be an int"):
        kv_cache_bytes("Llama-2-7B", 10, True)


def test_bad_window_tp_reserve_and_types():
    with pytest.raises(ValueError, match="window must be an int >= 1, got 0"):
        kv_cache_bytes("Llama-2-7B", 10, window=0)
    with pytest.raises(ValueError, match="tp=3 GPUs cannot share 8 kv heads"):
        kv_bytes_per_token("Llama-3-8B", tp=3)
    with pytest.raises(ValueError, match="tp must be an int >= 1"):
        weight_bytes("Llama-3-8B", tp=0)
    with pytest.raises(ValueError, match=r"reserved_fraction must be in \[0, 1\)"):
        memory_budget("Llama-3-8B", "H100-80", reserved_fraction=1.5)
    with pytest.raises(ValueError, match="reserved_bytes must be an int >= 0"):
        memory_budget("Llama-3-8B", "H100-80", reserved_bytes=-1)
    with pytest.raises(TypeError, match="expected a ModelConfig or a model name"):
        kv_bytes_per_token(42)
    with pytest.raises(TypeError, match="expected a GPU or a GPU name"):
        max_context("Llama-3-8B", 80)
    with pytest.raises(TypeError, match="expected a torch.dtype"):
        kv_bytes_per_token("Llama-3-8B", "fp16")
    with pytest.raises(ValueError, match="a byte count must be >= 0"):
        format_bytes(-1)


def test_bad_quant():
    with pytest.raises(ValueError, match=r"bits must be an int in \[1, 32\]"):
        KVQuant(0, 32)
    with pytest.raises(ValueError, match="group_size must be an int >= 1"):
        KVQuant(4, 0)
    with pytest.raises(ValueError, match="overhead_bytes must be an int >= 0"):
        KVQuant(4, 32, -2)
    with pytest.raises(ValueError, match="does not split into groups of 100"):
        kv_bytes_per_token("Llama-3-8B", quant=KVQuant(4, 100))
    with pytest.raises(ValueError, match="not a whole number of bytes"):
        kv_bytes_per_token(tiny(n_heads=2, n_kv_heads=1, head_dim=2), quant=KVQuant(3, 1, 0))
    with pytest.raises(TypeError, match="quant must be a KVQuant"):
        kv_bytes_per_token("Llama-3-8B", quant=4)


def test_dtype_bytes_used_for_weights():
    for dtype in DTYPES:
        assert weight_bytes("GPT-2", dtype) == n_params("GPT-2") * dtype_bytes(dtype)


# ---- usable memory -----------------------------------------------------------------------


def test_usable_memory_is_below_the_label_and_sourced():
    keys = set(re.findall(r"@\w+\{([^,\s]+),", BIB.read_text()))
    recorded = [g for g in GPUS.values() if g.memory_usable_bytes is not None]
    assert {g.name for g in recorded} >= {"T4", "H100-80"}
    for gpu in recorded:
        assert 0.9 * gpu.memory_bytes < gpu.memory_usable_bytes < gpu.memory_bytes, gpu.name
        assert gpu.usable_source in keys, f"{gpu.name}: source {gpu.usable_source!r} not in bib"
        assert gpu.usable().memory_bytes == gpu.usable_bytes == gpu.memory_usable_bytes
    for gpu in GPUS.values():
        if gpu.memory_usable_bytes is None:
            assert gpu.usable() is gpu and gpu.usable_bytes == gpu.memory_bytes


def test_gddr_with_ecc_gives_up_a_sixteenth():
    # CUDA Best Practices Guide: GDDR with ECC on loses 6.25% of its capacity
    t4 = get_gpu("T4")
    assert t4.usable_bytes == 15 * GiB == t4.memory_bytes * 15 // 16
    for name in ["L4", "A10"]:
        g = get_gpu(name)
        assert abs(g.usable_bytes / (g.memory_bytes * 15 / 16) - 1) < 0.001, name


def test_llama2_7b_on_a_t4_gets_about_2k_tokens_not_4k():
    label = max_context("Llama-2-7B", "T4", reserved_fraction=0.1)
    usable = max_context("Llama-2-7B", get_gpu("T4").usable(), reserved_fraction=0.1)
    assert 3500 < label < 4500 and 1500 < usable < 2500, (label, usable)
    # the formulas read memory_bytes only: a GPU name still means the label
    assert max_context("Llama-2-7B", "H100-80") > max_context(
        "Llama-2-7B", get_gpu("H100-80").usable()
    )


def test_kvquant_and_quantscheme_count_the_same_bytes_for_the_same_format():
    from kvlib.quant_scheme import SCHEMES

    config = get_model("Llama-3-8B")
    L, K, D = config.n_layers, config.n_kv_heads, config.head_dim
    int8 = SCHEMES["int8 per-token"]  # symmetric: one fp32 scale per token and head
    assert int8.bytes_per_token(D, K, L) == kv_bytes_per_token(config, quant=KVQuant(8, D, 4))
    int4 = SCHEMES["int4 per-token"]  # asymmetric: fp32 scale and zero point
    assert int4.bytes_per_token(D, K, L) == kv_bytes_per_token(config, quant=KVQuant(4, D, 8))
