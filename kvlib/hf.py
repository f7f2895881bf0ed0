"""Load Hugging Face Llama-family weights into a kvlib `Transformer`.

Both sides use the same "rotate_half" RoPE layout and (out, in) linear weights, so loading is
a renaming; no tensor is permuted or reshaped:

    model.embed_tokens.weight                    (V, C)    -> tok_embeddings.weight
    model.layers.{i}.self_attn.q_proj.weight     (H*D, C)  -> layers.{i}.attn.wq.weight
    model.layers.{i}.self_attn.k_proj.weight     (K*D, C)  -> layers.{i}.attn.wk.weight
    model.layers.{i}.self_attn.v_proj.weight     (K*D, C)  -> layers.{i}.attn.wv.weight
    model.layers.{i}.self_attn.o_proj.weight     (C, H*D)  -> layers.{i}.attn.wo.weight
    model.layers.{i}.mlp.gate_proj.weight        (F, C)    -> layers.{i}.mlp.w1.weight
    model.layers.{i}.mlp.up_proj.weight          (F, C)    -> layers.{i}.mlp.w3.weight
    model.layers.{i}.mlp.down_proj.weight        (C, F)    -> layers.{i}.mlp.w2.weight
    model.layers.{i}.input_layernorm.weight      (C,)      -> layers.{i}.attn_norm.weight
    model.layers.{i}.post_attention_layernorm.weight (C,)  -> layers.{i}.mlp_norm.weight
    model.norm.weight                            (C,)      -> norm.weight
    lm_head.weight                               (V, C)    -> output.weight (absent when tied)

Loading never imports `transformers`: a model is read through `.config` and `.state_dict()`
only, so kvlib works without it installed. The other direction: `to_hf_state_dict` renames a
kvlib state dict back to these names (the same table, read the other way), `hf_fields` gives
the config fields, and `hf_config(config)` builds a `transformers.LlamaConfig` from them (and
imports transformers to do it). `kvlib.export` writes a whole checkpoint folder with them.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace

import torch

from kvlib.config import ModelConfig
from kvlib.errors import KVLibTypeError, KVLibValueError, WeightLoadError
from kvlib.transformer import Transformer, check_state_dict

# The fields of a Hugging Face Llama config that a kvlib ModelConfig needs.
_HF_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "rms_norm_eps",
)


# Hugging Face name -> kvlib name: the whole model, then each layer's (after "model.layers.{i}.").
_TOP_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn.wq.weight",
    "self_attn.k_proj.weight": "attn.wk.weight",
    "self_attn.v_proj.weight": "attn.wv.weight",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "mlp.gate_proj.weight": "mlp.w1.weight",
    "mlp.up_proj.weight": "mlp.w3.weight",
    "mlp.down_proj.weight": "mlp.w2.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
}


def config_from_hf(hf_config) -> ModelConfig:
    """A kvlib `ModelConfig` from a `transformers.LlamaConfig`, an object with its fields, or
    a dict of them (a checkpoint's config.json)."""
    if isinstance(hf_config, Mapping):
        hf_config = SimpleNamespace(**hf_config)
    model_type = getattr(hf_config, "model_type", "llama")
    if model_type != "llama":
        raise KVLibValueError(
            f"only Llama-architecture configs load, got model_type={model_type!r}"
        )
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise KVLibValueError(f"kvlib's MLP is SwiGLU (silu); this config uses hidden_act={act!r}")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf_config, flag, False):
            raise KVLibValueError(f"kvlib layers have no biases; this config sets {flag}=True")
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    legacy = getattr(hf_config, "rope_scaling", None)  # transformers 4.x
    rope_type = rope.get("rope_type", (legacy or {}).get("rope_type", "default"))
    if rope_type != "default":
        raise KVLibValueError(
            f"only plain RoPE is supported, this config uses rope_type={rope_type!r}"
        )
    missing = [name for name in _HF_REQUIRED if not hasattr(hf_config, name)]
    if missing:
        raise KVLibValueError(
            f"a Llama config needs the fields {list(_HF_REQUIRED)}; "
            f"{type(hf_config).__name__} lacks {missing}"
        )
    theta = getattr(hf_config, "rope_theta", None) or rope.get("rope_theta", 10000.0)
    return ModelConfig(
        vocab_size=hf_config.vocab_size,
        dim=hf_config.hidden_size,
        n_layers=hf_config.num_hidden_layers,
        n_heads=hf_config.num_attention_heads,
        n_kv_heads=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
        head_dim=getattr(hf_config, "head_dim", None),
        ffn_dim=hf_config.intermediate_size,
        max_seq_len=hf_config.max_position_embeddings,
        rope_theta=float(theta),
        norm_eps=float(hf_config.rms_norm_eps),
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        name=str(getattr(hf_config, "name_or_path", "") or "hf-llama"),
    )


def hf_fields(config: ModelConfig) -> dict:
    """The `transformers.LlamaConfig` fields of a kvlib `ModelConfig`: the inverse of
    `config_from_hf` (same shapes, RoPE base, norm epsilon and embedding tying)."""
    if not isinstance(config, ModelConfig):
        raise KVLibTypeError(f"config must be a kvlib ModelConfig, got {type(config).__name__}")
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        intermediate_size=config.ffn_dim,
        max_position_embeddings=config.max_seq_len,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
    )


def hf_config(config: ModelConfig, **overrides):
    """A `transformers.LlamaConfig` with the shapes of a kvlib `ModelConfig` (imports
    transformers, which must be installed). No bos/eos token ids (kvlib's models have none);
    `overrides` are passed on, e.g. `attn_implementation="eager"`."""
    import transformers

    fields = hf_fields(config) | {"bos_token_id": None, "eos_token_id": None} | overrides
    return transformers.LlamaConfig(**fields)


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face Llama state dict to kvlib's names, checking every key and shape."""
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for name, tensor in state_dict.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from config.rope_theta
        if name in _TOP_NAMES:
            if not (config.tie_embeddings and name == "lm_head.weight"):
                out[_TOP_NAMES[name]] = tensor
        elif name.startswith("model.layers."):
            index, _, rest = name[len("model.layers.") :].partition(".")
            if rest in _LAYER_NAMES and index.isdigit() and int(index) < config.n_layers:
                out[f"layers.{index}.{_LAYER_NAMES[rest]}"] = tensor
            else:
                unexpected.append(name)
        else:
            unexpected.append(name)
    check_state_dict(out, config, source="state dict", unexpected=unexpected, error=WeightLoadError)
    return out


def to_hf_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """Rename a kvlib state dict to Hugging Face Llama names: the inverse of
    `convert_state_dict`. Every key and shape is checked first; with tied embeddings the
    output weight is left out (HF ties lm_head to model.embed_tokens itself)."""
    if not isinstance(config, ModelConfig):
        raise KVLibTypeError(f"config must be a kvlib ModelConfig, got {type(config).__name__}")
    state = dict(state_dict)
    if config.tie_embeddings:
        state.pop("output.weight", None)  # a tied model's state dict lists the shared tensor twice
    check_state_dict(state, config, source="kvlib state dict", error=WeightLoadError)
    top = {ours: theirs for theirs, ours in _TOP_NAMES.items()}
    layer = {ours: theirs for theirs, ours in _LAYER_NAMES.items()}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name in top:
            out[top[name]] = tensor
        else:  # check_state_dict let through only the names of Transformer(config)
            _, index, rest = name.split(".", 2)  # "layers", "{i}", "attn.wq.weight"
            out[f"model.layers.{index}.{layer[rest]}"] = tensor
    return out


def from_hf_llama(model_or_state_dict, config: ModelConfig | None = None) -> Transformer:
    """A kvlib `Transformer` holding the weights of a Hugging Face Llama model.

    Pass a `transformers.LlamaForCausalLM` (anything with `.config` and `.state_dict()`), or a
    raw state dict together with a kvlib `ModelConfig`. The result has the weights' dtype and
    device and is in eval mode.
    """
    if isinstance(model_or_state_dict, Mapping):
        if config is None:
            raise KVLibValueError("a raw state dict needs config= (a kvlib ModelConfig)")
        state_dict = model_or_state_dict
    elif hasattr(model_or_state_dict, "config") and hasattr(model_or_state_dict, "state_dict"):
        config = config or config_from_hf(model_or_state_dict.config)
        state_dict = model_or_state_dict.state_dict()
    else:
        raise KVLibTypeError(
            "expected a Hugging Face model (with .config and .state_dict()) or a state dict, "
            f"got {type(model_or_state_dict).__name__}"
        )
    if not isinstance(config, ModelConfig):
        raise KVLibTypeError(f"config must be a kvlib ModelConfig, got {type(config).__name__}")
    weights = convert_state_dict(state_dict, config)
    first = weights["tok_embeddings.weight"]
    model = Transformer(config).to(device=first.device, dtype=first.dtype)
    model.load_state_dict(weights, strict=not config.tie_embeddings)
    return model.eval()
