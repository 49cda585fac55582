"""scripts/study_nested_fits.py with --calib's sample held out of the second moments GPTQ fits (BENCHMARKS.md §6.9;
measured, not kept): the row choice then judges GPTQ's codes on inputs they were not fitted to. With GUARD_TOL set,
study_guard.py's row choice too.

    [GUARD_TOL=0.05] .venv/bin/python benchmarks/results/nested-fits-9/study_heldout.py MODEL --heldout TEXT \
        --variants calib:g32:r1 --bits 2,3,4 --train TRAIN.txt
"""

import os
import runpy
import sys
from pathlib import Path

import torch

import d2moe.quantize.calib as calib
import d2moe.router_train.activations as activations
from d2moe.quantize import gptq

HERE = Path(__file__).resolve().parent


def forward(self, hidden_states, top_k_index, top_k_weights):
    """_StatsExperts.forward, the kept sample left out of the moments where the expert saw at least twice as many."""
    x_all = hidden_states.float()
    out = torch.zeros_like(x_all)
    for e in torch.unique(top_k_index).tolist():
        tok, slot = (top_k_index == e).nonzero(as_tuple=True)
        x = x_all[tok]
        h = self.act(x @ self._matrix(e, "gate").T)
        h *= x @ self._matrix(e, "up").T
        out.index_add_(0, tok, (h @ self._matrix(e, "down").T) * top_k_weights[tok, slot].float().unsqueeze(-1))
        keep = torch.linspace(0, len(tok) - 1, min(len(tok), self.keep_tokens)).round().long()
        rest = torch.ones(len(tok), dtype=torch.bool)
        if len(tok) >= 2 * len(keep):
            rest[keep] = False
        for m, v in (("gate", x), ("down", h)):
            key = (self.layer, e, m)
            self.sums[key] = self.sums.get(key, 0) + v.square().sum(0, dtype=torch.float64)
            if key not in self.samples:
                self.samples[key] = v[keep].bfloat16()
            if self.blocks[m]:
                self.moments[key] = self.moments.get(key, 0) + gptq.second_moment(v[rest], self.blocks[m])
        self.counts[(self.layer, e)] = self.counts.get((self.layer, e), 0) + len(tok)
    return out.to(hidden_states.dtype)


activations._StatsExperts.forward = forward
if "GUARD_TOL" in os.environ:  # study_guard.py's _pick_rows, without running its study
    source = (HERE / "study_guard.py").read_text().split("calib._pick_rows = _pick_rows")[0]
    namespace: dict = {}
    exec(compile(source, str(HERE / "study_guard.py"), "exec"), namespace)
    calib._pick_rows = namespace["_pick_rows"]
script = HERE.parents[2] / "scripts" / "study_nested_fits.py"
sys.argv = [str(script), *sys.argv[1:]]
runpy.run_path(str(script), run_name="__main__")
