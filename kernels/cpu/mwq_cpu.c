/* CPU expert kernels: y = W_b x straight from MWQ bit-planes, never an fp32 copy of a matrix.

   A level-b matrix is read as "terms": each term is a small unsigned code built from consecutive
   bit-planes (MSB first) with a per-(row, group) float16 coefficient. With m_t, bias_t per term:
       w[o, c] = offset[o, g] + sum_t m_t * coef_t[o, g] * (code_t[o, c] + bias_t)
   sliced   : one term, planes [0, b), coef = scale, m = 2^-(b - b1), bias = 0.5
   residual : term 0 = planes [0, b1), coef = scale, m = 1, bias = 0.5;
              term j = plane b1 + j - 1, coef = alpha_j, m = 2, bias = -0.5
   (kernels/reference.py has the same formula in torch: it is the oracle these are tested against.)

   GEMV: y[n, o] = sum_g base[o, g] * sx[n, g] + sum_t sum_g m_t coef_t[o, g] dx[n, g] D_t[n, o, g]
   with base = offset + sum_t m_t coef_t bias_t, sx the exact float sum of x over the group, and
   D_t the integer dot product of the codes with x quantized to int16 per group (step dx). The
   int16 is split in two signed bytes (x = 256 hi + lo) so one u8 x s8 dot-product instruction
   (VNNI) serves both halves: activations keep 15 bits, the result is within ~1e-4 of fp32.
   Cost per weight ~ planes read: level 2 reads and builds half of what level 4 does.

   Two code paths with the same arithmetic: AVX-512 (BW + VL + VNNI; 32-column chunks, plane bits
   used directly as byte masks) and portable C (any group size that is a multiple of 8). Integer
   dot products are exact, so both paths give the same D_t; only float summation order differs.
   Every entry point works on a range of rows so callers can split a matrix over threads; a row
   range writes only its own outputs. */

#include <stdlib.h>

#include "common.h"

typedef struct {
    int32_t rows, cols, group_size, nterms;
    const uint8_t *planes[D2_MAX_PLANES]; /* plane p: [rows, cols / 8], bit c % 8 of byte c / 8 = column c */
    const uint16_t *offset;               /* f16 [rows, G] */
    const uint16_t *coef[D2_MAX_TERMS];   /* f16 [rows, G] */
    int32_t term_first[D2_MAX_TERMS], term_nplanes[D2_MAX_TERMS];
    float term_mul[D2_MAX_TERMS], term_bias[D2_MAX_TERMS];
    int32_t layout; /* D2_ROWS: planes as on disk; D2_BLOCKED: kernel-ready (d2_block_planes) */
} d2_matrix;

/* x of n tokens quantized per group: hi/lo int8 halves of the int16 code, step and exact sum. */
typedef struct {
    int32_t ntok, cols, group_size;
    int8_t *hi, *lo; /* [ntok, cols] */
    float *dx, *sx;  /* [ntok, G] */
} d2_qx;

/* ---------------------------------------------------------------- plane layouts

   D2_ROWS (the file's): bit c % 8 of row byte c / 8 is column c. D2_BLOCKED (kernel-ready, made in
   place when bytes enter the cache on CPUs whose kernels read it, see d2_block_planes): every full
   256-column block of a row keeps its 32 bytes, but byte j's bit k is column 32 k + j, so one
   32-byte load and a shift give a 32-column chunk's bits as byte lanes (AVX2 has no bit-to-byte mask
   instruction: from D2_ROWS that takes a broadcast, a shuffle and a compare per chunk and plane).
   A row's last cols % 256 columns stay as in D2_ROWS. Same bytes, same size. */
#define D2_ROWS 0
#define D2_BLOCKED 1

/* Bit of column c in one plane row (any layout; full_end = the row's columns in full blocks). */
static inline int plane_bit(const uint8_t *row, int c, int layout, int full_end) {
    if (layout == D2_BLOCKED && c < full_end) {
        const int w = c & 255;
        return (row[(c >> 8) * 32 + (w & 31)] >> (w >> 5)) & 1;
    }
    return (row[c >> 3] >> (c & 7)) & 1;
}

static inline int full_block_cols(int cols) { return cols & ~255; }

/* 1: AVX-512 VNNI, 2: AVX2, 0: portable C */
int d2_simd_level(void) { return D2_AVX512 ? 1 : (D2_AVX2 ? 2 : 0); }

/* ---------------------------------------------------------------- activation quantization */

void d2_quantize_x(const float *x, int32_t ntok, int32_t cols, int32_t group_size,
                   int8_t *hi, int8_t *lo, float *dx, float *sx) {
    const int G = cols / group_size;
    for (int n = 0; n < ntok; n++) {
        for (int g = 0; g < G; g++) {
            const float *xs = x + (int64_t)n * cols + (int64_t)g * group_size;
            float amax = 0.f, sum = 0.f;
            for (int c = 0; c < group_size; c++) {
                float a = fabsf(xs[c]);
                amax = a > amax ? a : amax;
                sum += xs[c];
            }
            const float qmax = lo ? 32511.f : 127.f; /* lo == NULL: plain int8 activations */
            const float d = amax > 0.f ? amax / qmax : 1.f, inv = 1.f / d;
            dx[n * G + g] = amax > 0.f ? d : 0.f;
            sx[n * G + g] = sum;
            int8_t *h = hi + (int64_t)n * cols + (int64_t)g * group_size;
            if (!lo) {
                for (int c = 0; c < group_size; c++) {
                    int32_t q = (int32_t)lrintf(xs[c] * inv);
                    h[c] = (int8_t)(q > 127 ? 127 : (q < -127 ? -127 : q));
                }
                continue;
            }
            int8_t *l = lo + (int64_t)n * cols + (int64_t)g * group_size;
            for (int c = 0; c < group_size; c++) {
                int32_t q = (int32_t)lrintf(xs[c] * inv);
                q = q > 32511 ? 32511 : (q < -32511 ? -32511 : q); /* keeps the high byte in [-127, 127] */
                int32_t low = ((q + 128) & 255) - 128; /* signed low byte: q = 256 * high + low */
                h[c] = (int8_t)((q - low) >> 8);
                l[c] = (int8_t)low;
            }
        }
    }
}

/* Per-row float coefficients: cf[t * G + g] = m_t coef_t[o, g]; base[g] = offset + sum_t cf bias_t. */
static void row_coefs(const d2_matrix *m, int o, float *cf, float *base) {
    const int G = m->cols / m->group_size;
    f16_row(m->offset + (int64_t)o * G, base, G);
    for (int t = 0; t < m->nterms; t++) {
        float *c = cf + t * G;
        f16_row(m->coef[t] + (int64_t)o * G, c, G);
        const float mul = m->term_mul[t], bias = m->term_bias[t];
        for (int g = 0; g < G; g++) {
            c[g] *= mul;
            base[g] += c[g] * bias;
        }
    }
}

/* ---------------------------------------------------------------- portable integer dot products */

/* D[n] = sum over the group's columns of code_t * xq[n] (exact, int32), portable. */
static void group_dots_c(const d2_matrix *m, int t, int o, int g, const d2_qx *q, int n0, int nt, int32_t *D) {
    const int gs = m->group_size, rb = m->cols / 8, first = m->term_first[t], np = m->term_nplanes[t];
    const int full_end = full_block_cols(m->cols);
    for (int n = 0; n < nt; n++) D[n] = 0;
    for (int byte = 0; byte < gs / 8; byte++) {
        int32_t code[8];
        for (int k = 0; k < 8; k++) {
            int32_t v = 0;
            for (int p = 0; p < np; p++)
                v = (v << 1) | plane_bit(m->planes[first + p] + (int64_t)o * rb, g * gs + byte * 8 + k, m->layout, full_end);
            code[k] = v;
        }
        for (int n = 0; n < nt; n++) {
            const int64_t at = (int64_t)(n0 + n) * m->cols + (int64_t)g * gs + byte * 8;
            int32_t acc = 0;
            if (q->lo)
                for (int k = 0; k < 8; k++) acc += code[k] * (256 * (int32_t)q->hi[at + k] + (int32_t)q->lo[at + k]);
            else
                for (int k = 0; k < 8; k++) acc += code[k] * (int32_t)q->hi[at + k];
            D[n] += acc;
        }
    }
}

static void rows_gemv_c(const d2_matrix *m, const d2_qx *q, int n0, int nt, float *y, int64_t ystride,
                        int32_t r0, int32_t r1, float *scratch) {
    const int G = m->cols / m->group_size;
    float *cf = scratch, *base = scratch + D2_MAX_TERMS * G;
    for (int o = r0; o < r1; o++) {
        row_coefs(m, o, cf, base);
        double acc[D2_MAX_TOKENS] = {0};
        for (int n = 0; n < nt; n++) {
            const float *sx = q->sx + (int64_t)(n0 + n) * G;
            float s = 0.f;
            for (int g = 0; g < G; g++) s += base[g] * sx[g];
            acc[n] = s;
        }
        for (int g = 0; g < G; g++) {
            for (int t = 0; t < m->nterms; t++) {
                int32_t D[D2_MAX_TOKENS];
                group_dots_c(m, t, o, g, q, n0, nt, D);
                for (int n = 0; n < nt; n++) acc[n] += (double)(cf[t * G + g] * q->dx[(int64_t)(n0 + n) * G + g]) * (double)D[n];
            }
        }
        for (int n = 0; n < nt; n++) y[(int64_t)(n0 + n) * ystride + o] = (float)acc[n];
    }
}

#include "mwq_avx2.h"

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
#define D2_TERMS_NT(NT, W) D2_TERM(1, NT, W) D2_TERM(2, NT, W) D2_TERM(3, NT, W) D2_TERM(4, NT, W) \
    D2_TERM(5, NT, W) D2_TERM(6, NT, W) D2_TERM(7, NT, W) D2_TERM(8, NT, W)
#define D2_TERMS_W(W) D2_TERMS_NT(1, W) D2_TERMS_NT(2, W) D2_TERMS_NT(3, W) D2_TERMS_NT(4, W)
D2_TERMS_W(0)
D2_TERMS_W(1)
#define D2_ROW_NT(NT, W) {term_1_##NT##_##W, term_2_##NT##_##W, term_3_##NT##_##W, term_4_##NT##_##W, \
                          term_5_##NT##_##W, term_6_##NT##_##W, term_7_##NT##_##W, term_8_##NT##_##W}
#define D2_TABLE_W(W) {D2_ROW_NT(1, W), D2_ROW_NT(2, W), D2_ROW_NT(3, W), D2_ROW_NT(4, W)}
static const term_fn TERMS[2][4][D2_MAX_PLANES] = {D2_TABLE_W(0), D2_TABLE_W(1)}; /* [64-wide][tokens - 1][planes - 1] */

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

#include "mwq_rows16.h"

/* ---------------------------------------------------------------- entry points */

/* Scratch floats a row range needs: coefficients of every term and the base, per group. */
/* Scratch floats any entry point needs for this matrix (the one owner of the layout): per-row term
   coefficients and base (D2_MAX_TERMS + 1 per group), then either per-token group factors (gemv) or
   one float32 row (bf16 tiles). */
int64_t d2_scratch_floats(const d2_matrix *m) {
    const int64_t G = m->cols / m->group_size, tokens = (int64_t)D2_MAX_TOKENS * G;
    const int64_t rows = (D2_MAX_TERMS + 1) * G + (tokens > m->cols ? tokens : m->cols);
    return m->layout == D2_ROWS16 ? rows + rows16_unpack_bytes(m) / 4 + 1 : rows; /* then one block unpacked */
}

/* The layout this build's vector kernels read fastest, made by d2_interleave_planes/_params (2) or
   d2_block_planes (1) when bytes enter the cache; 0: the file's. */
int d2_ready_layout(void) { return D2_AVX512 ? D2_ROWS16 : (D2_AVX2 ? D2_BLOCKED : D2_ROWS); }

/* Rows [r0, r1) of a D2_ROWS16 matrix through a row-wise entry point: each touched block copied back
   to the file's layout (the tail rows past the last full block already are), then fn on its rows. */
typedef void (*rows_fn)(const d2_matrix *, int32_t r0, int32_t r1, void *ctx, int64_t row_offset);
static void rows16_by_rows(const d2_matrix *m, int32_t r0, int32_t r1, float *scratch, rows_fn fn, void *ctx) {
    const int32_t full = m->rows & ~15;
    uint8_t *buf = (uint8_t *)(scratch + (d2_scratch_floats(m) - rows16_unpack_bytes(m) / 4 - 1));
    for (int32_t o = r0; o < r1 && o < full;) {
        const int32_t b = o / 16, e = 16 * b + 16 < r1 ? 16 * b + 16 : r1;
        const d2_matrix blk = rows16_unpack(m, b, buf);
        fn(&blk, o - 16 * b, e - 16 * b, ctx, 16 * (int64_t)b);
        o = e;
    }
    if (r1 > full) {
        d2_matrix tail = *m;
        tail.layout = D2_ROWS;
        fn(&tail, r0 > full ? r0 : full, r1, ctx, 0);
    }
}

/* y[n, o] for rows [r0, r1) and every token of q (ystride = y's row length). Rows are visited in
   tiles so that a tile's planes stay in cache while every 8-token block of q reuses them. */
static void gemv_rows(const d2_matrix *m, const d2_qx *q, float *y, int64_t ystride, int32_t r0, int32_t r1,
                      float *scratch, int32_t force_portable);

typedef struct { const d2_qx *q; float *y; int64_t ystride; float *scratch; int32_t force_portable; } gemv_ctx;

static void gemv_rows_fn(const d2_matrix *m, int32_t r0, int32_t r1, void *ctx, int64_t row_offset) {
    const gemv_ctx *c = (const gemv_ctx *)ctx;
    gemv_rows(m, c->q, c->y + row_offset, c->ystride, r0, r1, c->scratch, c->force_portable);
}

void d2_gemv_rows(const d2_matrix *m, const d2_qx *q, float *y, int64_t ystride, int32_t r0, int32_t r1,
                  float *scratch, int32_t force_portable) {
    if (m->layout != D2_ROWS16) {
        gemv_rows(m, q, y, ystride, r0, r1, scratch, force_portable);
        return;
    }
#if D2_AVX512
    if (!force_portable) { /* whole blocks inside the range: the block kernel */
        const int32_t first = (r0 + 15) / 16, last = (r1 < (m->rows & ~15) ? r1 : (m->rows & ~15)) / 16;
        for (int32_t b = first; b < last; b++) rows16_gemv_block(m, q, y, ystride, b);
        if (first < last) { /* what is left: the partial blocks at both ends and the tail rows */
            gemv_ctx c = {q, y, ystride, scratch, force_portable};
            rows16_by_rows(m, r0, 16 * first, scratch, gemv_rows_fn, &c);
            rows16_by_rows(m, 16 * last, r1, scratch, gemv_rows_fn, &c);
            return;
        }
    }
#endif
    gemv_ctx c = {q, y, ystride, scratch, force_portable};
    rows16_by_rows(m, r0, r1, scratch, gemv_rows_fn, &c);
}

static void gemv_rows(const d2_matrix *m, const d2_qx *q, float *y, int64_t ystride, int32_t r0, int32_t r1,
                      float *scratch, int32_t force_portable) {
#if D2_AVX512
    const int vector = !force_portable && m->group_size % 32 == 0 && m->layout == D2_ROWS;
#elif D2_AVX2
    const int vector = !force_portable && m->group_size % 32 == 0;
#else
    const int vector = 0;
#endif
    /* tokens per pass: 4 keep the vector accumulators in registers (8 spill: measured 2.9x slower on AVX-512) */
    const int block = vector ? 4 : D2_MAX_TOKENS;
    const int tile = q->ntok > block ? 16 : (r1 - r0);
    for (int t0 = r0; t0 < r1; t0 += tile) {
        const int t1 = t0 + tile < r1 ? t0 + tile : r1;
        for (int n0 = 0; n0 < q->ntok; n0 += block) {
            const int nt = q->ntok - n0 < block ? q->ntok - n0 : block;
#if D2_AVX512
            if (vector) {
                rows_gemv_avx512(m, q, n0, nt, y, ystride, t0, t1, scratch);
                continue;
            }
#elif D2_AVX2
            if (vector) {
                rows_gemv_avx2(m, q, n0, nt, y, ystride, t0, t1, scratch);
                continue;
            }
#endif
            rows_gemv_c(m, q, n0, nt, y, ystride, t0, t1, scratch);
        }
    }
}

/* One row of the weight at the matrix's level into w (float32 [cols]): the same operations in the
   same order as the torch reference (w = base, then w = fma(code_t, m_t coef_t, w) term by term). */
static void dequant_row(const d2_matrix *m, int o, const float *cf, const float *base, float *w, int force_portable) {
    const int gs = m->group_size, G = m->cols / gs, rb = m->cols / 8;
    for (int g = 0; g < G; g++)
        for (int c = 0; c < gs; c++) w[g * gs + c] = base[g];
    for (int t = 0; t < m->nterms; t++) {
        const int first = m->term_first[t], np = m->term_nplanes[t];
        const uint8_t *pl[D2_MAX_PLANES];
        for (int p = 0; p < np; p++) pl[p] = m->planes[first + p] + (int64_t)o * rb;
#if D2_AVX512
        if (!force_portable && gs % 64 == 0 && m->layout == D2_ROWS) {
            for (int c = 0; c < m->cols; c += 64) {
                __m512 cv[4];
                code_ps(code64(pl, c / 8, np), cv);
                const __m512 sv = _mm512_set1_ps(cf[t * G + c / gs]);
                for (int k = 0; k < 4; k++) {
                    float *wk = w + c + 16 * k;
                    _mm512_storeu_ps(wk, _mm512_fmadd_ps(cv[k], sv, _mm512_loadu_ps(wk)));
                }
            }
            continue;
        }
#elif D2_AVX2
        if (!force_portable && gs % 32 == 0) {
            dequant_term_avx2(pl, np, cf + t * G, gs, m->cols, m->layout == D2_BLOCKED ? full_block_cols(m->cols) : 0, w);
            continue;
        }
#endif
        (void)force_portable;
        const int full_end = full_block_cols(m->cols);
        for (int c = 0; c < m->cols; c++) {
            int v = 0;
            for (int p = 0; p < np; p++) v = (v << 1) | plane_bit(pl[p], c, m->layout, full_end);
            w[c] = fmaf((float)v, cf[t * G + c / gs], w[c]);
        }
    }
}

/* Rows [r0, r1) of the level's weight into out [r1 - r0, cols]: float32 (bf16 = 0) or bfloat16
   rounded to nearest even (bf16 = 1; scratch then needs cols more floats). Prefill tiles. */
static void dequant_rows(const d2_matrix *m, void *out, int32_t r0, int32_t r1, float *scratch, int32_t bf16,
                         int32_t force_portable);

typedef struct { uint8_t *out; int32_t r0; float *scratch; int32_t bf16, force_portable; } dequant_ctx;

static void dequant_rows_fn(const d2_matrix *m, int32_t r0, int32_t r1, void *ctx, int64_t row_offset) {
    const dequant_ctx *c = (const dequant_ctx *)ctx;
    const int64_t at = (row_offset + r0 - c->r0) * m->cols * (c->bf16 ? 2 : 4);
    dequant_rows(m, c->out + at, r0, r1, c->scratch, c->bf16, c->force_portable);
}

void d2_dequant_rows(const d2_matrix *m, void *out, int32_t r0, int32_t r1, float *scratch, int32_t bf16,
                     int32_t force_portable) {
    if (m->layout == D2_ROWS16) {
        dequant_ctx c = {(uint8_t *)out, r0, scratch, bf16, force_portable};
        rows16_by_rows(m, r0, r1, scratch, dequant_rows_fn, &c);
        return;
    }
    dequant_rows(m, out, r0, r1, scratch, bf16, force_portable);
}

static void dequant_rows(const d2_matrix *m, void *out, int32_t r0, int32_t r1, float *scratch, int32_t bf16,
                         int32_t force_portable) {
    const int G = m->cols / m->group_size;
    float *cf = scratch, *base = scratch + D2_MAX_TERMS * G, *row = base + G;
    for (int o = r0; o < r1; o++) {
        row_coefs(m, o, cf, base);
        if (!bf16) {
            dequant_row(m, o, cf, base, (float *)out + (int64_t)(o - r0) * m->cols, force_portable);
            continue;
        }
        uint16_t *dst = (uint16_t *)out + (int64_t)(o - r0) * m->cols;
#if D2_AVX512 && defined(__AVX512BF16__)
        if (!force_portable && m->nterms == 1 && m->group_size % 64 == 0 && m->layout == D2_ROWS) { /* sliced: one pass */
            const int gs = m->group_size, np = m->term_nplanes[0], rb = m->cols / 8;
            const uint8_t *pl[D2_MAX_PLANES];
            for (int p = 0; p < np; p++) pl[p] = m->planes[m->term_first[0] + p] + (int64_t)o * rb;
            for (int c = 0; c < m->cols; c += 64) {
                __m512 cv[4];
                code_ps(code64(pl, c / 8, np), cv);
                const __m512 sv = _mm512_set1_ps(cf[c / gs]), bv = _mm512_set1_ps(base[c / gs]);
                for (int k = 0; k < 4; k++)
                    _mm256_storeu_si256((__m256i *)(dst + c + 16 * k), (__m256i)_mm512_cvtneps_pbh(_mm512_fmadd_ps(cv[k], sv, bv)));
            }
            continue;
        }
#endif
        dequant_row(m, o, cf, base, row, force_portable);
        int c0 = 0;
#if D2_AVX512 && defined(__AVX512BF16__)
        if (!force_portable) /* same rounding (nearest even) as the loop below, 16 at a time */
            for (; c0 + 16 <= m->cols; c0 += 16)
                _mm256_storeu_si256((__m256i *)(dst + c0), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(row + c0)));
#elif D2_AVX2
        if (!force_portable) /* the loop below's integer rounding, 16 at a time */
            for (; c0 + 16 <= m->cols; c0 += 16) {
                __m256i r[2];
                for (int k = 0; k < 2; k++) {
                    const __m256i u = _mm256_loadu_si256((const __m256i *)(row + c0 + 8 * k));
                    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
                    r[k] = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
                }
                /* packus works per 128-bit lane: restore column order with a qword permute */
                const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r[0], r[1]), 0xd8);
                _mm256_storeu_si256((__m256i *)(dst + c0), packed);
            }
#endif
        for (int c = c0; c < m->cols; c++) { /* round to nearest even */
            uint32_t u;
            memcpy(&u, row + c, 4);
            dst[c] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        }
    }
}

/* ---------------------------------------------------------------- kernel-ready planes */

/* nrows plane rows of row_bytes bytes each, D2_ROWS -> D2_BLOCKED in place (every full 32-byte block
   of a row is permuted within itself; the tail stays). Run once when bytes enter the cache. */
void d2_block_planes(uint8_t *rows, int64_t nrows, int32_t row_bytes) {
    const int nblocks = row_bytes / 32;
    for (int64_t r = 0; r < nrows; r++) {
        uint8_t *row = rows + r * row_bytes;
        for (int b = 0; b < nblocks; b++) {
            uint8_t *blk = row + 32 * b;
#if D2_AVX2
            __m256i out = _mm256_setzero_si256();
            for (int k = 0; k < 8; k++) /* chunk k = bytes 4k..4k+3: their 32 bits become bit k of the 32 bytes */
                out = _mm256_or_si256(out, _mm256_and_si256(plane_mask32(blk + 4 * k), _mm256_set1_epi8((char)(1 << k))));
            _mm256_storeu_si256((__m256i *)blk, out);
#else
            uint8_t out[32] = {0};
            for (int k = 0; k < 8; k++)
                for (int j = 0; j < 32; j++) out[j] |= (uint8_t)(((blk[4 * k + j / 8] >> (j % 8)) & 1) << k);
            memcpy(blk, out, 32);
#endif
        }
    }
}
