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

import d2moe.quantize.calib as calib

TOL = float(os.environ.get("GUARD_TOL", "0"))
pick_rows = calib._pick_rows


def _pick_rows(candidates, errors, judged):
    """pack's choice, after making each candidate's rows that fail the guard unchoosable (infinite output error)."""
    n = len(candidates[0].cfg.bits)
    levels = [h * n + i for h in (0, 1) for i in (range(n) if judged is None else judged)]
    first = errors[0][levels]
    guarded = [errors[0]]
    for e in errors[1:]:
        farther = (e[levels].clamp_min(1e-300).log() > first.clamp_min(1e-300).log() + math.log1p(TOL)).any(0)
        e = e.clone()
        e[: 2 * n, farther] = math.inf
        guarded.append(e)
    return pick_rows(candidates, guarded, judged)


if __name__ == "__main__":
    calib._pick_rows = _pick_rows
    script = Path(__file__).resolve().parents[3] / "scripts" / "study_nested_fits.py"
    sys.argv = [str(script), *sys.argv[1:]]
    runpy.run_path(str(script), run_name="__main__")
