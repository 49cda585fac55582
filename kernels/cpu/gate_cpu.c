/* The served bit-width gate for a decode step's few pairs, in one call (runtime/gate_fast.py).

   A layer step's level choice is a 2-layer MLP over T*K <= 64 pairs and the capacity rule over them.
   In numpy that is ~10 small ops (~45 us a step inside a run, where caches are cold); here it is
   one ctypes call. Oracles: LayerGateHead.forward (torch) for the logits, gate_fast.assign_rule
   (Python) for the capacity rule; tests/runtime/test_gate_fast.py holds the three equal. */

#include "common.h"

#define D2_GATE_MAX_PAIRS 64
#define D2_GATE_MAX_LEVELS 16
#define D2_GATE_MAX_WIDTH 1024

/* logits[T*K, L] of one head. Shapes: hidden [T, H], proj_w [H, D] (input-major), proj_b/router_dir [D],
   expert_emb [E, D] or NULL, out_w [D, L] or NULL (then D == L: a linear head), out_b/router_out [L]
   (router_out may be NULL). index [T, K] int64, weights [T, K] float32. */
static void gate_logits(const float *hidden, int T, int H, const int64_t *index, const float *weights, int K,
                        const float *proj_w, const float *proj_b, const float *router_dir, const float *expert_emb,
                        const float *out_w, const float *out_b, const float *router_out, int D, int L,
                        float *logits) {
    float p[D2_GATE_MAX_WIDTH], z[D2_GATE_MAX_WIDTH];
    for (int t = 0; t < T; t++) {
        const float *h = hidden + (int64_t)t * H;
        for (int d = 0; d < D; d++) p[d] = proj_b[d];
        for (int c = 0; c < H; c++) {  /* row-by-row over proj_w: contiguous, vectorizes */
            const float hc = h[c], *wr = proj_w + (int64_t)c * D;
            for (int d = 0; d < D; d++) p[d] += hc * wr[d];
        }
        for (int k = 0; k < K; k++) {
            const float w = weights[t * K + k];
            const float *emb = expert_emb ? expert_emb + index[t * K + k] * D : NULL;
            float *out = logits + (int64_t)(t * K + k) * L;
            for (int d = 0; d < D; d++) z[d] = p[d] + w * router_dir[d] + (emb ? emb[d] : 0.0f);
            if (!out_w) {
                for (int d = 0; d < D; d++) out[d] = z[d];
                continue;
            }
            for (int l = 0; l < L; l++) out[l] = out_b[l] + (router_out ? w * router_out[l] : 0.0f);
            for (int d = 0; d < D; d++) {
                const float s = z[d] / (1.0f + expf(-z[d])), *wr = out_w + (int64_t)d * L;  /* silu */
                for (int l = 0; l < L; l++) out[l] += s * wr[l];
            }
        }
    }
}

/* The capacity rule (gate_fast.assign_rule): pairs by confidence (top softmax probability, float64;
   ties to the lower pair), each takes its r-th choice (by score, ties to the lower level) in round r
   while that level has room. Returns 0, or -1 when caps leave a pair unassigned. */
static int gate_assign(const float *scores, int n, int L, const int32_t *caps, int32_t *assigned) {
    double conf[D2_GATE_MAX_PAIRS];
    int priority[D2_GATE_MAX_PAIRS], remaining[D2_GATE_MAX_LEVELS];
    unsigned char prefs[D2_GATE_MAX_PAIRS][D2_GATE_MAX_LEVELS];
    for (int i = 0; i < n; i++) {
        const float *r = scores + (int64_t)i * L;
        double top = r[0], sum = 0.0;
        for (int j = 1; j < L; j++) top = r[j] > top ? r[j] : top;
        for (int j = 0; j < L; j++) sum += exp((double)r[j] - top);
        conf[i] = 1.0 / sum;
        for (int j = 0; j < L; j++) {  /* insertion sort: higher score first, equal scores keep level order */
            int at = j;
            while (at > 0 && r[prefs[i][at - 1]] < r[j]) {
                prefs[i][at] = prefs[i][at - 1];
                at--;
            }
            prefs[i][at] = (unsigned char)j;
        }
        int at = i;  /* priority: higher confidence first, equal confidence keeps pair order */
        while (at > 0 && conf[priority[at - 1]] < conf[i]) {
            priority[at] = priority[at - 1];
            at--;
        }
        priority[at] = i;
        assigned[i] = -1;
    }
    for (int j = 0; j < L; j++) remaining[j] = caps[j];
    for (int round = 0; round < L; round++)
        for (int q = 0; q < n; q++) {
            const int i = priority[q];
            if (assigned[i] >= 0) continue;
            const int level = prefs[i][round];
            if (remaining[level] > 0) {
                remaining[level]--;
                assigned[i] = level;
            }
        }
    for (int i = 0; i < n; i++)
        if (assigned[i] < 0) return -1;
    return 0;
}

/* One MoE layer's head as the served gate holds it (runtime/gate_fast.FrozenGate; shapes as gate_logits). */
typedef struct {
    const float *proj_w, *proj_b, *router_dir, *expert_emb, *out_w, *out_b, *router_out;
    int32_t E, D, L, H;
} D2GateHead;

/* A decode step's levels: bit value per pair (out_bits [T*K] = bits[level index], unless NULL), with the level indices
   (assigned [T*K]) and the logits behind them (logits [T*K, L], for tests). Returns 0; -1 when caps do not
   cover the pairs; -2 when a size is past the fixed limits or an expert index is outside [0, E). */
int d2_gate_levels(const D2GateHead *g, const float *hidden, int T, const int64_t *index, const float *weights,
                   int K, const int32_t *caps, const int64_t *bits, int64_t *out_bits, float *logits,
                   int32_t *assigned) {
    if (T * K > D2_GATE_MAX_PAIRS || g->L > D2_GATE_MAX_LEVELS || g->D > D2_GATE_MAX_WIDTH || T <= 0 || K <= 0 ||
        g->L <= 0)
        return -2;
    for (int i = 0; i < T * K; i++)
        if (index[i] < 0 || index[i] >= g->E) return -2;
    gate_logits(hidden, T, g->H, index, weights, K, g->proj_w, g->proj_b, g->router_dir, g->expert_emb, g->out_w,
                g->out_b, g->router_out, g->D, g->L, logits);
    const int rc = gate_assign(logits, T * K, g->L, caps, assigned);
    if (rc == 0 && out_bits)
        for (int i = 0; i < T * K; i++) out_bits[i] = bits[assigned[i]];
    return rc;
}
