/* Decode attention: one query per head against the KV cache, read in place in its dtype.

   torch's scaled_dot_product_attention on bf16 K/V costs ~3.6 us per cached key and layer for one query
   (16 heads x 128 on a Zen 4 core, BENCHMARKS.md section 0.12): 15.6 ms at 4096 keys where reading the
   cache takes ~2 ms. Here each head's scores are dot products over the cached keys (bf16/f16 widened in
   registers), a float32 softmax, and a float32 weighted sum of the values; heads are split over the pool.
   kernels/attention.py calls it for single-query steps and keeps torch's for everything else (the
   oracle in tests/kernels/test_attention.py). */

#include <stdlib.h>

#include "common.h"

enum { A_F32 = 0, A_BF16 = 1, A_F16 = 2 };

static inline float a_at(const void *p, int dtype, int64_t i) {
    if (dtype == A_F32) return ((const float *)p)[i];
    if (dtype == A_BF16) {
        uint32_t b = (uint32_t)((const uint16_t *)p)[i] << 16;
        float f;
        memcpy(&f, &b, 4);
        return f;
    }
    return f16_to_f32(((const uint16_t *)p)[i]);
}

#if D2_AVX512
static inline __m512 a_load16(const void *p, int dtype, int64_t i) {
    if (dtype == A_F32) return _mm512_loadu_ps((const float *)p + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
    if (dtype == A_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}
#endif

/* sum_d q[d] * x[d] for x in `dtype` at element offset i */
static inline float a_dot(const float *q, const void *x, int dtype, int64_t i, int D) {
    int d = 0;
    float s = 0.f;
#if D2_AVX512
    __m512 acc = _mm512_setzero_ps();
    for (; d + 16 <= D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), a_load16(x, dtype, i + d), acc);
    s = _mm512_reduce_add_ps(acc);
#endif
    for (; d < D; d++) s += q[d] * a_at(x, dtype, i + d);
    return s;
}

/* out[d] += p * x[d] */
static inline void a_axpy(float *out, float p, const void *x, int dtype, int64_t i, int D) {
    int d = 0;
#if D2_AVX512
    const __m512 pv = _mm512_set1_ps(p);
    for (; d + 16 <= D; d += 16)
        _mm512_storeu_ps(out + d, _mm512_fmadd_ps(pv, a_load16(x, dtype, i + d), _mm512_loadu_ps(out + d)));
#endif
    for (; d < D; d++) out[d] += p * a_at(x, dtype, i + d);
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
        p[j] = a->scale * a_dot(q, a->k, a->dtype, kb + j * a->k_js, a->Dk);
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
    for (int j = 0; j < a->L; j++) a_axpy(out, p[j] * inv, a->v, a->dtype, vb + j * a->v_js, a->Dv);
}

/* Returns 0; -1 for arguments it does not take (heads not a multiple of the KV heads, no keys); -2 when scratch
   could not be allocated. */
int32_t d2_attend_one(const float *q, const void *k, const void *v, float *out, int32_t dtype, int32_t B, int32_t Hq,
                      int32_t Hkv, int32_t L, int32_t Dk, int32_t Dv, int64_t k_bs, int64_t k_hs, int64_t k_js,
                      int64_t v_bs, int64_t v_hs, int64_t v_js, float scale, int32_t threads) {
    if (Hkv <= 0 || Hq % Hkv || L <= 0 || Dk <= 0 || Dv <= 0 || B <= 0 || dtype < 0 || dtype > 2) return -1;
    d2_attn a = {q, k, v, out, k_bs, k_hs, k_js, v_bs, v_hs, v_js, dtype, B, Hq, Hkv, L, Dk, Dv, scale, 0};
    d2_pool_items(attend_head, &a, B * Hq, threads);
    return a.failed ? -2 : 0;
}
