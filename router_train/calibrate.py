"""Per-layer capacities for a model-wide budget (`--capacity-scope model`).

The budget c holds over all (token, expert) pairs of the model, but layers run one after another at
inference, so each layer gets its own capacity c^l: run the gate over calibration blocks, pool every
layer's pair logits, apply the capacity rule once to the pool (`pooled_layer_capacity`), and take
each layer's level fractions. Layer l+1's inputs depend on layer l's levels, so the pass is repeated
with the capacities it found (two passes reach a fixed point in practice).

Shape letters: B blocks, S positions, N pairs of a layer (B*S*top-k), L levels.
"""

from __future__ import annotations

import torch

from d2moe.router_train.session import Session
from d2moe.runtime.gate import BitWidthGate, capacity_binds, pooled_layer_capacity


@torch.no_grad()
def collect_pair_logits(session: Session, gate: BitWidthGate, blocks: torch.Tensor, batch_size: int = 8) -> dict[int, torch.Tensor]:
    """{layer: [N, L]} the gate's level logits for every pair of `blocks` [B, S] (levels under its current caps)."""
    session.use_gate(gate)
    noise = {layer: m.noise for layer, m in session.experts.items()}
    for m in session.experts.values():
        m.noise = False
    pairs: dict[int, list[torch.Tensor]] = {layer: [] for layer in session.moe_layers}
    try:
        for start in range(0, blocks.shape[0], batch_size):
            session.logits(blocks[start:start + batch_size], "gated")
            for layer in session.moe_layers:
                logits = session.experts[layer].stats["logits"]  # [T, K, L]
                pairs[layer].append(logits.reshape(-1, logits.shape[-1]).float().cpu())
    finally:
        for layer, m in session.experts.items():
            m.noise = noise[layer]
    return {layer: torch.cat(chunks) for layer, chunks in pairs.items()}


def calibrate_layer_capacity(
    session: Session, gate: BitWidthGate, blocks: torch.Tensor, batch_size: int = 8, passes: int = 2
) -> dict[int, tuple[float, ...]] | None:
    """Set (and return) the gate's per-layer capacities for its model-wide budget; None when none are needed.

    Scope "layer", or a budget that limits no level (every c_k = 1), needs no per-layer capacities.
    """
    if gate.capacity_scope != "model" or not capacity_binds(gate.capacity):
        gate.set_capacity(gate.capacity, gate.capacity_scope, None)
        return None
    for _ in range(max(1, passes)):
        rows = pooled_layer_capacity(collect_pair_logits(session, gate, blocks, batch_size), gate.capacity)
        gate.set_capacity(gate.capacity, "model", rows)
    return gate.layer_capacity
