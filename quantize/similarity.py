"""Expert similarity at pack time, for `--on-miss substitute` (d2moe.runtime.miss).

Which resident expert can stand in for a missing one? The one whose *function* is closest: each
expert of a layer is applied to the same fixed probe input X [N, H] (N = 32 standard-normal rows,
seeded per layer: the scale of an RMS-normalised hidden state), y_e = down(act(gate X) * up X), and
two experts' similarity is the cosine of their flattened outputs. Why outputs on a random probe
rather than calibration hidden states or raw weights: it needs nothing but the weights the pack
already streams (no model forward, no data), costs three [N, H] x [H, I] products per expert (about
1 s per Mixtral-8x7B expert on this 2-core machine), and, unlike a cosine of weights, is invariant to
permutations of the intermediate neurons (two experts computing the same function from differently
ordered neurons look identical). A calibration-set probe is a drop-in (`probe=`) for later.

The manifest keeps, per expert, its `k` nearest neighbours (most similar first, ties to the lower id)
with the cosine rounded to 4 decimals (d2moe.quantize.format.sections validates them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

METHOD = "output-cosine-random-probe"
PROBE_ROWS = 32
DEFAULT_NEIGHBORS = 16


def _activation(name: str):
    return {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu}.get(name, F.silu)


class SimilarityCollector:
    """Fed every expert matrix of a layer in (expert, gate/up/down) order; gives each expert's neighbours."""

    def __init__(self, hidden_act: str = "silu", rows: int = PROBE_ROWS, k: int = DEFAULT_NEIGHBORS, seed: int = 0):
        self.act = _activation(hidden_act)
        self.rows, self.k, self.seed = rows, k, seed
        self._probe: dict[int, torch.Tensor] = {}
        self._partial: dict[tuple[int, int], torch.Tensor] = {}
        self._outputs: dict[int, dict[int, torch.Tensor]] = {}
        self.hidden_act = hidden_act

    def probe(self, layer: int, hidden: int) -> torch.Tensor:
        if layer not in self._probe:
            g = torch.Generator().manual_seed(self.seed * 100003 + layer)
            self._probe[layer] = torch.randn(self.rows, hidden, generator=g)
        return self._probe[layer]

    def observe(self, layer: int, expert: int, matrix: str, w: torch.Tensor) -> None:
        """One source matrix ([O, I] as the adapter gives it: gate/up [inter, hidden], down [hidden, inter])."""
        w = w.float()
        key = (layer, expert)
        if matrix == "gate":
            self._partial[key] = self.act(self.probe(layer, w.shape[1]) @ w.T)
        elif matrix == "up":
            self._partial[key] = self._partial[key] * (self.probe(layer, w.shape[1]) @ w.T)
        else:
            y = self._partial.pop(key) @ w.T  # [N, H]
            self._outputs.setdefault(layer, {})[expert] = y.reshape(-1).double()

    def neighbors(self, layer: int) -> list[list[list]]:
        """[[[neighbour, cosine], ...] per expert] for `layer` (its outputs are then dropped)."""
        outs = self._outputs.pop(layer, {})
        self._probe.pop(layer, None)
        experts = sorted(outs)
        if not experts:
            return []
        y = torch.stack([outs[e] for e in experts])  # [E, N*H]
        y = y / y.norm(dim=1, keepdim=True).clamp_min(1e-30)
        cos = (y @ y.T).clamp(-1, 1)
        rows = []
        for i in range(len(experts)):
            cands = [(round(float(cos[i, j]), 4), experts[j]) for j in range(len(experts)) if j != i]
            cands.sort(key=lambda c: (-c[0], c[1]))
            rows.append([[other, score] for score, other in cands[: self.k]])
        return rows

    def section(self, layers: dict[int, list]) -> dict:
        """The manifest's `similarity` section from {layer: neighbors(layer)}."""
        return {"method": METHOD, "probe_rows": self.rows, "seed": self.seed, "activation": self.hidden_act,
                "neighbors": {str(layer): rows for layer, rows in sorted(layers.items())}}
