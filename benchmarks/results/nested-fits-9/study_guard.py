"""scripts/study_nested_fits.py with a guard on --calib's row choice (BENCHMARKS.md §6.9; measured, not kept).

pick_rows switches a row to another candidate only where it is SWITCH_MARGIN nearer in the geometric mean over the
judged levels on each half of the sample; the guard also requires that no judged level be farther than
(1 + GUARD_TOL) times the first candidate's, on either half.

    GUARD_TOL=0.05 .venv/bin/python benchmarks/results/nested-fits-9/study_guard.py MODEL --heldout TEXT \
        --variants calib:g16:r1 --bits 2,3,4 --train TRAIN.txt
"""

import math
import os
import runpy
import sys
from pathlib import Path

import torch

import d2moe.quantize.calib as calib
from d2moe.quantize.types import MWQTensor

TOL = float(os.environ.get("GUARD_TOL", "0"))


def _pick_rows(candidates, errors, judged):
    n = len(candidates[0].cfg.bits)
    judged = list(range(n)) if judged is None else judged
    errs = torch.stack(errors).clamp_min(1e-300)
    per = errs[:, : 2 * n].log().view(len(errors), 2, n, -1)[:, :, judged]  # [C, 2, L, O]
    halves = per.sum(2)
    margin = len(judged) * math.log1p(calib.SWITCH_MARGIN)
    confirmed = (halves[1:] + margin < halves[:1]).all(1)
    confirmed &= (per[1:] <= per[:1] + math.log1p(TOL)).all(2).all(1)  # the guard
    score = halves.sum(1)
    score[1:] = score[1:].masked_fill(~confirmed, math.inf)
    best = score.argmin(0)
    first = candidates[0]
    scale, offset, planes = first.scale.clone(), first.offset.clone(), first.planes.clone()
    for c in range(1, len(candidates)):
        rows, t = best == c, candidates[c]
        scale[rows], offset[rows], planes[:, rows] = t.scale[rows], t.offset[rows], t.planes[:, rows]
    chosen = torch.stack(errors).gather(0, best.view(1, 1, -1).expand(1, 3 * n, -1))[0]
    return MWQTensor(first.shape, first.cfg, first.level, scale, offset, planes, None), chosen


calib._pick_rows = _pick_rows
script = Path(__file__).resolve().parents[3] / "scripts" / "study_nested_fits.py"
sys.argv = [str(script), *sys.argv[1:]]
runpy.run_path(str(script), run_name="__main__")
