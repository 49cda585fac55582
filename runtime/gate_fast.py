"""The bit-width gate for the few pairs of a decode step, without torch's per-op dispatch.

A decode step has T*K pairs (2-16). There the torch gate costs ~10 small tensor ops for the head
(~10 µs of dispatch each) and ~20 more for the vectorized capacity rounds (d2moe.runtime.gate), more
than the kernels of a small expert. Here the same computation runs as a few numpy calls on frozen
float32 copies of the heads (`FrozenGate`) and the capacity rule runs sequentially in Python
(`assign_rule`): pairs in priority order (confidence = the top softmax probability in float64, ties to
the lower pair index), each takes its r-th choice in round r (choices by logit, ties to the lower
level) while that level has room. Within a level the accepted pairs are the first by priority, as in
the vectorized rounds, so the levels are the same (tested).

Where the CPU kernel library is built, both run as one native call instead (kernels/cpu/gate_cpu.c):
inside a run the numpy form costs ~45 µs a step for its ~10 small ops on cold caches, about what the
kernels of a small expert take. numpy and `assign_rule` stay its oracles and the fallback.
"""

from __future__ import annotations

import ctypes
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

    def __init__(self, gate, native: bool = True) -> None:
        from d2moe.kernels import cpu
        from d2moe.runtime.gate import capacity_caps

        self.gate = gate
        self.levels = list(gate.levels)
        self._capacity_caps = capacity_caps
        self._caps: dict[tuple[int, int], np.ndarray] = {}  # (layer, pairs) -> int32 caps per level
        self.lib = cpu.load() if native else None
        self.heads = {}
        for layer in gate.moe_layers:
            head = gate.head(layer)
            out = head.out
            self.heads[int(layer)] = (
                _array(head.proj.weight).T.copy(), _array(head.proj.bias), _array(head.router_dir),
                _array(head.expert_emb), None if out is None else _array(out.weight).T.copy(),
                None if out is None else _array(out.bias), _array(head.router_out),
            )
        self.num_experts = int(gate.num_experts)
        if self.lib is not None:
            self._native = {layer: self._native_head(h) for layer, h in self.heads.items()}
            # the native call's outputs: one step at a time per served gate, so one scratch set serves every call
            self._bits = np.asarray(self.levels, dtype=np.int64)
            self._logits = np.empty(SMALL * len(self.levels), dtype=np.float32)
            self._assigned = np.empty(SMALL, dtype=np.int32)
            self._scratch_at = (self._bits.ctypes.data, self._logits.ctypes.data, self._assigned.ctypes.data)

    def _native_head(self, head):
        """d2_gate_levels' head (kernels.cpu.GateHead) over the arrays of self.heads, which keep owning them."""
        from d2moe.kernels import cpu

        proj_w, proj_b, router_dir, expert_emb, out_w, out_b, router_out = head
        ptr = lambda a: None if a is None else a.ctypes.data  # noqa: E731
        width = proj_w.shape[1]
        return ctypes.byref(cpu.GateHead(
            ptr(proj_w), ptr(proj_b), ptr(router_dir), ptr(expert_emb), ptr(out_w), ptr(out_b), ptr(router_out),
            self.num_experts, width, width if out_w is None else out_w.shape[1], proj_w.shape[0]))

    def caps(self, layer: int, n: int) -> np.ndarray:
        """int32 caps per level for n pairs of `layer` (kept: their address goes to the native call)."""
        key = (int(layer), n)
        caps = self._caps.get(key)
        if caps is None:
            caps = self._caps[key] = np.asarray(self._capacity_caps(self.gate.capacity_for(layer), n), dtype=np.int32)
        return caps

    def native_levels(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                      top_k_weights: torch.Tensor, out: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(level index [T*K] int32, logits [T*K, L] float32) from the native gate, T*K <= SMALL: views of scratch
        that the next call overwrites. `out` (int64, T*K elements) receives the bit values."""
        t, k = top_k_index.shape
        if hidden.dtype != torch.float32 or not hidden.is_contiguous():
            hidden = hidden.to(torch.float32).contiguous()
        if top_k_index.dtype != torch.int64 or not top_k_index.is_contiguous():
            top_k_index = top_k_index.to(torch.int64).contiguous()
        if top_k_weights.dtype != torch.float32 or not top_k_weights.is_contiguous():
            top_k_weights = top_k_weights.to(torch.float32).contiguous()
        if hidden.shape[1] != self.gate.hidden_size:
            raise ValueError(f"gate step hidden size {hidden.shape[1]} is not the gate's {self.gate.hidden_size}")
        n = t * k
        bits_at, logits_at, assigned_at = self._scratch_at
        rc = self.lib.d2_gate_levels(self._native[int(layer)], hidden.data_ptr(), t, top_k_index.data_ptr(),
                                     top_k_weights.data_ptr(), k, self.caps(layer, n).ctypes.data, bits_at,
                                     None if out is None else out.data_ptr(), logits_at, assigned_at)
        if rc == -1:
            raise RuntimeError("capacity rule left pairs unassigned: caps do not cover the batch")
        if rc != 0:
            raise ValueError(f"gate step of {t}x{k} pairs is outside the native gate's limits or its expert ids")
        num_levels = len(self.levels)
        return self._assigned[:n], self._logits[: n * num_levels].reshape(n, num_levels)

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
        if self.lib is not None and t * k <= SMALL:
            out = torch.empty((t, k), dtype=torch.long)
            self.native_levels(layer, hidden, top_k_index, top_k_weights, out)
            return out
        logits = self.logits(layer, hidden.to(torch.float32).numpy(), top_k_index.numpy(),
                             top_k_weights.to(torch.float32).numpy())
        rows = logits.reshape(t * k, -1).astype(np.float64).tolist()
        idx = assign_rule(rows, self.caps(layer, t * k).tolist())
        levels = self.levels
        return torch.tensor([levels[i] for i in idx], dtype=torch.long).reshape(t, k)
