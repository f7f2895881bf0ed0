"""GPU kernels for the KV cache, and the checks that run without a GPU.

    roofline   arithmetic intensity, ridge points, attainable FLOP/s (the live copy bandwidth
               is measured by kvlib.timing.copy_bandwidth)
    nvrtc      compile kvlib/kernels/*.cu to PTX with NVRTC, assemble with ptxas (no GPU)
    emulate    NumPy emulation of the kernels' tiling, matched against kvlib's references
    kernels    CuPy RawModule wrappers: fp16 GEMM (naive, tiled, WMMA) and paged decode
               attention (CUDA cores, Tensor Cores), torch tensors in and out via DLPack
    host       run the same kernels on the CPU from their exact source (g++ against a header
               with CUDA's execution model), under AddressSanitizer and UBSan if asked
    results/   measured results of `python -m kvlib.bench --gpu` (`kvlib.bench.gpu`: copy
               bandwidth, GEMM vs cuBLAS, decode attention bandwidth from 1k to 64k tokens),
               committed as JSON and loaded by chapter 10 (`kvlib.bench.gpu_results`)

Shapes follow kvlib (B batch, H query heads, K kv heads, G = H / K, T query tokens, D head
dim; the paged pool is (num_blocks, K, P, D) per layer). Nothing here imports CuPy at import
time, so `import kvlib.gpu` works on any machine.
"""
