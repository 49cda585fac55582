/* The AVX-512 (BW + VL + VNNI) expert kernels on the file's plane layout (mwq_cpu.c has the formula and the
   entry points): codes from plane bits used directly as byte masks, 64-column chunks, and the bit
   transpose for 3-4 planes. Rows in the ROWS16 layout go through mwq_rows16.h instead. */
/* ---------------------------------------------------------------- AVX-512 */
#if D2_AVX512

/* 64 columns' codes of an NP-plane term as u8 lanes: plane p's 64 bits mask the add of 2^(NP-1-p). */
static inline __attribute__((always_inline)) __m512i code64(const uint8_t *const *pl, int64_t at, const int NP) {
    /* kmovq k, m64 straight from the plane (a mask register loads 64 bits at any alignment) */
    __m512i code = _mm512_maskz_mov_epi8(_load_mask64((__mmask64 *)(pl[0] + at)), _mm512_set1_epi8((char)(1 << (NP - 1))));
    for (int p = 1; p < NP; p++)
        code = _mm512_mask_add_epi8(code, _load_mask64((__mmask64 *)(pl[p] + at)), code,
                                    _mm512_set1_epi8((char)(1 << (NP - 1 - p))));
    return code;
}

/* The 64 u8 codes of code64 as four float32 vectors of 16 (prefill tiles). */
static inline __attribute__((always_inline)) void code_ps(const __m512i code, __m512 out[4]) {
    out[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(code, 0)));
    out[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(code, 1)));
    out[2] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(code, 2)));
    out[3] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(code, 3)));
}

static inline __attribute__((always_inline)) __m256i code32(const uint8_t *const *pl, int64_t at, const int NP) {
    uint32_t bits;
    memcpy(&bits, pl[0] + at, 4);
    __m256i code = _mm256_maskz_mov_epi8((__mmask32)bits, _mm256_set1_epi8((char)(1 << (NP - 1))));
    for (int p = 1; p < NP; p++) {
        memcpy(&bits, pl[p] + at, 4);
        code = _mm256_mask_add_epi8(code, (__mmask32)bits, code, _mm256_set1_epi8((char)(1 << (NP - 1 - p))));
    }
    return code;
}

/* Integer dot products of one group (all its 64- or 32-column chunks) for NT tokens, combined
   from the hi/lo halves: d[n] = sum over the group of code * (256 hi + lo), as int32 lanes. */
static inline __attribute__((always_inline)) void group_dots(
    const uint8_t *const *pl, const int NP, const int NT, const int W64, const int LO, const d2_qx *q, int n0,
    int c0, int c1, __m512i *d) {
    const int64_t cols = q->cols;
    if (W64) {
        __m512i ih[D2_MAX_TOKENS], il[D2_MAX_TOKENS];
        for (int n = 0; n < NT; n++) ih[n] = il[n] = _mm512_setzero_si512();
        for (int c = c0; c < c1; c += 64) {
            const __m512i code = code64(pl, c >> 3, NP);
            for (int n = 0; n < NT; n++) {
                const int64_t at = (int64_t)(n0 + n) * cols + c;
                ih[n] = _mm512_dpbusd_epi32(ih[n], code, _mm512_loadu_si512(q->hi + at));
                if (LO) il[n] = _mm512_dpbusd_epi32(il[n], code, _mm512_loadu_si512(q->lo + at));
            }
        }
        for (int n = 0; n < NT; n++) d[n] = LO ? _mm512_add_epi32(_mm512_slli_epi32(ih[n], 8), il[n]) : ih[n];
    } else {
        __m256i ih[D2_MAX_TOKENS], il[D2_MAX_TOKENS];
        for (int n = 0; n < NT; n++) ih[n] = il[n] = _mm256_setzero_si256();
        for (int c = c0; c < c1; c += 32) {
            const __m256i code = code32(pl, c >> 3, NP);
            for (int n = 0; n < NT; n++) {
                const int64_t at = (int64_t)(n0 + n) * cols + c;
                ih[n] = _mm256_dpbusd_epi32(ih[n], code, _mm256_loadu_si256((const __m256i *)(q->hi + at)));
                if (LO) il[n] = _mm256_dpbusd_epi32(il[n], code, _mm256_loadu_si256((const __m256i *)(q->lo + at)));
            }
        }
        for (int n = 0; n < NT; n++)
            d[n] = _mm512_zextsi256_si512(LO ? _mm256_add_epi32(_mm256_slli_epi32(ih[n], 8), il[n]) : ih[n]);
    }
}

#if defined(__AVX512VBMI__) && defined(__GFNI__)
#define D2_TRANSPOSE 1
/* Byte permutations that turn four groups' plane bytes into GF2P8AFFINE matrices: for group k, qword j
   (columns 8j..8j+7) gets plane p's byte j at byte 8 - NP + p, so that the affine product with the
   one-hot bytes 1 << i reads, for column 8j + i, bit (NP - 1 - p) = plane p's bit: the code, MSB first.
   Sources: planes 0, 1 (bytes 0..63) and 2, 3 (64..127), 32 bytes (four groups) each. */
static inline __mmask64 transpose_index(const int NP, __m512i *idx) {
    uint8_t t[4][64];
    uint64_t keep = 0;
    for (int k = 0; k < 4; k++)
        for (int j = 0; j < 8; j++)
            for (int r = 0; r < 8; r++) {
                const int p = r - (8 - NP);
                t[k][8 * j + r] = (uint8_t)(p >= 0 ? p * 32 + k * 8 + j : 0);
                if (k == 0 && p >= 0) keep |= 1ull << (8 * j + r);
            }
    for (int k = 0; k < 4; k++) idx[k] = _mm512_loadu_si512(t[k]);
    return _cvtu64_mask64(keep);
}
#else
#define D2_TRANSPOSE 0
#endif

/* One term of one row for NT tokens: facc[n] += sum_g s[n, g] * D_t[n, g] (s = m_t coef_t dx).
   W64: 64-column chunks in zmm (group size % 64 == 0), else 32-column chunks in ymm. Two
   accumulators per token (even and odd groups) so consecutive groups' FMAs do not wait on
   each other; a group size of 64 is one chunk, unrolled by the compiler. */
static inline __attribute__((always_inline)) void term_row(
    const uint8_t *const *pl, const int NP, const int NT, const int W64, const int LO, const d2_qx *q, int n0,
    const int gs, int G, const float *s, __m512 *facc) {
    __m512 a0[D2_MAX_TOKENS], a1[D2_MAX_TOKENS];
    for (int n = 0; n < NT; n++) { a0[n] = facc[n]; a1[n] = _mm512_setzero_ps(); }
    int g = 0;
#if D2_TRANSPOSE
    if (W64 && gs == 64 && NP >= 3 && NP <= 4) { /* 3-4 planes: four groups' codes by bit transpose (faster than 3-4 mask adds each; for 1-2 planes the mask adds are) */
        __m512i idx[4];
        const __mmask64 keep = transpose_index(NP, idx);
        const __m512i xk = _mm512_set1_epi64((long long)0x8040201008040201ULL);
        for (; g + 4 <= G; g += 4) {
            const int64_t at = (int64_t)g * 8; /* 64 columns = 8 bytes of each plane per group */
            const __m256i zero = _mm256_setzero_si256();
            const __m256i p0 = _mm256_loadu_si256((const __m256i *)(pl[0] + at));
            const __m256i p1 = NP > 1 ? _mm256_loadu_si256((const __m256i *)(pl[1] + at)) : zero;
            const __m256i p2 = NP > 2 ? _mm256_loadu_si256((const __m256i *)(pl[2] + at)) : zero;
            const __m256i p3 = NP > 3 ? _mm256_loadu_si256((const __m256i *)(pl[3] + at)) : zero;
            const __m512i z01 = _mm512_inserti64x4(_mm512_castsi256_si512(p0), p1, 1);
            const __m512i z23 = _mm512_inserti64x4(_mm512_castsi256_si512(p2), p3, 1);
            for (int k = 0; k < 4; k++) {
                const __m512i code = _mm512_gf2p8affine_epi64_epi8(
                    xk, _mm512_maskz_permutex2var_epi8(keep, z01, idx[k], z23), 0);
                const int64_t c = (int64_t)(g + k) * 64;
                for (int n = 0; n < NT; n++) {
                    const int64_t xa = (int64_t)(n0 + n) * q->cols + c;
                    __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), code, _mm512_loadu_si512(q->hi + xa));
                    if (LO) d = _mm512_add_epi32(_mm512_slli_epi32(d, 8),
                                                 _mm512_dpbusd_epi32(_mm512_setzero_si512(), code, _mm512_loadu_si512(q->lo + xa)));
                    const __m512 sv = _mm512_set1_ps(s[n * G + g + k]);
                    if (k & 1) a1[n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sv, a1[n]);
                    else a0[n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sv, a0[n]);
                }
            }
        }
    }
#endif
    if (W64 && gs == 64) { /* one 64-column chunk per group: straight-line, plane pointers in registers */
        const uint8_t *p[D2_MAX_PLANES];
        for (int k = 0; k < NP; k++) p[k] = pl[k];
        const int8_t *xh[D2_MAX_TOKENS], *xl[D2_MAX_TOKENS];
        for (int n = 0; n < NT; n++) {
            xh[n] = q->hi + (int64_t)(n0 + n) * q->cols;
            xl[n] = LO ? q->lo + (int64_t)(n0 + n) * q->cols : 0;
        }
        for (; g + 2 <= G; g += 2) {
            const __m512i c0 = code64(p, (int64_t)g * 8, NP), c1 = code64(p, (int64_t)g * 8 + 8, NP);
            for (int n = 0; n < NT; n++) {
                const int8_t *h = xh[n] + (int64_t)g * 64;
                __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c0, _mm512_loadu_si512(h));
                __m512i d1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c1, _mm512_loadu_si512(h + 64));
                if (LO) {
                    const int8_t *l = xl[n] + (int64_t)g * 64;
                    d0 = _mm512_add_epi32(_mm512_slli_epi32(d0, 8), _mm512_dpbusd_epi32(_mm512_setzero_si512(), c0, _mm512_loadu_si512(l)));
                    d1 = _mm512_add_epi32(_mm512_slli_epi32(d1, 8), _mm512_dpbusd_epi32(_mm512_setzero_si512(), c1, _mm512_loadu_si512(l + 64)));
                }
                a0[n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_set1_ps(s[n * G + g]), a0[n]);
                a1[n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_set1_ps(s[n * G + g + 1]), a1[n]);
            }
        }
    }
    for (; g + 2 <= G; g += 2) {
        __m512i d0[D2_MAX_TOKENS], d1[D2_MAX_TOKENS];
        group_dots(pl, NP, NT, W64, LO, q, n0, g * gs, (g + 1) * gs, d0);
        group_dots(pl, NP, NT, W64, LO, q, n0, (g + 1) * gs, (g + 2) * gs, d1);
        for (int n = 0; n < NT; n++) {
            a0[n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0[n]), _mm512_set1_ps(s[n * G + g]), a0[n]);
            a1[n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1[n]), _mm512_set1_ps(s[n * G + g + 1]), a1[n]);
        }
    }
    if (g < G) {
        __m512i d0[D2_MAX_TOKENS];
        group_dots(pl, NP, NT, W64, LO, q, n0, g * gs, (g + 1) * gs, d0);
        for (int n = 0; n < NT; n++)
            a0[n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0[n]), _mm512_set1_ps(s[n * G + g]), a0[n]);
    }
    for (int n = 0; n < NT; n++) facc[n] = _mm512_add_ps(a0[n], a1[n]);
}

typedef void (*term_fn)(const uint8_t *const *, const d2_qx *, int, int, int, const float *, __m512 *);

#define D2_TERM(NP, NT, W)                                                                             \
    static void term_##NP##_##NT##_##W(const uint8_t *const *pl, const d2_qx *q, int n0, int gs, int G, \
                                       const float *s, __m512 *facc) {                                 \
        const int lo = q->lo != 0; /* int16 activations (hi/lo halves) or plain int8 */              \
        if (W && gs == 64 && lo) term_row(pl, NP, NT, W, 1, q, n0, 64, G, s, facc);                    \
        else if (W && gs == 64) term_row(pl, NP, NT, W, 0, q, n0, 64, G, s, facc);                     \
        else if (lo) term_row(pl, NP, NT, W, 1, q, n0, gs, G, s, facc);                                \
        else term_row(pl, NP, NT, W, 0, q, n0, gs, G, s, facc);                                        \
    }
D2_FOR_KERNELS(D2_TERM, 0)
D2_FOR_KERNELS(D2_TERM, 1)
static const term_fn TERMS[2][4][D2_MAX_PLANES] = {D2_KERNEL_TABLE(term, 0), D2_KERNEL_TABLE(term, 1)}; /* [64-wide][tokens - 1][planes - 1] */

/* float16 row -> 16 float lanes from g (masked at the row's end) */
static inline __m512 f16x16(const uint16_t *row, int g, __mmask16 k) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, row + g));
}

static void rows_gemv_avx512(const d2_matrix *m, const d2_qx *q, int n0, int nt, float *y, int64_t ystride,
                             int32_t r0, int32_t r1, float *scratch) {
    const int gs = m->group_size, G = m->cols / gs, rb = m->cols / 8, w64 = gs % 64 == 0;
    float *s = scratch; /* [nt, G] per term: s[n, g] = m_t coef_t[o, g] dx[n, g] */
    for (int o = r0; o < r1; o++) {
        /* the base term first (sum_g base[o, g] sx[n, g], base = offset + sum_t m_t coef_t bias_t), 16
           groups at a time: per-row work in vectors, not per-group scalar loops (a third of level 2's time) */
        __m512 facc[D2_MAX_TOKENS];
        for (int n = 0; n < nt; n++) facc[n] = _mm512_setzero_ps();
        for (int g = 0; g < G; g += 16) {
            const __mmask16 k = G - g >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (G - g)) - 1);
            __m512 base = f16x16(m->offset + (int64_t)o * G, g, k);
            for (int t = 0; t < m->nterms; t++)
                base = _mm512_fmadd_ps(_mm512_mul_ps(f16x16(m->coef[t] + (int64_t)o * G, g, k), _mm512_set1_ps(m->term_mul[t])),
                                       _mm512_set1_ps(m->term_bias[t]), base);
            for (int n = 0; n < nt; n++)
                facc[n] = _mm512_fmadd_ps(base, _mm512_maskz_loadu_ps(k, q->sx + (int64_t)(n0 + n) * G + g), facc[n]);
        }
        for (int t = 0; t < m->nterms; t++) {
            const uint8_t *pl[D2_MAX_PLANES];
            const int np = m->term_nplanes[t];
            for (int p = 0; p < np; p++) pl[p] = m->planes[m->term_first[t] + p] + (int64_t)o * rb;
            const __m512 mul = _mm512_set1_ps(m->term_mul[t]);
            for (int g = 0; g < G; g += 16) {
                const __mmask16 k = G - g >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (G - g)) - 1);
                const __m512 c = _mm512_mul_ps(f16x16(m->coef[t] + (int64_t)o * G, g, k), mul);
                for (int n = 0; n < nt; n++)
                    _mm512_mask_storeu_ps(s + n * G + g, k, _mm512_mul_ps(c, _mm512_maskz_loadu_ps(k, q->dx + (int64_t)(n0 + n) * G + g)));
            }
            TERMS[w64][nt - 1][np - 1](pl, q, n0, gs, G, s, facc);
        }
        for (int n = 0; n < nt; n++) y[(int64_t)(n0 + n) * ystride + o] = _mm512_reduce_add_ps(facc[n]);
    }
}
#endif
