"""The capacity rule's Python form for small batches equals the vectorized rounds, ties included."""

from __future__ import annotations

import random

import torch

from d2moe.runtime import gate as g
from d2moe.runtime.gate_fast import FrozenGate, assign_small


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


def test_frozen_gate_selects_the_levels_of_the_torch_gate():
    """The numpy decode path (FrozenGate) gives the torch gate's levels on decode-sized batches, for MLP
    and linear heads, with and without expert embeddings and the router-weight term."""
    torch.manual_seed(0)
    pick = random.Random(1)
    for arch in [dict(proj_dim=32), dict(proj_dim=0), dict(proj_dim=16, expert_embedding=False),
                 dict(proj_dim=32, router_skip=True)]:
        gate = g.BitWidthGate(hidden_size=48, num_experts=8, moe_layers=[1, 3], **arch)
        with torch.no_grad():
            for p in gate.parameters():
                p.normal_(0, 0.5)  # trained-like weights, not the near-zero init
        frozen = FrozenGate(gate)
        for _ in range(100):
            t, k = pick.randint(1, 8), pick.randint(1, 4)
            hidden = torch.randn(t, 48)
            index = torch.stack([torch.randperm(8)[:k] for _ in range(t)])
            weights = torch.softmax(torch.randn(t, k), dim=-1)
            layer = pick.choice([1, 3])
            want = gate.logits(layer, hidden, index, weights)
            got = frozen.logits(layer, hidden.numpy(), index.numpy(), weights.numpy())
            assert torch.allclose(torch.from_numpy(got), want, atol=1e-5, rtol=1e-5)
            assert torch.equal(frozen.select_levels(layer, hidden, index, weights),
                               gate.select_levels(layer, hidden, index, weights))
