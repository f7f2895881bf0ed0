// fp16 GEMM in three steps: C = A @ B with fp32 accumulation.
//
// Layout (row-major, contiguous):
//     A: (M, R) half    B: (R, N) half    C: (M, N) float
// R is the reduction length (BLAS calls it K; in kvlib K means kv heads).
//
// gemm_naive   one thread per C element, every operand read from global memory.
// gemm_tiled   16 x 16 tiles of A and B staged in shared memory: each element loaded once
//              per tile is reused by 16 threads.
// gemm_wmma    Tensor Cores through WMMA m16n16k16 (half inputs, float accumulate, sm_70+;
//              the book targets sm_75, Colab's T4, and newer). A block of 4 warps computes a
//              32 x 32 tile of C, each warp one 16 x 16 fragment; tiles are zero-padded in
//              shared memory, so any M, N, R work.
#include <cuda_fp16.h>
#include <mma.h>

using namespace nvcuda;

#define TILE 16

extern "C" __global__ void gemm_naive(const half* __restrict__ A, const half* __restrict__ B,
                                      float* __restrict__ C, int M, int N, int R) {
    int row = blockIdx.y * blockDim.y + threadIdx.y;
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= M || col >= N) return;
    float acc = 0.0f;
    for (int r = 0; r < R; ++r) {
        acc += __half2float(A[row * R + r]) * __half2float(B[r * N + col]);
    }
    C[row * N + col] = acc;
}

// blockDim = (TILE, TILE): thread (ty, tx) computes C[row, col].
extern "C" __global__ void gemm_tiled(const half* __restrict__ A, const half* __restrict__ B,
                                      float* __restrict__ C, int M, int N, int R) {
    __shared__ float As[TILE][TILE];
    __shared__ float Bs[TILE][TILE];
    int ty = threadIdx.y, tx = threadIdx.x;
    int row = blockIdx.y * TILE + ty;
    int col = blockIdx.x * TILE + tx;
    float acc = 0.0f;
    for (int r0 = 0; r0 < R; r0 += TILE) {
        // each thread loads one element of each tile (zero outside the matrices)
        As[ty][tx] = (row < M && r0 + tx < R) ? __half2float(A[row * R + r0 + tx]) : 0.0f;
        Bs[ty][tx] = (r0 + ty < R && col < N) ? __half2float(B[(r0 + ty) * N + col]) : 0.0f;
        __syncthreads();
        for (int r = 0; r < TILE; ++r) acc += As[ty][r] * Bs[r][tx];
        __syncthreads();  // before the next tile overwrites As, Bs
    }
    if (row < M && col < N) C[row * N + col] = acc;
}

#define WM 16  // WMMA fragment: 16 x 16 x 16
#define BM 32  // block tile of C: 32 x 32, 2 x 2 warps
#define WARPS 4

// blockDim = (128,): warp w computes the fragment at rows (w / 2) * 16, cols (w % 2) * 16.
extern "C" __global__ void gemm_wmma(const half* __restrict__ A, const half* __restrict__ B,
                                     float* __restrict__ C, int M, int N, int R) {
    __shared__ __align__(32) half As[BM][WM];   // (32 rows of C, 16 of R)
    __shared__ __align__(32) half Bs[WM][BM];   // (16 of R, 32 cols of C)
    __shared__ __align__(32) float Cs[BM][BM];  // staging for bounds-checked stores
    int warp = threadIdx.x / 32;
    int wy = warp / 2, wx = warp % 2;
    int row0 = blockIdx.y * BM, col0 = blockIdx.x * BM;

    wmma::fragment<wmma::matrix_a, WM, WM, WM, half, wmma::row_major> a_frag;
    wmma::fragment<wmma::matrix_b, WM, WM, WM, half, wmma::row_major> b_frag;
    wmma::fragment<wmma::accumulator, WM, WM, WM, float> c_frag;
    wmma::fill_fragment(c_frag, 0.0f);

    for (int r0 = 0; r0 < R; r0 += WM) {
        // 128 threads load the 32 x 16 tile of A and the 16 x 32 tile of B, zero-padded
        for (int i = threadIdx.x; i < BM * WM; i += blockDim.x) {
            int ar = i / WM, ac = i % WM;  // As[ar][ac]
            int gr = row0 + ar, gc = r0 + ac;
            As[ar][ac] = (gr < M && gc < R) ? A[gr * R + gc] : __float2half(0.0f);
            int br = i / BM, bc = i % BM;  // Bs[br][bc]
            int hr = r0 + br, hc = col0 + bc;
            Bs[br][bc] = (hr < R && hc < N) ? B[hr * N + hc] : __float2half(0.0f);
        }
        __syncthreads();
        wmma::load_matrix_sync(a_frag, &As[wy * WM][0], WM);
        wmma::load_matrix_sync(b_frag, &Bs[0][wx * WM], BM);
        wmma::mma_sync(c_frag, a_frag, b_frag, c_frag);  // one Tensor Core step, fp32 acc
        __syncthreads();
    }
    wmma::store_matrix_sync(&Cs[wy * WM][wx * WM], c_frag, BM, wmma::mem_row_major);
    __syncthreads();
    for (int i = threadIdx.x; i < BM * BM; i += blockDim.x) {
        int r = row0 + i / BM, c = col0 + i % BM;
        if (r < M && c < N) C[r * N + c] = Cs[i / BM][i % BM];
    }
}
