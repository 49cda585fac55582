// d2moe CUDA kernels on the nested MWQ bit-planes (compiled at first use by cupy.RawModule / NVRTC).
//
// Every kernel reads one matrix at one level through its "terms" (kernels/packed.py):
//     w[r, c] = offset[r, g] + sum_t mul_t * coef_t[r, g] * (code_t[r, c] + bias_t),   g = c / group_size
// with code_t the unsigned number read from planes [first_t, first_t + nplanes_t), most significant
// first. Plane p is uint8 [rows, cols / 8], bit k of byte b = column 8 b + k, so the little-endian
// 32-bit word k of a row holds columns [32 k, 32 k + 32) (bit j = column 32 k + j). Only the planes
// the level needs are read. Arithmetic is float32; no CUDA headers (fp16/bf16 conversions are PTX).
//
// The host side (kernels/cuda_abi.py) packs D2Mat / D2Problem with the same layout (a test checks
// the offsets against this file compiled by the host C compiler) and sizes the grids.

#define D2_MAX_TERMS 8
#define D2_MAX_PLANES 8
#define D2_MAX_TOKENS 8
#define D2_GEMV_WARPS 8
#define D2_ROWS_PER_WARP 2
#define D2_CHUNK_WORDS 32
#define D2_DEQUANT_THREADS 128

struct D2Mat {
    long long rows, cols, group_size, nterms;
    unsigned long long planes[D2_MAX_PLANES];  // device pointers, uint8 [rows, cols / 8]
    unsigned long long offset;                 // float16 [rows, G]
    unsigned long long coef[D2_MAX_TERMS];     // float16 [rows, G]
    int first[D2_MAX_TERMS];
    int nplanes[D2_MAX_TERMS];
    float mul[D2_MAX_TERMS];
    float bias[D2_MAX_TERMS];
    int words_aligned;  // 1: cols % 32 == 0 and every plane 4-byte aligned (rows read as uint32 words)
    int pad;
};

struct D2Problem {  // one GEMV of a grouped launch: y [ntok, rows] = x [ntok, cols] W^T (float32)
    D2Mat m;
    unsigned long long x;
    unsigned long long y;
    long long ntok;
    long long pad;
};

// The conversions are PTX on the GPU; compiled for the host (tests/cuda/simt_host.cpp) they are C.
__device__ __forceinline__ float d2_h2f(unsigned short h) {
#ifdef __CUDACC__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    _Float16 v;
    __builtin_memcpy(&v, &h, 2);
    return (float)v;
#endif
}

__device__ __forceinline__ unsigned short d2_f2h(float f) {
#ifdef __CUDACC__
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    _Float16 v = (_Float16)f;
    unsigned short h;
    __builtin_memcpy(&h, &v, 2);
    return h;
#endif
}

__device__ __forceinline__ unsigned short d2_f2bf(float f) {
#ifdef __CUDACC__
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    unsigned int u;
    __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // round to nearest even
#endif
}

// Word k (columns [32 k, 32 k + 32)) of plane p, row r; bytes past the row's end read as 0.
__device__ __forceinline__ unsigned int d2_word(const D2Mat& m, int p, long long r, long long k) {
    const long long row_bytes = m.cols >> 3;
    const unsigned char* row = (const unsigned char*)m.planes[p] + r * row_bytes;
    if (m.words_aligned) return __ldg((const unsigned int*)row + k);
    unsigned int w = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
        long long i = 4 * k + b;
        if (i < row_bytes) w |= (unsigned int)__ldg(row + i) << (8 * b);
    }
    return w;
}

// The level's planes of word k, row r (planes beyond the level stay 0 and are never read).
__device__ __forceinline__ void d2_load_words(const D2Mat& m, long long r, long long k, unsigned int* words) {
    const int used = m.first[m.nterms - 1] + m.nplanes[m.nterms - 1];
#pragma unroll
    for (int p = 0; p < D2_MAX_PLANES; ++p) words[p] = p < used ? d2_word(m, p, r, k) : 0u;
}

// Per-group constants: a_t = mul_t * coef_t[r, g]; base = offset[r, g] + sum_t a_t * bias_t.
__device__ __forceinline__ float d2_group(const D2Mat& m, long long r, long long g, float* a) {
    const long long G = m.cols / m.group_size;
    float base = d2_h2f(__ldg((const unsigned short*)m.offset + r * G + g));
#pragma unroll
    for (int t = 0; t < D2_MAX_TERMS; ++t) {
        if (t < m.nterms) {
            a[t] = m.mul[t] * d2_h2f(__ldg((const unsigned short*)m.coef[t] + r * G + g));
            base += a[t] * m.bias[t];
        } else {
            a[t] = 0.f;
        }
    }
    return base;
}

// w at bit j of the loaded words.
__device__ __forceinline__ float d2_weight(const D2Mat& m, const unsigned int* words, int j, float base, const float* a) {
    float w = base;
#pragma unroll
    for (int t = 0; t < D2_MAX_TERMS; ++t) {
        if (t < m.nterms) {
            const int first = m.first[t], last = m.first[t] + m.nplanes[t] - 1;
            unsigned int code = 0;
#pragma unroll
            for (int p = 0; p < D2_MAX_PLANES; ++p)
                if (p >= first && p <= last) code |= ((words[p] >> j) & 1u) << (last - p);
            w += a[t] * (float)code;
        }
    }
    return w;
}

// The general path over one (row, 32-column word): fn(j, c, w) for every column c = 32 k + j < cols,
// with w its weight; any group size (the group may change inside the word) and any terms.
template <class Fn>
__device__ __forceinline__ void d2_word_weights(const D2Mat& m, long long r, long long k, Fn fn) {
    unsigned int w[D2_MAX_PLANES];
    d2_load_words(m, r, k, w);
    float a[D2_MAX_TERMS];
    const long long c0 = 32 * k;
    long long g = c0 / m.group_size, g_end = (g + 1) * m.group_size;
    float base = d2_group(m, r, g, a);
#pragma unroll 4
    for (int j = 0; j < 32; ++j) {
        const long long c = c0 + j;
        if (c >= m.cols) break;
        if (c == g_end) {
            ++g;
            g_end += m.group_size;
            base = d2_group(m, r, g, a);
        }
        fn(j, c, d2_weight(m, w, j, base, a));
    }
}

// x's chunk of D2_CHUNK_WORDS words (columns [32 w0, 32 (w0 + D2_CHUNK_WORDS))) of every token into
// shared memory, padded to 33 floats per word so that lane l reading word l hits bank (l + j) % 32.
__device__ __forceinline__ void d2_stage_x(float (*xs)[D2_CHUNK_WORDS][33], const float* x, int ntok,
                                           long long cols, long long w0) {
    __syncthreads();
    for (int i = threadIdx.x; i < ntok * D2_CHUNK_WORDS * 32; i += blockDim.x) {
        const int n = i / (D2_CHUNK_WORDS * 32), c = i % (D2_CHUNK_WORDS * 32);
        const long long col = 32 * w0 + c;
        xs[n][c >> 5][c & 31] = col < cols ? x[n * cols + col] : 0.f;
    }
    __syncthreads();
}

// Each row's 32 lane partial sums -> y [ntok, rows] (warp-shuffle reduction).
template <int NT>
__device__ __forceinline__ void d2_store_rows(float (&acc)[D2_ROWS_PER_WARP][NT], float* y, long long rows,
                                              long long row0, int ntok, int lane) {
#pragma unroll
    for (int rr = 0; rr < D2_ROWS_PER_WARP; ++rr) {
        const long long r = row0 + rr;
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            float v = acc[rr][n];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
            if (lane == 0 && r < rows && n < ntok) y[n * rows + r] = v;
        }
    }
}

// The fast path's layout: planes read as words, every word inside one group (group_size % 32 == 0),
// and terms "F planes from plane 0, then one term per further plane": sliced (one term, F = level)
// and residual (F = b1, then one single-plane term per extra level) are both of this form.
__device__ __forceinline__ int d2_fast_first(const D2Mat& m) {
#ifdef D2_GENERIC_ONLY  // the general path alone (scripts/gpu_bench.py times both; tests check both)
    return 0;
#endif
    if (!m.words_aligned || (m.group_size & 31) || m.nterms < 1 || m.first[0] != 0) return 0;
    const int F = m.nplanes[0];
    for (int t = 1; t < m.nterms; ++t)
        if (m.nplanes[t] != 1 || m.first[t] != F + t - 1) return 0;
    return F;
}

// One warp's rows over every column chunk: x staged per chunk, `word(r, k, acc[r's row])` adds row r's
// word k (32 columns) to its NT token sums, then the warp reduces and stores. Both paths are this loop.
template <int NT, class Word>
__device__ __forceinline__ void d2_gemv_rows(const D2Mat& m, const float* x, float* y, int ntok, long long row0,
                                             int lane, float (*xs)[D2_CHUNK_WORDS][33], Word word) {
    const long long words = (m.cols + 31) >> 5;
    float acc[D2_ROWS_PER_WARP][NT];
#pragma unroll
    for (int rr = 0; rr < D2_ROWS_PER_WARP; ++rr)
#pragma unroll
        for (int n = 0; n < NT; ++n) acc[rr][n] = 0.f;
    for (long long w0 = 0; w0 < words; w0 += D2_CHUNK_WORDS) {
        d2_stage_x(xs, x, ntok, m.cols, w0);
        const long long k = w0 + lane;
        if (k >= words) continue;
#pragma unroll
        for (int rr = 0; rr < D2_ROWS_PER_WARP; ++rr)
            if (row0 + rr < m.rows) word(row0 + rr, k, acc[rr]);
    }
    d2_store_rows<NT>(acc, y, m.rows, row0, ntok, lane);
}

// One (row, 32-column word) of a fast-path layout (d2_fast_first): the level's plane words and the
// group's constants, F and whether there are single-plane terms fixed at compile time. weight(j): the
// code of term 0 assembled from F plane bits, made a float by the exponent trick (no int-to-float
// conversion), w = base + a0 code (+ the single-plane terms' a_s whose bit is set).
template <int F, bool SINGLES>
struct D2FastWord {
    unsigned int w[D2_MAX_PLANES];
    float a0, base, as[D2_MAX_PLANES];
    int nsingle;

    __device__ __forceinline__ D2FastWord(const D2Mat& m, long long r, long long k) {
        const long long row_bytes = m.cols >> 3, rg = r * (m.cols / m.group_size) + k / (m.group_size >> 5);
        nsingle = (int)m.nterms - 1;
#pragma unroll
        for (int p = 0; p < D2_MAX_PLANES; ++p)
            w[p] = p < F + nsingle ? __ldg((const unsigned int*)((const unsigned char*)m.planes[p] + r * row_bytes) + k) : 0u;
        a0 = m.mul[0] * d2_h2f(__ldg((const unsigned short*)m.coef[0] + rg));
        base = d2_h2f(__ldg((const unsigned short*)m.offset + rg)) + a0 * m.bias[0];
#pragma unroll
        for (int s = 0; s < D2_MAX_PLANES - F; ++s) {
            as[s] = SINGLES && s < nsingle ? m.mul[s + 1] * d2_h2f(__ldg((const unsigned short*)m.coef[s + 1] + rg)) : 0.f;
            base += as[s] * (SINGLES && s < nsingle ? m.bias[s + 1] : 0.f);
        }
    }

    __device__ __forceinline__ float weight(int j) const {
        unsigned int code = 0x4B000000u;  // 2^23: the code lands in the mantissa's low bits
#pragma unroll
        for (int p = 0; p < F; ++p) code |= ((w[p] >> j) & 1u) << (F - 1 - p);
        float v = fmaf(a0, __int_as_float(code) - 8388608.f, base);
        if (SINGLES) {
#pragma unroll
            for (int s = 0; s < D2_MAX_PLANES - F; ++s)
                if (s < nsingle && ((w[F + s] >> j) & 1u)) v += as[s];
        }
        return v;
    }
};

// Fast GEMV of one warp's rows (D2FastWord per word), the token count NT (>= ntok) fixed at compile
// time: per column one weight, then NT FMAs.
template <int F, bool SINGLES, int NT>
__device__ void d2_gemv_fast(const D2Mat& m, const float* x, float* y, int ntok, long long row0, int lane,
                             float (*xs)[D2_CHUNK_WORDS][33]) {
    d2_gemv_rows<NT>(m, x, y, ntok, row0, lane, xs, [&](long long r, long long k, float (&acc)[NT]) {
        const D2FastWord<F, SINGLES> fw(m, r, k);
#pragma unroll 8
        for (int j = 0; j < 32; ++j) {
            const float v = fw.weight(j);
#pragma unroll
            for (int n = 0; n < NT; ++n) acc[n] = fmaf(v, xs[n][lane][j], acc[n]);
        }
    });
}

// Fast dequantization of one (row, word): 32 weights written 8 at a time as 16-byte stores (fp16/bf16
// pairs packed in 32-bit words) or 2 x 16 bytes (fp32). The row's output is 16-byte aligned (checked).
template <int F, bool SINGLES>
__device__ void d2_dequant_fast(const D2Mat& m, long long r, long long k, void* out, int out_kind) {
    const D2FastWord<F, SINGLES> fw(m, r, k);
    const long long first = r * m.cols + 32 * k;  // element index of column 32 k
#pragma unroll 1
    for (int j0 = 0; j0 < 32; j0 += 8) {
        float v[8];
#pragma unroll
        for (int jj = 0; jj < 8; ++jj) v[jj] = fw.weight(j0 + jj);
        if (out_kind == 0) {
            float4* o = (float4*)((float*)out + first + j0);
            o[0] = make_float4(v[0], v[1], v[2], v[3]);
            o[1] = make_float4(v[4], v[5], v[6], v[7]);
        } else {
            unsigned int h[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const unsigned int lo = out_kind == 1 ? d2_f2h(v[2 * i]) : d2_f2bf(v[2 * i]);
                const unsigned int hi = out_kind == 1 ? d2_f2h(v[2 * i + 1]) : d2_f2bf(v[2 * i + 1]);
                h[i] = lo | (hi << 16);
            }
            *(uint4*)((unsigned short*)out + first + j0) = make_uint4(h[0], h[1], h[2], h[3]);
        }
    }
}

// Runs body.run<F, SINGLES>() for the compiled fast-path variant of (F, singles) and returns true, or
// returns false when none is compiled (the general path runs). Sliced layouts: F = the level; residual:
// F = the first level's bits, with single-plane terms above it.
template <class Body>
__device__ __forceinline__ bool d2_fast_variant(int F, bool singles, const Body& body) {
    if (singles) {
        switch (F) {
            case 1: body.template run<1, true>(); return true;
            case 2: body.template run<2, true>(); return true;
            case 3: body.template run<3, true>(); return true;
            case 4: body.template run<4, true>(); return true;
            default: return false;
        }
    }
    switch (F) {
        case 1: body.template run<1, false>(); return true;
        case 2: body.template run<2, false>(); return true;
        case 3: body.template run<3, false>(); return true;
        case 4: body.template run<4, false>(); return true;
        case 5: body.template run<5, false>(); return true;
        case 6: body.template run<6, false>(); return true;
        case 8: body.template run<8, false>(); return true;
        default: return false;
    }
}

// d2_fast_variant's bodies: one warp's rows of a GEMV with NT token slots, and one (row, word) dequantized.
template <int NT>
struct D2GemvFast {
    const D2Mat& m;
    const float* x;
    float* y;
    int ntok;
    long long row0;
    int lane;
    float (*xs)[D2_CHUNK_WORDS][33];

    template <int F, bool SINGLES>
    __device__ __forceinline__ void run() const { d2_gemv_fast<F, SINGLES, NT>(m, x, y, ntok, row0, lane, xs); }
};

struct D2DequantFast {
    const D2Mat& m;
    long long r, k;
    void* out;
    int out_kind;

    template <int F, bool SINGLES>
    __device__ __forceinline__ void run() const { d2_dequant_fast<F, SINGLES>(m, r, k, out, out_kind); }
};

// (a) Level-b dequantization: one thread per (row, 32-column word); out_kind 0 f32, 1 f16, 2 bf16. A
// fast-path layout into a 16-byte aligned output takes d2_dequant_fast, anything else the general path.
// grid = (rows, ceil(words / D2_DEQUANT_THREADS)), block = D2_DEQUANT_THREADS.
extern "C" __global__ void d2_dequant(const D2Mat* __restrict__ mp, void* __restrict__ out, int out_kind) {
    const D2Mat& m = *mp;
    const long long r = blockIdx.x;
    const long long k = (long long)blockIdx.y * blockDim.x + threadIdx.x;
    if (r >= m.rows || k >= ((m.cols + 31) >> 5)) return;
    const int F = ((unsigned long long)out & 15) ? 0 : d2_fast_first(m);
    if (F > 0 && d2_fast_variant(F, m.nterms > 1, D2DequantFast{m, r, k, out, out_kind})) return;
    d2_word_weights(m, r, k, [&](int, long long c, float v) {
        const long long i = r * m.cols + c;
        if (out_kind == 0) ((float*)out)[i] = v;
        else if (out_kind == 1) ((unsigned short*)out)[i] = d2_f2h(v);
        else ((unsigned short*)out)[i] = d2_f2bf(v);
    });
}

// (b)+(c) Fused dequant-GEMV, grouped: blockIdx.y picks the problem (one per active expert matrix,
// each at its own level), blockIdx.x a tile of D2_GEMV_WARPS * D2_ROWS_PER_WARP rows. Lane l of a
// warp takes word l of each D2_CHUNK_WORDS-word column chunk; x's chunk sits in shared memory.
// float32 accumulation, warp-shuffle reduction. The layout of d2_fast_first (every packed layout
// d2moe writes when columns and groups are multiples of 32) takes d2_gemv_fast; anything else the
// general per-column path below. Every branch between them is uniform over the block.
// grid = (ceil(max rows / rows per block), problems), block = 32 * D2_GEMV_WARPS.
extern "C" __global__ void d2_gemv(const D2Problem* __restrict__ problems) {
    __shared__ float xs[D2_MAX_TOKENS][D2_CHUNK_WORDS][33];
    const D2Problem& pr = problems[blockIdx.y];
    const D2Mat& m = pr.m;
    const long long rows_per_block = D2_GEMV_WARPS * D2_ROWS_PER_WARP;
    if ((long long)blockIdx.x * rows_per_block >= m.rows) return;  // uniform over the block
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long row0 = (long long)blockIdx.x * rows_per_block + (long long)warp * D2_ROWS_PER_WARP;
    const int ntok = (int)pr.ntok;
    const float* x = (const float*)pr.x;
    float* y = (float*)pr.y;

    const int F = d2_fast_first(m);
    if (F > 0) {
        const bool singles = m.nterms > 1;
        bool done;
        if (ntok == 1) done = d2_fast_variant(F, singles, D2GemvFast<1>{m, x, y, ntok, row0, lane, xs});
        else if (ntok <= 4) done = d2_fast_variant(F, singles, D2GemvFast<4>{m, x, y, ntok, row0, lane, xs});
        else done = d2_fast_variant(F, singles, D2GemvFast<8>{m, x, y, ntok, row0, lane, xs});
        if (done) return;
    }

    d2_gemv_rows<D2_MAX_TOKENS>(m, x, y, ntok, row0, lane, xs, [&](long long r, long long k, float (&acc)[D2_MAX_TOKENS]) {
        d2_word_weights(m, r, k, [&](int j, long long, float v) {
#pragma unroll
            for (int n = 0; n < D2_MAX_TOKENS; ++n)
                if (n < ntok) acc[n] += v * xs[n][lane][j];
        });
    });
}
