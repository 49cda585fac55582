"""The capacity rule for the few pairs of a decode step, in plain Python (d2moe.runtime.gate.assign_with_capacity).

A decode step has T*K pairs (2-16): there the vectorized rounds cost ~20 tensor ops, more than the
rest of the gate. Sequential form of the same rule: pairs in priority order (confidence = the top
softmax probability in float64, ties to the lower pair index), each takes its r-th choice in round r
(choices by logit, ties to the lower level) while that level has room. Within a level the accepted
pairs are the first by priority, as in the vectorized rounds, so the result is the same (tested).
"""

from __future__ import annotations

import torch

SMALL = 64  # pairs at or below which the Python form runs


def assign_small(scores: torch.Tensor, caps: list[int]) -> torch.Tensor:
    """scores [N, L] float64 (N <= SMALL), caps per level -> level index per pair [N]."""
    n, num_levels = scores.shape
    rows = scores.tolist()
    confidence = torch.softmax(scores, dim=1).amax(dim=1).tolist()
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
    return torch.tensor(assigned, dtype=torch.long, device=scores.device)
