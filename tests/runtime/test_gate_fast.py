"""The capacity rule's Python form for small batches equals the vectorized rounds, ties included."""

from __future__ import annotations

import random

import torch

from d2moe.runtime import gate as g
from d2moe.runtime.gate_fast import assign_small


def test_small_batches_assign_like_the_vectorized_rule(monkeypatch):
    rng, pick = torch.Generator().manual_seed(0), random.Random(0)
    for t in range(600):
        n, levels = pick.randint(1, 64), pick.randint(1, 4)
        logits = torch.randn(n, levels, generator=rng, dtype=torch.float64)
        if t % 3 == 0:
            logits = logits.round()  # ties between levels and between pairs
        cap = [pick.random() for _ in range(levels)]
        cap = [c / sum(cap) for c in cap] if t % 2 else [min(1.0, 2 * c) for c in cap]
        cap[-1] = max(cap[-1], 1.0 - sum(cap[:-1]))
        fast = assign_small(logits, g.capacity_caps(cap, n))
        monkeypatch.setattr(g, "SMALL", -1)
        assert torch.equal(fast, g.assign_with_capacity(logits, cap)), (t, logits, cap)
        monkeypatch.setattr(g, "SMALL", 64)
