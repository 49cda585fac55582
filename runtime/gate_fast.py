"""The bit-width gate for the few pairs of a decode step, without torch's per-op dispatch.

A decode step has T*K pairs (2-16). There the torch gate costs ~10 small tensor ops for the head
(~10 µs of dispatch each) and ~20 more for the vectorized capacity rounds (d2moe.runtime.gate), more
than the kernels of a small expert. Here the same computation runs as a few numpy calls on frozen
float32 copies of the heads (`FrozenGate`) and the capacity rule runs sequentially in Python
(`assign_rule`): pairs in priority order (confidence = the top softmax probability in float64, ties to
the lower pair index), each takes its r-th choice in round r (choices by logit, ties to the lower
level) while that level has room. Within a level the accepted pairs are the first by priority, as in
the vectorized rounds, so the levels are the same (tested).
"""

from __future__ import annotations

import math

import numpy as np
import torch

SMALL = 64  # pairs at or below which the Python form runs


def assign_rule(rows: list[list[float]], caps: list[int]) -> list[int]:
    """rows [N][L] level scores, caps per level -> level index per pair."""
    n = len(rows)
    num_levels = len(caps)
    confidence = []
    for r in rows:
        top = max(r)
        confidence.append(1.0 / math.fsum(math.exp(v - top) for v in r))  # top softmax probability
    prefs = [sorted(range(num_levels), key=lambda j, r=r: (-r[j], j)) for r in rows]
    priority = sorted(range(n), key=lambda i: (-confidence[i], i))
    remaining = list(caps)
    assigned = [-1] * n
    for r in range(num_levels):
        for i in priority:
            if assigned[i] < 0:
                level = prefs[i][r]
                if remaining[level] > 0:
                    remaining[level] -= 1
                    assigned[i] = level
    if min(assigned, default=0) < 0:
        raise RuntimeError("capacity rule left pairs unassigned: caps do not cover the batch")
    return assigned


def assign_small(scores: torch.Tensor, caps: list[int]) -> torch.Tensor:
    """scores [N, L] float64 (N <= SMALL), caps per level -> level index per pair [N]."""
    return torch.tensor(assign_rule(scores.tolist(), caps), dtype=torch.long, device=scores.device)


def _array(p) -> np.ndarray | None:
    return None if p is None else p.detach().to(torch.float32).cpu().numpy().copy()


class FrozenGate:
    """A served gate's heads as numpy float32 arrays. The gate must not train while it serves: the
    copies are taken once (GateLevels builds this at session start)."""

    def __init__(self, gate) -> None:
        from d2moe.runtime.gate import capacity_caps

        self.gate = gate
        self.levels = list(gate.levels)
        self._caps = capacity_caps
        self.heads = {}
        for layer in gate.moe_layers:
            head = gate.head(layer)
            out = head.out
            self.heads[int(layer)] = (
                _array(head.proj.weight).T.copy(), _array(head.proj.bias), _array(head.router_dir),
                _array(head.expert_emb), None if out is None else _array(out.weight).T.copy(),
                None if out is None else _array(out.bias), _array(head.router_out),
            )

    def logits(self, layer: int, hidden: np.ndarray, top_k_index: np.ndarray, top_k_weights: np.ndarray) -> np.ndarray:
        """hidden [T, H] float32, top_k_index [T, K], top_k_weights [T, K] float32 -> [T, K, L] float32,
        the head's forward (LayerGateHead.forward) in numpy."""
        proj_w, proj_b, router_dir, expert_emb, out_w, out_b, router_out = self.heads[int(layer)]
        w = top_k_weights[:, :, None]
        z = (hidden @ proj_w + proj_b)[:, None, :] + w * router_dir  # [T, K, D]
        if expert_emb is not None:
            z = z + expert_emb[top_k_index]
        if out_w is None:
            return z
        z = z / (1.0 + np.exp(-z))  # silu
        logits = z @ out_w + out_b
        if router_out is not None:
            logits = logits + w * router_out
        return logits

    def select_levels(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                      top_k_weights: torch.Tensor) -> torch.Tensor:
        """Bit values [T, K] under the layer's capacity rule, as BitWidthGate.select_levels."""
        t, k = top_k_index.shape
        logits = self.logits(layer, hidden.to(torch.float32).numpy(), top_k_index.numpy(),
                             top_k_weights.to(torch.float32).numpy())
        rows = logits.reshape(t * k, -1).astype(np.float64).tolist()
        idx = assign_rule(rows, self._caps(self.gate.capacity_for(layer), t * k))
        levels = self.levels
        return torch.tensor([levels[i] for i in idx], dtype=torch.long).reshape(t, k)
