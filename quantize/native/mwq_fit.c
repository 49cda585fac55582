/* The MWQ "sliced" fit of a row range, the same algorithm as d2moe/quantize/grid.py's search_grid
 * (whose torch version stays the fallback and the readable specification), plus an optional refit.
 *
 * Per group of S consecutive columns: clip-search one bk-bit grid (scale, offset) minimising the mean
 * over the readable levels of log(weighted squared error); level b reads the top b bits of a code and
 * reconstructs at the centre of its cell. Refit (K-quant style, kept nested): given the codes, the
 * grid (offset, scale) that minimises the level-weighted least squares over all levels at once is a
 * 2x2 solve (every level is linear in offset and scale); it is kept only where it lowers the
 * objective. Column weights (calibration: mean squared activation per input column) weight the error.
 *
 * Output: bit-planes [bk, rows, cols/8] MSB first (bit c%8 of byte c/8 = column c), float16 scale and
 * offset [rows, G], and per level the unweighted squared error and the signal (for SQNR).
 * Built with -ffp-contract=off and no fast-math: results do not depend on the machine's FMA.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_S 1024
#define MAX_LEVELS 8
#define LANES 16

enum { D2_F32 = 0, D2_BF16 = 1, D2_F16 = 2 };

static const float COARSE[13] = {1.24f, 1.16f, 1.08f, 1.0f, 0.94f, 0.88f, 0.82f, 0.76f, 0.7f, 0.64f, 0.58f, 0.52f, 0.46f};
static const float FINE[4] = {-0.03f, 0.03f, -0.015f, 0.015f};

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float round_f16(float x) { return (float)(_Float16)x; }

static inline uint16_t f16_bits(float x) {
    _Float16 h = (_Float16)x;
    uint16_t u;
    memcpy(&u, &h, 2);
    return u;
}

/* x[0..n) = src[idx..idx+n) of a float32 / bfloat16 / float16 matrix, as float32 (exactly); gptq.c reads its rows
 * through it too */
void d2q_load_group(const void *src, int dtype, int64_t idx, int n, float *x) {
    if (dtype == D2_F32) {
        memcpy(x, (const float *)src + idx, (size_t)n * 4);
    } else if (dtype == D2_BF16) {
        const uint16_t *p = (const uint16_t *)src + idx;
        for (int j = 0; j < n; j++) x[j] = bf16_to_f32(p[j]);
    } else {
        const _Float16 *p = (const _Float16 *)src + idx;
        for (int j = 0; j < n; j++) x[j] = (float)p[j];
    }
}

/* sum over j of w[j] * v[j]^2 in LANES partial sums (an explicit order the compiler may vectorise) */
typedef struct {
    int n, bk, nlev;
    const int *levels;
    const float *x, *w; /* w may be NULL: unit weights */
} Group;

/* Sums run in LANES partial sums (a fixed order, so every machine gets the same bits), held as
   LANES / VW vectors of the target's native width VW: 16-float GCC vectors lowered onto 8-float
   AVX2 registers ran 5x slower than two 8-float ones. */
#if defined(__AVX512F__)
#define VW 16
#else
#define VW 8
#endif
#define NV (LANES / VW)
typedef float vf __attribute__((vector_size(4 * VW)));
typedef int32_t vi __attribute__((vector_size(4 * VW)));

static inline __attribute__((always_inline)) vf splat(float v) { return (vf){0} + v; }

/* floor(t) clamped to [0, top], exact for |t| < 2^31 (t is a position in cells: bounded by the grid). */
static inline __attribute__((always_inline)) vf cell_index(vf t, vf top) {
    vf q = __builtin_convertvector(__builtin_convertvector(t, vi), vf); /* trunc */
    q += __builtin_convertvector(t < q, vf);                             /* mask -1 where t < trunc(t) */
    q = (vf)((vi)q & (q > 0));
    vi over = q > top;
    return (vf)(((vi)q & ~over) | ((vi)top & over));
}

/* t[0..n) (n a power of two) added as a fixed pairwise tree over the index (t[l + half] onto t[l], halving): the
 * same bits whatever the vector width, and a short dependency chain where a sequential sum of the 16 lanes took
 * ~15% of the subblock fit in a profile. Overwrites t. */
static inline __attribute__((always_inline)) double pairwise_sum(double *t, int n) {
    for (int half = n / 2; half > 0; half /= 2)
        for (int l = 0; l < half; l++) t[l] += t[l + half];
    return t[0];
}

/* The LANES partial sums of a vf[NV], in double. */
static inline __attribute__((always_inline)) double lane_sum(const vf *acc) {
    double t[LANES];
    for (int h = 0; h < NV; h++)
        for (int k = 0; k < VW; k++) t[h * VW + k] = acc[h][k];
    return pairwise_sum(t, LANES);
}

/* Weighted squared error per level of a grid (offset of cell 0's lower edge, step of the bk-bit cell):
 * one pass over the group for all levels, one vector of partial sums per level. */
static void level_errors(const Group *g, float offset, float step, double *err) {
    float inv = step > 0 ? 1.0f / step : 0.0f;
    vf acc[MAX_LEVELS][NV], shrink[MAX_LEVELS], top[MAX_LEVELS];
    for (int li = 0; li < g->nlev; li++) {
        shrink[li] = splat(ldexpf(1.0f, -(g->bk - g->levels[li])));
        top[li] = splat((float)((1 << g->levels[li]) - 1));
        for (int h = 0; h < NV; h++) acc[li][h] = splat(0);
    }
    for (int j0 = 0; j0 < g->n; j0 += LANES) {
        for (int h = 0; h < NV; h++) {
            const int jh = j0 + h * VW; /* lanes h*VW .. h*VW+VW-1 of the LANES partial sums */
            vf x, w;
            if (jh + VW <= g->n) {
                memcpy(&x, g->x + jh, sizeof x);
                if (g->w) memcpy(&w, g->w + jh, sizeof w); else w = splat(1.0f);
            } else { /* tail: padded lanes get weight 0 */
                for (int k = 0; k < VW; k++) {
                    int in = jh + k < g->n;
                    x[k] = in ? g->x[jh + k] : g->x[0];
                    w[k] = in ? (g->w ? g->w[jh + k] : 1.0f) : 0.0f;
                }
            }
            vf u = (x - offset) * inv;
            for (int li = 0; li < g->nlev; li++) {
                vf t = u * shrink[li];
                vf e = t - cell_index(t, top[li]) - 0.5f;
                acc[li][h] += w * (e * e);
            }
        }
    }
    for (int li = 0; li < g->nlev; li++) {
        double cell = (double)step / shrink[li][0];
        err[li] = lane_sum(acc[li]) * cell * cell;
    }
}

/* The mean over n levels of log(error + floor_), or for one level its argument: log is monotone, so the same order
 * without a log per candidate (~12% of the subblock fit in a profile). The search's and the refits' objective. */
static double mean_log(const double *err, int n, double floor_) {
    if (n == 1) return err[0] + floor_;
    double s = 0;
    for (int i = 0; i < n; i++) s += log(err[i] + floor_);
    return s / n;
}

static double objective(const Group *g, float offset, float step) {
    double err[MAX_LEVELS];
    level_errors(g, offset, step, err);
    return mean_log(err, g->nlev, 1.1754943508222875e-38);
}

/* The clip search of grid.py: scale [min, max] about its midpoint (0.46-1.24), a coarse sweep, then steps around
 * the best (the centre moves to the best after each +delta, as grid.py does). */
static void search(const Group *g, float *offset_out, float *step_out) {
    float mn = g->x[0], mx = g->x[0];
    for (int j = 1; j < g->n; j++) {
        mn = g->x[j] < mn ? g->x[j] : mn;
        mx = g->x[j] > mx ? g->x[j] : mx;
    }
    float mid = (mx + mn) * 0.5f, half = (mx - mn) * 0.5f, ncodes = (float)((1 << g->bk) - 1);
    double best = INFINITY;
    float best_shrink = 1.0f;
#define TRY(SHRINK)                                                   \
    do {                                                              \
        float sh_ = (SHRINK);                                         \
        float st_ = (2.0f * half * sh_) / ncodes;                     \
        double o_ = objective(g, mid - half * sh_ - st_ * 0.5f, st_); \
        if (o_ < best) {                                              \
            best = o_;                                                \
            best_shrink = sh_;                                        \
        }                                                             \
    } while (0)
    for (int c = 0; c < 13; c++) TRY(COARSE[c]);
    float centre = best_shrink;
    for (int c = 0; c < 4; c++) {
        float sh = centre + FINE[c];
        TRY(sh < 0.3f ? 0.3f : (sh > 1.3f ? 1.3f : sh));
        if (FINE[c] > 0) centre = best_shrink;
    }
#undef TRY
    float step = (2.0f * half * best_shrink) / ncodes;
    *offset_out = mid - half * best_shrink - step * 0.5f;
    *step_out = step;
}

/* bk-bit codes on the stored float16 grid (grid.py's grid_codes). */
static void grid_codes(const Group *g, float scale16, float offset16, int b1, uint8_t *q) {
    float step = scale16 * ldexpf(1.0f, -(g->bk - b1));
    float inv = step > 0 ? 1.0f / step : 0.0f, top = (float)((1 << g->bk) - 1);
    for (int j = 0; j < g->n; j++) {
        float u = floorf((g->x[j] - offset16) * inv);
        q[j] = (uint8_t)(u < 0 ? 0 : (u > top ? top : u));
    }
}

/* Squared error per level on a stored float16 grid (its codes are grid_codes' by construction). */
static void stored_errors(const Group *g, float scale16, float offset16, int b1, int weighted, double *err) {
    Group u = *g;
    if (!weighted) u.w = NULL;
    level_errors(&u, offset16, scale16 * ldexpf(1.0f, -(g->bk - b1)), err);
}

/* One refit: the (offset, scale) minimising sum_b lambda_b sum_j w_j (x_j - offset - scale c_bj)^2 over
 * the current codes, lambda_b = 1 / error_b (a Gauss-Newton step on the mean-log objective). */
static int refit(const Group *g, const uint8_t *q, const double *err, int b1, double floor_, float *scale16,
                 float *offset16) {
    double a00 = 0, a01 = 0, a11 = 0, r0 = 0, r1 = 0;
    for (int li = 0; li < g->nlev; li++) { /* per-level sums in float vectors, combined in double */
        int b = g->levels[li];
        float unit = ldexpf(1.0f, -(b - b1));
        vf s0[NV], s1[NV], s2[NV], t0[NV], t1[NV];
        for (int h = 0; h < NV; h++) s0[h] = s1[h] = s2[h] = t0[h] = t1[h] = splat(0);
        for (int j0 = 0; j0 < g->n; j0 += LANES) {
            for (int h = 0; h < NV; h++) {
                vf x, w, c;
                for (int k = 0; k < VW; k++) {
                    int jk = j0 + h * VW + k, in = jk < g->n, j = in ? jk : 0;
                    x[k] = g->x[j];
                    w[k] = in ? (g->w ? g->w[j] : 1.0f) : 0.0f;
                    c[k] = unit * ((float)(q[j] >> (g->bk - b)) + 0.5f);
                }
                vf wc = w * c;
                s0[h] += w;
                s1[h] += wc;
                s2[h] += wc * c;
                t0[h] += w * x;
                t1[h] += wc * x;
            }
        }
        double lam = 1.0 / (err[li] + floor_), v[5] = {0, 0, 0, 0, 0};
        for (int h = 0; h < NV; h++)
            for (int k = 0; k < VW; k++) {
                v[0] += s0[h][k];
                v[1] += s1[h][k];
                v[2] += s2[h][k];
                v[3] += t0[h][k];
                v[4] += t1[h][k];
            }
        a00 += lam * v[0];
        a01 += lam * v[1];
        a11 += lam * v[2];
        r0 += lam * v[3];
        r1 += lam * v[4];
    }
    double det = a00 * a11 - a01 * a01;
    if (!(det > 1e-30 * a00 * a11)) return 0;
    double off = (a11 * r0 - a01 * r1) / det, sc = (a00 * r1 - a01 * r0) / det;
    if (!(sc > 0) || !isfinite(off) || !isfinite(sc)) return 0;
    float s16 = round_f16((float)sc), o16 = round_f16((float)off);
    if (!(s16 > 0) || !isfinite(s16) || !isfinite(o16)) return 0;
    *scale16 = s16;
    *offset16 = o16;
    return 1;
}

/* A group's grid: the clip search, then up to `refits` least-squares refits, each kept only while the objective
 * (the mean over g's levels of log error) drops. Float16 (scale, offset) out, the bk-bit codes on that grid in q
 * (q2: scratch). Returns 0, or -2 if the grid overflows float16. */
static int fit_group(const Group *g, int b1, int refits, uint8_t *q, uint8_t *q2, float *scale16, float *offset16) {
    float off, step;
    search(g, &off, &step);
    float s16 = round_f16(step * ldexpf(1.0f, g->bk - b1)), o16;
    if (s16 == 0) { /* too flat for float16: keep its mean */
        double m = 0;
        for (int j = 0; j < g->n; j++) m += g->x[j];
        o16 = round_f16((float)(m / g->n));
    } else {
        o16 = round_f16(off);
    }
    if (!isfinite(s16) || !isfinite(o16)) return -2;
    grid_codes(g, s16, o16, b1, q);
    if (refits > 0 && s16 > 0) {
        double err[MAX_LEVELS], signal = 0;
        for (int j = 0; j < g->n; j++) signal += (double)g->x[j] * g->x[j] * (g->w ? g->w[j] : 1.0);
        const double fl = 1e-12 * signal + 1.1754943508222875e-38;
        stored_errors(g, s16, o16, b1, 1, err);
        double best = mean_log(err, g->nlev, fl);
        for (int it = 0; it < refits; it++) {
            float ns = s16, no = o16;
            if (!refit(g, q, err, b1, fl, &ns, &no)) break;
            double e2[MAX_LEVELS];
            grid_codes(g, ns, no, b1, q2);
            stored_errors(g, ns, no, b1, 1, e2);
            const double obj = mean_log(e2, g->nlev, fl);
            if (!(obj < best)) break;
            best = obj;
            s16 = ns;
            o16 = no;
            memcpy(q, q2, (size_t)g->n);
            memcpy(err, e2, sizeof(e2));
        }
    }
    *scale16 = s16;
    *offset16 = o16;
    return 0;
}

/* A group's codes into the bit-planes: plane p holds bit (bk-1-p) of each code; 8 columns per byte, column c
 * at bit c%8. dst = the group's first byte in plane 0. */
static void write_planes(const uint8_t *q, int group, int bk, uint8_t *dst, int64_t plane_stride) {
    for (int p = 0; p < bk; p++) {
        uint8_t *d = dst + p * plane_stride;
        int shift = bk - 1 - p;
        for (int j8 = 0; j8 < group; j8 += 8) {
            uint8_t v = 0;
            for (int k = 0; k < 8; k++) v |= (uint8_t)(((q[j8 + k] >> shift) & 1) << k);
            d[j8 / 8] = v;
        }
    }
}

/* Rows [r0, r1) of uint8 codes [rows][cols] into bit-planes [bk][rows][cols/8] (write_planes' layout): pack
 * --calib's GPTQ codes, packed by the task that chose them (torch's pack_bits took a tenth of a calibrated fit). */
void d2q_pack_rows(const uint8_t *codes, int rows, int cols, int bk, uint8_t *planes, int r0, int r1) {
    const int64_t plane_stride = (int64_t)rows * (cols / 8);
    for (int r = r0; r < r1; r++)
        write_planes(codes + (int64_t)r * cols, cols, bk, planes + (int64_t)r * (cols / 8), plane_stride);
}

/* Each element's weight in the fit's error: the column weight (or NULL: 1) times the weighting's share.
 * 1: sqrt(2 mean x^2 + x^2) (K-quants' 3-6 bit weighting); 2: |x| + tiny (Q2_K's). */
static const float *group_weights(const float *x, const float *cw, int group, int weighting, float *wbuf) {
    if (!weighting) return cw;
    float s2 = 0;
    for (int j = 0; j < group; j++) s2 += x[j] * x[j];
    float sigma2 = weighting == 1 ? 2.0f * s2 / group : 1e-6f * s2 / group;
    for (int j = 0; j < group; j++) wbuf[j] = (cw ? cw[j] : 1.0f) * sqrtf(sigma2 + x[j] * x[j]);
    return wbuf;
}

/* Fit rows [r0, r1) of a [rows, cols] matrix (element (r, c) at src[r * row_stride + c]).
 * planes: [bk][rows][cols/8]; scale/offset: float16 bits [rows][G]; err_out: [nlev] unweighted squared
 * error summed over the row range; signal_out: sum of x^2. weighting (quantize/native.py's WEIGHTINGS)
 * weights each element's error, times its column weight: 0 equally, 1 by sqrt(sigma2 + x^2) (sigma2 = twice
 * the group's mean square; K-quants' 3-6 bit weighting), 2 by |x| (Q2_K's; a tiny sigma2 keeps zeros in). Returns 0, or -1 on bad arguments, -2 if a stored scale or offset overflows float16, -3 if a
 * weight is NaN or infinite. */
int d2q_fit_rows(const void *src, int dtype, int64_t row_stride, int rows, int cols, int group, int bk, int b1,
                 int nlev, const int *levels, const float *col_weight, int weighting, int refits, int r0, int r1,
                 uint8_t *planes, uint16_t *scale, uint16_t *offset, double *err_out, double *signal_out) {
    if (group < 8 || group > MAX_S || group % 8 || cols % group || bk < 1 || bk > 8 || b1 < 1 || b1 > bk ||
        nlev < 1 || nlev > MAX_LEVELS || r0 < 0 || r1 > rows)
        return -1;
    float x[MAX_S], wbuf[MAX_S];
    uint8_t q[MAX_S], q2[MAX_S];
    int G = cols / group;
    int64_t plane_stride = (int64_t)rows * (cols / 8);
    for (int li = 0; li < nlev; li++) err_out[li] = 0;
    *signal_out = 0;
    for (int r = r0; r < r1; r++) {
        for (int gi = 0; gi < G; gi++) {
            d2q_load_group(src, dtype, (int64_t)r * row_stride + (int64_t)gi * group, group, x);
            int finite = 1;
            for (int j = 0; j < group; j++) finite &= (x[j] - x[j]) == 0.0f; /* false for NaN and +-inf */
            if (!finite) return -3;
            const float *cw = group_weights(x, col_weight ? col_weight + (int64_t)gi * group : NULL, group, weighting, wbuf);
            Group g = {group, bk, nlev, levels, x, cw};
            float s16, o16;
            if (fit_group(&g, b1, refits, q, q2, &s16, &o16)) return -2;
            scale[(int64_t)r * G + gi] = f16_bits(s16);
            offset[(int64_t)r * G + gi] = f16_bits(o16);
            double e[MAX_LEVELS];
            stored_errors(&g, s16, o16, b1, 0, e);
            for (int li = 0; li < nlev; li++) err_out[li] += e[li];
            for (int j = 0; j < group; j++) *signal_out += (double)x[j] * x[j];
            write_planes(q, group, bk, planes + (int64_t)r * (cols / 8) + (int64_t)gi * group / 8, plane_stride);
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- scheme "subblock" (quantize/subblock.py)
 * Each group's grid is fitted for level b1 alone (the same clip search and refits on one level), then its
 * (scale, offset) become a 4-bit code pair against float16 (d, dmin) per 256-column super-block (scale =
 * d * s, offset = -dmin * k): each group takes the best of its 4 neighbouring code pairs by its level-b1
 * weighted error, and its codes are taken on that stored grid. Output: planes, pcode u8 [rows][G], psuper
 * f16 [rows][S][2]; errors as above. */

#define SUPER_COLS 256

/* quantize/subblock.py's round_param: the nearest value of 7 significant bits that float16 holds (a multiple of
 * 2^-24), ties to even, so d * code and dmin * code are exact for any 4-bit code. */
static float round_param(float x) {
    int e;
    const float m = frexpf(x, &e);
    const float v = ldexpf(rintf(m * 128.0f), e - 7);
    return v < 0x1p-14f ? rintf(v * 0x1p24f) * 0x1p-24f : v;
}

/* Weighted squared error of a group read at level b1 on a float16 grid (scale = level-b1 cell width, offset
 * = cell 0's lower edge): each weight at the centre of its clamped cell (offset for a zero scale). Summed in
 * double in 8 partial sums (column j into sum j % 8; n is a multiple of 8), then pairwise_sum: vectorisable,
 * the same bits on every machine. */
static double first_level_error(const float *x, const float *w, int n, float scale, float offset, int b1) {
    const float inv = scale > 0 ? 1.0f / scale : 0.0f, top = (float)((1 << b1) - 1);
    double s[8] = {0};
    for (int j0 = 0; j0 < n; j0 += 8)
        for (int k = 0; k < 8; k++) {
            const int j = j0 + k;
            float q = floorf((x[j] - offset) * inv);
            q = q < 0 ? 0 : (q > top ? top : q);
            const float e = x[j] - (offset + scale * (q + 0.5f));
            s[k] += (double)(e * e) * (w ? w[j] : 1.0f);
        }
    return pairwise_sum(s, 8);
}

static int fit_rows_subblock(const void *src, int dtype, int64_t row_stride, int rows, int cols, int group, int bk,
                             int b1, int nlev, const int *levels, const float *col_weight, int weighting, int refits,
                             int r0, int r1, uint8_t *planes, uint8_t *pcode, uint16_t *psuper, double *err_out,
                             double *signal_out, float *fit_scale, float *fit_offset);

/* Returns as d2q_fit_rows, or -4 out of memory. */
int d2q_fit_rows_subblock(const void *src, int dtype, int64_t row_stride, int rows, int cols, int group, int bk,
                          int b1, int nlev, const int *levels, const float *col_weight, int weighting, int refits,
                          int r0, int r1, uint8_t *planes, uint8_t *pcode, uint16_t *psuper, double *err_out,
                          double *signal_out) {
    if (group < 8 || group > MAX_S || group % 8 || SUPER_COLS % group || cols % group || bk < 1 || bk > 8 || b1 < 1 ||
        b1 > bk || nlev < 1 || nlev > MAX_LEVELS || r0 < 0 || r1 > rows)
        return -1;
    const int G = cols / group;
    float *fit_scale = (float *)malloc(sizeof(float) * 2 * (size_t)G), *fit_offset = fit_scale + G;
    if (!fit_scale) return -4;
    const int rc = fit_rows_subblock(src, dtype, row_stride, rows, cols, group, bk, b1, nlev, levels, col_weight,
                                     weighting, refits, r0, r1, planes, pcode, psuper, err_out, signal_out, fit_scale,
                                     fit_offset);
    free(fit_scale);
    return rc;
}

/* d2q_fit_rows_subblock with scratch for one row's fitted grids (fit_scale, fit_offset: G floats each). */
static int fit_rows_subblock(const void *src, int dtype, int64_t row_stride, int rows, int cols, int group, int bk,
                             int b1, int nlev, const int *levels, const float *col_weight, int weighting, int refits,
                             int r0, int r1, uint8_t *planes, uint8_t *pcode, uint16_t *psuper, double *err_out,
                             double *signal_out, float *fit_scale, float *fit_offset) {
    const int G = cols / group, gps = SUPER_COLS / group, S = (G + gps - 1) / gps;
    float x[MAX_S], wbuf[MAX_S];
    uint8_t q[MAX_S], q2[MAX_S];
    const int one[1] = {b1};
    const int64_t plane_stride = (int64_t)rows * (cols / 8);
    for (int li = 0; li < nlev; li++) err_out[li] = 0;
    *signal_out = 0;
    for (int r = r0; r < r1; r++) {
        for (int gi = 0; gi < G; gi++) { /* pass 1: each group's grid for level b1 */
            d2q_load_group(src, dtype, (int64_t)r * row_stride + (int64_t)gi * group, group, x);
            int finite = 1;
            for (int j = 0; j < group; j++) finite &= (x[j] - x[j]) == 0.0f;
            if (!finite) return -3;
            const float *w = group_weights(x, col_weight ? col_weight + (int64_t)gi * group : NULL, group, weighting, wbuf);
            Group g = {group, bk, 1, one, x, w}; /* level b1 alone */
            float s16, o16;
            if (fit_group(&g, b1, refits, q, q2, &s16, &o16)) return -2;
            fit_scale[gi] = s16;
            fit_offset[gi] = o16;
        }
        for (int s = 0; s < S; s++) { /* pass 2: the super-block's parameters, each group's code pair, its codes */
            const int g0 = s * gps, g1 = g0 + gps < G ? g0 + gps : G;
            float smax = 0, bmax = 0; /* largest scale, and how far below zero a cell 0 starts at most */
            for (int gi = g0; gi < g1; gi++) {
                smax = fit_scale[gi] > smax ? fit_scale[gi] : smax;
                bmax = -fit_offset[gi] > bmax ? -fit_offset[gi] : bmax;
            }
            const float d = round_param(smax / 15.0f), dmin = round_param(bmax / 15.0f);
            if (!isfinite(d) || !isfinite(dmin) || d > 65504.0f || dmin > 65504.0f) return -2;
            uint16_t *ps = psuper + ((int64_t)r * S + s) * 2;
            ps[0] = f16_bits(d);
            ps[1] = f16_bits(dmin);
            for (int gi = g0; gi < g1; gi++) {
                d2q_load_group(src, dtype, (int64_t)r * row_stride + (int64_t)gi * group, group, x);
                const float *w = group_weights(x, col_weight ? col_weight + (int64_t)gi * group : NULL, group, weighting, wbuf);
                const float below = -fit_offset[gi] > 0 ? -fit_offset[gi] : 0.0f;
                const float sc0 = d > 0 ? floorf(fit_scale[gi] / d) : 0.0f, sc_min = d > 0 ? 1.0f : 0.0f;
                const float k0 = dmin > 0 ? floorf(below / dmin) : 0.0f;
                double best = INFINITY;
                int best_sc = 0, best_oc = 0;
                for (int c = 0; c < 4; c++) {
                    float fsc = sc0 + (float)(c >> 1), fk = k0 + (float)(c & 1);
                    fsc = fsc < sc_min ? sc_min : (fsc > 15.0f ? 15.0f : fsc);
                    fk = fk < 0.0f ? 0.0f : (fk > 15.0f ? 15.0f : fk);
                    const double e = first_level_error(x, w, group, d * fsc, -(dmin * fk), b1);
                    if (e < best) {
                        best = e;
                        best_sc = (int)fsc;
                        best_oc = (int)fk;
                    }
                }
                pcode[(int64_t)r * G + gi] = (uint8_t)(best_sc | (best_oc << 4));
                const float cs = d * (float)best_sc, co = -(dmin * (float)best_oc); /* exact (7-bit d, dmin) */
                Group g = {group, bk, nlev, levels, x, w};
                grid_codes(&g, cs, co, b1, q);
                double e[MAX_LEVELS];
                stored_errors(&g, cs, co, b1, 0, e);
                for (int li = 0; li < nlev; li++) err_out[li] += e[li];
                for (int j = 0; j < group; j++) *signal_out += (double)x[j] * x[j];
                write_planes(q, group, bk, planes + (int64_t)r * (cols / 8) + (int64_t)gi * group / 8, plane_stride);
            }
        }
    }
    return 0;
}
