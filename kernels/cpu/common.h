/* What the CPU kernel sources share: the SIMD switch, limits and float16 helpers. */
#ifndef D2_CPU_COMMON_H
#define D2_CPU_COMMON_H

#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && defined(__AVX512F__)
#include <immintrin.h>
#define D2_AVX512 1
#else
#define D2_AVX512 0
#endif

/* AVX2 + FMA (+ F16C): the vector path of CPUs without AVX-512 (most laptops and desktops, Zen 1-3). */
#if !D2_AVX512 && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define D2_AVX2 1
#else
#define D2_AVX2 0
#endif

#if D2_AVX2
static inline float hsum256_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#define D2_MAX_TERMS 8
#define D2_MAX_PLANES 8
#define D2_MAX_TOKENS 8 /* tokens per register block */

/* Kernel templates are instantiated per plane count (1..8) and token block (1..4): D2_FOR_KERNELS(M, X) expands
   M(NP, NT, X), which defines NAME_NP_NT_X, for all 32, and D2_KERNEL_TABLE(NAME, X) is their
   [tokens - 1][planes - 1] table. */
#define D2_FOR_PLANES(M, NT, X) M(1, NT, X) M(2, NT, X) M(3, NT, X) M(4, NT, X) M(5, NT, X) M(6, NT, X) \
    M(7, NT, X) M(8, NT, X)
#define D2_FOR_KERNELS(M, X) D2_FOR_PLANES(M, 1, X) D2_FOR_PLANES(M, 2, X) D2_FOR_PLANES(M, 3, X) D2_FOR_PLANES(M, 4, X)
#define D2_KERNEL_ROW(NAME, NT, X) {NAME##_1_##NT##_##X, NAME##_2_##NT##_##X, NAME##_3_##NT##_##X, NAME##_4_##NT##_##X, \
                                    NAME##_5_##NT##_##X, NAME##_6_##NT##_##X, NAME##_7_##NT##_##X, NAME##_8_##NT##_##X}
#define D2_KERNEL_TABLE(NAME, X) {D2_KERNEL_ROW(NAME, 1, X), D2_KERNEL_ROW(NAME, 2, X), D2_KERNEL_ROW(NAME, 3, X), \
                                  D2_KERNEL_ROW(NAME, 4, X)}

static inline float f16_to_f32(uint16_t h) {
#if D2_AVX512 || D2_AVX2
    return _cvtsh_ss(h); /* F16C: exact, as the portable bit manipulation (a scalar parameter per super-block and row) */
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else { /* subnormal: renormalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) bits = sign | 0x7f800000u | (man << 13);
    else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline uint16_t f16_from_f32(float f) { /* round to nearest even, as torch's .half() */
    _Float16 h = (_Float16)f;
    uint16_t u;
    memcpy(&u, &h, 2);
    return u;
}

/* Scheme subblock (quantize/subblock.py): a group's float16 scale d * s and offset -dmin * k from its code byte
   (s low nibble, k high) and its super-block's (d, dmin); both products are exact. */
static inline void subblock_params(float d, float dmin, uint8_t code, uint16_t *scale, uint16_t *offset) {
    *scale = f16_from_f32(d * (float)(code & 15));
    *offset = f16_from_f32(-(dmin * (float)(code >> 4)));
}

/* subblock_params for the groups [g, g1) of one super-block, 8 at a time with F16C; returns the first group left for
   the scalar loop. The same products and rounding as subblock_params: scalar, this expansion was most of an AVX2
   GEMV's time (one float16 conversion per group against a few instructions per 32 columns of codes). */
static inline int subblock_params8(float d, float dmin, const uint8_t *pc, int g, int g1, uint16_t *sc, uint16_t *of) {
#if D2_AVX512 || D2_AVX2
    const __m256 dv = _mm256_set1_ps(d), mv = _mm256_set1_ps(dmin), sign = _mm256_set1_ps(-0.0f);
    for (; g + 8 <= g1; g += 8) {
        const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(pc + g)));
        const __m256 s = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_and_si256(c, _mm256_set1_epi32(15))));
        const __m256 o = _mm256_xor_ps(_mm256_mul_ps(mv, _mm256_cvtepi32_ps(_mm256_srli_epi32(c, 4))), sign);
        _mm_storeu_si128((__m128i *)(sc + g), _mm256_cvtps_ph(s, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        _mm_storeu_si128((__m128i *)(of + g), _mm256_cvtps_ph(o, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
#else
    (void)d, (void)dmin, (void)pc, (void)g1, (void)sc, (void)of;
#endif
    return g;
}

static inline void f16_row(const uint16_t *src, float *dst, int n) {
    int i = 0;
#if D2_AVX512
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
#elif D2_AVX2
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#endif
    for (; i < n; i++) dst[i] = f16_to_f32(src[i]);
}

#endif
