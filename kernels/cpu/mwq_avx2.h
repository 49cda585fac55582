/* The expert kernels' AVX2 path (CPUs without AVX-512: most laptops and desktops, AMD Zen 1-3),
   included by mwq_cpu.c after its types. The same arithmetic as the AVX-512 and portable paths:
   exact integer dot products per group, scales applied in float32 per group.

   32-column chunks in ymm. A plane's 32 bits become 32 byte masks (broadcast, byte shuffle, bit
   test); a term's code is built from its planes as u8 lanes, multiplied by the int8 activations with
   vpmaddubsw (u8 x s8 -> s16 pairs: no saturation while codes are <= 15) and summed into int32 with
   vpmaddwd. Terms of 5-8 planes are split in two nibble codes, D = 16 D_hi + D_lo, so every code
   stays <= 15. Cost per weight ~ planes read: level 2 builds half of what level 4 does. */

#if D2_AVX2

/* Group sizes the AVX2 kernels take: multiples of 32 columns, and 16 where the columns fill whole 32-column chunks
   (two groups per chunk, term_g16_avx2); others run the portable loop. */
static inline int avx2_groups(const d2_matrix *m) {
    return m->group_size % 32 == 0 || (m->group_size == 16 && m->cols % 32 == 0);
}

/* 32 columns of one plane row (4 bytes at p) as 32 byte masks: 0xff where the column's bit is set. */
static inline __attribute__((always_inline)) __m256i plane_mask32(const uint8_t *p) {
    uint32_t bits;
    memcpy(&bits, p, 4);
    /* every 128-bit lane holds the 4 bytes (broadcast), so in-lane shuffles can spread any of them */
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL); /* lane k tests bit k % 8 */
    const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), spread);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}

/* u8 codes of 32 columns from planes [p0, p0 + n), most significant first (byte `at` of each row). */
static inline __attribute__((always_inline)) __m256i code32_avx2(const uint8_t *const *pl, int64_t at, const int p0,
                                                                 const int n) {
    __m256i code = _mm256_and_si256(plane_mask32(pl[p0] + at), _mm256_set1_epi8((char)(1 << (n - 1))));
    for (int p = 1; p < n; p++)
        code = _mm256_or_si256(code, _mm256_and_si256(plane_mask32(pl[p0 + p] + at),
                                                      _mm256_set1_epi8((char)(1 << (n - 1 - p)))));
    return code;
}

/* The same codes from D2_BLOCKED planes: chunk k of the 256-column block at byte `at` is bit k of its
   32 bytes (one load, a shift and a mask per plane instead of a broadcast, shuffle and compare). */
static inline __attribute__((always_inline)) __m256i code32_blocked(const uint8_t *const *pl, int64_t at, int k,
                                                                    const int p0, const int n) {
    const __m128i shift = _mm_cvtsi32_si128(k);
    const __m256i one = _mm256_set1_epi8(1);
    __m256i code = _mm256_and_si256(_mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)(pl[p0] + at)), shift), one);
    for (int p = 1; p < n; p++) /* code = 2 code + bit (the 16-bit shift's spill from the next byte is masked off) */
        code = _mm256_or_si256(_mm256_add_epi8(code, code),
                               _mm256_and_si256(_mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)(pl[p0 + p] + at)), shift), one));
    return code;
}

/* Codes of the 32 columns at c: blocked where c lies in a full block (c < bl_end), else as on disk. */
static inline __attribute__((always_inline)) __m256i code32_at(const uint8_t *const *pl, int c, int bl_end,
                                                               const int p0, const int n) {
    return c < bl_end ? code32_blocked(pl, (int64_t)(c >> 8) * 32, (c >> 5) & 7, p0, n) : code32_avx2(pl, c >> 3, p0, n);
}

/* The 32 columns at c as the codes of the low nibble's planes [NH, NP) and the high nibble's [0, NH) (hi = lo where
   NH is 0: terms of at most 4 planes). */
static inline __attribute__((always_inline)) void nibbles_at(const uint8_t *const *pl, int c, int bl_end, const int NH,
                                                             const int NL, __m256i *lo, __m256i *hi) {
    *lo = code32_at(pl, c, bl_end, NH, NL);
    *hi = NH ? code32_at(pl, c, bl_end, 0, NH) : *lo;
}

/* s16 pair sums of code * x over 32 columns (codes <= 15, x int8: |pair| <= 3840, so up to 8 chunks
   add in int16 without overflow before one vpmaddwd widens them). */
static inline __attribute__((always_inline)) __m256i pairs32_avx2(const __m256i code, const int8_t *x) {
    return _mm256_maddubs_epi16(code, _mm256_loadu_si256((const __m256i *)x));
}

static inline __attribute__((always_inline)) __m256i widen_avx2(const __m256i pairs) {
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

/* One 32-column chunk into a token's int16 sums: [0] low nibble x hi, [1] high nibble x hi, [2] low x lo,
   [3] high x lo (NH: planes in the high nibble; LO: int16 activations' low bytes). */
static inline __attribute__((always_inline)) void add_chunk_avx2(__m256i *acc, const __m256i lo_code, const __m256i hi_code,
                                                                 const int NH, const int LO, const d2_qx *q, int64_t xa) {
    acc[0] = _mm256_add_epi16(acc[0], pairs32_avx2(lo_code, q->hi + xa));
    if (NH) acc[1] = _mm256_add_epi16(acc[1], pairs32_avx2(hi_code, q->hi + xa));
    if (LO) {
        acc[2] = _mm256_add_epi16(acc[2], pairs32_avx2(lo_code, q->lo + xa));
        if (NH) acc[3] = _mm256_add_epi16(acc[3], pairs32_avx2(hi_code, q->lo + xa));
    }
}

/* The int32 dot products of add_chunk_avx2's sums: D = 256 (16 hi_hi + lo_hi) + (16 hi_lo + lo_lo). */
static inline __attribute__((always_inline)) __m256i combine_avx2(const __m256i *acc, const int NH, const int LO) {
    __m256i dh = widen_avx2(acc[0]);
    if (NH) dh = _mm256_add_epi32(dh, _mm256_slli_epi32(widen_avx2(acc[1]), 4));
    if (LO) {
        __m256i dl = widen_avx2(acc[2]);
        if (NH) dl = _mm256_add_epi32(dl, _mm256_slli_epi32(widen_avx2(acc[3]), 4));
        dh = _mm256_add_epi32(_mm256_slli_epi32(dh, 8), dl);
    }
    return dh;
}

/* One term of one row for NT tokens: facc[n] += sum_g s[n, g] * D_t[n, g] (s = m_t coef_t dx).
   Two accumulators per token (even and odd groups) keep consecutive groups' FMAs independent. */
static inline __attribute__((always_inline)) void term_row_avx2(
    const uint8_t *const *pl, const int NP, const int NT, const int LO, const d2_qx *q, int n0, const int gs, int G,
    int bl_end, int g0, const float *s, __m256 *facc) {
    const int NH = NP > 4 ? NP - 4 : 0, NL = NP - NH; /* planes of the high and the low nibble */
    const int64_t cols = q->cols;
    __m256 a0[D2_MAX_TOKENS], a1[D2_MAX_TOKENS];
    for (int n = 0; n < NT; n++) { a0[n] = facc[n]; a1[n] = _mm256_setzero_ps(); }
    for (int g = g0; g < G; g++) {
        __m256i d[D2_MAX_TOKENS];
        for (int n = 0; n < NT; n++) d[n] = _mm256_setzero_si256();
        for (int c0 = g * gs; c0 < (g + 1) * gs; c0 += 256) { /* int16 sums over at most 8 chunks */
            const int c1 = c0 + 256 < (g + 1) * gs ? c0 + 256 : (g + 1) * gs;
            /* int16 sums: [0] low nibble x hi, [1] high nibble x hi, [2] low x lo, [3] high x lo */
            __m256i acc[D2_MAX_TOKENS][4];
            for (int n = 0; n < NT; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = _mm256_setzero_si256();
            for (int c = c0; c < c1; c += 32) {
                __m256i lo_code, hi_code;
                nibbles_at(pl, c, bl_end, NH, NL, &lo_code, &hi_code);
                for (int n = 0; n < NT; n++)
                    add_chunk_avx2(acc[n], lo_code, hi_code, NH, LO, q, (int64_t)(n0 + n) * cols + c);
            }
            for (int n = 0; n < NT; n++) d[n] = _mm256_add_epi32(d[n], combine_avx2(acc[n], NH, LO));
        }
        for (int n = 0; n < NT; n++) {
            const __m256 sv = _mm256_set1_ps(s[n * G + g]);
            if (g & 1) a1[n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[n]), sv, a1[n]);
            else a0[n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[n]), sv, a0[n]);
        }
    }
    for (int n = 0; n < NT; n++) facc[n] = _mm256_add_ps(a0[n], a1[n]);
}

/* Bits of chunk K (0..7) of a D2_BLOCKED block as byte lanes holding 1 << POS (K, POS compile-time). */
static inline __attribute__((always_inline)) __m256i blocked_bits(const __m256i v, const int K, const int POS) {
    const __m256i t = K > POS ? _mm256_srli_epi16(v, K - POS) : (K < POS ? _mm256_slli_epi16(v, POS - K) : v);
    return _mm256_and_si256(t, _mm256_set1_epi8((char)(1 << POS)));
}

/* nibbles_at for chunk K (compile-time) of a D2_BLOCKED block already loaded, one vector per plane in v. */
static inline __attribute__((always_inline)) void blocked_nibbles(const __m256i *v, const int K, const int NH, const int NL,
                                                                  __m256i *lo, __m256i *hi) {
    *lo = blocked_bits(v[NH], K, NL - 1);
    for (int p = 1; p < NL; p++) *lo = _mm256_or_si256(*lo, blocked_bits(v[NH + p], K, NL - 1 - p));
    *hi = *lo;
    if (NH) {
        *hi = blocked_bits(v[0], K, NH - 1);
        for (int p = 1; p < NH; p++) *hi = _mm256_or_si256(*hi, blocked_bits(v[p], K, NH - 1 - p));
    }
}

/* Groups of 16 columns (cols % 32 == 0): a 32-column chunk holds two groups. After the widening, int32 lanes 0-3
   sum the first group's columns and lanes 4-7 the second's, so a chunk stays one vpmaddubsw per code and token.
   Four chunks (eight groups) are reduced together: two rounds of vphaddd leave the eight group sums in one vector
   (groups 0 2 4 6 1 3 5 7), which takes its eight scales in one permuted load and one FMA. */
static inline __attribute__((always_inline)) void g16_eight(
    const __m256i *lo_code, const __m256i *hi_code, const int NH, const int NT, const int LO, const d2_qx *q, int n0,
    int c, const float *s, int G, __m256 *acc_f) {
    const __m256i order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7); /* the reduced sums' groups */
    const int64_t cols = q->cols;
    for (int n = 0; n < NT; n++) {
        __m256i d[4];
        for (int k = 0; k < 4; k++) {
            __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
            add_chunk_avx2(acc, lo_code[k], hi_code[k], NH, LO, q, (int64_t)(n0 + n) * cols + c + 32 * k);
            d[k] = combine_avx2(acc, NH, LO);
        }
        const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(d[0], d[1]), _mm256_hadd_epi32(d[2], d[3]));
        const __m256 sv = _mm256_permutevar8x32_ps(_mm256_loadu_ps(s + n * G), order);
        acc_f[n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), sv, acc_f[n]);
    }
}

/* One term of one row at group 16: full 256-column blocks of D2_BLOCKED planes unrolled (one 32-byte load per plane
   and block, constant shifts: as term_blocks_avx2), then eight groups at a time from code32_at, then single chunks
   (the last G % 8 groups) each with a two-valued scale vector. */
static inline __attribute__((always_inline)) void term_g16_avx2(
    const uint8_t *const *pl, const int NP, const int NT, const int LO, const d2_qx *q, int n0, int G, int bl_end,
    const float *s, __m256 *facc) {
    const int NH = NP > 4 ? NP - 4 : 0, NL = NP - NH; /* planes of the high and the low nibble */
    const int64_t cols = q->cols;
    __m256 a0[D2_MAX_TOKENS], a1[D2_MAX_TOKENS];
    for (int n = 0; n < NT; n++) { a0[n] = facc[n]; a1[n] = _mm256_setzero_ps(); }
    int g = 0;
    for (int b = 0; b < bl_end / 256; b++, g += 16) {
        __m256i v[D2_MAX_PLANES];
        for (int p = 0; p < NP; p++) v[p] = _mm256_loadu_si256((const __m256i *)(pl[p] + (int64_t)b * 32));
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            __m256i lo_code[4], hi_code[4];
#pragma GCC unroll 4
            for (int kk = 0; kk < 4; kk++) blocked_nibbles(v, 4 * h + kk, NH, NL, &lo_code[kk], &hi_code[kk]);
            g16_eight(lo_code, hi_code, NH, NT, LO, q, n0, 256 * b + 128 * h, s + g + 8 * h, G, h ? a1 : a0);
        }
    }
    for (; g + 8 <= G; g += 8) {
        __m256i lo_code[4], hi_code[4];
        for (int k = 0; k < 4; k++) nibbles_at(pl, 16 * g + 32 * k, bl_end, NH, NL, &lo_code[k], &hi_code[k]);
        g16_eight(lo_code, hi_code, NH, NT, LO, q, n0, 16 * g, s + g, G, a0);
    }
    for (; g < G; g += 2) {
        const int c = g * 16;
        __m256i lo_code, hi_code;
        nibbles_at(pl, c, bl_end, NH, NL, &lo_code, &hi_code);
        for (int n = 0; n < NT; n++) {
            __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
            add_chunk_avx2(acc, lo_code, hi_code, NH, LO, q, (int64_t)(n0 + n) * cols + c);
            const __m256 sv = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(s[n * G + g])),
                                                   _mm_set1_ps(s[n * G + g + 1]), 1);
            a1[n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(combine_avx2(acc, NH, LO)), sv, a1[n]);
        }
    }
    for (int n = 0; n < NT; n++) facc[n] = _mm256_add_ps(a0[n], a1[n]);
}

/* The decode hot path over a row's full 256-column blocks of D2_BLOCKED planes, group size GS in
   {32, 64, 128}: each block unrolled into its 8 chunks and 256 / GS groups, so every shift and group
   boundary is a constant (the generic loop's per-chunk bookkeeping cost more than the arithmetic), one
   32-byte load per plane and block. Codes of 5-8 planes are split in nibbles and int16 activations
   (LO) in bytes as in term_row_avx2; a group's int16 sums span at most 4 chunks. */
static inline __attribute__((always_inline)) void term_blocks_avx2(
    const uint8_t *const *pl, const int NP, const int NT, const int GS, const int LO, const d2_qx *q, int n0,
    int nblk, int G, const float *s, __m256 *facc) {
    const int CPG = GS / 32, GPB = 256 / GS; /* chunks per group, groups per block */
    const int NH = NP > 4 ? NP - 4 : 0, NL = NP - NH; /* planes of the high and the low nibble */
    const int64_t cols = q->cols;
    __m256 a0[D2_MAX_TOKENS], a1[D2_MAX_TOKENS];
    for (int n = 0; n < NT; n++) { a0[n] = facc[n]; a1[n] = _mm256_setzero_ps(); }
    for (int b = 0; b < nblk; b++) {
        __m256i v[D2_MAX_PLANES];
        for (int p = 0; p < NP; p++) v[p] = _mm256_loadu_si256((const __m256i *)(pl[p] + (int64_t)b * 32));
#pragma GCC unroll 8
        for (int gi = 0; gi < GPB; gi++) {
            __m256i acc[D2_MAX_TOKENS][4]; /* [0] low nibble x hi, [1] high nibble x hi, [2] low x lo, [3] high x lo */
            for (int n = 0; n < NT; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = _mm256_setzero_si256();
#pragma GCC unroll 4
            for (int kk = 0; kk < CPG; kk++) {
                const int k = gi * CPG + kk, c = b * 256 + k * 32;
                __m256i lo_code, hi_code;
                blocked_nibbles(v, k, NH, NL, &lo_code, &hi_code);
                for (int n = 0; n < NT; n++)
                    add_chunk_avx2(acc[n], lo_code, hi_code, NH, LO, q, (int64_t)(n0 + n) * cols + c);
            }
            const int g = b * GPB + gi;
            for (int n = 0; n < NT; n++) {
                const __m256 d = _mm256_cvtepi32_ps(combine_avx2(acc[n], NH, LO));
                if (gi & 1) a1[n] = _mm256_fmadd_ps(d, _mm256_set1_ps(s[n * G + g]), a1[n]);
                else a0[n] = _mm256_fmadd_ps(d, _mm256_set1_ps(s[n * G + g]), a0[n]);
            }
        }
    }
    for (int n = 0; n < NT; n++) facc[n] = _mm256_add_ps(a0[n], a1[n]);
}

typedef void (*term2_fn)(const uint8_t *const *, const d2_qx *, int, int, int, int, const float *, __m256 *);

/* One specialisation per plane count and token count; group sizes 32 and 64 get unrolled bodies. */
#define D2_TERM2(NP, NT)                                                                                        \
    static void term2_##NP##_##NT(const uint8_t *const *pl, const d2_qx *q, int n0, int gs, int G, int bl_end, \
                                  const float *s, __m256 *facc) {                                               \
        const int lo = q->lo != 0;                                                                              \
        int g0 = 0;                                                                                             \
        if (gs == 16) {                                                                                         \
            if (lo) term_g16_avx2(pl, NP, NT, 1, q, n0, G, bl_end, s, facc);                                    \
            else term_g16_avx2(pl, NP, NT, 0, q, n0, G, bl_end, s, facc);                                       \
            return;                                                                                             \
        }                                                                                                       \
        if (bl_end && (gs == 32 || gs == 64 || gs == 128)) { /* blocked: the unrolled path, then the tail */ \
            const int nblk = bl_end / 256;                                                                      \
            if (gs == 64) {                                                                                     \
                if (lo) term_blocks_avx2(pl, NP, NT, 64, 1, q, n0, nblk, G, s, facc);                           \
                else term_blocks_avx2(pl, NP, NT, 64, 0, q, n0, nblk, G, s, facc);                              \
            } else if (gs == 32) {                                                                              \
                if (lo) term_blocks_avx2(pl, NP, NT, 32, 1, q, n0, nblk, G, s, facc);                           \
                else term_blocks_avx2(pl, NP, NT, 32, 0, q, n0, nblk, G, s, facc);                              \
            } else if (lo) term_blocks_avx2(pl, NP, NT, 128, 1, q, n0, nblk, G, s, facc);                       \
            else term_blocks_avx2(pl, NP, NT, 128, 0, q, n0, nblk, G, s, facc);                                 \
            g0 = bl_end / gs;                                                                                   \
            if (g0 == G) return;                                                                                \
        }                                                                                                       \
        if (gs == 64) {                                                                                         \
            if (lo) term_row_avx2(pl, NP, NT, 1, q, n0, 64, G, bl_end, g0, s, facc);                            \
            else term_row_avx2(pl, NP, NT, 0, q, n0, 64, G, bl_end, g0, s, facc);                               \
        } else if (gs == 32) {                                                                                  \
            if (lo) term_row_avx2(pl, NP, NT, 1, q, n0, 32, G, bl_end, g0, s, facc);                            \
            else term_row_avx2(pl, NP, NT, 0, q, n0, 32, G, bl_end, g0, s, facc);                               \
        } else if (lo) term_row_avx2(pl, NP, NT, 1, q, n0, gs, G, bl_end, g0, s, facc);                         \
        else term_row_avx2(pl, NP, NT, 0, q, n0, gs, G, bl_end, g0, s, facc);                                   \
    }
#define D2_TERMS2_NT(NT) D2_TERM2(1, NT) D2_TERM2(2, NT) D2_TERM2(3, NT) D2_TERM2(4, NT) \
    D2_TERM2(5, NT) D2_TERM2(6, NT) D2_TERM2(7, NT) D2_TERM2(8, NT)
D2_TERMS2_NT(1)
D2_TERMS2_NT(2)
D2_TERMS2_NT(3)
D2_TERMS2_NT(4)
#define D2_ROW2_NT(NT) {term2_1_##NT, term2_2_##NT, term2_3_##NT, term2_4_##NT, \
                        term2_5_##NT, term2_6_##NT, term2_7_##NT, term2_8_##NT}
static const term2_fn TERMS2[4][D2_MAX_PLANES] = {D2_ROW2_NT(1), D2_ROW2_NT(2), D2_ROW2_NT(3), D2_ROW2_NT(4)};

static void rows_gemv_avx2(const d2_matrix *m, const d2_qx *q, int n0, int nt, float *y, int64_t ystride,
                           int32_t r0, int32_t r1, float *scratch) {
    const int gs = m->group_size, G = m->cols / gs, rb = m->cols / 8, G8 = G & ~7;
    const int bl_end = m->layout == D2_BLOCKED ? full_block_cols(m->cols) : 0;
    float *s = scratch; /* [nt, G] per term: s[n, g] = m_t coef_t[o, g] dx[n, g] */
    for (int o = r0; o < r1; o++) {
        const uint16_t *off = m->offset + (int64_t)o * G;
        /* the base term (sum_g base[o, g] sx[n, g], base = offset + sum_t m_t coef_t bias_t) 8 groups at a
           time, the last G % 8 in scalars: per-row work in vectors (on AVX-512 it was a third of level 2) */
        __m256 facc[D2_MAX_TOKENS];
        float tail[D2_MAX_TOKENS] = {0};
        for (int n = 0; n < nt; n++) facc[n] = _mm256_setzero_ps();
        for (int g = 0; g < G8; g += 8) {
            __m256 base = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(off + g)));
            for (int t = 0; t < m->nterms; t++) {
                const __m256 c = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m->coef[t] + (int64_t)o * G + g))),
                                               _mm256_set1_ps(m->term_mul[t]));
                base = _mm256_fmadd_ps(c, _mm256_set1_ps(m->term_bias[t]), base);
            }
            for (int n = 0; n < nt; n++)
                facc[n] = _mm256_fmadd_ps(base, _mm256_loadu_ps(q->sx + (int64_t)(n0 + n) * G + g), facc[n]);
        }
        for (int g = G8; g < G; g++) {
            float base = f16_to_f32(off[g]);
            for (int t = 0; t < m->nterms; t++)
                base += f16_to_f32(m->coef[t][(int64_t)o * G + g]) * m->term_mul[t] * m->term_bias[t];
            for (int n = 0; n < nt; n++) tail[n] += base * q->sx[(int64_t)(n0 + n) * G + g];
        }
        for (int t = 0; t < m->nterms; t++) {
            const uint8_t *pl[D2_MAX_PLANES];
            const int np = m->term_nplanes[t];
            for (int p = 0; p < np; p++) pl[p] = m->planes[m->term_first[t] + p] + (int64_t)o * rb;
            const uint16_t *coef = m->coef[t] + (int64_t)o * G;
            const __m256 mul = _mm256_set1_ps(m->term_mul[t]);
            for (int g = 0; g < G8; g += 8) {
                const __m256 c = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(coef + g))), mul);
                for (int n = 0; n < nt; n++)
                    _mm256_storeu_ps(s + n * G + g, _mm256_mul_ps(c, _mm256_loadu_ps(q->dx + (int64_t)(n0 + n) * G + g)));
            }
            for (int g = G8; g < G; g++)
                for (int n = 0; n < nt; n++)
                    s[n * G + g] = f16_to_f32(coef[g]) * m->term_mul[t] * q->dx[(int64_t)(n0 + n) * G + g];
            TERMS2[nt - 1][np - 1](pl, q, n0, gs, G, bl_end, s, facc);
        }
        for (int n = 0; n < nt; n++) y[(int64_t)(n0 + n) * ystride + o] = hsum256_ps(facc[n]) + tail[n];
    }
}

/* w += code_t * (m_t coef_t) for one term of one row, 32 columns at a time (gs % 32 == 0, or 16 with cols % 32 == 0:
   a chunk's second half then takes the next group's coefficient): the same single-rounding fma per element as the
   portable loop and the torch reference. */
static void dequant_term_avx2(const uint8_t *const *pl, int np, const float *cf, int gs, int cols, int bl_end, float *w) {
    for (int c = 0; c < cols; c += 32) {
        const __m256i code = code32_at(pl, c, bl_end, 0, np);
        const __m256 sv0 = _mm256_set1_ps(cf[c / gs]), sv1 = _mm256_set1_ps(cf[(c + 16) / gs]);
        const __m128i lo = _mm256_castsi256_si128(code), hi = _mm256_extracti128_si256(code, 1);
        const __m128i part[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
        for (int k = 0; k < 4; k++) {
            const __m256 cv = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part[k]));
            float *wk = w + c + 8 * k;
            _mm256_storeu_ps(wk, _mm256_fmadd_ps(cv, k < 2 ? sv0 : sv1, _mm256_loadu_ps(wk)));
        }
    }
}

#endif
