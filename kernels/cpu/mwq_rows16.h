/* D2_ROWS16: the AVX-512 kernels' kernel-ready layout (made in place when bytes enter the cache).

   In the file's layout one row's group is one 64-column chunk, so every (row, group) pays a VNNI dot
   product's reduction: an int32 -> float convert and an FMA per 64 weights, as much work as the dot
   product itself, and level 2 ran no faster than level 4. Here 16 consecutive rows share each 64-bit
   word: per plane, word j of a 16-row block holds columns 4j..4j+3 of the 16 rows (bit 4i + k = row i,
   column 4j + k). A word's codes then fill one zmm as 16 rows x 4 columns, so one VNNI instruction
   against the 4 activations of that quad (broadcast) adds straight into 16 row accumulators, and the
   float work is once per (16 rows, group). Parameters (offset, scale, alpha: f16 [rows, G]) are stored
   per block as [G][16], so a group's 16 row factors are one load.

   Rows past the last full block of 16 stay in the file's layout (their bytes do not move). Same bytes,
   same size: a permutation inside each plane's and each parameter array's 16-row blocks, so a level's
   prefix and an upgrade's extra segments are re-laid out independently. Needs cols % 64 == 0. */

#define D2_ROWS16 2

/* 16 x 16 nibble transpose: nibble j of the word at in + i * istride becomes nibble i of the word at
   out + j * ostride (rows <-> quads; the transform is its own inverse). */
static inline void nib_transpose16_c(const uint8_t *in, int64_t istride, uint8_t *out, int64_t ostride) {
    uint64_t q[16], o[16] = {0};
    for (int i = 0; i < 16; i++) memcpy(&q[i], in + i * istride, 8);
    for (int j = 0; j < 16; j++)
        for (int i = 0; i < 16; i++) o[j] |= ((q[i] >> (4 * j)) & 15u) << (4 * i);
    for (int j = 0; j < 16; j++) memcpy(out + j * ostride, &o[j], 8);
}

#if D2_AVX512 && defined(__AVX512VBMI__)
#define D2_NIB_SIMD 1
/* The transpose on registers: a, b = words 0-7, 8-15 (one per qword lane) -> out words 0-7, 8-15. */
static inline __attribute__((always_inline)) void nib_core(__m512i a, __m512i b, __m512i *lo, __m512i *hi) {
    /* byte kk * 8 + m <- word 2m's (ie) or 2m + 1's (io) byte kk: 16 m + kk, 16 m + 8 + kk */
    static const uint8_t ie[64] = {0,16,32,48,64,80,96,112,1,17,33,49,65,81,97,113,2,18,34,50,66,82,98,114,3,19,35,51,67,83,99,115,4,20,36,52,68,84,100,116,5,21,37,53,69,85,101,117,6,22,38,54,70,86,102,118,7,23,39,55,71,87,103,119};
    static const uint8_t io[64] = {8,24,40,56,72,88,104,120,9,25,41,57,73,89,105,121,10,26,42,58,74,90,106,122,11,27,43,59,75,91,107,123,12,28,44,60,76,92,108,124,13,29,45,61,77,93,109,125,14,30,46,62,78,94,110,126,15,31,47,63,79,95,111,127};
    const __m512i nib = _mm512_set1_epi8(15), vie = _mm512_loadu_si512(ie), vio = _mm512_loadu_si512(io);
    /* bytes i * 8 + k of (a|b): word i's nibble 2k (lo) or 2k + 1 (hi) */
    const __m512i alo = _mm512_and_si512(a, nib), blo = _mm512_and_si512(b, nib);
    const __m512i ahi = _mm512_and_si512(_mm512_srli_epi16(a, 4), nib), bhi = _mm512_and_si512(_mm512_srli_epi16(b, 4), nib);
    /* byte kk * 8 + m of out word (2 kk or 2 kk + 1) = nibbles of words 2m (low) and 2m + 1 (high) */
    const __m512i qe = _mm512_or_si512(_mm512_permutex2var_epi8(alo, vie, blo),
                                       _mm512_slli_epi16(_mm512_permutex2var_epi8(alo, vio, blo), 4));
    const __m512i qo = _mm512_or_si512(_mm512_permutex2var_epi8(ahi, vie, bhi),
                                       _mm512_slli_epi16(_mm512_permutex2var_epi8(ahi, vio, bhi), 4));
    *lo = _mm512_permutex2var_epi64(qe, _mm512_set_epi64(11, 3, 10, 2, 9, 1, 8, 0), qo);
    *hi = _mm512_permutex2var_epi64(qe, _mm512_set_epi64(15, 7, 14, 6, 13, 5, 12, 4), qo);
}

static void nib_transpose16(const uint8_t *in, int64_t istride, uint8_t *out, int64_t ostride) {
    const __m512i rows = _mm512_set_epi64(7 * istride, 6 * istride, 5 * istride, 4 * istride, 3 * istride,
                                          2 * istride, istride, 0);
    const __m512i a = istride == 8 ? _mm512_loadu_si512(in) : _mm512_i64gather_epi64(rows, in, 1);
    const __m512i b = istride == 8 ? _mm512_loadu_si512(in + 64) : _mm512_i64gather_epi64(rows, in + 8 * istride, 1);
    __m512i lo, hi;
    nib_core(a, b, &lo, &hi);
    if (ostride == 8) {
        _mm512_storeu_si512(out, lo);
        _mm512_storeu_si512(out + 64, hi);
    } else { /* two stores and sixteen 8-byte copies beat two scatters (Zen 4) */
        uint64_t w[16];
        _mm512_storeu_si512(w, lo);
        _mm512_storeu_si512(w + 8, hi);
        for (int j = 0; j < 16; j++) memcpy(out + j * ostride, &w[j], 8);
    }
}

/* r[i] lane g -> r[g] lane i (8 x 8 qwords) */
static inline __attribute__((always_inline)) void transpose8x8_epi64(__m512i r[8]) {
    __m512i t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm512_unpacklo_epi64(r[i], r[i + 1]);     /* columns 0, 2, 4, 6 of rows i, i + 1 */
        t[i + 1] = _mm512_unpackhi_epi64(r[i], r[i + 1]); /* columns 1, 3, 5, 7 */
    }
    const __m512i p04 = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0), p26 = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
    for (int h = 0; h < 8; h += 4) { /* rows h..h+3: u[h + c] holds columns (c, c + 4) for c = 0, 2 and 1, 3 */
        u[h + 0] = _mm512_permutex2var_epi64(t[h], p04, t[h + 2]);
        u[h + 2] = _mm512_permutex2var_epi64(t[h], p26, t[h + 2]);
        u[h + 1] = _mm512_permutex2var_epi64(t[h + 1], p04, t[h + 3]);
        u[h + 3] = _mm512_permutex2var_epi64(t[h + 1], p26, t[h + 3]);
    }
    for (int c = 0; c < 4; c++) {
        r[c] = _mm512_shuffle_i64x2(u[c], u[c + 4], 0x44);
        r[c + 4] = _mm512_shuffle_i64x2(u[c], u[c + 4], 0xEE);
    }
}
#else
#define D2_NIB_SIMD 0
#define nib_transpose16 nib_transpose16_c
#endif

/* ---------------------------------------------------------------- re-layout (cache fill) */

/* A few KiB of scratch not granted: bytes flagged ROWS16 but left as they were would compute garbage. */
static void rows16_out_of_memory(void) {
    fputs("d2moe kernels: out of memory re-laying out a 16-row block\n", stderr);
    abort();
}

/* nplanes planes of [rows, row_bytes] (contiguous), file layout -> D2_ROWS16, in place. */
void d2_interleave_planes(uint8_t *p, int64_t nplanes, int32_t rows, int32_t row_bytes) {
    if (row_bytes % 8) return; /* cols % 64 != 0: never blocked (blocks_planes says no) */
    const int64_t bbytes = 16 * (int64_t)row_bytes;
    uint8_t *tmp = (uint8_t *)malloc((size_t)bbytes);
    if (!tmp) rows16_out_of_memory();
    for (int64_t k = 0; k < nplanes; k++)
        for (int b = 0; b < rows / 16; b++) {
            uint8_t *blk = p + (k * rows + 16 * (int64_t)b) * row_bytes;
            memcpy(tmp, blk, (size_t)bbytes);
            int g = 0;
#if D2_NIB_SIMD
            for (; g + 8 <= row_bytes / 8; g += 8) { /* 8 words of 16 rows: transposed in registers, no gathers */
                __m512i r[8], s[8];
                for (int i = 0; i < 8; i++) {
                    r[i] = _mm512_loadu_si512(tmp + i * (int64_t)row_bytes + 8 * g);
                    s[i] = _mm512_loadu_si512(tmp + (i + 8) * (int64_t)row_bytes + 8 * g);
                }
                transpose8x8_epi64(r);
                transpose8x8_epi64(s);
                for (int k = 0; k < 8; k++) {
                    __m512i lo, hi;
                    nib_core(r[k], s[k], &lo, &hi);
                    _mm512_storeu_si512(blk + 128 * (int64_t)(g + k), lo);
                    _mm512_storeu_si512(blk + 128 * (int64_t)(g + k) + 64, hi);
                }
            }
#endif
            for (; g < row_bytes / 8; g++) nib_transpose16(tmp + 8 * g, row_bytes, blk + 128 * g, 8);
        }
    free(tmp);
}

/* narrays f16 arrays of [rows, G] (contiguous), [16, G] -> [G, 16] per full block of 16 rows, in place. */
void d2_interleave_params(uint16_t *p, int64_t narrays, int32_t rows, int32_t G) {
    uint16_t *tmp = (uint16_t *)malloc((size_t)16 * G * 2);
    if (!tmp) rows16_out_of_memory();
    for (int64_t k = 0; k < narrays; k++)
        for (int b = 0; b < rows / 16; b++) {
            uint16_t *blk = p + (k * rows + 16 * (int64_t)b) * G;
            int g = 0;
#if D2_AVX512
            /* a group's 16 row values by one 32-bit gather (the value in each low half), narrowed */
            const __m512i at = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                  _mm512_set1_epi32(2 * G));
            for (; g < G - 1; g++) /* the last group's gather would read 2 bytes past the block */
                _mm256_storeu_si256((__m256i *)(tmp + g * 16), _mm512_cvtepi32_epi16(_mm512_i32gather_epi32(at, blk + g, 1)));
#endif
            for (; g < G; g++)
                for (int i = 0; i < 16; i++) tmp[g * 16 + i] = blk[i * G + g];
            memcpy(blk, tmp, (size_t)16 * G * 2);
        }
    free(tmp);
}

/* Bytes of the buffer rows16_unpack needs: every plane and parameter array of one block. */
static int64_t rows16_unpack_bytes(const d2_matrix *m) {
    return (int64_t)D2_MAX_PLANES * 16 * (m->cols / 8) + (int64_t)(1 + D2_MAX_TERMS) * 16 * (m->cols / m->group_size) * 2;
}

/* Block b of m (its 16 rows) copied back into the file's layout in buf: a 16-row d2_matrix that every
   row-wise path (portable, prefill tiles, partial blocks) reads as usual. */
static d2_matrix rows16_unpack(const d2_matrix *m, int b, uint8_t *buf) {
    const int rb = m->cols / 8, G = m->cols / m->group_size;
    d2_matrix r = *m;
    r.rows = 16;
    r.layout = D2_ROWS;
    int nplanes = 0;
    for (int t = 0; t < m->nterms; t++)
        if (m->term_first[t] + m->term_nplanes[t] > nplanes) nplanes = m->term_first[t] + m->term_nplanes[t];
    for (int p = 0; p < nplanes; p++) {
        uint8_t *dst = buf + (int64_t)p * 16 * rb;
        const uint8_t *src = m->planes[p] + (int64_t)b * 16 * rb;
        for (int g = 0; g < rb / 8; g++) nib_transpose16(src + 128 * g, 8, dst + 8 * g, rb);
        r.planes[p] = dst;
    }
    uint16_t *prm = (uint16_t *)(buf + (int64_t)D2_MAX_PLANES * 16 * rb);
    if (m->pcode) { /* subblock: the block's parameters from its codes ([G][16] bytes, (d, dmin) [S * 2][16]) */
        const int gps = 256 / m->group_size, S = (G + gps - 1) / gps;
        const uint8_t *pc = m->pcode + (int64_t)b * 16 * G;
        const uint16_t *ps = m->psuper + (int64_t)b * 16 * S * 2;
        for (int s = 0; s < S; s++) {
            const int g1 = (s + 1) * gps < G ? (s + 1) * gps : G;
            for (int i = 0; i < 16; i++) {
                const float d = f16_to_f32(ps[32 * s + i]), dmin = f16_to_f32(ps[32 * s + 16 + i]);
                for (int g = s * gps; g < g1; g++)
                    subblock_params(d, dmin, pc[16 * (int64_t)g + i], prm + 16 * G + i * G + g, prm + i * G + g);
            }
        }
        r.offset = prm;
        r.coef[0] = prm + 16 * G;
        r.pcode = NULL;
        r.psuper = NULL;
        return r;
    }
    for (int a = 0; a <= m->nterms; a++) {
        const uint16_t *src = (a == 0 ? m->offset : m->coef[a - 1]) + (int64_t)b * 16 * G;
        uint16_t *dst = prm + (int64_t)a * 16 * G;
        for (int i = 0; i < 16; i++)
            for (int g = 0; g < G; g++) dst[i * G + g] = src[g * 16 + i];
        if (a == 0) r.offset = dst;
        else r.coef[a - 1] = dst;
    }
    return r;
}

/* ---------------------------------------------------------------- GEMV on 16-row blocks (AVX-512) */
#if D2_AVX512

/* Scheme subblock's parameters of one 16-row block, read where they sit in the cache: codes [G][16] bytes and
   (d, dmin) [S * 2][16] float16 (interleaved per block when bytes entered the cache). */
typedef struct {
    const uint8_t *code;
    const uint16_t *super;
    int gps_shift; /* log2 of the groups per 256-column super-block */
} d2_sub16;

/* A group's 16 row coefficients, float16 [G][16]. */
static inline __attribute__((always_inline)) __m512 rows16_coef(const uint16_t *coef, int g) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(coef + (int64_t)g * 16)));
}

/* One term over every group of a block for NT tokens: facc[n] (lane i = row i) += sum_g s[i, g] D[n, i, g]
   with s = m_t coef_t dx. A group's quads' dot products go to CH accumulators, summed at its end. */
static inline __attribute__((always_inline)) void rows16_term_ch(
    const uint8_t *const *pl, const int NP, const int NT, const int LO, const int SUB, const d2_qx *q, int n0, int G,
    int qpg, const uint16_t *coef, const d2_sub16 *sub, float mul, __m512 *facc, const int CH) {
    const int8_t *xh[D2_MAX_TOKENS], *xl[D2_MAX_TOKENS];
    for (int n = 0; n < NT; n++) {
        xh[n] = q->hi + (int64_t)(n0 + n) * q->cols;
        xl[n] = LO ? q->lo + (int64_t)(n0 + n) * q->cols : 0;
    }
    __m512 acc[D2_MAX_TOKENS]; /* in registers across groups: through facc each group's FMA waited on a store */
    for (int n = 0; n < NT; n++) acc[n] = facc[n];
    __m512 dm = _mm512_setzero_ps(); /* subblock: d m of the current super-block */
    for (int g = 0; g < G; g++) {
        if (SUB && !(g & ((1 << sub->gps_shift) - 1)))
            dm = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sub->super + 32 * (int64_t)(g >> sub->gps_shift)))),
                               _mm512_set1_ps(mul));
        __m512i dh[D2_MAX_TOKENS][4], dl[D2_MAX_TOKENS][4]; /* a fixed size: CH-sized arrays were stack VLAs */
        for (int n = 0; n < NT; n++)
            for (int c = 0; c < CH; c++) dh[n][c] = dl[n][c] = _mm512_setzero_si512();
        const int64_t q0 = (int64_t)g * qpg;
        for (int j = 0; j < qpg; j += CH)
            for (int c = 0; c < CH; c++) {
                const __m512i code = code64(pl, 8 * (q0 + j + c), NP);
                for (int n = 0; n < NT; n++) {
                    int32_t xv;
                    memcpy(&xv, xh[n] + 4 * (q0 + j + c), 4);
                    dh[n][c] = _mm512_dpbusd_epi32(dh[n][c], code, _mm512_set1_epi32(xv));
                    if (LO) {
                        memcpy(&xv, xl[n] + 4 * (q0 + j + c), 4);
                        dl[n][c] = _mm512_dpbusd_epi32(dl[n][c], code, _mm512_set1_epi32(xv));
                    }
                }
            }
        const __m512 cs = SUB ? _mm512_mul_ps(dm, _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_cvtepu8_epi32(
                                    _mm_loadu_si128((const __m128i *)(sub->code + 16 * (int64_t)g))), _mm512_set1_epi32(15))))
                              : _mm512_mul_ps(rows16_coef(coef, g), _mm512_set1_ps(mul)); /* exact: mul is 2^-k */
        for (int n = 0; n < NT; n++) {
            __m512i d = dh[n][0], e = dl[n][0];
            for (int c = 1; c < CH; c++) {
                d = _mm512_add_epi32(d, dh[n][c]);
                if (LO) e = _mm512_add_epi32(e, dl[n][c]);
            }
            if (LO) d = _mm512_add_epi32(_mm512_slli_epi32(d, 8), e);
            const __m512 s = _mm512_mul_ps(cs, _mm512_set1_ps(q->dx[(int64_t)(n0 + n) * G + g]));
            acc[n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[n]);
        }
    }
    for (int n = 0; n < NT; n++) facc[n] = acc[n];
}

/* Accumulators per group: with 32 columns or more, four (one token) or two (several, whose chains are already
   independent) hide VNNI's latency. Groups of 16 or fewer columns take one: the next groups' chains are independent
   of this one's and overlap it. Groups of 16 and 32 columns get copies with a constant trip count, which unroll a
   group's quads. The accumulator arrays have a fixed size and the token sums a local array: sized by CH the arrays
   were stack VLAs, and the sums went through facc's memory, one store-to-load wait per group (BENCHMARKS.md §0.16). */
static inline __attribute__((always_inline)) void rows16_term(
    const uint8_t *const *pl, const int NP, const int NT, const int LO, const int SUB, const d2_qx *q, int n0, int G,
    int qpg, const uint16_t *coef, const d2_sub16 *sub, float mul, __m512 *facc) {
    if (qpg == 4)
        rows16_term_ch(pl, NP, NT, LO, SUB, q, n0, G, 4, coef, sub, mul, facc, 1);
    else if (qpg <= 4)
        rows16_term_ch(pl, NP, NT, LO, SUB, q, n0, G, qpg, coef, sub, mul, facc, 1);
    else if (qpg == 8)
        rows16_term_ch(pl, NP, NT, LO, SUB, q, n0, G, 8, coef, sub, mul, facc, NT == 1 ? 4 : 2);
    else
        rows16_term_ch(pl, NP, NT, LO, SUB, q, n0, G, qpg, coef, sub, mul, facc, NT == 1 ? 4 : 2);
}

/* Subblock's base term over groups [g0, g1) of super-block s (a multiple of 4 groups, all sharing the sums' step
   ds[n, s]): facc[n] += ds (d m bias SC + (-dmin) K) with SC = sum_g s_g sq_g and K = sum_g k_g sq_g exact int32
   dot products of the scale and offset codes with the quantized group sums. Four groups' code bytes (one 16-byte
   row vector each) are transposed so that each row's lane holds its four codes: one VNNI per half and code. */
static inline __attribute__((always_inline)) void rows16_base_codes(const uint8_t *code, int g0, int g1, const d2_qx *q,
                                                                    int n0, const int nt, int G, int s, __m512 nmin,
                                                                    __m512 dmb, __m512 *facc) {
    static const uint8_t tr4[64] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                    0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                    0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                    0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
    /* dword 4 L + j <- dword 4 j + L: lane L gets rows 4L..4L+3 of the four groups; then bytes 4 r + j <- 4 j + r */
    const __m512i dw = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    const __m512i by = _mm512_loadu_si512(tr4), nib = _mm512_set1_epi8(15);
    __m512i kh[4], kl[4], sh[4], sl[4];
    for (int n = 0; n < nt; n++) kh[n] = kl[n] = sh[n] = sl[n] = _mm512_setzero_si512();
    for (int g = g0; g < g1; g += 4) {
        const __m512i c = _mm512_shuffle_epi8(_mm512_permutexvar_epi32(dw, _mm512_loadu_si512(code + 16 * (int64_t)g)), by);
        const __m512i sc = _mm512_and_si512(c, nib), k = _mm512_and_si512(_mm512_srli_epi16(c, 4), nib);
        for (int n = 0; n < nt; n++) {
            int32_t h, l;
            memcpy(&h, q->sh + (int64_t)(n0 + n) * G + g, 4);
            memcpy(&l, q->sl + (int64_t)(n0 + n) * G + g, 4);
            const __m512i bh = _mm512_set1_epi32(h), bl = _mm512_set1_epi32(l);
            kh[n] = _mm512_dpbusd_epi32(kh[n], k, bh);
            kl[n] = _mm512_dpbusd_epi32(kl[n], k, bl);
            sh[n] = _mm512_dpbusd_epi32(sh[n], sc, bh);
            sl[n] = _mm512_dpbusd_epi32(sl[n], sc, bl);
        }
    }
    const int S = (G + sum_groups(q->group_size) - 1) / sum_groups(q->group_size);
    for (int n = 0; n < nt; n++) { /* |K|, |SC| <= 15 * 32511 * groups per span < 2^24: exact in float */
        const __m512 kf = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(kh[n], 8), kl[n]));
        const __m512 sf = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(sh[n], 8), sl[n]));
        const __m512 t = _mm512_fmadd_ps(dmb, sf, _mm512_mul_ps(nmin, kf));
        facc[n] = _mm512_fmadd_ps(t, _mm512_set1_ps(q->ds[(int64_t)(n0 + n) * S + s]), facc[n]);
    }
}

typedef void (*rows16_fn)(const uint8_t *const *, const d2_qx *, int, int, int, const uint16_t *, const d2_sub16 *,
                          float, __m512 *);
#define D2_R16(NP, NT, X) /* X = LO + 2 SUB */                                                      \
    static void r16_##NP##_##NT##_##X(const uint8_t *const *pl, const d2_qx *q, int n0, int G, int qpg,    \
                                      const uint16_t *coef, const d2_sub16 *sub, float mul, __m512 *facc) { \
        rows16_term(pl, NP, NT, (X) & 1, (X) >> 1, q, n0, G, qpg, coef, sub, mul, facc);                   \
    }
D2_FOR_KERNELS(D2_R16, 0)
D2_FOR_KERNELS(D2_R16, 1)
D2_FOR_KERNELS(D2_R16, 2)
D2_FOR_KERNELS(D2_R16, 3)
static const rows16_fn ROWS16[4][4][D2_MAX_PLANES] = {D2_KERNEL_TABLE(r16, 0), D2_KERNEL_TABLE(r16, 1),
                                                      D2_KERNEL_TABLE(r16, 2), D2_KERNEL_TABLE(r16, 3)}; /* [lo + 2 subblock][tokens - 1][planes - 1] */

/* y[n, 16 b + i] for every token of q and the 16 rows of block b (scheme subblock: each group's parameters
   computed from its codes in registers; else the float16 parameter arrays). */
static void rows16_gemv_block(const d2_matrix *m, const d2_qx *q, float *y, int64_t ystride, int b) {
    const int gs = m->group_size, G = m->cols / gs, rb = m->cols / 8, lo = q->lo != 0;
    const int64_t pbase = (int64_t)b * 16 * rb, prm = (int64_t)b * 16 * G;
    d2_sub16 sub16, *sub = NULL; /* subblock: the block's codes, read in place */
    if (m->pcode) {
        const int gps = 256 / gs, S = (G + gps - 1) / gps;
        sub16 = (d2_sub16){m->pcode + prm, m->psuper + (int64_t)b * 16 * S * 2, __builtin_ctz(gps)};
        sub = &sub16;
    }
    for (int n0 = 0; n0 < q->ntok; n0 += 4) {
        const int nt = q->ntok - n0 < 4 ? q->ntok - n0 : 4;
        __m512 facc[D2_MAX_TOKENS];
        for (int n = 0; n < nt; n++) facc[n] = _mm512_setzero_ps();
        if (sub) { /* base = -dmin k + d s m bias: (-dmin, d m bias) once per super-block, the codes once per group */
            const int gps = 1 << sub->gps_shift;
            for (int g0 = 0; g0 < G; g0 += gps) {
                const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sub->super + 32 * (int64_t)(g0 / gps))));
                const __m512 nmin = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_cvtph_ps(_mm256_loadu_si256(
                                                      (const __m256i *)(sub->super + 32 * (int64_t)(g0 / gps) + 16))));
                const __m512 dmb = _mm512_mul_ps(d, _mm512_set1_ps(m->term_mul[0] * m->term_bias[0])); /* exact: 2^k */
                const int g1 = g0 + gps < G ? g0 + gps : G, g4 = sum_groups(gs) == gps ? g0 + ((g1 - g0) & ~3) : g0;
                if (g4 > g0) /* whole fours: integer dot products of the codes with the quantized sums */
                    switch (nt) { /* constant token counts keep the accumulators in registers */
                    case 1: rows16_base_codes(sub->code, g0, g4, q, n0, 1, G, g0 / gps, nmin, dmb, facc); break;
                    case 2: rows16_base_codes(sub->code, g0, g4, q, n0, 2, G, g0 / gps, nmin, dmb, facc); break;
                    case 3: rows16_base_codes(sub->code, g0, g4, q, n0, 3, G, g0 / gps, nmin, dmb, facc); break;
                    default: rows16_base_codes(sub->code, g0, g4, q, n0, 4, G, g0 / gps, nmin, dmb, facc);
                    }
                for (int g = g4; g < g1; g++) {
                    const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(sub->code + 16 * (int64_t)g)));
                    const __m512 k = _mm512_cvtepi32_ps(_mm512_srli_epi32(c, 4));
                    const __m512 sc = _mm512_cvtepi32_ps(_mm512_and_si512(c, _mm512_set1_epi32(15)));
                    const __m512 base = _mm512_fmadd_ps(dmb, sc, _mm512_mul_ps(nmin, k)); /* one rounding, as below */
                    for (int n = 0; n < nt; n++)
                        facc[n] = _mm512_fmadd_ps(base, _mm512_set1_ps(q->sx[(int64_t)(n0 + n) * G + g]), facc[n]);
                }
            }
        } else {
            for (int g = 0; g < G; g++) { /* base term: offset + sum_t m_t coef_t bias_t, times the exact group sum */
                __m512 base = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(m->offset + prm + (int64_t)g * 16)));
                for (int t = 0; t < m->nterms; t++) {
                    const __m512 c = rows16_coef(m->coef[t] + prm, g);
                    base = _mm512_fmadd_ps(_mm512_mul_ps(c, _mm512_set1_ps(m->term_mul[t])), _mm512_set1_ps(m->term_bias[t]), base);
                }
                for (int n = 0; n < nt; n++)
                    facc[n] = _mm512_fmadd_ps(base, _mm512_set1_ps(q->sx[(int64_t)(n0 + n) * G + g]), facc[n]);
            }
        }
        for (int t = 0; t < m->nterms; t++) {
            const uint8_t *pl[D2_MAX_PLANES];
            const int np = m->term_nplanes[t];
            for (int p = 0; p < np; p++) pl[p] = m->planes[m->term_first[t] + p] + pbase;
            ROWS16[lo + 2 * (sub != NULL)][nt - 1][np - 1](pl, q, n0, G, gs / 4, sub ? NULL : m->coef[t] + prm, sub, m->term_mul[t], facc);
        }
        for (int n = 0; n < nt; n++) _mm512_storeu_ps(y + (int64_t)(n0 + n) * ystride + 16 * (int64_t)b, facc[n]);
    }
}
#endif
