/* Dense GEMV for decode: the model's resident nn.Linear layers at memory rate (kernels/dense.py), and
   single-query attention over the KV cache (kernels/attention.py), both reading 16-bit data in place. */

#include <stdlib.h>

#include "common.h"

/* ---------------------------------------------------------------- dense GEMV (decode) */

/* y[n, o] = sum_c W[o, c] x[n, c] (* scale[o] for int8) for rows [r0, r1), ntok <= 8 tokens.
   W is row-major [rows, cols] of dtype 0 = float32, 1 = bfloat16, 2 = float16, 3 = int8 with a
   float32 scale per row. x is float32 [ntok, cols]; accumulation is float32 in a fixed order. */
enum { D2_F32 = 0, D2_BF16 = 1, D2_F16 = 2, D2_I8 = 3 };

static inline float dense_at(const void *W, int dtype, int64_t i) {
    switch (dtype) {
    case D2_F32: return ((const float *)W)[i];
    case D2_BF16: { uint32_t b = (uint32_t)((const uint16_t *)W)[i] << 16; float f; memcpy(&f, &b, 4); return f; }
    case D2_F16: return f16_to_f32(((const uint16_t *)W)[i]);
    default: return (float)((const int8_t *)W)[i];
    }
}

#if D2_AVX512 || D2_AVX2
/* One row loop for both vector widths: VW floats per vector, the dtype's load widened to float32. */
#if D2_AVX512
#define VW 16
typedef __m512 vec;
#define vzero _mm512_setzero_ps
#define vloadu _mm512_loadu_ps
#define vfmadd _mm512_fmadd_ps
#define vadd _mm512_add_ps
#define vsum _mm512_reduce_add_ps
#define vstoreu _mm512_storeu_ps
#define vset1 _mm512_set1_ps
static inline __attribute__((always_inline)) vec dense_load(const void *W, const int dtype, int64_t i) {
    switch (dtype) {
    case D2_F32: return _mm512_loadu_ps((const float *)W + i);
    case D2_BF16: return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)W + i))), 16));
    case D2_F16: return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)W + i)));
    default: return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)W + i))));
    }
}
#else
#define VW 8
typedef __m256 vec;
#define vzero _mm256_setzero_ps
#define vloadu _mm256_loadu_ps
#define vfmadd _mm256_fmadd_ps
#define vadd _mm256_add_ps
#define vsum hsum256_ps
#define vstoreu _mm256_storeu_ps
#define vset1 _mm256_set1_ps
static inline __attribute__((always_inline)) vec dense_load(const void *W, const int dtype, int64_t i) {
    switch (dtype) {
    case D2_F32: return _mm256_loadu_ps((const float *)W + i);
    case D2_BF16: return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)W + i))), 16));
    case D2_F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)W + i)));
    default: return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)W + i))));
    }
}
#endif

static inline __attribute__((always_inline)) void dense_rows_vec(
    const void *W, const int dtype, const float *scale, int cols, const float *x, const int NT, float *y,
    int64_t ystride, int r0, int r1) {
    for (int o = r0; o < r1; o++) {
        vec acc[D2_MAX_TOKENS], acc2[D2_MAX_TOKENS];
        for (int n = 0; n < NT; n++) acc[n] = acc2[n] = vzero();
        const int64_t row = (int64_t)o * cols;
        int c = 0;
        for (; c + 2 * VW <= cols; c += 2 * VW) { /* two independent chains hide the FMA latency */
            const vec w0 = dense_load(W, dtype, row + c), w1 = dense_load(W, dtype, row + c + VW);
            for (int n = 0; n < NT; n++) {
                acc[n] = vfmadd(w0, vloadu(x + (int64_t)n * cols + c), acc[n]);
                acc2[n] = vfmadd(w1, vloadu(x + (int64_t)n * cols + c + VW), acc2[n]);
            }
        }
        for (int n = 0; n < NT; n++) {
            float tail = 0.f;
            for (int k = c; k < cols; k++) tail += dense_at(W, dtype, row + k) * x[(int64_t)n * cols + k];
            float v = vsum(vadd(acc[n], acc2[n])) + tail;
            y[(int64_t)n * ystride + o] = scale ? v * scale[o] : v;
        }
    }
}

#define D2_DENSE(DT, NT) \
    static void dense_##DT##_##NT(const void *W, const float *s, int cols, const float *x, float *y, int64_t ys, int r0, int r1) { \
        dense_rows_vec(W, DT, s, cols, x, NT, y, ys, r0, r1); }
#define D2_DENSE_DT(DT) D2_DENSE(DT, 1) D2_DENSE(DT, 2) D2_DENSE(DT, 3) D2_DENSE(DT, 4) \
    D2_DENSE(DT, 5) D2_DENSE(DT, 6) D2_DENSE(DT, 7) D2_DENSE(DT, 8)
D2_DENSE_DT(0) D2_DENSE_DT(1) D2_DENSE_DT(2) D2_DENSE_DT(3)
typedef void (*dense_fn)(const void *, const float *, int, const float *, float *, int64_t, int, int);
#define D2_DENSE_ROW(DT) {dense_##DT##_1, dense_##DT##_2, dense_##DT##_3, dense_##DT##_4, \
                          dense_##DT##_5, dense_##DT##_6, dense_##DT##_7, dense_##DT##_8}
static const dense_fn DENSE[4][D2_MAX_TOKENS] = {D2_DENSE_ROW(0), D2_DENSE_ROW(1), D2_DENSE_ROW(2), D2_DENSE_ROW(3)};
#endif

void d2_dense_rows(const void *W, int32_t dtype, const float *scale, int32_t cols, const float *x, int32_t ntok,
                   float *y, int64_t ystride, int32_t r0, int32_t r1, int32_t force_portable) {
    for (int n0 = 0; n0 < ntok; n0 += D2_MAX_TOKENS) {
        const int nt = ntok - n0 < D2_MAX_TOKENS ? ntok - n0 : D2_MAX_TOKENS;
        const float *xs = x + (int64_t)n0 * cols;
        float *ys = y + (int64_t)n0 * ystride;
#if D2_AVX512 || D2_AVX2
        if (!force_portable) {
            DENSE[dtype][nt - 1](W, scale, cols, xs, ys, ystride, r0, r1);
            continue;
        }
#endif
        (void)force_portable;
        for (int o = r0; o < r1; o++)
            for (int n = 0; n < nt; n++) {
                float acc = 0.f;
                for (int c = 0; c < cols; c++) acc += dense_at(W, dtype, (int64_t)o * cols + c) * xs[(int64_t)n * cols + c];
                ys[(int64_t)n * ystride + o] = scale ? acc * scale[o] : acc;
            }
    }
}

/* ---------------------------------------------------------------- decode attention

   One query per head against the KV cache, read in place in its dtype. torch's scaled_dot_product_attention
   on bf16 K/V costs ~3.6 us per cached key and layer for one query (16 heads x 128 on a Zen 4 core,
   BENCHMARKS.md section 0.12): 15.6 ms at 4096 keys where reading the cache takes ~2 ms. Here each head's
   scores are dot products over the cached keys, a float32 softmax, and a float32 weighted sum of the
   values; heads are split over the pool. kernels/attention.py calls it for single-query steps and keeps
   torch's for everything else (the oracle in tests/kernels/test_attention.py). */

/* sum_d q[d] * x[i + d] for x in `dtype` (D2_F32, D2_BF16, D2_F16) */
static inline float attn_dot(const float *q, const void *x, int dtype, int64_t i, int D) {
    int d = 0;
    float s = 0.f;
#if D2_AVX512 || D2_AVX2
    vec acc = vzero();
    for (; d + VW <= D; d += VW) acc = vfmadd(vloadu(q + d), dense_load(x, dtype, i + d), acc);
    s = vsum(acc);
#endif
    for (; d < D; d++) s += q[d] * dense_at(x, dtype, i + d);
    return s;
}

/* out[d] += p * x[i + d] */
static inline void attn_axpy(float *out, float p, const void *x, int dtype, int64_t i, int D) {
    int d = 0;
#if D2_AVX512 || D2_AVX2
    const vec pv = vset1(p);
    for (; d + VW <= D; d += VW) vstoreu(out + d, vfmadd(pv, dense_load(x, dtype, i + d), vloadu(out + d)));
#endif
    for (; d < D; d++) out[d] += p * dense_at(x, dtype, i + d);
}

typedef struct {
    const float *q;        /* [B, Hq, Dk] */
    const void *k, *v;     /* element (b, h, j, d) at b*bs + h*hs + j*js + d */
    float *out;            /* [B, Hq, Dv] */
    int64_t k_bs, k_hs, k_js, v_bs, v_hs, v_js;
    int32_t dtype, B, Hq, Hkv, L, Dk, Dv;
    float scale;
    volatile int32_t failed; /* a head's scratch could not be allocated */
} d2_attn;

void d2_pool_items(void (*item)(void *ctx, int32_t i), void *ctx, int32_t n, int32_t threads);

static void attend_head(void *ctx, int32_t i) {
    const d2_attn *a = (const d2_attn *)ctx;
    static __thread float *p;
    static __thread int64_t cap;
    if (a->L > cap) {
        free(p);
        p = (float *)malloc((size_t)a->L * sizeof(float));
        cap = p ? a->L : 0;
        if (!p) {
            ((d2_attn *)ctx)->failed = 1;
            return;
        }
    }
    const int b = i / a->Hq, h = i % a->Hq, kvh = h / (a->Hq / a->Hkv);
    const float *q = a->q + ((int64_t)b * a->Hq + h) * a->Dk;
    const int64_t kb = b * a->k_bs + kvh * a->k_hs, vb = b * a->v_bs + kvh * a->v_hs;
    float m = -INFINITY;
    for (int j = 0; j < a->L; j++) {
        p[j] = a->scale * attn_dot(q, a->k, a->dtype, kb + j * a->k_js, a->Dk);
        m = p[j] > m ? p[j] : m;
    }
    float sum = 0.f;
    for (int j = 0; j < a->L; j++) {
        p[j] = expf(p[j] - m);
        sum += p[j];
    }
    float *out = a->out + ((int64_t)b * a->Hq + h) * a->Dv;
    for (int d = 0; d < a->Dv; d++) out[d] = 0.f;
    const float inv = 1.f / sum;
    for (int j = 0; j < a->L; j++) attn_axpy(out, p[j] * inv, a->v, a->dtype, vb + j * a->v_js, a->Dv);
}

/* Returns 0; -1 for arguments it does not take (heads not a multiple of the KV heads, no keys); -2 when scratch
   could not be allocated. */
int32_t d2_attend_one(const float *q, const void *k, const void *v, float *out, int32_t dtype, int32_t B, int32_t Hq,
                      int32_t Hkv, int32_t L, int32_t Dk, int32_t Dv, int64_t k_bs, int64_t k_hs, int64_t k_js,
                      int64_t v_bs, int64_t v_hs, int64_t v_js, float scale, int32_t threads) {
    if (Hkv <= 0 || Hq % Hkv || L <= 0 || Dk <= 0 || Dv <= 0 || B <= 0 || dtype < D2_F32 || dtype > D2_F16) return -1;
    d2_attn a = {q, k, v, out, k_bs, k_hs, k_js, v_bs, v_hs, v_js, dtype, B, Hq, Hkv, L, Dk, Dv, scale, 0};
    d2_pool_items(attend_head, &a, B * Hq, threads);
    return a.failed ? -2 : 0;
}
