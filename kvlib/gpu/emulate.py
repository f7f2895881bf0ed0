"""NumPy emulation of the CUDA kernels' tiling, so the algorithms are tested without a GPU.

Each function runs the same loops as its kernel in `kvlib/kernels/*.cu`, in the same order,
with the same rounding: inputs rounded to fp16, products accumulated in fp32, the same online
softmax rescaling and the same split-KV partitions and reduction. What it cannot reproduce is
the order of additions inside one Tensor Core instruction (hardware specific, within fp32
rounding). Thread blocks that run in parallel on the GPU are vectorized or looped here.

Layouts (letters as in kvlib; R is a GEMM's reduction length, K stays kv heads):

    GEMM        a: (m, k), b: (k, n) -> (m, n) float32
    attention   q: (B, H, T, D); k_pool, v_pool: (num_blocks, K, P, D), P = block_size;
                block_tables: (B, M) int, -1 past the end; seq_lens: (B,) -> (B, H, T, D)

`paged_reference` is the reference path: `kvlib.paged.paged_attention(method="gather")` in
float64 on the same fp16-rounded inputs.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kvlib import paged
from kvlib.errors import KVLibTypeError, KVLibValueError, check_int
from kvlib.online_softmax import online_softmax_step

WMMA_TILE = 16  # m16n16k16
GEMM_BLOCK = 32  # gemm_wmma: a 32 x 32 block of C per thread block
CUDA_CORE_CHUNK = 128  # paged_attention_cuda_core: keys per step (its blockDim.x)

Array = np.ndarray | torch.Tensor


def _np(name: str, x: Array, ndim: int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise KVLibTypeError(
            f"{name} must be a NumPy array or torch tensor, got {type(x).__name__}"
        )
    if x.ndim != ndim:
        raise KVLibValueError(f"{name} must be {ndim}-D, got shape {x.shape}")
    return x


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """x rounded to fp16 and back to fp32 (torch tensors)."""
    return x.to(torch.float16).to(torch.float32)


def round_fp16(x: Array) -> np.ndarray:
    """x rounded to fp16 and held in fp32: what a kernel reading `half` sees."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).astype(np.float16).astype(np.float32)


def split_ranges(seq_len: int, block_size: int, num_splits: int) -> list[tuple[int, int]]:
    """Key ranges [begin, end) of the split-KV partitions of one sequence (kernel's split_range).

    Each partition gets ceil(n_blocks / num_splits) whole blocks, so a block never straddles
    two partitions; trailing partitions may be empty (begin == end).
    """
    check_int("block_size", block_size)
    check_int("num_splits", num_splits)
    check_int("seq_len", seq_len, low=0)
    n_blocks = -(-seq_len // block_size)
    per_split = -(-n_blocks // num_splits)
    out = []
    for i in range(num_splits):
        begin = i * per_split * block_size
        end = min(begin + per_split * block_size, seq_len)
        out.append((begin, max(begin, end)))
    return out


def wmma_gemm(a: Array, b: Array) -> np.ndarray:
    """gemm_wmma's arithmetic: fp16 inputs, zero-padded 16-wide steps over R, fp32 accumulate.

    The kernel's 32 x 32 blocks and 16 x 16 warp fragments are independent, so all output
    tiles advance together here; each one sees the same R steps in the same order.
    """
    a, b = _np("a", a, 2), _np("b", b, 2)
    if a.shape[1] != b.shape[0]:
        raise KVLibValueError(
            f"a {a.shape} and b {b.shape} do not chain: expected (m, k) and (k, n)"
        )
    M, R = a.shape
    N = b.shape[1]
    pad = lambda n, m: -(-n // m) * m  # noqa: E731
    Mp, Np, Rp = pad(M, GEMM_BLOCK), pad(N, GEMM_BLOCK), pad(R, WMMA_TILE)
    A = np.zeros((Mp, Rp), np.float32)  # (m, k) zero-padded like the shared-memory tiles
    B = np.zeros((Rp, Np), np.float32)  # (k, n)
    A[:M, :R], B[:R, :N] = round_fp16(a), round_fp16(b)
    C = np.zeros((Mp, Np), np.float32)  # (m, n) accumulators, fp32
    for r0 in range(0, Rp, WMMA_TILE):  # one mma_sync per step, per 16 x 16 tile
        C += A[:, r0 : r0 + WMMA_TILE] @ B[r0 : r0 + WMMA_TILE, :]
    return C[:M, :N]


def paged_attention_partials(
    q: Array,
    k_pool: Array,
    v_pool: Array,
    block_tables: Array,
    seq_lens: Array,
    *,
    num_splits: int = 1,
    scale: float | None = None,
    kernel: str = "wmma",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-partition (m, l, o) exactly as the attention kernels write them.

    kernel="wmma": 16 query rows (the G*T rows of a GQA group, zero-padded) by 16 keys per
    step, P rounded to fp16 before P @ V. kernel="cuda_core": 128 keys per step, P in fp32.
    Returns m, l: (B, H, T, NS) and o: (B, H, T, NS, D), all float32.
    """
    if kernel not in ("wmma", "cuda_core"):
        raise KVLibValueError(f"kernel must be 'wmma' or 'cuda_core', got {kernel!r}")
    q = round_fp16(_np("q", q, 4))
    kp, vp = round_fp16(_np("k_pool", k_pool, 4)), round_fp16(_np("v_pool", v_pool, 4))
    tables = _np("block_tables", block_tables, 2).astype(np.int64)
    lens = _np("seq_lens", seq_lens, 1).astype(np.int64)
    B, H, T, D = q.shape
    K, P = kp.shape[1], kp.shape[2]
    if H % K or kp.shape[3] != D or kp.shape != vp.shape:
        raise KVLibValueError(
            f"q {q.shape} does not match pools {kp.shape}, {vp.shape}: expected pools of "
            f"(num_blocks, K, P, D={D}) with H={H} a multiple of K"
        )
    G = H // K
    rows = G * T
    chunk, round_p = (WMMA_TILE, True) if kernel == "wmma" else (CUDA_CORE_CHUNK, False)
    tile = WMMA_TILE if kernel == "wmma" else rows  # query rows processed together
    n_tiles = -(-rows // tile)
    scale = np.float32(1.0 / math.sqrt(D) if scale is None else scale)
    part_m = np.full((B, H, T, num_splits), -np.inf, np.float32)
    part_l = np.zeros((B, H, T, num_splits), np.float32)
    part_o = np.zeros((B, H, T, num_splits, D), np.float32)
    for b in range(B):
        S = int(lens[b])
        ranges = split_ranges(S, P, num_splits)
        for kvh in range(K):
            qrows = q[b, kvh * G : (kvh + 1) * G].reshape(rows, D)  # (G*T, D), row = g*T + t
            qpad = np.zeros((n_tiles * tile, D), np.float32)  # padding rows are zero
            qpad[:rows] = qrows
            for ti in range(n_tiles):
                row = ti * tile + np.arange(tile)  # (tile,)
                Qt = qpad[row]  # (tile, D)
                q_pos = S - T + row % T  # (tile,)
                real = row < rows
                for split, (begin, end) in enumerate(ranges):
                    state = None  # the online softmax's (m, l, o), see kvlib.online_softmax
                    for c0 in range(begin, end, chunk):
                        s = c0 + np.arange(chunk)  # (chunk,) key positions
                        ok = s < end
                        blk = tables[b, s[ok] // P]
                        Kc = np.zeros((chunk, D), np.float32)  # zero past the end
                        Vc = np.zeros((chunk, D), np.float32)
                        Kc[ok] = kp[blk, kvh, s[ok] % P]
                        Vc[ok] = vp[blk, kvh, s[ok] % P]
                        sc = (Qt @ Kc.T) * scale  # (tile, chunk) fp32
                        vis = real[:, None] & ok[None, :] & (s[None, :] <= q_pos[:, None])
                        sc = np.where(vis, sc, np.float32(-np.inf))
                        Vt = torch.from_numpy(Vc)  # (chunk, D)
                        # the WMMA kernel rounds P to fp16 for P @ V (its sum stays fp32)
                        values = (lambda p, Vt=Vt: _fp16(p) @ Vt) if round_p else Vt
                        state = online_softmax_step(state, torch.from_numpy(sc), values)
                    if state is None:  # an empty partition: m = -inf, l = 0, o = 0 as set
                        continue
                    m, l, o = (x.numpy() for x in state)  # (tile, 1), (tile, 1), (tile, D)
                    m, l = m[:, 0], l[:, 0]
                    for r in np.flatnonzero(real):
                        g, t = divmod(int(row[r]), T)
                        h = kvh * G + g
                        part_m[b, h, t, split] = m[r]
                        part_l[b, h, t, split] = l[r]
                        part_o[b, h, t, split] = o[r]
    return part_m, part_l, part_o


def split_kv_reduce(part_m: np.ndarray, part_l: np.ndarray, part_o: np.ndarray) -> np.ndarray:
    """Merge partitions: sum_i e^(m_i - M) o_i / sum_i e^(m_i - M) l_i (kernel split_kv_reduce)."""
    if part_o.shape[:-1] != part_m.shape or part_l.shape != part_m.shape:
        raise KVLibValueError(
            f"partials disagree: m {part_m.shape}, l {part_l.shape}, o {part_o.shape}; "
            "expected m and l of (B, H, T, NS) and o of (B, H, T, NS, D)"
        )
    M = part_m.max(axis=-1)  # (B, H, T)
    M_safe = np.where(np.isneginf(M), np.float32(0), M)
    w = np.exp(part_m - M_safe[..., None])  # (B, H, T, NS)
    L = (part_l * w).sum(axis=-1)  # (B, H, T)
    O = (part_o * w[..., None]).sum(axis=-2)  # (B, H, T, D)
    out = np.zeros_like(O)
    np.divide(O, L[..., None], out=out, where=L[..., None] > 0)  # sees nothing -> zeros
    return out


def paged_attention(
    q: Array,
    k_pool: Array,
    v_pool: Array,
    block_tables: Array,
    seq_lens: Array,
    *,
    num_splits: int = 1,
    scale: float | None = None,
    kernel: str = "wmma",
) -> np.ndarray:
    """The attention kernel's output (B, H, T, D) in float32, before its final cast to fp16."""
    parts = paged_attention_partials(
        q, k_pool, v_pool, block_tables, seq_lens,
        num_splits=num_splits, scale=scale, kernel=kernel,
    )  # fmt: skip
    return split_kv_reduce(*parts)


def paged_reference(
    q: Array,
    k_pool: Array,
    v_pool: Array,
    block_tables: Array,
    seq_lens: Array,
    *,
    scale: float | None = None,
) -> np.ndarray:
    """kvlib's gather reference in float64 on the fp16-rounded inputs: (B, H, T, D)."""
    q64 = torch.from_numpy(round_fp16(_np("q", q, 4))).double()
    kp = torch.from_numpy(round_fp16(_np("k_pool", k_pool, 4))).double()
    vp = torch.from_numpy(round_fp16(_np("v_pool", v_pool, 4))).double()
    n_blocks, K, P, D = kp.shape
    pool = paged.BlockAllocator(1, n_blocks, P, K, D, dtype=torch.float64)
    pool.k_pool[0], pool.v_pool[0] = kp, vp
    tables = torch.as_tensor(_np("block_tables", block_tables, 2)).long()
    lens = torch.as_tensor(_np("seq_lens", seq_lens, 1)).long()
    out = paged.paged_attention(q64, pool, tables, lens, 0, scale=scale, method="gather")
    return out.numpy()


def random_paged_inputs(
    seq_lens: list[int],
    H: int,
    K: int,
    D: int,
    block_size: int,
    *,
    T: int = 1,
    seed: int = 0,
    extra_blocks: int = 3,
    dtype: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """A paged test case: shuffled (non-adjacent) blocks, -1 past each row's end.

    Returns q (B, H, T, D), k_pool and v_pool (num_blocks, K, P, D), block_tables (B, M) int32
    and seq_lens (B,) int32, all on the CPU.
    """
    gen = torch.Generator().manual_seed(seed)
    P = block_size
    need = [-(-n // P) for n in seq_lens]
    n_blocks = sum(need) + extra_blocks
    M = max(need)
    order = torch.randperm(n_blocks, generator=gen).tolist()
    tables = torch.full((len(seq_lens), M), -1, dtype=torch.int32)  # (B, M)
    pos = 0
    for b, n in enumerate(need):
        tables[b, :n] = torch.tensor(order[pos : pos + n], dtype=torch.int32)
        pos += n
    shape = (n_blocks, K, P, D)  # (num_blocks, K, P, D)
    return {
        "q": torch.randn(len(seq_lens), H, T, D, generator=gen).to(dtype),
        "k_pool": torch.randn(shape, generator=gen).to(dtype),
        "v_pool": torch.randn(shape, generator=gen).to(dtype),
        "block_tables": tables,
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32),
    }
