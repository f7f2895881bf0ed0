// Decode attention over a paged KV cache, split-KV (flash-decoding), fp32 softmax.
//
// Layout (contiguous; letters as in kvlib):
//     q:            (B, H, T, D) half   the last T tokens of each sequence (decode: T = 1)
//     k_pool, v_pool: (num_blocks, K, P, D) half   one layer's pool, P = block_size
//     block_tables: (B, M) int32        token s of row b lives in block block_tables[b, s / P],
//                                       slot s % P
//     seq_lens:     (B,) int32          tokens cached per row, the T query tokens included
//     part_m, part_l: (B, H, T, NS) float   per split: running max and softmax denominator
//     part_o:       (B, H, T, NS, D) float  per split: unnormalized output (numerator)
//     out:          (B, H, T, D) half
// Query head h reads kv head h / G (G = H / K). Query t of row b sits at position
// seq_lens[b] - T + t and sees keys at positions <= its own (causal).
//
// Split-KV: the keys of row b are cut into NS partitions of whole blocks (split_range below);
// every (row, partition) runs in its own thread block with an online softmax, and
// split_kv_reduce merges the partitions. Two attention kernels:
//
// paged_attention_cuda_core   one block of 128 threads per (b, h, t, split): each thread
//                             scores one key of a 128-key chunk, then each thread owns
//                             output dims. CUDA cores only.
// paged_attention_wmma        one warp per (b, kv head, 16-row tile, split): the G*T query
//                             rows of a GQA group fill the 16 rows of a WMMA tile; keys go 16
//                             at a time; S = Q K^T and O += P V run on Tensor Cores
//                             (m16n16k16, fp32 accumulate; P rounded to half for the MMA).
#include <cuda_fp16.h>
#include <mma.h>

using namespace nvcuda;

#define NEG_INF (-__int_as_float(0x7f800000))
#define CHUNK 128  // keys per step of the CUDA-core kernel (= its blockDim.x)
#define MAX_D 256  // head dims the CUDA-core kernel supports (2 per thread)
#define WT 16      // WMMA tile: 16 query rows x 16 keys x 16 head dims

// Keys [*begin, *end) of partition `split`: ceil(n_blocks / num_splits) whole blocks each.
__device__ __forceinline__ void split_range(int seq_len, int block_size, int num_splits,
                                            int split, int* begin, int* end) {
    int n_blocks = (seq_len + block_size - 1) / block_size;
    int per_split = (n_blocks + num_splits - 1) / num_splits;
    int b = split * per_split * block_size;
    int e = min(b + per_split * block_size, seq_len);
    *begin = b;
    *end = max(e, b);  // an empty partition when b >= seq_len
}

__device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// Max / sum over the whole block; `red` holds one float per warp.
__device__ float block_max(float x, float* red) {
    x = warp_max(x);
    __syncthreads();  // the previous reduction has finished reading red
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = x;
    __syncthreads();
    x = red[0];
    for (int w = 1; w < blockDim.x / 32; ++w) x = fmaxf(x, red[w]);
    return x;
}

__device__ float block_sum(float x, float* red) {
    x = warp_sum(x);
    __syncthreads();
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = x;
    __syncthreads();
    x = red[0];
    for (int w = 1; w < blockDim.x / 32; ++w) x += red[w];
    return x;
}

// grid (NS, H * T, B), block (CHUNK,); D <= MAX_D.
extern "C" __global__ void paged_attention_cuda_core(
    const half* __restrict__ q, const half* __restrict__ k_pool, const half* __restrict__ v_pool,
    const int* __restrict__ block_tables, const int* __restrict__ seq_lens,
    float* __restrict__ part_m, float* __restrict__ part_l, float* __restrict__ part_o, int H,
    int K, int T, int D, int P, int max_blocks, int num_splits, float scale) {
    __shared__ long long off_s[CHUNK];  // pool offset of each key of the chunk
    __shared__ float q_s[MAX_D];         // the query, fp32
    __shared__ float p_s[CHUNK];         // softmax numerators of the chunk
    __shared__ float red[32];            // one partial per warp

    int split = blockIdx.x, b = blockIdx.z;
    int h = blockIdx.y / T, t = blockIdx.y % T;
    int kvh = h / (H / K);
    int tid = threadIdx.x;
    int seq_len = seq_lens[b];
    int q_pos = seq_len - T + t;
    int begin, end;
    split_range(seq_len, P, num_splits, split, &begin, &end);
    end = min(end, q_pos + 1);  // causal: later keys are invisible to this query

    const half* qp = q + ((long long)(b * H + h) * T + t) * D;
    for (int d = tid; d < D; d += blockDim.x) q_s[d] = __half2float(qp[d]);
    float m = NEG_INF, l = 0.0f;
    float acc[MAX_D / CHUNK] = {0.0f, 0.0f};
    __syncthreads();

    for (int c0 = begin; c0 < end; c0 += CHUNK) {  // uniform over the block
        int s = c0 + tid;
        float score = NEG_INF;
        if (s < end) {
            long long blk = block_tables[b * max_blocks + s / P];
            long long off = ((blk * K + kvh) * P + s % P) * D;
            off_s[tid] = off;
            float dot = 0.0f;
            for (int d = 0; d < D; ++d) dot += q_s[d] * __half2float(k_pool[off + d]);
            score = dot * scale;
        }
        float m_new = fmaxf(m, block_max(score, red));  // finite: key c0 is visible
        float alpha = expf(m - m_new);                   // rescales the earlier chunks
        float p = (s < end) ? expf(score - m_new) : 0.0f;
        p_s[tid] = p;
        l = l * alpha + block_sum(p, red);  // block_sum's barrier also publishes p_s, off_s
        m = m_new;
        int n = min(CHUNK, end - c0);
        for (int i = 0; i < MAX_D / CHUNK; ++i) {
            int d = tid + i * CHUNK;
            if (d < D) {
                float a = acc[i] * alpha;
                for (int j = 0; j < n; ++j) a += p_s[j] * __half2float(v_pool[off_s[j] + d]);
                acc[i] = a;
            }
        }
        __syncthreads();  // before the next chunk overwrites p_s and off_s
    }

    long long idx = ((long long)(b * H + h) * T + t) * num_splits + split;
    if (tid == 0) {
        part_m[idx] = m;
        part_l[idx] = l;
    }
    for (int i = 0; i < MAX_D / CHUNK; ++i) {
        int d = tid + i * CHUNK;
        if (d < D) part_o[idx * D + d] = acc[i];
    }
}

// grid (NS, K * n_tiles, B) with n_tiles = ceil(G * T / 16), block (32,): one warp.
// Dynamic shared memory 160 * D + 1856 bytes; D must be a multiple of 16.
extern "C" __global__ void paged_attention_wmma(
    const half* __restrict__ q, const half* __restrict__ k_pool, const half* __restrict__ v_pool,
    const int* __restrict__ block_tables, const int* __restrict__ seq_lens,
    float* __restrict__ part_m, float* __restrict__ part_l, float* __restrict__ part_o, int H,
    int K, int T, int D, int P, int max_blocks, int num_splits, float scale) {
    extern __shared__ __align__(32) unsigned char smem[];
    half* q_s = (half*)smem;            // (16, D) query rows of the tile
    half* k_s = q_s + WT * D;           // (16, D) 16 keys
    half* v_s = k_s + WT * D;           // (16, D) their values
    float* o_s = (float*)(v_s + WT * D);  // (16, D) running numerator, fp32
    float* s_s = o_s + WT * D;          // (16, 16) scores
    half* p_s = (half*)(s_s + WT * WT);  // (16, 16) softmax numerators, rounded to half
    float* m_s = (float*)(p_s + WT * WT);  // (16,) running max
    float* l_s = m_s + WT;              // (16,) running denominator
    float* a_s = l_s + WT;              // (16,) rescale factor of this step
    long long* off_s = (long long*)(a_s + WT);  // (16,) pool offset of each key, -1 = none

    int lane = threadIdx.x;
    int split = blockIdx.x, b = blockIdx.z;
    int G = H / K, rows = G * T;
    int n_tiles = (rows + WT - 1) / WT;
    int kvh = blockIdx.y / n_tiles, r0 = (blockIdx.y % n_tiles) * WT;
    int seq_len = seq_lens[b];
    int begin, end;
    split_range(seq_len, P, num_splits, split, &begin, &end);

    // tile row r is query row r0 + r = g * T + t: head kvh * G + g, token t; rows past G*T are 0
    for (int i = lane; i < WT * D; i += 32) {
        int row = r0 + i / D, d = i % D;
        half x = __float2half(0.0f);
        if (row < rows) {
            int h = kvh * G + row / T, t = row % T;
            x = q[((long long)(b * H + h) * T + t) * D + d];
        }
        q_s[i] = x;
        o_s[i] = 0.0f;
    }
    if (lane < WT) {
        m_s[lane] = NEG_INF;
        l_s[lane] = 0.0f;
    }
    __syncwarp();

    wmma::fragment<wmma::matrix_a, WT, WT, WT, half, wmma::row_major> q_frag;
    wmma::fragment<wmma::matrix_b, WT, WT, WT, half, wmma::col_major> kt_frag;  // K^T
    wmma::fragment<wmma::accumulator, WT, WT, WT, float> s_frag;
    wmma::fragment<wmma::matrix_a, WT, WT, WT, half, wmma::row_major> p_frag;
    wmma::fragment<wmma::matrix_b, WT, WT, WT, half, wmma::row_major> v_frag;
    wmma::fragment<wmma::accumulator, WT, WT, WT, float> o_frag;

    for (int c0 = begin; c0 < end; c0 += WT) {
        if (lane < WT) {  // where each of the 16 keys lives in the pool
            int s = c0 + lane;
            long long off = -1;
            if (s < end) {
                long long blk = block_tables[b * max_blocks + s / P];
                off = ((blk * K + kvh) * P + s % P) * D;
            }
            off_s[lane] = off;
        }
        __syncwarp();
        for (int i = lane; i < WT * D; i += 32) {  // gather 16 keys and values, zero past end
            long long off = off_s[i / D];
            int d = i % D;
            k_s[i] = off >= 0 ? k_pool[off + d] : __float2half(0.0f);
            v_s[i] = off >= 0 ? v_pool[off + d] : __float2half(0.0f);
        }
        __syncwarp();

        // S = Q K^T: (16, D) @ (D, 16), D / 16 Tensor Core steps
        wmma::fill_fragment(s_frag, 0.0f);
        for (int d0 = 0; d0 < D; d0 += WT) {
            wmma::load_matrix_sync(q_frag, q_s + d0, D);
            wmma::load_matrix_sync(kt_frag, k_s + d0, D);  // col-major view of K = K^T
            wmma::mma_sync(s_frag, q_frag, kt_frag, s_frag);
        }
        wmma::store_matrix_sync(s_s, s_frag, WT, wmma::mem_row_major);
        __syncwarp();

        if (lane < WT) {  // online softmax, one row per lane, fp32
            int row = r0 + lane;
            int q_pos = seq_len - T + row % T;
            float mx = NEG_INF;
            for (int j = 0; j < WT; ++j) {
                int s = c0 + j;
                bool visible = row < rows && s < end && s <= q_pos;
                float x = visible ? s_s[lane * WT + j] * scale : NEG_INF;
                s_s[lane * WT + j] = x;
                mx = fmaxf(mx, x);
            }
            float m_old = m_s[lane];
            float m_new = fmaxf(m_old, mx);
            float m_safe = (m_new == NEG_INF) ? 0.0f : m_new;  // nothing visible yet
            float alpha = expf(m_old - m_safe);
            float sum = 0.0f;
            for (int j = 0; j < WT; ++j) {
                float p = expf(s_s[lane * WT + j] - m_safe);
                sum += p;
                p_s[lane * WT + j] = __float2half(p);
            }
            l_s[lane] = l_s[lane] * alpha + sum;
            m_s[lane] = m_new;
            a_s[lane] = alpha;
        }
        __syncwarp();

        for (int i = lane; i < WT * D; i += 32) o_s[i] *= a_s[i / D];  // rescale old rows
        __syncwarp();
        // O += P V: (16, 16) @ (16, D), one Tensor Core step per 16 head dims
        wmma::load_matrix_sync(p_frag, p_s, WT);
        for (int d0 = 0; d0 < D; d0 += WT) {
            wmma::load_matrix_sync(o_frag, o_s + d0, D, wmma::mem_row_major);
            wmma::load_matrix_sync(v_frag, v_s + d0, D);
            wmma::mma_sync(o_frag, p_frag, v_frag, o_frag);
            wmma::store_matrix_sync(o_s + d0, o_frag, D, wmma::mem_row_major);
        }
        __syncwarp();
    }

    for (int r = 0; r < WT && r0 + r < rows; ++r) {
        int row = r0 + r;
        int h = kvh * G + row / T, t = row % T;
        long long idx = ((long long)(b * H + h) * T + t) * num_splits + split;
        if (lane == 0) {
            part_m[idx] = m_s[r];
            part_l[idx] = l_s[r];
        }
        for (int d = lane; d < D; d += 32) part_o[idx * D + d] = o_s[r * D + d];
    }
}

// Merge the NS partitions of each (b, h, t): out = sum_i e^(m_i - M) o_i / sum_i e^(m_i - M) l_i.
// grid (B * H * T,), block (128,).
extern "C" __global__ void split_kv_reduce(const float* __restrict__ part_m,
                                           const float* __restrict__ part_l,
                                           const float* __restrict__ part_o,
                                           half* __restrict__ out, int num_splits, int D) {
    long long row = blockIdx.x;
    const float* pm = part_m + row * num_splits;
    const float* pl = part_l + row * num_splits;
    const float* po = part_o + row * num_splits * D;
    float M = NEG_INF;
    for (int i = 0; i < num_splits; ++i) M = fmaxf(M, pm[i]);
    float M_safe = (M == NEG_INF) ? 0.0f : M;
    float L = 0.0f;
    for (int i = 0; i < num_splits; ++i) L += pl[i] * expf(pm[i] - M_safe);
    float inv = L > 0.0f ? 1.0f / L : 0.0f;  // a query that sees nothing outputs zeros
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float o = 0.0f;
        for (int i = 0; i < num_splits; ++i) o += po[i * D + d] * expf(pm[i] - M_safe);
        out[row * D + d] = __float2half(o * inv);
    }
}
