"""A Llama-style decoder that reads and writes a KV cache.

Each block: x + Attention(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)). Attention is grouped-query
(H query heads share K kv heads) with rotary position embeddings (RoPE) in the Llama / Hugging
Face "rotate_half" convention, so Hugging Face Llama weights load without any permutation.

Shapes:
    tokens: (B, T) int64            T new tokens per row
    hidden states x: (B, T, C)
    q: (B, H, T, D)   k, v: (B, K, T, D) new, (B, K, S, D) with the cache
    rope cos, sin: (B, 1, T, D), computed in fp32 for the positions of the T new tokens
        (`rope_cos_sin`) once per forward pass, then cast to the model's dtype
    logits: (B, T, V)

With a cache, the T new tokens sit in slots [S - T, S) of an S-slot history, so the causal mask
is aligned bottom-right (`causal_mask(T, S)`). Left padding (chapter 4) is declared once, on an
empty cache, from an `attention_mask`; a padded row's real tokens get positions 0, 1, ... exactly
as if the row ran alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvlib.attention import causal_mask, grouped_attention, real_slots
from kvlib.cache import Cache, position_ids
from kvlib.config import ModelConfig
from kvlib.errors import KVCacheError, KVLibTypeError, KVLibValueError
from kvlib.rope import apply_rope, rope_cos_sin, rope_tables

# ---- building blocks ---------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, with the mean taken in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's rms_norm on the fp32 upcast: `rms_norm_reference` in one kernel
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # (..., C), one call
        xf = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)  # (..., C) fp32
        return self.weight * xf.to(x.dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm spelled out: x / sqrt(mean(x^2) + eps) in fp32, cast back, times weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., C) fp32
    return weight * xf.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE; writes its new keys and values to a cache."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        C, H, K, D = config.dim, config.n_heads, config.n_kv_heads, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, K, D
        self.wq = nn.Linear(C, H * D, bias=False)
        self.wk = nn.Linear(C, K * D, bias=False)
        self.wv = nn.Linear(C, K * D, bias=False)
        self.wo = nn.Linear(H * D, C, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Cache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). cos and sin (B, 1, T, D) of the tokens' positions come from
        `Transformer.forward`; mask is None (every slot visible) or bool (b, 1, T, S).

        With a cache, the layer makes one call: `cache.attend` stores the new keys and values
        and returns the attention of q over the layer's whole history.
        """
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.wq(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        v = self.wv(x).view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = grouped_attention(q, k, v, mask)  # (B, H, T, D); fp16/bf16 softmax upcast to fp32
        else:
            out = cache.attend(layer, q, k, v, mask)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
        return self.wo(out)


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(config.dim, config.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(config.ffn_dim, config.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm decoder block: attention and MLP, each added to the residual stream."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache=None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


# ---- inputs ------------------------------------------------------------------------------------


def check_tokens(tokens: torch.Tensor, vocab_size: int, name: str = "tokens") -> None:
    """Raise unless `tokens` is a non-empty (B, T) int64/int32 tensor of ids in [0, vocab_size).

    The one token check of kvlib: the model, `generate` (name="prompt"), chunked prefill and
    streaming all call it, so misuse reads the same everywhere.
    """
    if not isinstance(tokens, torch.Tensor):
        raise KVLibTypeError(
            f"{name} must be a torch.Tensor of token ids, got {type(tokens).__name__}"
        )
    if tokens.dtype not in (torch.int64, torch.int32):
        raise KVLibTypeError(f"{name} must be int64 token ids, got {tokens.dtype}")
    if tokens.ndim != 2:
        raise KVLibValueError(
            f"{name} must have shape (B, T), got {tuple(tokens.shape)} "
            f"(add a batch axis with {name}[None])"
        )
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise KVLibValueError(f"empty input: {name} has shape {tuple(tokens.shape)}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        raise KVLibValueError(f"token ids must be in [0, {vocab_size}), got values in [{lo}, {hi}]")


def check_state_dict(
    state: dict[str, torch.Tensor],
    config: ModelConfig,
    *,
    source: str = "state dict",
    unexpected: list[str] | tuple[str, ...] = (),
    error: type[Exception] = ValueError,
) -> None:
    """Raise `error` unless `state` holds exactly the weights of `Transformer(config)`, each of
    the right shape (output.weight left out when the embeddings are tied).

    `unexpected`: names the caller already knows it could not place (reported with the rest).
    The loaders of Hugging Face weights (`kvlib.hf`) and of saved weights (`kvlib.train`) use it.
    """

    def some(names: list[str]) -> str:
        return f"{names[:5]}{'...' if len(names) > 5 else ''}"

    with torch.device("meta"):  # shapes only, no memory
        reference = Transformer(config).state_dict()
    if config.tie_embeddings:
        reference.pop("output.weight")
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(unexpected) | (set(state) - set(reference)))
    if missing or unexpected:
        raise error(
            f"{source} does not match a {config.n_layers}-layer kvlib Transformer: "
            f"unexpected keys {some(unexpected)}, missing kvlib weights {some(missing)}"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(reference[name].shape):
            raise error(
                f"{source}: {name}: expected shape {tuple(reference[name].shape)} for this "
                f"config, got {tuple(tensor.shape)}"
            )


# ---- padding and positions ---------------------------------------------------------------------


def pad_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask of left-padded rows -> (B,) int64 number of padding tokens per row.

    Raises ValueError unless every row is zeros then ones (at least one 1).
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2:
        raise KVLibValueError(
            f"attention_mask must be a (B, T) tensor of 0/1, got "
            f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}"
        )
    m = attention_mask.long()
    if bool(((m != 0) & (m != 1)).any()):
        raise KVLibValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    if m.shape[1] > 1 and bool((m[:, 1:] < m[:, :-1]).any()):
        rows = torch.nonzero((m[:, 1:] < m[:, :-1]).any(1)).flatten().tolist()
        raise KVLibValueError(
            f"attention_mask rows {rows} have a 1 followed by a 0: only LEFT padding is "
            "supported (pad at the start of each row, real tokens last)"
        )
    n_real = m.sum(1)  # (B,)
    if bool((n_real == 0).any()):
        rows = torch.nonzero(n_real == 0).flatten().tolist()
        raise KVLibValueError(f"attention_mask rows {rows} have no real tokens")
    return m.shape[1] - n_real  # (B,)


_positions = position_ids  # forward's keyword argument shadows the name


# ---- the model ---------------------------------------------------------------------------------


class Transformer(nn.Module):
    """Llama-style decoder: embeddings, L blocks, final RMSNorm, output head.

    `forward(tokens, cache=None, attention_mask=None)` returns logits (B, T, V). Without a cache
    the T tokens attend causally to each other; with one, they attend to every cached slot and
    to themselves, and their keys and values are appended to the cache.
    """

    def __init__(self, config: ModelConfig, init_std: float = 0.02) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise KVLibTypeError(f"config must be a kvlib ModelConfig, got {type(config).__name__}")
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.init_weights(init_std)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) for embeddings and projections, ones for the norms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    @property
    def rope_cos(self) -> torch.Tensor:
        """(max_seq_len, D) fp32 cos of every position's RoPE angles, on the model's device."""
        return self._rope_tables()[0]

    @property
    def rope_sin(self) -> torch.Tensor:
        """(max_seq_len, D) fp32 sin of every position's RoPE angles, on the model's device."""
        return self._rope_tables()[1]

    def _rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        return rope_tables(c.head_dim, c.max_seq_len, c.rope_theta, self.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    # ---- checks (all before the cache is touched) -------------------------------------------
    def _check_tokens(self, tokens: torch.Tensor) -> None:
        check_tokens(tokens, self.config.vocab_size)

    def check_cache(self, cache: Cache, B: int, n_fed: int = 0) -> None:
        """Raise unless `cache` is a kvlib cache shaped for this model and B rows, with room
        and positions for `n_fed` more tokens (the checks generate and chunked prefill make
        before a run of several forward passes)."""
        if not isinstance(cache, Cache):
            raise KVLibTypeError(
                f"cache must be a kvlib cache (a kvlib.cache.Cache), got {type(cache).__name__}"
            )
        cache.check_config(self.config)
        if cache.batch_size != B:
            raise KVCacheError(f"cache holds {cache.batch_size} rows, tokens have B={B}")
        if n_fed:
            cache.check_room(n_fed)
            last = cache.max_position(n_fed)
            if last >= self.config.max_seq_len:
                raise KVLibValueError(
                    f"the cache holds {cache.seq_len} tokens; feeding {n_fed} more would reach "
                    f"position {last}, past config.max_seq_len={self.config.max_seq_len}"
                )

    def _check_padding(
        self, attention_mask: torch.Tensor | None, B: int, T: int, S0: int
    ) -> torch.Tensor | None:
        """(B,) padding per row from a (B, T) 0/1 mask, or None; only on an empty cache."""
        if attention_mask is None:
            return None
        if S0 > 0:
            raise KVLibValueError(
                f"attention_mask describes left padding of a prompt and needs an empty "
                f"cache; this one holds {S0} tokens (padding is kept by the cache)"
            )
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, T):
            raise KVLibValueError(
                f"attention_mask must have the shape of tokens {(B, T)}, "
                f"got {tuple(getattr(attention_mask, 'shape', ()))}"
            )
        return pad_lengths(attention_mask)  # (B,)

    def _check_positions(self, pos: torch.Tensor, B: int, T: int) -> torch.Tensor:
        if not isinstance(pos, torch.Tensor) or tuple(pos.shape) != (B, T):
            raise KVLibValueError(
                f"position_ids must be an integer tensor of shape {(B, T)}, got "
                f"{tuple(getattr(pos, 'shape', ()))}"
            )
        if pos.dtype.is_floating_point or pos.dtype == torch.bool:
            raise KVLibValueError(f"position_ids must be an integer tensor, got {pos.dtype}")
        lo, hi = int(pos.min()), int(pos.max())
        if lo < 0 or hi >= self.config.max_seq_len:
            raise KVLibValueError(
                f"positions must be in [0, {self.config.max_seq_len}) (config.max_seq_len, the "
                f"RoPE table's length), got [{lo}, {hi}]"
            )
        return pos.to(device=self.device, dtype=torch.long)

    # ---- forward -------------------------------------------------------------------------------
    def forward(
        self,
        tokens: torch.Tensor,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V) for T new tokens ((B, 1, V) with last_only), appended to `cache`.

        attention_mask: (B, T) 0/1 for left-padded rows; only on an empty cache (or no cache).
        position_ids: (B, T) RoPE positions overriding the cache's (chapter 4 uses it to show
        what wrong positions do).

        With a cache, every input is checked first; the cache then prepares the step (an
        evicting cache makes room), gives the positions, and each layer makes one
        `cache.attend` call. If anything fails after the first write, the cache is rolled back
        to where it was, so a failed call changes nothing.
        """
        self._check_tokens(tokens)
        B, T = tokens.shape
        if cache is not None:
            self.check_cache(cache, B)
        S0 = 0 if cache is None else cache.seq_len
        n_pad = self._check_padding(attention_mask, B, T, S0)
        if position_ids is not None:
            position_ids = self._check_positions(position_ids, B, T)
        if cache is None:
            start = torch.zeros(B, dtype=torch.long, device=tokens.device)
            start = start if n_pad is None else n_pad.to(tokens.device)  # (B,)
            if position_ids is None:
                pos = self._check_positions(_positions(start, 0, T), B, T)  # (B, T), T in range
            else:
                pos = position_ids
            valid = real_slots(start, T)  # (B, S) with S = T
            mask = causal_mask(T, T, device=tokens.device)[None, None] & valid[:, None, None, :]
            return self._run(tokens, pos, mask, None, last_only)
        state = cache.checkpoint()
        try:
            if n_pad is not None:
                cache.set_left_padding(n_pad.to(cache.device))
            cache.prepare(T)  # an evicting cache makes room here
            pos = cache.next_positions(T) if position_ids is None else position_ids  # (B, T)
            pos = self._check_positions(pos, B, T)
            S = cache.seq_len + T
            if T == 1 and not bool(cache.start.any()):
                mask = None  # a decode step without padding sees every slot
            else:
                mask = causal_mask(T, S, device=tokens.device)[None, None]  # (1, 1, T, S)
                mask = mask & cache.valid_mask(S)[:, None, None, :]  # (B, 1, T, S)
            return self._run(tokens, pos, mask, cache, last_only)
        except BaseException:
            cache.rollback(state)
            raise

    def _run(
        self,
        tokens: torch.Tensor,
        pos: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Cache | None,
        last_only: bool,
    ) -> torch.Tensor:
        """The layers, on checked inputs: positions (B, T), mask (b, 1, T, S) or None."""
        x = self.tok_embeddings(tokens)  # (B, T, C)
        cos, sin = rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta)  # (B, T, D)
        cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (B, 1, T, D) each
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, mask, cache, i)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        return self.output(self.norm(x))  # (B, T, V)
