import pytest
import torch

from kvlib.config import tiny
from kvlib.flops import forward_flops, generation_flops
from kvlib.memory import MODELS


def test_forward_flops_is_twice_params_plus_attention():
    # Without attention (S small) a forward pass costs about 2 FLOPs per parameter per token
    # (embeddings are a lookup, not a matmul, so they are left out of the parameter count).
    cfg = MODELS["Llama-2-7B"]
    matmul_params = cfg.n_params - cfg.vocab_size * cfg.dim - (2 * cfg.n_layers + 1) * cfg.dim
    T = 1
    attention = 2 * 2 * T * 1 * cfg.n_heads * cfg.head_dim * cfg.n_layers
    assert forward_flops(cfg, T, 1) == 2 * matmul_params * T + attention


def test_forward_flops_matches_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    cfg = tiny()
    T, S = 3, 7
    c, d, h, k, f = cfg.dim, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim
    x = torch.randn(T, c)
    with FlopCounterMode(display=False) as counter:
        for _ in range(cfg.n_layers):
            q = x @ torch.randn(c, h * d)
            x @ torch.randn(c, 2 * k * d)
            scores = q.reshape(T, h, d).transpose(0, 1) @ torch.randn(h, d, S)
            out = scores @ torch.randn(h, S, d)
            out.transpose(0, 1).reshape(T, h * d) @ torch.randn(h * d, c)
            x @ torch.randn(c, 2 * f)
            torch.randn(T, f) @ torch.randn(f, c)
        x @ torch.randn(c, cfg.vocab_size)
    assert forward_flops(cfg, T, S) == counter.get_total_flops()


def test_cache_saves_quadratic_work():
    cfg = tiny()
    small = generation_flops(cfg, 4, 8, cached=False) / generation_flops(cfg, 4, 8, cached=True)
    large = generation_flops(cfg, 4, 64, cached=False) / generation_flops(cfg, 4, 64, cached=True)
    assert 1 < small < large


def test_generation_flops_sums_forward_passes():
    cfg = tiny()
    assert generation_flops(cfg, 5, 1, cached=True) == forward_flops(cfg, 5)
    assert generation_flops(cfg, 5, 1, cached=False) == forward_flops(cfg, 5)
    two = forward_flops(cfg, 5) + forward_flops(cfg, 1, 6)
    assert generation_flops(cfg, 5, 2, cached=True) == two


@pytest.mark.parametrize(("T", "S"), [(0, 3), (4, 3), (-1, None)])
def test_bad_lengths_raise(T, S):
    with pytest.raises(ValueError, match="need 1 <= T <= S"):
        forward_flops(tiny(), T, S)


def test_bad_generation_lengths_raise():
    with pytest.raises(ValueError, match="prompt_len >= 1"):
        generation_flops(tiny(), 0, 3, cached=True)
