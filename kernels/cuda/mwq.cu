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

__device__ __forceinline__ float d2_h2f(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ unsigned short d2_f2h(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ unsigned short d2_f2bf(float f) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
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

// (a) Level-b dequantization: one thread per (row, 32-column word); out_kind 0 f32, 1 f16, 2 bf16.
// grid = (rows, ceil(words / D2_DEQUANT_THREADS)), block = D2_DEQUANT_THREADS.
extern "C" __global__ void d2_dequant(const D2Mat* __restrict__ mp, void* __restrict__ out, int out_kind) {
    const D2Mat& m = *mp;
    const long long r = blockIdx.x;
    const long long k = (long long)blockIdx.y * blockDim.x + threadIdx.x;
    const long long words = (m.cols + 31) >> 5;
    if (r >= m.rows || k >= words) return;
    unsigned int w[D2_MAX_PLANES];
    d2_load_words(m, r, k, w);
    float a[D2_MAX_TERMS];
    long long c0 = 32 * k;
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
        const float v = d2_weight(m, w, j, base, a);
        const long long i = r * m.cols + c;
        if (out_kind == 0) ((float*)out)[i] = v;
        else if (out_kind == 1) ((unsigned short*)out)[i] = d2_f2h(v);
        else ((unsigned short*)out)[i] = d2_f2bf(v);
    }
}

// (b)+(c) Fused dequant-GEMV, grouped: blockIdx.y picks the problem (one per active expert matrix,
// each at its own level), blockIdx.x a tile of D2_GEMV_WARPS * D2_ROWS_PER_WARP rows. Lane l of a
// warp takes word l of each D2_CHUNK_WORDS-word column chunk; x's chunk sits in shared memory padded
// to 33 floats per word so the 32 lanes hit 32 banks. float32 accumulation, warp-shuffle reduction.
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
    const long long words = (m.cols + 31) >> 5;
    float acc[D2_ROWS_PER_WARP][D2_MAX_TOKENS];
#pragma unroll
    for (int rr = 0; rr < D2_ROWS_PER_WARP; ++rr)
#pragma unroll
        for (int n = 0; n < D2_MAX_TOKENS; ++n) acc[rr][n] = 0.f;

    for (long long w0 = 0; w0 < words; w0 += D2_CHUNK_WORDS) {
        __syncthreads();
        for (int i = threadIdx.x; i < ntok * D2_CHUNK_WORDS * 32; i += blockDim.x) {
            const int n = i / (D2_CHUNK_WORDS * 32), c = i % (D2_CHUNK_WORDS * 32);
            const long long col = 32 * w0 + c;
            xs[n][c >> 5][c & 31] = col < m.cols ? x[n * m.cols + col] : 0.f;
        }
        __syncthreads();
        const long long k = w0 + lane;
        if (k >= words) continue;
#pragma unroll
        for (int rr = 0; rr < D2_ROWS_PER_WARP; ++rr) {
            const long long r = row0 + rr;
            if (r >= m.rows) continue;
            unsigned int w[D2_MAX_PLANES];
            d2_load_words(m, r, k, w);
            float a[D2_MAX_TERMS];
            const long long c0 = 32 * k;
            long long g = c0 / m.group_size, g_end = (g + 1) * m.group_size;
            float base = d2_group(m, r, g, a);
            for (int j = 0; j < 32; ++j) {
                const long long c = c0 + j;
                if (c >= m.cols) break;
                if (c == g_end) {
                    ++g;
                    g_end += m.group_size;
                    base = d2_group(m, r, g, a);
                }
                const float v = d2_weight(m, w, j, base, a);
#pragma unroll
                for (int n = 0; n < D2_MAX_TOKENS; ++n)
                    if (n < ntok) acc[rr][n] += v * xs[n][lane][j];
            }
        }
    }
    float* y = (float*)pr.y;
#pragma unroll
    for (int rr = 0; rr < D2_ROWS_PER_WARP; ++rr) {
        const long long r = row0 + rr;
#pragma unroll
        for (int n = 0; n < D2_MAX_TOKENS; ++n) {
            float v = acc[rr][n];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
            if (lane == 0 && r < m.rows && n < ntok) y[n * m.rows + r] = v;
        }
    }
}
