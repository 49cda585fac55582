"""The capacity rule's Python form for small batches equals the vectorized rounds, ties included."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from d2moe.kernels import cpu
from d2moe.runtime import gate as g
from d2moe.runtime.gate_fast import FrozenGate, assign_rule, assign_small


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


def _trained_like(gate):
    with torch.no_grad():
        for p in gate.parameters():
            p.normal_(0, 0.5)  # trained-like weights, not the near-zero init
    return gate


@pytest.mark.skipif(cpu.load() is None, reason="no C compiler: the native gate is not built")
def test_native_gate_equals_numpy_and_torch():
    """kernels/cpu/gate_cpu.c: the head's logits within float32 rounding of torch's, and the levels of the
    torch gate, for every head architecture and decode-sized batch (up to 64 pairs)."""
    torch.manual_seed(2)
    pick = random.Random(3)
    for arch in [dict(proj_dim=32), dict(proj_dim=0), dict(proj_dim=16, expert_embedding=False),
                 dict(proj_dim=32, router_skip=True)]:
        gate = _trained_like(g.BitWidthGate(hidden_size=40, num_experts=16, moe_layers=[0, 2], **arch))
        frozen, numpy_only = FrozenGate(gate), FrozenGate(gate, native=False)
        assert frozen.lib is not None and numpy_only.lib is None
        for _ in range(150):
            t, k = pick.choice([(1, 1), (1, 2), (1, 8), (2, 4), (8, 8), (16, 4), (3, 5)])
            hidden = torch.randn(t, 40)
            index = torch.stack([torch.randperm(16)[:k] for _ in range(t)])
            weights = torch.softmax(torch.randn(t, k), dim=-1)
            layer = pick.choice([0, 2])
            want = gate.logits(layer, hidden, index, weights).reshape(t * k, -1)
            assigned, logits = frozen.native_levels(layer, hidden, index, weights)
            assert torch.allclose(torch.from_numpy(logits.copy()), want, atol=1e-5, rtol=1e-5)
            levels = frozen.select_levels(layer, hidden, index, weights)
            assert torch.equal(levels, gate.select_levels(layer, hidden, index, weights))
            assert torch.equal(levels, numpy_only.select_levels(layer, hidden, index, weights))


@pytest.mark.skipif(cpu.load() is None, reason="no C compiler: the native gate is not built")
def test_native_capacity_rule_breaks_ties_like_the_python_rule():
    """Exact ties between pairs (same expert, no hidden term) and between levels (equal biases): the native
    rule's order must be assign_rule's (lower pair first, lower level first)."""
    pick = random.Random(4)
    for trial in range(200):
        levels = pick.randint(1, 4)
        gate = g.BitWidthGate(hidden_size=8, num_experts=4, moe_layers=[0], levels=tuple(range(2, 2 + levels)),
                              capacity=(1.0,) * levels, proj_dim=0)
        with torch.no_grad():
            gate.head(0).proj.weight.zero_()
            gate.head(0).proj.bias.copy_(torch.tensor([float(pick.randint(0, 1)) for _ in range(levels)]))
            gate.head(0).expert_emb.copy_(torch.randint(0, 2, (4, levels)).float())
        frozen = FrozenGate(gate)
        t, k = pick.randint(1, 16), pick.randint(1, 4)
        n = t * k
        cap = [pick.random() for _ in range(levels)]
        cap = [c / sum(cap) for c in cap]
        caps = g.capacity_caps(cap, n)
        frozen._caps[(0, n)] = np.asarray(caps, dtype=np.int32)
        index = torch.randint(0, 4, (t, k))
        assigned, logits = frozen.native_levels(0, torch.randn(t, 8), index, torch.zeros(t, k))
        assert assigned.tolist() == assign_rule(logits.astype(np.float64).tolist(), caps), trial


@pytest.mark.skipif(cpu.load() is None, reason="no C compiler: the native gate is not built")
def test_native_gate_rejects_what_it_cannot_serve():
    gate = _trained_like(g.BitWidthGate(hidden_size=8, num_experts=4, moe_layers=[0]))
    frozen = FrozenGate(gate)
    with pytest.raises(ValueError, match="expert ids"):
        frozen.native_levels(0, torch.randn(1, 8), torch.tensor([[4]]), torch.ones(1, 1))
    with pytest.raises(ValueError, match="limits"):
        frozen.native_levels(0, torch.randn(33, 8), torch.zeros(33, 2, dtype=torch.long), torch.ones(33, 2))
