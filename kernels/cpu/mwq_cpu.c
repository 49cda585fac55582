/* CPU expert kernels: y = W_b x straight from MWQ bit-planes, never an fp32 copy of a matrix.

   A level-b matrix is read as "terms": each term is a small unsigned code built from consecutive
   bit-planes (MSB first) with a per-(row, group) float16 coefficient. With m_t, bias_t per term:
       w[o, c] = offset[o, g] + sum_t m_t * coef_t[o, g] * (code_t[o, c] + bias_t)
   sliced   : one term, planes [0, b), coef = scale, m = 2^-(b - b1), bias = 0.5
   residual : term 0 = planes [0, b1), coef = scale, m = 1, bias = 0.5;
              term j = plane b1 + j - 1, coef = alpha_j, m = 2, bias = -0.5
   (kernels/reference.py has the same formula in torch: it is the oracle these are tested against.)

   GEMV: y[n, o] = sum_g base[o, g] * sx[n, g] + sum_t sum_g m_t coef_t[o, g] dx[n, g] D_t[n, o, g]
   with base = offset + sum_t m_t coef_t bias_t, sx the sum of x over the group (quantized to 15 bits per
   256 columns, see d2_qx), and
   D_t the integer dot product of the codes with x quantized to int16 per group (step dx). The
   int16 is split in two signed bytes (x = 256 hi + lo) so one u8 x s8 dot-product instruction
   (VNNI) serves both halves: activations keep 15 bits, the result is within ~1e-4 of fp32.
   Cost per weight ~ planes read: level 2 reads and builds half of what level 4 does.

   Two code paths with the same arithmetic: AVX-512 (BW + VL + VNNI; 32-column chunks, plane bits
   used directly as byte masks) and portable C (any group size that is a multiple of 8). Integer
   dot products are exact, so both paths give the same D_t; only float summation order differs.
   Every entry point works on a range of rows so callers can split a matrix over threads; a row
   range writes only its own outputs. */

#include <stdio.h>
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
    /* scheme subblock (quantize/subblock.py): parameters as codes, offset and coef[0] unused (NULL) */
    const uint8_t *pcode;   /* uint8 [rows, G]: scale code (low nibble), offset code (high); else NULL */
    const uint16_t *psuper; /* f16 [rows, S, 2]: (d, dmin) per 256-column super-block */
} d2_matrix;

/* x of n tokens quantized per group: hi/lo int8 halves of the int16 code, step and sum. The group sums are
   quantized too, to int16 (hi/lo halves sh, sl) with one step ds per span of D2_SUM_SPAN columns (subblock's
   super-block), and sx holds their value ds * (256 sh + sl): every path multiplies the same sums, and
   subblock's 16-row kernel takes its base term as integer dot products of the parameter codes with them. */
typedef struct {
    int32_t ntok, cols, group_size;
    int8_t *hi, *lo; /* [ntok, cols] */
    float *dx, *sx;  /* [ntok, G] */
    int8_t *sh, *sl; /* [ntok, G] */
    float *ds;       /* [ntok, ceil(G / sum_groups(group_size))] */
} d2_qx;

#define D2_SUM_SPAN 256
/* Groups per span of one sum step: a super-block's where the group size divides it, else one. */
static inline int sum_groups(int group_size) {
    return group_size <= D2_SUM_SPAN && D2_SUM_SPAN % group_size == 0 ? D2_SUM_SPAN / group_size : 1;
}

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

/* int16 code of v at step 1 / inv as signed high and low bytes (v = 256 h + l), |code| <= 32511 so |h| <= 127. */
static inline void split16(float v, float inv, int8_t *h, int8_t *l) {
    int32_t q = (int32_t)lrintf(v * inv);
    q = q > 32511 ? 32511 : (q < -32511 ? -32511 : q);
    const int32_t low = ((q + 128) & 255) - 128;
    *h = (int8_t)((q - low) >> 8);
    *l = (int8_t)low;
}

void d2_quantize_x(const float *x, int32_t ntok, int32_t cols, int32_t group_size,
                   int8_t *hi, int8_t *lo, float *dx, float *sx, int8_t *sh, int8_t *sl, float *ds) {
    const int G = cols / group_size, span = sum_groups(group_size), S = (G + span - 1) / span;
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
            for (int c = 0; c < group_size; c++) split16(xs[c], inv, h + c, l + c);
        }
        for (int s = 0; s < S; s++) { /* the sums, span by span */
            float *su = sx + (int64_t)n * G;
            const int g0 = s * span, g1 = g0 + span < G ? g0 + span : G;
            float amax = 0.f;
            for (int g = g0; g < g1; g++) amax = fabsf(su[g]) > amax ? fabsf(su[g]) : amax;
            const float d = amax > 0.f ? amax / 32511.f : 0.f, inv = amax > 0.f ? 1.f / d : 0.f;
            ds[(int64_t)n * S + s] = d;
            for (int g = g0; g < g1; g++) {
                int8_t *h = sh + (int64_t)n * G + g, *l = sl + (int64_t)n * G + g;
                split16(su[g], inv, h, l);
                su[g] = d * (float)(256 * (int32_t)*h + *l);
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

#include "mwq_avx512.h"

#include "mwq_rows16.h"

/* ---------------------------------------------------------------- scheme subblock (quantize/subblock.py)

   Each group's (scale, offset) is a code byte against float16 (d, dmin) per 256-column super-block:
       scale = d * (code & 15),  offset = -dmin * (code >> 4)
   d and dmin have at most 7 significant bits, so both products are exact (in float16 too). Under D2_ROWS16
   the codes are interleaved per 16-row block as [G][16] bytes and the super-block parameters as [S * 2][16]
   (d2_interleave_params): whole blocks compute parameters from the codes in registers (rows16_gemv_block),
   other rows get them expanded when their block is unpacked (rows16_unpack, rows16_by_rows). In the row
   layouts, 16-row views get theirs expanded into float16 scratch (subblock_view). */

/* Floats of scratch the row-wise paths use (subblock's expanded parameters go after them). */
static int64_t row_scratch_floats(const d2_matrix *m) {
    const int64_t G = m->cols / m->group_size, tokens = (int64_t)D2_MAX_TOKENS * G;
    return (D2_MAX_TERMS + 1) * G + (tokens > m->cols ? tokens : m->cols);
}

/* Rows [r0, r0 + n) (file layout codes) -> scale, offset float16 [n, G]. */
static void subblock_expand_rows(const d2_matrix *m, int32_t r0, int32_t n, uint16_t *sc, uint16_t *of) {
    const int G = m->cols / m->group_size, gps = 256 / m->group_size, S = (G + gps - 1) / gps;
    for (int i = 0; i < n; i++) {
        const uint8_t *pc = m->pcode + (int64_t)(r0 + i) * G;
        const uint16_t *ps = m->psuper + (int64_t)(r0 + i) * S * 2;
        for (int s = 0; s < S; s++) {
            const float d = f16_to_f32(ps[2 * s]), dmin = f16_to_f32(ps[2 * s + 1]);
            const int g1 = (s + 1) * gps < G ? (s + 1) * gps : G;
            for (int g = subblock_params8(d, dmin, pc, s * gps, g1, sc + (int64_t)i * G, of + (int64_t)i * G); g < g1; g++)
                subblock_params(d, dmin, pc[g], sc + (int64_t)i * G + g, of + (int64_t)i * G + g);
        }
    }
}

/* Rows [r0, r0 + 16) of m (fewer at the end) in a row layout (D2_ROWS, D2_BLOCKED) as a matrix with float16
   parameters in sc, of. */
static d2_matrix subblock_view(const d2_matrix *m, int32_t r0, uint16_t *sc, uint16_t *of) {
    d2_matrix v = *m;
    const int64_t rb = m->cols / 8;
    v.rows = m->rows - r0 < 16 ? m->rows - r0 : 16;
    for (int p = 0; p < D2_MAX_PLANES; p++)
        if (m->planes[p]) v.planes[p] = m->planes[p] + (int64_t)r0 * rb;
    v.offset = of;
    v.coef[0] = sc;
    v.pcode = NULL;
    v.psuper = NULL;
    subblock_expand_rows(m, r0, v.rows, sc, of);
    return v;
}

/* ---------------------------------------------------------------- entry points */

/* Scratch floats a row range needs: coefficients of every term and the base, per group. */
/* Scratch floats any entry point needs for this matrix (the one owner of the layout): per-row term
   coefficients and base (D2_MAX_TERMS + 1 per group), then either per-token group factors (gemv) or
   one float32 row (bf16 tiles). */
int64_t d2_scratch_floats(const d2_matrix *m) {
    const int64_t G = m->cols / m->group_size;
    return row_scratch_floats(m) + (m->pcode ? 16 * G : 0); /* subblock: two float16 [16, G] parameter arrays */
}

/* The layout this build's vector kernels read fastest, made by d2_interleave_planes/_params (2) or
   d2_block_planes (1) when bytes enter the cache; 0: the file's. */
int d2_ready_layout(void) { return D2_AVX512 ? D2_ROWS16 : (D2_AVX2 ? D2_BLOCKED : D2_ROWS); }

/* Rows [r0, r1) of a D2_ROWS16 matrix through a row-wise entry point: each touched block copied back
   to the file's layout (the tail rows past the last full block already are), then fn on its rows. */
typedef void (*rows_fn)(const d2_matrix *, int32_t r0, int32_t r1, void *ctx, int64_t row_offset);
static void rows16_by_rows(const d2_matrix *m, int32_t r0, int32_t r1, rows_fn fn, void *ctx) {
    const int32_t full = m->rows & ~15;
    /* the unpacked block (or subblock's tail parameters): allocated only here (whole-block GEMV ranges, the hot
       path, never need it) */
    const int need = r0 < r1 && (r0 < full || (m->pcode && r1 > full));
    uint8_t *buf = need ? (uint8_t *)malloc((size_t)rows16_unpack_bytes(m)) : NULL;
    if (need && !buf) rows16_out_of_memory(); /* a quarter MiB */
    for (int32_t o = r0; o < r1 && o < full;) {
        const int32_t b = o / 16, e = 16 * b + 16 < r1 ? 16 * b + 16 : r1;
        const d2_matrix blk = rows16_unpack(m, b, buf);
        fn(&blk, o - 16 * b, e - 16 * b, ctx, 16 * (int64_t)b);
        o = e;
    }
    if (r1 > full) { /* the rows past the last full block keep the file's layout */
        d2_matrix tail = *m;
        tail.layout = D2_ROWS;
        int32_t from = r0 > full ? r0 : full, row0 = 0;
        if (m->pcode) { /* subblock: a view of the tail rows, parameters expanded into buf */
            uint16_t *sc = (uint16_t *)buf, *of = sc + 16 * (m->cols / m->group_size);
            tail = subblock_view(&tail, full, sc, of);
            from -= full;
            row0 = full;
        }
        fn(&tail, from, r1 - row0, ctx, row0);
    }
    free(buf);
}

/* Rows [r0, r1) of a subblock matrix in a row layout through a row-wise entry point: 16-row views with their
   parameters expanded into the end of `scratch` (past what the row-wise paths use), then fn on their rows. */
static void subblock_by_rows(const d2_matrix *m, int32_t r0, int32_t r1, rows_fn fn, void *ctx, float *scratch) {
    uint16_t *sc = (uint16_t *)(scratch + row_scratch_floats(m)), *of = sc + 16 * (m->cols / m->group_size);
    for (int32_t o = r0; o < r1;) {
        const int32_t v0 = o & ~15, e = v0 + 16 < r1 ? v0 + 16 : r1;
        const d2_matrix v = subblock_view(m, v0, sc, of);
        fn(&v, o - v0, e - v0, ctx, v0);
        o = e;
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
    if (m->pcode && m->layout != D2_ROWS16) { /* subblock in a row layout */
        gemv_ctx c = {q, y, ystride, scratch, force_portable};
        subblock_by_rows(m, r0, r1, gemv_rows_fn, &c, scratch);
        return;
    }
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
            rows16_by_rows(m, r0, 16 * first, gemv_rows_fn, &c);
            rows16_by_rows(m, 16 * last, r1, gemv_rows_fn, &c);
            return;
        }
    }
#endif
    gemv_ctx c = {q, y, ystride, scratch, force_portable};
    rows16_by_rows(m, r0, r1, gemv_rows_fn, &c);
}

static void gemv_rows(const d2_matrix *m, const d2_qx *q, float *y, int64_t ystride, int32_t r0, int32_t r1,
                      float *scratch, int32_t force_portable) {
#if D2_AVX512
    const int vector = !force_portable && m->group_size % 32 == 0 && m->layout == D2_ROWS;
#elif D2_AVX2
    const int vector = !force_portable && avx2_groups(m);
#else
    const int vector = 0;
    (void)force_portable;
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
        if (!force_portable && gs % 16 == 0 && m->cols % 64 == 0 && m->layout == D2_ROWS) {
            for (int c = 0; c < m->cols; c += 64) { /* 64 columns: one group, or 2-4 groups of 16-32 */
                __m512 cv[4];
                code_ps(code64(pl, c / 8, np), cv);
                for (int k = 0; k < 4; k++) {
                    float *wk = w + c + 16 * k;
                    const __m512 sv = _mm512_set1_ps(cf[t * G + (c + 16 * k) / gs]);
                    _mm512_storeu_ps(wk, _mm512_fmadd_ps(cv[k], sv, _mm512_loadu_ps(wk)));
                }
            }
            continue;
        }
#elif D2_AVX2
        if (!force_portable && avx2_groups(m)) {
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
    if (m->pcode && m->layout != D2_ROWS16) { /* subblock in a row layout */
        dequant_ctx c = {(uint8_t *)out, r0, scratch, bf16, force_portable};
        subblock_by_rows(m, r0, r1, dequant_rows_fn, &c, scratch);
        return;
    }
    if (m->layout == D2_ROWS16) {
        dequant_ctx c = {(uint8_t *)out, r0, scratch, bf16, force_portable};
        rows16_by_rows(m, r0, r1, dequant_rows_fn, &c);
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

/* ---------------------------------------------------------------- one decode expert in one call

   y [ntok, H] = down(silu(gate x) * (up x)) for x [ntok, H]: the activations quantized, three GEMVs (rows
   split on the pool when chunks > 1) and the SwiGLU between them, without returning to Python. A small
   expert's six kernel calls and ~15 tensor allocations cost more than its arithmetic from Python
   (kernels/dispatch.py keeps that composed form as the fallback; the numbers are the same up to the
   float rounding of silu). Buffers are one arena per calling thread, grown to the largest call. */

void d2_pool_gemv(const void *m, const void *q, float *y, int64_t ystride, int32_t rows, int64_t scratch_floats,
                  int32_t force_portable, int32_t threads, int32_t nchunks);

static int64_t align64(int64_t n) { return (n + 63) & ~(int64_t)63; }

/* The calling thread's arena, grown to `bytes` (+ 64 for alignment, which the sizes below include) and
   kept: a 64-byte aligned start, or NULL when it cannot be allocated. */
static unsigned char *thread_arena(int64_t bytes) {
    static __thread unsigned char *arena;
    static __thread int64_t arena_cap;
    if (bytes > arena_cap) {
        free(arena);
        arena = (unsigned char *)malloc((size_t)bytes);
        arena_cap = arena ? bytes : 0;
        if (!arena) return NULL;
    }
    return (unsigned char *)(((uintptr_t)arena + 63) & ~(uintptr_t)63);
}

/* Arena bytes for x [ntok, cols] quantized per group: the int8 half (or halves), (dx, sx) and the sums' halves
   per group, their steps per span. */
static int64_t qx_bytes(int32_t ntok, int32_t cols, int32_t group_size, int halves) {
    const int64_t G = cols / group_size, S = (G + sum_groups(group_size) - 1) / sum_groups(group_size);
    return align64((int64_t)halves * ntok * cols) + align64(8 * (int64_t)ntok * G) + align64(2 * (int64_t)ntok * G) +
           align64(4 * (int64_t)ntok * S);
}

/* x quantized into the arena at *p (which advances past it), as d2_quantize_x lays it out. */
static d2_qx quantize_into(unsigned char **p, const float *x, int32_t ntok, int32_t cols, int32_t group_size,
                           int halves) {
    const int64_t G = cols / group_size;
    int8_t *hi = (int8_t *)*p;
    float *dx = (float *)(*p + align64((int64_t)halves * ntok * cols));
    int8_t *sh = (int8_t *)((unsigned char *)dx + align64(8 * (int64_t)ntok * G));
    float *ds = (float *)((unsigned char *)sh + align64(2 * (int64_t)ntok * G));
    d2_qx q = {ntok, cols, group_size, hi, halves == 2 ? hi + (int64_t)ntok * cols : NULL, dx, dx + ntok * G,
               sh, sh + ntok * G, ds};
    *p += qx_bytes(ntok, cols, group_size, halves);
    d2_quantize_x(x, ntok, cols, group_size, q.hi, q.lo, q.dx, q.sx, q.sh, q.sl, q.ds);
    return q;
}

/* A whole matrix's GEMV, its rows split on the pool when nchunks > 1. */
static void gemv_split(const d2_matrix *m, const d2_qx *q, float *y, float *scratch, int64_t scratch_floats,
                       int32_t threads, int32_t nchunks, int32_t force_portable) {
    if (nchunks > 1 && threads > 1)
        d2_pool_gemv(m, q, y, m->rows, m->rows, scratch_floats, force_portable, threads, nchunks);
    else
        d2_gemv_rows(m, q, y, m->rows, 0, m->rows, scratch, force_portable);
}

/* Returns the workspace bytes used (>= 0), or -1 when the shapes do not chain (gate/up [I, H], down [H, I],
   one group size for gate and up) or the arena cannot be allocated. */
static int64_t expert_silu(const d2_matrix *gate, const d2_matrix *up, const d2_matrix *down, const float *x,
                           int32_t ntok, int32_t act_bits, float *y, int64_t scratch_floats, int32_t threads,
                           int32_t chunks_in, int32_t chunks_down, int32_t force_portable) {
    const int32_t H = gate->cols, I = gate->rows;
    if (up->rows != I || up->cols != H || down->rows != H || down->cols != I || up->group_size != gate->group_size ||
        ntok <= 0 || (act_bits != 8 && act_bits != 16))
        return -1;
    const int halves = act_bits == 16 ? 2 : 1;
    const int64_t gu = align64(4 * (int64_t)ntok * I); /* the gate and up outputs, each */
    const int64_t bytes = qx_bytes(ntok, H, gate->group_size, halves) + 2 * gu +
                          qx_bytes(ntok, I, down->group_size, halves) + align64(4 * scratch_floats) + 64;
    unsigned char *p = thread_arena(bytes);
    if (!p) return -1;
    float *g = (float *)p, *u = (float *)(p + gu), *scratch = (float *)(p + 2 * gu);
    p += 2 * gu + align64(4 * scratch_floats); /* then the two quantized inputs */
    const d2_qx qx = quantize_into(&p, x, ntok, H, gate->group_size, halves);
    gemv_split(gate, &qx, g, scratch, scratch_floats, threads, chunks_in, force_portable);
    gemv_split(up, &qx, u, scratch, scratch_floats, threads, chunks_in, force_portable);
    for (int64_t i = 0; i < (int64_t)ntok * I; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    const d2_qx qh = quantize_into(&p, g, ntok, I, down->group_size, halves);
    gemv_split(down, &qh, y, scratch, scratch_floats, threads, chunks_down, force_portable);
    return bytes;
}

/* A step's experts in one call: items[i] = (gate, up, down, x, y, ntok, act_bits) as expert_silu. Experts
   too small to split by rows (chunks_in = chunks_down = 1 for every item) run whole, one per pool thread;
   otherwise one after another, each split by rows. Returns the workspace bytes held at once (one arena
   per thread running), or -1 when an item's shapes do not chain. */
typedef struct {
    const d2_matrix *gate, *up, *down;
    const float *x;
    float *y;
    int32_t ntok, act_bits, chunks_in, chunks_down;
    int64_t used; /* out: the item's workspace bytes, -1 on error */
} d2_expert_item;

typedef struct {
    d2_expert_item *items;
    int64_t scratch_floats;
    int32_t force_portable;
} d2_items_ctx;

void d2_pool_items(void (*item)(void *ctx, int32_t i), void *ctx, int32_t n, int32_t threads);

static void run_expert_item(void *ctx, int32_t i) {
    const d2_items_ctx *c = (const d2_items_ctx *)ctx;
    d2_expert_item *it = c->items + i;
    it->used = expert_silu(it->gate, it->up, it->down, it->x, it->ntok, it->act_bits, it->y, c->scratch_floats,
                           1, 1, 1, c->force_portable);
}

int64_t d2_experts_silu(d2_expert_item *items, int32_t n, int64_t scratch_floats, int32_t threads,
                        int32_t force_portable) {
    int split_rows = 0;
    for (int32_t i = 0; i < n; i++) split_rows |= items[i].chunks_in > 1 || items[i].chunks_down > 1;
    int64_t most = 0;
    if (split_rows || threads <= 1) {
        for (int32_t i = 0; i < n; i++) {
            d2_expert_item *it = items + i;
            it->used = expert_silu(it->gate, it->up, it->down, it->x, it->ntok, it->act_bits, it->y, scratch_floats,
                                   threads, it->chunks_in, it->chunks_down, force_portable);
        }
    } else {
        d2_items_ctx ctx = {items, scratch_floats, force_portable};
        d2_pool_items(run_expert_item, &ctx, n, threads);
    }
    for (int32_t i = 0; i < n; i++) {
        if (items[i].used < 0) return -1;
        most = items[i].used > most ? items[i].used : most;
    }
    return most * (split_rows || threads <= 1 ? 1 : (n < threads ? n : threads));
}

/* y [ntok, rows] = x W^T for one matrix (a dense layer in the experts' format, run --dense-weights int4): x
   quantized into the thread's arena and the GEMV, in one call. Returns the workspace bytes, -1 on failure. */
int64_t d2_linear(const d2_matrix *m, const float *x, int32_t ntok, int32_t act_bits, float *y,
                  int64_t scratch_floats, int32_t threads, int32_t nchunks, int32_t force_portable) {
    if (ntok <= 0 || (act_bits != 8 && act_bits != 16)) return -1;
    const int halves = act_bits == 16 ? 2 : 1;
    const int64_t bytes = qx_bytes(ntok, m->cols, m->group_size, halves) + align64(4 * scratch_floats) + 64;
    unsigned char *p = thread_arena(bytes);
    if (!p) return -1;
    const d2_qx q = quantize_into(&p, x, ntok, m->cols, m->group_size, halves);
    gemv_split(m, &q, y, (float *)p, scratch_floats, threads, nchunks, force_portable);
    return bytes;
}
