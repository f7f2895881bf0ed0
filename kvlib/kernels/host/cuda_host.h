// CUDA's execution model on the CPU, for running kvlib/kernels/*.cu unmodified with g++.
//
// The .cu file includes <cuda_fp16.h> and <mma.h>; the files of that name beside this header
// include it, so `g++ -I kvlib/kernels/host` compiles the kernel source as it is. A launch runs
// the grid's blocks one after another; the threads of a block are cooperative user-level
// contexts (ucontext) on one OS thread. A thread runs until it reaches a barrier, a shuffle or
// a WMMA operation, or returns; when no thread can run, the scheduler releases a barrier or a
// warp collective whose participants have all arrived, and otherwise reports the deadlock.
//
// Why contexts and not one std::thread per CUDA thread: switching happens only at the points
// where CUDA synchronizes, so the interleaving between barriers is chosen (lanes forward or
// reversed: a missing barrier changes the result), the run is deterministic, and the
// scheduler sees where every thread waits (so a barrier that some thread leaves by another
// path is reported, not hung on). AddressSanitizer is told about each stack switch. Each
// context is made once per launch (makecontext) and reused by every block; switches are
// _setjmp / _longjmp, which, unlike swapcontext, make no system call.
//
// What it enforces, as a GPU would fault or hang:
//   __syncthreads   every live thread of the block reaches the same barrier; none returns
//                   while others wait (a barrier in a divergent branch, an early exit)
//   __syncwarp, __shfl_*_sync   every lane named in the mask arrives with the same mask; the
//                   caller is in its mask; a shuffle reads only lanes in the mask
//   wmma            pointers 256-bit (32-byte) aligned, ldm a multiple of 16 bytes (8 halves,
//                   4 floats), the same pointer and ldm on every lane, the whole warp present
//   shared memory   every block's static and dynamic __shared__ bytes start as NaN (0xff), so
//                   a read before a write shows; at most 48 KiB of dynamic shared memory per
//                   launch, and its bytes past the launch's size are poisoned under
//                   AddressSanitizer and guarded by a canary otherwise
//   launch limits   at most 1024 threads per block, blockDim.z <= 64, gridDim.y, z <= 65535
// Static __shared__ arrays are thread_local (one per block, blocks run in turn; the program's
// thread-local block holds nothing else), so -fsanitize=bounds (part of UBSan) catches an index
// past their end; global buffers are heap allocations of their exact size, so AddressSanitizer
// catches any byte past them.
#pragma once

#include <link.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <ucontext.h>

#include <functional>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define KVHOST_ASAN 1
#else
#define KVHOST_ASAN 0
#endif

// ---- keywords ------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __shared__ thread_local
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

// ---- half and intrinsics -------------------------------------------------------------------
typedef _Float16 __half;  // IEEE binary16; conversions round to nearest even, as on a GPU
typedef __half half;

inline float __half2float(half h) { return (float)h; }
inline half __float2half(float f) { return (half)f; }
inline half __float2half_rn(float f) { return (half)f; }
inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}
inline int __float_as_int(float f) {
    int i;
    memcpy(&i, &f, 4);
    return i;
}
inline float __expf(float x) { return expf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

// ---- the scheduler -------------------------------------------------------------------------
namespace kvhost {

constexpr int WARP = 32;
constexpr size_t MAX_DYNAMIC_SMEM = 48 * 1024;  // a launch's limit without an opt-in attribute
constexpr unsigned char CANARY = 0xa5;

enum State { RUNNABLE, AT_BARRIER, AT_WARP, EXITED };
enum Kind { SYNCWARP, SHFL_IDX, SHFL_UP, SHFL_DOWN, SHFL_XOR, WMMA_LOAD, WMMA_STORE, WMMA_MMA };
inline const char* kind_name(int k) {
    static const char* names[] = {"__syncwarp",          "__shfl_sync",
                                  "__shfl_up_sync",      "__shfl_down_sync",
                                  "__shfl_xor_sync",     "wmma::load_matrix_sync",
                                  "wmma::store_matrix_sync", "wmma::mma_sync"};
    return names[k];
}

struct Thread;
using Completion = void (*)(Thread** lanes, unsigned mask);

struct Thread {
    ucontext_t ctx;  // to enter the thread's stack the first time
    jmp_buf jb;      // where it waits
    uint3 idx;
    int lin = 0;  // linear index in the block
    State state = RUNNABLE;
    int line = 0;  // source line of the barrier or collective it waits at
    // a warp collective in progress
    int kind = 0;
    unsigned mask = 0;
    uint64_t value = 0, result = 0;  // shuffle operand and result (bit patterns)
    int arg = 0, width = 0;          // shuffle lane argument and width
    const void* ptr = nullptr;       // wmma memory operand
    unsigned ldm = 0;
    int layout = 0;
    void* frag[4] = {nullptr, nullptr, nullptr, nullptr};  // wmma fragments of this lane
    Completion complete = nullptr;
    char* stack = nullptr;
    void* fake_stack = nullptr;
};

struct Dynamic {
    unsigned char* base;
    size_t capacity;
};

inline std::string g_kernel;
inline uint3 g_block_idx;
inline dim3 g_block_dim, g_grid_dim;
inline Thread* g_cur = nullptr;
inline std::vector<Thread> g_threads;
inline jmp_buf g_sched;
inline void* g_sched_fake = nullptr;
inline std::function<void()> g_body;
inline std::vector<Dynamic> g_dynamic;
inline size_t g_dynamic_size = 0;
inline const void* g_main_bottom = nullptr;
inline size_t g_main_size = 0;
#if KVHOST_ASAN
constexpr size_t STACK = 512 * 1024;
#else
constexpr size_t STACK = 64 * 1024;
#endif

[[noreturn]] inline void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline void fail(const char* fmt, ...) {
    fprintf(stderr, "kvhost: %s block (%u, %u, %u)", g_kernel.c_str(), g_block_idx.x,
            g_block_idx.y, g_block_idx.z);
    if (g_cur) fprintf(stderr, " thread (%u, %u, %u)", g_cur->idx.x, g_cur->idx.y, g_cur->idx.z);
    fprintf(stderr, ": ");
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
    fflush(stderr);
    _Exit(3);
}

// A user context switch, announced to AddressSanitizer (a fiber switch).
inline void enter_fiber(void** save, const void* bottom, size_t size) {
#if KVHOST_ASAN
    __sanitizer_start_switch_fiber(save, bottom, size);
#else
    (void)save, (void)bottom, (void)size;
#endif
}
inline void entered_fiber(void* save, const void** bottom, size_t* size) {
#if KVHOST_ASAN
    __sanitizer_finish_switch_fiber(save, bottom, size);
#else
    (void)save, (void)bottom, (void)size;
#endif
}

// Called by a CUDA thread: back to the scheduler, until it switches to this thread again.
inline void switch_out(Thread* t) {
    if (!_setjmp(t->jb)) {
        enter_fiber(&t->fake_stack, g_main_bottom, g_main_size);
        _longjmp(g_sched, 1);
    }
    entered_fiber(t->fake_stack, nullptr, nullptr);
}

// Called by the scheduler: run thread t until it waits or returns.
inline void switch_in(Thread* t) {
    g_cur = t;
    if (!_setjmp(g_sched)) {
        enter_fiber(&g_sched_fake, t->stack, STACK);
        _longjmp(t->jb, 1);
    }
    entered_fiber(g_sched_fake, nullptr, nullptr);
    g_cur = nullptr;
}

inline void wait(State state, int line) {
    Thread* t = g_cur;
    t->state = state;
    t->line = line;
    switch_out(t);
}

// The life of a context: wait to be started, run the kernel for one block, repeat.
inline void thread_loop() {
    Thread* t = g_cur;
    entered_fiber(nullptr, &g_main_bottom, &g_main_size);
    for (;;) {
        switch_out(t);
        g_body();
        t->state = EXITED;
    }
}

// Make thread t's context and run it to its first wait (the top of thread_loop).
inline void start(Thread* t) {
    getcontext(&t->ctx);
    t->ctx.uc_stack.ss_sp = t->stack;
    t->ctx.uc_stack.ss_size = STACK;
    t->ctx.uc_link = nullptr;
    makecontext(&t->ctx, thread_loop, 0);
    g_cur = t;
    ucontext_t here;
    if (!_setjmp(g_sched)) {
        enter_fiber(&g_sched_fake, t->stack, STACK);
        swapcontext(&here, &t->ctx);
    }
    entered_fiber(g_sched_fake, nullptr, nullptr);
    g_cur = nullptr;
}

inline int lane_of(const Thread& t) { return t.lin % WARP; }
inline int warp_of(const Thread& t) { return t.lin / WARP; }

// The lanes of warp w (nullptr where the block has no such thread).
inline void warp_lanes(int w, Thread** lanes) {
    for (int l = 0; l < WARP; ++l) {
        size_t i = (size_t)w * WARP + l;
        lanes[l] = i < g_threads.size() ? &g_threads[i] : nullptr;
    }
}

inline std::string where(const Thread& t) {
    char buf[160];
    if (t.state == EXITED) snprintf(buf, sizeof buf, "returned");
    else if (t.state == AT_BARRIER) snprintf(buf, sizeof buf, "__syncthreads at line %d", t.line);
    else if (t.state == AT_WARP)
        snprintf(buf, sizeof buf, "%s (mask 0x%08x) at line %d", kind_name(t.kind), t.mask, t.line);
    else snprintf(buf, sizeof buf, "running");
    return buf;
}

inline void fail_stuck(const Thread& waiting, const Thread& other, const char* why) {
    g_cur = nullptr;
    fail("deadlock: thread (%u, %u, %u) waits at %s, but thread (%u, %u, %u) %s (%s)",
         waiting.idx.x, waiting.idx.y, waiting.idx.z, where(waiting).c_str(), other.idx.x,
         other.idx.y, other.idx.z, where(other).c_str(), why);
}

// Release one warp collective whose lanes have all arrived; false when there is none.
inline bool release_warp() {
    int n_warps = (int)((g_threads.size() + WARP - 1) / WARP);
    Thread* lanes[WARP];
    for (int w = 0; w < n_warps; ++w) {
        warp_lanes(w, lanes);
        for (int l = 0; l < WARP; ++l) {
            Thread* t = lanes[l];
            if (!t || t->state != AT_WARP) continue;
            bool complete = true;
            for (int j = 0; j < WARP && complete; ++j) {
                if (!(t->mask >> j & 1u)) continue;
                Thread* u = lanes[j];
                complete = u && u->state == AT_WARP && u->mask == t->mask && u->kind == t->kind;
            }
            if (!complete) continue;
            t->complete(lanes, t->mask);
            for (int j = 0; j < WARP; ++j)
                if (t->mask >> j & 1u) lanes[j]->state = RUNNABLE;
            return true;
        }
    }
    return false;
}

// Every thread is waiting: release what can be released, or report why nothing can.
inline void release() {
    if (release_warp()) return;
    Thread* barrier = nullptr;
    for (Thread& t : g_threads) {
        if (t.state == AT_BARRIER && !barrier) barrier = &t;
    }
    for (Thread& t : g_threads) {  // a warp collective that cannot complete
        if (t.state != AT_WARP) continue;
        Thread* lanes[WARP];
        warp_lanes(warp_of(t), lanes);
        for (int j = 0; j < WARP; ++j) {
            if (!(t.mask >> j & 1u)) continue;
            Thread* u = lanes[j];
            if (!u) {
                g_cur = &t;
                fail("%s names lane %d (mask 0x%08x), which this block does not have",
                     kind_name(t.kind), j, t.mask);
            }
            if (u->state == EXITED) fail_stuck(t, *u, "a lane named in the mask has returned");
            if (u->state == AT_BARRIER) fail_stuck(t, *u, "a lane named in the mask is elsewhere");
            if (u->mask != t.mask) fail_stuck(t, *u, "the masks do not match");
            if (u->kind != t.kind) fail_stuck(t, *u, "different warp collectives");
        }
    }
    if (!barrier) {
        g_cur = nullptr;
        fail("deadlock: no thread can run");
    }
    for (Thread& t : g_threads) {
        if (t.state == EXITED)
            fail_stuck(*barrier, t, "__syncthreads must be reached by every thread of the block");
        if (t.line != barrier->line)
            fail_stuck(*barrier, t, "the threads of a block wait at different barriers");
    }
    for (Thread& t : g_threads) t.state = RUNNABLE;
}

inline void check_launch(dim3 grid, dim3 block, size_t smem) {
    size_t threads = (size_t)block.x * block.y * block.z;
    if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 ||
        grid.z == 0 || grid.y > 65535 || grid.z > 65535)
        fail("invalid launch: grid (%u, %u, %u), block (%u, %u, %u): a block holds 1..1024 "
             "threads with z <= 64, the grid's y and z are 1..65535",
             grid.x, grid.y, grid.z, block.x, block.y, block.z);
    if (smem > MAX_DYNAMIC_SMEM)
        fail("the launch asks for %zu bytes of dynamic shared memory, above %zu", smem,
             MAX_DYNAMIC_SMEM);
}

// The program's thread-local block: every __shared__ array, static and dynamic.
struct TlsBlock {
    unsigned char* data = nullptr;
    size_t size = 0;
};

inline int find_tls(struct dl_phdr_info* info, size_t, void* out) {
    for (int i = 0; i < info->dlpi_phnum; ++i) {  // the first module is the program itself
        if (info->dlpi_phdr[i].p_type == PT_TLS) {
            ((TlsBlock*)out)->data = (unsigned char*)info->dlpi_tls_data;
            ((TlsBlock*)out)->size = info->dlpi_phdr[i].p_memsz;
        }
    }
    return 1;
}

// Shared memory of a new block: all of it NaN (0xff), the dynamic bytes past the launch's size
// poisoned (AddressSanitizer) and filled with a canary.
inline void prepare_shared() {
    static TlsBlock tls;
    static bool found = false;
    if (!found) {
        dl_iterate_phdr(find_tls, &tls);
        found = true;
    }
    for (Dynamic& d : g_dynamic) {
#if KVHOST_ASAN
        ASAN_UNPOISON_MEMORY_REGION(d.base, d.capacity);
#endif
    }
    if (tls.data) memset(tls.data, 0xff, tls.size);
    for (Dynamic& d : g_dynamic) {
        memset(d.base, 0xff, g_dynamic_size);
        memset(d.base + g_dynamic_size, CANARY, d.capacity - g_dynamic_size);
#if KVHOST_ASAN
        ASAN_POISON_MEMORY_REGION(d.base + g_dynamic_size, d.capacity - g_dynamic_size);
#endif
    }
}

inline void check_dynamic() {
    for (Dynamic& d : g_dynamic) {
#if KVHOST_ASAN
        ASAN_UNPOISON_MEMORY_REGION(d.base, d.capacity);
#endif
        for (size_t i = g_dynamic_size; i < d.capacity; ++i) {
            if (d.base[i] != CANARY) {
                g_cur = nullptr;
                fail("wrote byte %zu of dynamic shared memory; the launch gave %zu bytes", i,
                     g_dynamic_size);
            }
        }
    }
}

// order 0: blocks and threads forward; 1: both reversed (between two synchronization points
// the threads run in that order, each to its next barrier or collective).
inline void launch(const char* kernel, dim3 grid, dim3 block, size_t smem, int order,
                   std::function<void()> body) {
    g_kernel = kernel;
    g_cur = nullptr;
    check_launch(grid, block, smem);
    g_grid_dim = grid;
    g_block_dim = block;
    g_dynamic_size = smem;
    g_body = std::move(body);
    size_t n = (size_t)block.x * block.y * block.z;
    g_threads.assign(n, Thread());
    for (size_t i = 0; i < n; ++i) {
        g_threads[i].stack = (char*)malloc(STACK);
        start(&g_threads[i]);
    }
    size_t n_blocks = (size_t)grid.x * grid.y * grid.z;
    for (size_t bi = 0; bi < n_blocks; ++bi) {
        size_t b = order ? n_blocks - 1 - bi : bi;
        g_block_idx = {(unsigned)(b % grid.x), (unsigned)(b / grid.x % grid.y),
                       (unsigned)(b / ((size_t)grid.x * grid.y))};
        prepare_shared();
        for (size_t i = 0; i < n; ++i) {
            Thread& t = g_threads[i];
            t.lin = (int)i;
            t.idx = {(unsigned)(i % block.x), (unsigned)(i / block.x % block.y),
                     (unsigned)(i / ((size_t)block.x * block.y))};
            t.state = RUNNABLE;
        }
        for (;;) {
            bool ran = false, live = false;
            for (size_t k = 0; k < n; ++k) {
                Thread& t = g_threads[order ? n - 1 - k : k];
                if (t.state != RUNNABLE) {
                    live |= t.state != EXITED;
                    continue;
                }
                switch_in(&t);
                ran = true;
                live |= t.state != EXITED;
            }
            if (!live) break;
            if (!ran) release();
        }
        check_dynamic();
    }
    for (Thread& t : g_threads) free(t.stack);
    g_threads.clear();
}

inline void register_dynamic(unsigned char* base, size_t capacity) {
    g_dynamic.push_back({base, capacity});
}

// ---- warp collectives ----------------------------------------------------------------------
inline void check_own_mask(unsigned mask, int kind) {
    if (!(mask >> lane_of(*g_cur) & 1u))
        fail("%s with mask 0x%08x, which does not name the calling lane %d", kind_name(kind),
             mask, lane_of(*g_cur));
}

inline void collective(int kind, unsigned mask, int line, Completion complete) {
    check_own_mask(mask, kind);
    g_cur->kind = kind;
    g_cur->mask = mask;
    g_cur->complete = complete;
    wait(AT_WARP, line);
}

inline void no_op(Thread**, unsigned) {}

inline void shuffle(Thread** lanes, unsigned mask) {
    for (int l = 0; l < WARP; ++l) {
        if (!(mask >> l & 1u)) continue;
        Thread* t = lanes[l];
        int w = t->width, seg = l / w * w, src = l;
        switch (t->kind) {
            case SHFL_IDX: src = seg + ((t->arg % w) + w) % w; break;
            case SHFL_UP: src = l - seg >= t->arg ? l - t->arg : l; break;
            case SHFL_DOWN: src = l - seg + t->arg < w ? l + t->arg : l; break;
            case SHFL_XOR: src = (l ^ t->arg) < seg + w ? (l ^ t->arg) : l; break;
        }
        if (src < 0 || src >= WARP || !(mask >> src & 1u)) {
            g_cur = t;
            fail("%s (mask 0x%08x) at line %d reads lane %d, which the mask does not name",
                 kind_name(t->kind), mask, t->line, src);
        }
        t->result = lanes[src]->value;
    }
}

template <class T>
inline T shfl(int kind, unsigned mask, T var, int arg, int width, int line) {
    static_assert(sizeof(T) <= 8, "shuffle of a type wider than 64 bits");
    if (width < 1 || width > WARP || (width & (width - 1)))
        fail("%s width %d: expected a power of 2 up to 32", kind_name(kind), width);
    Thread* t = g_cur;
    t->value = 0;
    memcpy(&t->value, &var, sizeof(T));
    t->arg = arg;
    t->width = width;
    collective(kind, mask, line, shuffle);
    T out;
    memcpy(&out, &g_cur->result, sizeof(T));
    return out;
}

}  // namespace kvhost

#define threadIdx (static_cast<const uint3&>(kvhost::g_cur->idx))
#define blockIdx (static_cast<const uint3&>(kvhost::g_block_idx))
#define blockDim (static_cast<const dim3&>(kvhost::g_block_dim))
#define gridDim (static_cast<const dim3&>(kvhost::g_grid_dim))
#define warpSize 32

inline void __syncthreads(int line = __builtin_LINE()) { kvhost::wait(kvhost::AT_BARRIER, line); }
inline void __syncwarp(unsigned mask = 0xffffffffu, int line = __builtin_LINE()) {
    kvhost::collective(kvhost::SYNCWARP, mask, line, kvhost::no_op);
}
template <class T>
inline T __shfl_sync(unsigned mask, T var, int src, int width = 32, int line = __builtin_LINE()) {
    return kvhost::shfl(kvhost::SHFL_IDX, mask, var, src, width, line);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned d, int width = 32,
                        int line = __builtin_LINE()) {
    return kvhost::shfl(kvhost::SHFL_UP, mask, var, (int)d, width, line);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned d, int width = 32,
                          int line = __builtin_LINE()) {
    return kvhost::shfl(kvhost::SHFL_DOWN, mask, var, (int)d, width, line);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                         int line = __builtin_LINE()) {
    return kvhost::shfl(kvhost::SHFL_XOR, mask, var, lane_mask, width, line);
}

// ---- WMMA ----------------------------------------------------------------------------------
// A fragment of an R x C tile is spread over the warp: lane l holds elements l, l + 32, ...
// of the tile in row-major order (the hardware's mapping is unspecified; code that relies on
// it is wrong on some GPU). load, store and mma wait for the whole warp, then act at once.
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int m, int n, int k, class T, class Layout = void>
struct fragment {
    static constexpr int rows = __is_same(Use, matrix_b) ? k : m;
    static constexpr int cols = __is_same(Use, matrix_a) ? k : n;
    static constexpr int num_elements = rows * cols / kvhost::WARP;
    static_assert(rows * cols % kvhost::WARP == 0, "fragment size");
    T x[num_elements];
};

namespace detail {

template <class T>
inline void check_operand(const void* p, unsigned ldm, const char* what, int kind) {
    if ((uintptr_t)p % 32)
        kvhost::fail("%s: pointer %p is not 256-bit (32-byte) aligned", what, p);
    unsigned step = 16 / sizeof(T);
    if (ldm % step)
        kvhost::fail("%s: ldm %u is not a multiple of %u elements (16 bytes)", what, ldm, step);
    (void)kind;
}

template <class Frag>
inline void same_args(kvhost::Thread** lanes, const char* what) {
    for (int l = 1; l < kvhost::WARP; ++l) {
        if (lanes[l]->ptr != lanes[0]->ptr || lanes[l]->ldm != lanes[0]->ldm ||
            lanes[l]->layout != lanes[0]->layout) {
            kvhost::g_cur = lanes[l];
            kvhost::fail("%s: lane %d passes pointer %p ldm %u, lane 0 pointer %p ldm %u", what,
                         l, lanes[l]->ptr, lanes[l]->ldm, lanes[0]->ptr, lanes[0]->ldm);
        }
    }
}

template <class Frag, class T>
inline void load_all(kvhost::Thread** lanes, unsigned) {
    same_args<Frag>(lanes, "wmma::load_matrix_sync");
    const T* p = (const T*)lanes[0]->ptr;
    unsigned ldm = lanes[0]->ldm;
    bool col = lanes[0]->layout == mem_col_major;
    for (int l = 0; l < kvhost::WARP; ++l) {
        Frag* f = (Frag*)lanes[l]->frag[0];
        for (int i = 0; i < Frag::num_elements; ++i) {
            int e = i * kvhost::WARP + l, r = e / Frag::cols, c = e % Frag::cols;
            f->x[i] = col ? p[(size_t)c * ldm + r] : p[(size_t)r * ldm + c];
        }
    }
}

template <class Frag, class T>
inline void store_all(kvhost::Thread** lanes, unsigned) {
    same_args<Frag>(lanes, "wmma::store_matrix_sync");
    T* p = (T*)lanes[0]->ptr;
    unsigned ldm = lanes[0]->ldm;
    bool col = lanes[0]->layout == mem_col_major;
    for (int l = 0; l < kvhost::WARP; ++l) {
        const Frag* f = (const Frag*)lanes[l]->frag[0];
        for (int i = 0; i < Frag::num_elements; ++i) {
            int e = i * kvhost::WARP + l, r = e / Frag::cols, c = e % Frag::cols;
            (col ? p[(size_t)c * ldm + r] : p[(size_t)r * ldm + c]) = f->x[i];
        }
    }
}

template <class FD, class FA, class FB, class FC>
inline void mma_all(kvhost::Thread** lanes, unsigned) {
    constexpr int M = FA::rows, K = FA::cols, N = FB::cols;
    float a[M * K], b[K * N], c[M * N];
    for (int l = 0; l < kvhost::WARP; ++l) {
        const FA* fa = (const FA*)lanes[l]->frag[1];
        const FB* fb = (const FB*)lanes[l]->frag[2];
        const FC* fc = (const FC*)lanes[l]->frag[3];
        for (int i = 0; i < FA::num_elements; ++i) a[i * kvhost::WARP + l] = (float)fa->x[i];
        for (int i = 0; i < FB::num_elements; ++i) b[i * kvhost::WARP + l] = (float)fb->x[i];
        for (int i = 0; i < FC::num_elements; ++i) c[i * kvhost::WARP + l] = (float)fc->x[i];
    }
    for (int i = 0; i < M; ++i) {
        for (int j = 0; j < N; ++j) {
            float acc = c[i * N + j];
            for (int r = 0; r < K; ++r) acc += a[i * K + r] * b[r * N + j];  // fp32 products
            c[i * N + j] = acc;
        }
    }
    for (int l = 0; l < kvhost::WARP; ++l) {
        FD* fd = (FD*)lanes[l]->frag[0];
        for (int i = 0; i < FD::num_elements; ++i) fd->x[i] = c[i * kvhost::WARP + l];
    }
}

inline void post(const void* p, unsigned ldm, int layout, void* frag) {
    kvhost::Thread* t = kvhost::g_cur;
    t->ptr = p;
    t->ldm = ldm;
    t->layout = layout;
    t->frag[0] = frag;
}

template <class Layout>
constexpr int layout_of() {
    return __is_same(Layout, col_major) ? mem_col_major : mem_row_major;
}

}  // namespace detail

template <class Use, int m, int n, int k, class T, class L, class V>
inline void fill_fragment(fragment<Use, m, n, k, T, L>& f, const V& v) {
    for (int i = 0; i < f.num_elements; ++i) f.x[i] = (T)v;
}

// matrix_a / matrix_b: the layout is the fragment's
template <class Use, int m, int n, int k, class T, class L>
inline void load_matrix_sync(fragment<Use, m, n, k, T, L>& f, const T* p, unsigned ldm,
                             int line = __builtin_LINE()) {
    static_assert(!__is_same(L, void), "an accumulator load needs a wmma::layout_t");
    using F = fragment<Use, m, n, k, T, L>;
    detail::check_operand<T>(p, ldm, "wmma::load_matrix_sync", kvhost::WMMA_LOAD);
    detail::post(p, ldm, detail::layout_of<L>(), &f);
    kvhost::collective(kvhost::WMMA_LOAD, 0xffffffffu, line, detail::load_all<F, T>);
}

template <int m, int n, int k, class T>
inline void load_matrix_sync(fragment<accumulator, m, n, k, T>& f, const T* p, unsigned ldm,
                             layout_t layout, int line = __builtin_LINE()) {
    using F = fragment<accumulator, m, n, k, T>;
    detail::check_operand<T>(p, ldm, "wmma::load_matrix_sync", kvhost::WMMA_LOAD);
    detail::post(p, ldm, layout, &f);
    kvhost::collective(kvhost::WMMA_LOAD, 0xffffffffu, line, detail::load_all<F, T>);
}

template <int m, int n, int k, class T>
inline void store_matrix_sync(T* p, const fragment<accumulator, m, n, k, T>& f, unsigned ldm,
                              layout_t layout, int line = __builtin_LINE()) {
    using F = fragment<accumulator, m, n, k, T>;
    detail::check_operand<T>(p, ldm, "wmma::store_matrix_sync", kvhost::WMMA_STORE);
    detail::post(p, ldm, layout, (void*)&f);
    kvhost::collective(kvhost::WMMA_STORE, 0xffffffffu, line, detail::store_all<F, T>);
}

template <int m, int n, int k, class TA, class LA, class LB, class TC, class TD>
inline void mma_sync(fragment<accumulator, m, n, k, TD>& d,
                     const fragment<matrix_a, m, n, k, TA, LA>& a,
                     const fragment<matrix_b, m, n, k, TA, LB>& b,
                     const fragment<accumulator, m, n, k, TC>& c, int line = __builtin_LINE()) {
    using FD = fragment<accumulator, m, n, k, TD>;
    using FA = fragment<matrix_a, m, n, k, TA, LA>;
    using FB = fragment<matrix_b, m, n, k, TA, LB>;
    using FC = fragment<accumulator, m, n, k, TC>;
    kvhost::Thread* t = kvhost::g_cur;
    t->frag[0] = &d;
    t->frag[1] = (void*)&a;
    t->frag[2] = (void*)&b;
    t->frag[3] = (void*)&c;
    kvhost::collective(kvhost::WMMA_MMA, 0xffffffffu, line, detail::mma_all<FD, FA, FB, FC>);
}

}  // namespace wmma
}  // namespace nvcuda
