"""kvlib's Transformer against Hugging Face's LlamaForCausalLM (random init, offline, eager)."""

import pytest
import torch

from kvlib.config import ModelConfig
from kvlib.generate import generate
from kvlib.hf import (
    WeightLoadError,
    config_from_hf,
    convert_state_dict,
    from_hf_llama,
    hf_config,
)
from kvlib.kv_cache import KVCache

transformers = pytest.importorskip("transformers")

ATOL = 1e-5


def hf_llama(n_heads=4, n_kv_heads=2, tie=False, seed=0, **kw):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=64,
        rope_theta=500.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        attn_implementation="eager",
        **kw,
    )
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # larger weights than the default init: peaky logits, varied tokens
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
    return model


def hf_forward(model, tokens, cache):
    """HF forward with a DynamicCache (positional: the keyword was renamed across versions)."""
    return model(tokens, None, None, cache, use_cache=True).logits


KINDS = [(4, 4, False), (4, 2, False), (4, 1, True)]  # MHA, GQA, MQA (tied embeddings)


def test_config_from_hf_reads_every_field():
    hf = hf_llama(4, 2, tie=True)
    c = config_from_hf(hf.config)
    assert (c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads) == (96, 32, 2, 4, 2)
    assert (c.head_dim, c.ffn_dim, c.max_seq_len) == (8, 80, 64)
    assert (c.rope_theta, c.norm_eps, c.tie_embeddings) == (500.0, 1e-5, True)


@pytest.mark.parametrize("H,K,tie", KINDS, ids=["MHA", "GQA", "MQA"])
def test_logits_and_cache_match_hf_at_prefill_and_every_decode_step(H, K, tie):
    hf = hf_llama(H, K, tie)
    model = from_hf_llama(hf)
    assert model.config.attention_kind == {4: "MHA", 2: "GQA", 1: "MQA"}[K]
    prompt = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    hf_cache = transformers.DynamicCache(config=hf.config)
    cache = KVCache.from_config(model.config, 2, 40)
    worst = 0.0
    with torch.no_grad():
        ref, ours = hf_forward(hf, prompt, hf_cache), model(prompt, cache)
        diffs = [(ref - ours).abs().max().item()]
        tok = ref[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        for _ in range(12):
            ref, ours = hf_forward(hf, tok, hf_cache), model(tok, cache)
            diffs.append((ref - ours).abs().max().item())
            tok = ref[:, -1].argmax(-1, keepdim=True)
    worst = max(diffs)
    assert worst < ATOL, f"max |logit diff| vs HF = {worst:.3g} (per step {diffs})"
    for layer in range(model.config.n_layers):
        hk, hv = hf_cache.layers[layer].keys, hf_cache.layers[layer].values  # (B, K, S, D)
        S = hk.shape[2]
        assert cache.seq_len == S == 9 + 12
        dk = (cache.keys[layer][:, :, :S] - hk).abs().max().item()
        dv = (cache.values[layer][:, :, :S] - hv).abs().max().item()
        assert max(dk, dv) < ATOL, f"layer {layer}: cached K diff {dk:.3g}, V diff {dv:.3g}"


@pytest.mark.parametrize("H,K,tie", KINDS, ids=["MHA", "GQA", "MQA"])
def test_greedy_tokens_match_hf_generate(H, K, tie):
    hf = hf_llama(H, K, tie, seed=2)
    model = from_hf_llama(hf)
    prompt = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf.generate(
            prompt, max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None
        )
    ours = generate(model, prompt, 20)
    assert torch.equal(ours, ref), f"kvlib {ours.tolist()} vs HF {ref.tolist()}"


def test_state_dict_with_config_loads_like_the_model():
    hf = hf_llama()
    a = from_hf_llama(hf)
    b = from_hf_llama(hf.state_dict(), config_from_hf(hf.config))
    tokens = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        diff = (a(tokens) - b(tokens)).abs().max().item()
    # Exact on every CPU: the same weights in the same architecture run the same ops.
    assert diff == 0.0, f"same weights, different logits: {diff}"


def test_loaded_model_keeps_the_weights_dtype():
    hf = hf_llama().to(torch.bfloat16)
    model = from_hf_llama(hf)
    assert model.dtype == torch.bfloat16
    assert model.rope_cos.dtype == torch.float32


def test_missing_key_raises():
    hf = hf_llama()
    sd = dict(hf.state_dict())
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(
        WeightLoadError, match=r"missing kvlib weights \['layers.1.mlp.w3.weight'\]"
    ):
        from_hf_llama(sd, config_from_hf(hf.config))


def test_unexpected_key_raises():
    hf = hf_llama()
    sd = dict(hf.state_dict())
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    with pytest.raises(WeightLoadError, match=r"unexpected keys \['model.layers.0.self_attn"):
        convert_state_dict(sd, config_from_hf(hf.config))


def test_config_with_fewer_layers_than_the_weights_raises():
    hf = hf_llama()
    config = config_from_hf(hf.config).replace(n_layers=1)
    with pytest.raises(WeightLoadError, match="unexpected keys.*model.layers.1"):
        from_hf_llama(hf.state_dict(), config)


def test_wrong_shape_raises():
    hf = hf_llama(4, 2)
    config = config_from_hf(hf.config).replace(n_kv_heads=4)  # weights are GQA, config says MHA
    with pytest.raises(
        WeightLoadError, match=r"layers.0.attn.wk.weight: expected shape \(32, 32\)"
    ):
        from_hf_llama(hf.state_dict(), config)


def test_state_dict_without_config_raises():
    with pytest.raises(ValueError, match="needs config="):
        from_hf_llama({"model.norm.weight": torch.ones(4)})


def test_wrong_input_type_raises():
    with pytest.raises(TypeError, match="expected a Hugging Face model"):
        from_hf_llama(42)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("hidden_act", "gelu", "SwiGLU"),
        ("attention_bias", True, "no biases"),
        ("mlp_bias", True, "no biases"),
    ],
)
def test_unsupported_hf_configs_raise(field, value, message):
    config = transformers.LlamaConfig(
        vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, **{field: value}
    )
    with pytest.raises(ValueError, match=message):
        config_from_hf(config)


def test_scaled_rope_is_rejected():
    config = transformers.LlamaConfig(vocab_size=8, hidden_size=8, num_attention_heads=2)
    config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="rope_type='linear'"):
        config_from_hf(config)


def test_non_llama_config_is_rejected():
    class Fake:
        model_type = "gpt2"

    with pytest.raises(ValueError, match="model_type='gpt2'"):
        config_from_hf(Fake())


def test_kvlib_imports_without_touching_transformers():
    import subprocess
    import sys

    code = (
        "import sys, kvlib, kvlib.hf, kvlib.transformer, kvlib.generate; "
        "assert 'transformers' not in sys.modules, 'transformers was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_model_config_roundtrip_for_plain_config():
    # A kvlib config survives being described to HF and read back.
    c = ModelConfig(vocab_size=50, dim=24, n_layers=1, n_heads=6, n_kv_heads=3, max_seq_len=32)
    hf = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=24,
        intermediate_size=c.ffn_dim,
        num_hidden_layers=1,
        num_attention_heads=6,
        num_key_value_heads=3,
        max_position_embeddings=32,
        rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta,
    )
    back = config_from_hf(hf)
    assert back.replace(name="") == c.replace(name="")


def test_non_llama_config_raises():
    config = hf_llama().config
    config.model_type = "mistral"
    with pytest.raises(
        ValueError, match="only Llama-architecture configs load, got model_type='mistral'"
    ):
        config_from_hf(config)


def test_config_from_a_dict_equals_config_from_the_object():
    hf_config = hf_llama().config
    assert config_from_hf(hf_config.to_dict()) == config_from_hf(hf_config)
    assert config_from_hf(hf_config.to_dict()).vocab_size == hf_config.vocab_size == 96
    with pytest.raises(ValueError, match=r"lacks \['hidden_size'\]"):
        config_from_hf({k: v for k, v in hf_config.to_dict().items() if k != "hidden_size"})


HF_CASES = [
    ModelConfig(vocab_size=50, dim=24, n_layers=1, n_heads=6, n_kv_heads=3, max_seq_len=32),
    ModelConfig(
        vocab_size=96,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=1,
        head_dim=16,  # not dim // n_heads
        ffn_dim=40,
        max_seq_len=64,
        rope_theta=500.0,
        norm_eps=1e-6,
        tie_embeddings=True,
    ),
]


@pytest.mark.parametrize("config", HF_CASES)
def test_hf_config_roundtrips_through_config_from_hf(config):
    back = config_from_hf(hf_config(config))
    assert back.replace(name="") == config.replace(name=""), f"{back} != {config}"


def test_a_model_from_hf_config_loads_into_kvlib_with_the_same_logits():
    config = HF_CASES[1]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config(config, attn_implementation="eager")).eval()
    ours = from_hf_llama(model)
    assert ours.config.replace(name="") == config.replace(name="")
    tokens = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        diff = (model(tokens).logits - ours(tokens)).abs().max().item()
    assert diff < ATOL, f"max logit difference {diff:.3e}"


def test_hf_config_needs_a_kvlib_config():
    with pytest.raises(TypeError, match="config must be a kvlib ModelConfig, got dict"):
        hf_config({"vocab_size": 3})
