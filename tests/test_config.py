import pytest
import torch

from kvlib import ConfigError, ModelConfig
from kvlib.config import dtype_bytes, tiny
from kvlib.memory import MODELS, get_model, kv_bytes_per_token


def test_defaults_are_derived():
    cfg = ModelConfig(vocab_size=100, dim=64, n_layers=2, n_heads=8)
    assert cfg.n_kv_heads == 8
    assert cfg.head_dim == 8
    assert cfg.ffn_dim % 32 == 0 and cfg.ffn_dim >= 2 * 4 * 64 // 3
    assert cfg.group_size == 1 and cfg.attention_kind == "MHA"


@pytest.mark.parametrize(("kv", "kind", "group"), [(8, "MHA", 1), (2, "GQA", 4), (1, "MQA", 8)])
def test_attention_kind_and_group(kv, kind, group):
    cfg = ModelConfig(vocab_size=10, dim=64, n_layers=1, n_heads=8, n_kv_heads=kv)
    assert cfg.attention_kind == kind
    assert cfg.group_size == group


def test_kv_bytes_per_token_formula():
    cfg = tiny()
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int8):
        expected = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype_bytes(dtype)
        assert cfg.kv_bytes_per_token(dtype) == expected
    assert kv_bytes_per_token(cfg, torch.float16) == cfg.kv_bytes_per_token(torch.float16)


def test_llama2_7b_bytes_per_token_is_half_a_megabyte():
    # 2 (K, V) * 32 layers * 32 heads * 128 dims * 2 bytes = 524,288 bytes (fp16).
    assert kv_bytes_per_token("Llama-2-7B", torch.float16) == 524_288


def test_param_count_llama2_7b():
    # Llama-2-7B has 6.74e9 parameters.
    assert abs(MODELS["Llama-2-7B"].n_params / 6.74e9 - 1) < 0.01


def test_frozen_and_replace_revalidates():
    cfg = tiny()
    with pytest.raises(AttributeError):
        cfg.dim = 3
    assert cfg.replace(n_layers=4).n_layers == 4
    with pytest.raises(ConfigError, match="multiple of n_kv_heads"):
        cfg.replace(n_kv_heads=3)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"n_heads": 6, "n_kv_heads": 4, "head_dim": 8}, "multiple of n_kv_heads"),
        ({"dim": 0}, "dim must be an int >= 1"),
        ({"n_layers": -1}, "n_layers must be an int >= 1"),
        ({"dim": 30, "n_heads": 4, "n_kv_heads": 4}, "not divisible by n_heads"),
        ({"head_dim": 7}, "must be even"),
        ({"head_dim": 0}, "head_dim must be an int >= 1"),
        ({"rope_theta": 0.0}, "rope_theta must be positive"),
        ({"norm_eps": -1e-5}, "norm_eps must be positive"),
    ],
)
def test_invalid_configs_raise(changes, match):
    with pytest.raises(ConfigError, match=match):
        tiny(**changes)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"vocab_size": 2.5}, "vocab_size must be an int, got float 2.5"),
        ({"max_seq_len": True}, "max_seq_len must be an int, got bool True"),
    ],
)
def test_non_integer_sizes_raise_type_error(changes, match):
    with pytest.raises(TypeError, match=match):
        tiny(**changes)


def test_check_int_bounds_and_error_class():
    from kvlib.config import check_int

    assert check_int("n", 0, low=0) == 0
    with pytest.raises(ConfigError, match="n must be an int >= 2, got 1"):
        check_int("n", 1, low=2, error=ConfigError)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_dtype_bytes_rejects_non_dtype():
    with pytest.raises(TypeError, match="torch.dtype"):
        dtype_bytes("float16")


def test_unknown_model_suggests_closest():
    with pytest.raises(KeyError, match="did you mean Llama-2-7B"):
        get_model("Lama-2-7X")


def test_replace_derives_defaults_again_unless_given():
    cfg = ModelConfig(vocab_size=100, dim=64, n_layers=2, n_heads=8)  # head_dim 8, ffn 192, MHA
    wider = cfg.replace(dim=128)
    assert (wider.head_dim, wider.ffn_dim, wider.n_kv_heads) == (16, 352, 8)
    assert cfg.replace(n_heads=4).n_kv_heads == 4  # MHA stays MHA
    explicit = ModelConfig(vocab_size=100, dim=64, n_layers=2, n_heads=8, head_dim=32)
    assert explicit.replace(dim=128).head_dim == 32  # a value that was given is kept
    assert cfg.replace(dim=128, head_dim=4).head_dim == 4
    assert cfg.replace(n_layers=3).head_dim == 8  # unrelated changes leave it alone
