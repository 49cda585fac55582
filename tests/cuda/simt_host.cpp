// kernels/cuda/mwq.cu compiled by the host C++ compiler and run on the CPU, thread for thread.
//
// The CPU emulator (kernels/cuda_emulator.py) recomputes what the kernels should compute in torch; this
// runs the kernels' own source instead, so a wrong index, a missed barrier, a bad shuffle or a wrong
// fast path in mwq.cu shows up on a machine without a GPU. Each CUDA thread of a block is a fiber
// (ucontext) on one OS thread; blocks run one after another. __syncthreads() waits for every live
// thread of the block, __shfl_down_sync() for every live thread of the warp (exited threads count as
// arrived, as on the GPU), with the exchanged values double-buffered per round. __shared__ becomes
// `static`, which is one copy per block because blocks never overlap. Device pointers are host
// addresses: the records hold data_ptr()s of CPU tensors.
//
// Built by tests/cuda/simt.py:  g++ -std=c++17 -O1 -shared -fPIC [-DMWQ_SOURCE='"other.cu"'] simt_host.cpp -o simt_host.so

#include <cmath>
#include <cstdint>
#include <cstring>
#include <ucontext.h>
#include <vector>

struct SimtDim {
    unsigned x, y, z;
};

static SimtDim threadIdx, blockIdx, blockDim, gridDim;

namespace simt {

enum State { RUNNING, AT_BLOCK_SYNC, AT_WARP_SYNC, DONE };

struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    State state;
    unsigned tid;
};

static ucontext_t scheduler;
static std::vector<Fiber> fibers;
static unsigned current;
static float shfl_slots[2][64][32];  // [round parity][warp][lane]
static unsigned shfl_round[64];     // per warp: completed shuffle rounds
static void (*body)(void*);
static void* body_arg;

static void yield_as(State s) {
    fibers[current].state = s;
    swapcontext(&fibers[current].ctx, &scheduler);
}

static void entry() {
    body(body_arg);
    fibers[current].state = DONE;  // uc_link returns to the scheduler
}

// Run `fn(arg)` as every thread of one block.
static void run_block(void (*fn)(void*), void* arg, unsigned nthreads) {
    body = fn;
    body_arg = arg;
    fibers.resize(nthreads);
    for (unsigned w = 0; w < 64; ++w) shfl_round[w] = 0;
    for (unsigned t = 0; t < nthreads; ++t) {
        Fiber& f = fibers[t];
        f.stack.resize(256 * 1024);
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = &scheduler;
        makecontext(&f.ctx, entry, 0);
        f.state = RUNNING;
        f.tid = t;
    }
    for (;;) {
        bool progressed = false;
        for (unsigned t = 0; t < nthreads; ++t) {
            if (fibers[t].state != RUNNING) continue;
            current = t;
            threadIdx = {fibers[t].tid % blockDim.x, (fibers[t].tid / blockDim.x) % blockDim.y,
                         fibers[t].tid / (blockDim.x * blockDim.y)};
            swapcontext(&scheduler, &fibers[t].ctx);
            progressed = true;
        }
        if (progressed) continue;
        // nobody runnable: release a warp whose live threads all wait at a shuffle, else the block
        bool released = false;
        for (unsigned w = 0; w * 32 < nthreads; ++w) {
            bool any = false, all = true;
            for (unsigned t = 32 * w; t < 32 * (w + 1) && t < nthreads; ++t) {
                if (fibers[t].state == DONE) continue;
                any = true;
                all = all && fibers[t].state == AT_WARP_SYNC;
            }
            if (any && all) {
                for (unsigned t = 32 * w; t < 32 * (w + 1) && t < nthreads; ++t)
                    if (fibers[t].state == AT_WARP_SYNC) fibers[t].state = RUNNING;
                released = true;
            }
        }
        if (released) continue;
        bool any = false, all = true;
        for (unsigned t = 0; t < nthreads; ++t) {
            if (fibers[t].state == DONE) continue;
            any = true;
            all = all && fibers[t].state == AT_BLOCK_SYNC;
        }
        if (!any) return;
        if (!all) __builtin_trap();  // threads wait at different barriers: a deadlock on the GPU too
        for (unsigned t = 0; t < nthreads; ++t)
            if (fibers[t].state == AT_BLOCK_SYNC) fibers[t].state = RUNNING;
    }
}

}  // namespace simt

static inline void __syncthreads() { simt::yield_as(simt::AT_BLOCK_SYNC); }

static inline float __shfl_down_sync(unsigned, float v, int off) {
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const unsigned parity = simt::shfl_round[warp] & 1;
    simt::shfl_slots[parity][warp][lane] = v;
    simt::yield_as(simt::AT_WARP_SYNC);
    // the first lane through counts the round; later lanes of the same round see it counted
    const float out = lane + off < 32 ? simt::shfl_slots[parity][warp][lane + off] : v;
    if ((simt::shfl_round[warp] & 1) == parity) ++simt::shfl_round[warp];
    return out;
}

template <class T>
static inline T __ldg(const T* p) { return *p; }

struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
static inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

static inline float __int_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

using std::fmaf;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

#ifndef MWQ_SOURCE
#define MWQ_SOURCE "../../kernels/cuda/mwq.cu"
#endif
#include MWQ_SOURCE

namespace {
struct DequantArgs {
    const D2Mat* m;
    void* out;
    int kind;
};
void dequant_body(void* a) {
    auto* d = static_cast<DequantArgs*>(a);
    d2_dequant(d->m, d->out, d->kind);
}
void gemv_body(void* a) { d2_gemv(static_cast<const D2Problem*>(a)); }
}  // namespace

// which: 0 d2_dequant(a0 = D2Mat*, a1 = out, a2 = out kind), 1 d2_gemv(a0 = D2Problem*).
extern "C" int simt_launch(int which, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                           unsigned bz, uint64_t a0, uint64_t a1, int a2) {
    if (bx * by * bz > 64 * 32) return 1;
    gridDim = {gx, gy, gz};
    blockDim = {bx, by, bz};
    DequantArgs d{reinterpret_cast<const D2Mat*>(a0), reinterpret_cast<void*>(a1), a2};
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                blockIdx = {x, y, z};
                if (which == 0) simt::run_block(dequant_body, &d, bx * by * bz);
                else simt::run_block(gemv_body, reinterpret_cast<void*>(a0), bx * by * bz);
            }
    return 0;
}
