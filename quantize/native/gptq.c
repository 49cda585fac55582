/* Nested GPTQ codes of a row range: the same algorithm as d2moe/quantize/gptq.py's _rows_codes (whose torch
 * version stays the fallback and the readable specification), without its per-column Python loop.
 *
 * Per diagonal block of H and per level, lowest first: the columns are chosen one by one, each error divided by
 * U's diagonal and fed to the columns after it through U's row (U^T U = H^-1), in GPTQ's lazy batches: to the
 * batch's own columns one by one, to the rest of the block once per batch. Level b1 chooses among the cells within
 * `window` cells of the weight, each level above among the children of the level below's cell.
 *
 * Rows go TILE at a time, held column-major (a column of the tile is one vector), so every step is a vector
 * operation over the tile's rows and each element of U, read once, updates them all.
 * The same sums as the torch version in another order (its batch update is a matrix product), so a code at a
 * rounding boundary may differ. Every feedback step x -= e * u is one fused multiply-add (rounded once): the
 * vector FMA where the target has it, fmaf lane by lane where not, so results do not depend on the machine,
 * its vector width or the thread count (the rest is built with -ffp-contract=off and no fast-math).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 16 /* rows per tile: one AVX-512 vector, two AVX2 ones */
#define LAZY 32 /* columns fed to each other one by one before the rest of the block gets their errors at once */

void d2q_load_group(const void *src, int dtype, int64_t idx, int n, float *x); /* mwq_fit.c: float32/bf16/f16 */

typedef float vt __attribute__((vector_size(4 * TILE)));
typedef int32_t vm __attribute__((vector_size(4 * TILE)));

static inline vt splat(float v) { return (vt){0} + v; }
static inline vt pick(vm mask, vt a, vt b) { return (vt)(((vm)a & mask) | ((vm)b & ~mask)); } /* mask ? a : b */
static inline vt vmax(vt a, vt b) { return pick(a > b, a, b); }
static inline vt vmin(vt a, vt b) { return pick(a < b, a, b); }
static inline vt vfloor(vt a) {
    vt r;
    for (int i = 0; i < TILE; i++) r[i] = floorf(a[i]);
    return r;
}

/* Every feedback step a - e * u is rounded once: where the target has a vector FMA (vfnmadd, fmls) the functions
 * below are compiled with contraction, which makes it that instruction; elsewhere libm's fmaf, lane by lane. */
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
#define VECTOR_FMA 1
#else
#define VECTOR_FMA 0
#endif
#if VECTOR_FMA
#define UNROLL 8 /* columns updated per pass over the batch: 8 independent FMA chains cover the FMA's latency */
#define FNMA(a, e, u) ((a) - (e) * (u))
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
#else
#define UNROLL 4
#define FNMA(a, e, u) fnma_lanes(a, e, u)
static inline vt fnma_lanes(vt a, vt e, float u) {
    vt r;
    for (int i = 0; i < TILE; i++) r[i] = fmaf(-e[i], u, a[i]);
    return r;
}
#endif

/* x[k] -= sum over the batch's columns i of e[i] * U[s0 + i][k] for the columns k past the batch, UNROLL columns at
 * a time, each column's sum in the batch's order. Each U element is read once per tile, broadcast to its rows. */
static void feed_rest(vt *x, const float *ub, int block, int s0, int s1, const vt *e) {
    int k = s1;
    for (; k + UNROLL <= block; k += UNROLL) {
        const float *u = ub + (int64_t)k * block + s0;
        vt a[UNROLL];
        for (int m = 0; m < UNROLL; m++) a[m] = x[k + m];
        for (int i = 0; i < s1 - s0; i++)
            for (int m = 0; m < UNROLL; m++) a[m] = FNMA(a[m], e[i], u[(int64_t)m * block + i]);
        for (int m = 0; m < UNROLL; m++) x[k + m] = a[m];
    }
    for (; k < block; k++) {
        const float *uk = ub + (int64_t)k * block + s0;
        vt a = x[k];
        for (int i = 0; i < s1 - s0; i++) a = FNMA(a, e[i], uk[i]);
        x[k] = a;
    }
}

/* column j's error ej fed to the batch's columns after it, j + 1 .. s1 - 1 */
static void feed_batch(vt *x, const float *ub, int block, int j, int s1, vt ej) {
    for (int k = j + 1; k < s1; k++) x[k] = FNMA(x[k], ej, ub[(int64_t)k * block + j]);
}
#if VECTOR_FMA
#pragma GCC pop_options
#endif

/* codes [rows, cols] (row-major, uint8) of rows r0..r1 of w [rows, cols], contiguous, of dtype 0 float32, 1 bfloat16
 * or 2 float16 (mwq_fit.c's codes; read as float32, exactly, so the codes do not depend on it).
 * ut: float32 [cols / block, block, block], each block of U transposed (ut[k][j] = U[j][k]); cell1, off: float32
 * [rows, cols / group], level b1's cell width and cell 0's lower edge; bits: the nbits levels, ascending.
 * Returns 0, or -4 when out of memory. */
int d2q_gptq_rows(const void *w, int dtype, int cols, const float *ut, int block, const float *cell1, const float *off,
                  int group, int nbits, const int *bits, float window, uint8_t *codes, int r0, int r1) {
    const int groups = cols / group;
    vt *x = aligned_alloc(64, sizeof(vt) * block), *w0 = aligned_alloc(64, sizeof(vt) * block);
    vt *prev = aligned_alloc(64, sizeof(vt) * block), *cur = aligned_alloc(64, sizeof(vt) * block);
    float *row = malloc(sizeof(float) * block);
    if (!x || !w0 || !prev || !cur || !row) {
        free(x), free(w0), free(prev), free(cur), free(row);
        return -4;
    }
    for (int t0 = r0; t0 < r1; t0 += TILE) {
        const int nt = r1 - t0 < TILE ? r1 - t0 : TILE; /* rows past nt repeat the last: computed, never written */
        for (int c0 = 0; c0 < cols; c0 += block) {
            const float *ub = ut + (int64_t)(c0 / block) * block * block;
            for (int r = 0; r < TILE; r++) {
                d2q_load_group(w, dtype, (int64_t)(t0 + (r < nt ? r : nt - 1)) * cols + c0, block, row);
                for (int j = 0; j < block; j++) w0[j][r] = row[j];
            }
            for (int li = 0; li < nbits; li++) {
                const int b = bits[li];
                const vt top = splat((float)((1 << b) - 1)), zero = splat(0.0f), half = splat(0.5f);
                const vt kids = splat(li ? (float)(1 << (b - bits[li - 1])) : 0.0f);
                const float shrink = ldexpf(1.0f, bits[0] - b);
                vt cell = zero, inv = zero, o = zero, e[LAZY];
                memcpy(x, w0, sizeof(vt) * block);
                for (int j = 0; j < block; j++) {
                    const int col = c0 + j, s0 = j - j % LAZY, s1 = s0 + LAZY < block ? s0 + LAZY : block;
                    if (j == 0 || col % group == 0) { /* the tile rows' grids for this group */
                        for (int r = 0; r < TILE; r++) {
                            const int64_t gi = (int64_t)(t0 + (r < nt ? r : nt - 1)) * groups + col / group;
                            cell[r] = cell1[gi] * shrink, o[r] = off[gi];
                        }
                        inv = pick(cell > 0, 1.0f / cell, zero);
                    }
                    vt lo, hi;
                    if (li == 0) { /* cells within `window` cells of the weight itself */
                        lo = vmin(vmax(vfloor((w0[j] - window * cell - o) * inv), zero), top);
                        hi = vmin(vmax(vfloor((w0[j] + window * cell - o) * inv), zero), top);
                    } else { /* the children of the level below's cell */
                        lo = prev[j] * kids;
                        hi = lo + (kids - 1.0f);
                    }
                    const vt q = vmin(vmax(vfloor((x[j] - o) * inv), lo), hi);
                    cur[j] = q;
                    const vt ej = e[j - s0] = (x[j] - (o + cell * (q + half))) / ub[(int64_t)j * block + j];
                    feed_batch(x, ub, block, j, s1, ej);
                    if (j == s1 - 1) feed_rest(x, ub, block, s0, s1, e);
                }
                vt *swap = prev;
                prev = cur, cur = swap;
            }
            for (int r = 0; r < nt; r++)
                for (int j = 0; j < block; j++) codes[(int64_t)(t0 + r) * cols + c0 + j] = (uint8_t)prev[j][r];
        }
    }
    free(x), free(w0), free(prev), free(cur), free(row);
    return 0;
}
