"""scripts/study_nested_fits.py with --calib's sample held out of the second moments GPTQ fits (BENCHMARKS.md §6.9;
measured, not kept): the row choice then judges GPTQ's codes on inputs they were not fitted to. With GUARD_TOL set,
study_guard.py's row choice too.

    [GUARD_TOL=0.05] .venv/bin/python benchmarks/results/nested-fits-9/study_heldout.py MODEL --heldout TEXT \
        --variants calib:g32:r1 --bits 2,3,4 --train TRAIN.txt
"""

import importlib.util
import os
import runpy
import sys
import types
from pathlib import Path

import torch

import d2moe.quantize.calib as calib
import d2moe.router_train.activations as activations
from d2moe.quantize import gptq

HERE = Path(__file__).resolve().parent
KEEP: list[int] = []  # the sample size expert_column_stats chose


def sample_tokens(*args) -> int:
    KEEP[:] = [activations_sample_tokens(*args)]
    return KEEP[0]


def held_out_moment(v: torch.Tensor, block: int) -> torch.Tensor:
    """gptq.second_moment of the routed inputs v without the sample _StatsExperts.forward keeps of them (its
    evenly spaced rows), where the expert saw at least twice as many."""
    keep = torch.linspace(0, len(v) - 1, min(len(v), KEEP[0])).round().long()
    rest = torch.ones(len(v), dtype=torch.bool)
    if len(v) >= 2 * len(keep):
        rest[keep] = False
    return gptq.second_moment(v[rest], block)


activations_sample_tokens = activations.sample_tokens
activations.sample_tokens = sample_tokens
# every layer in one call, as when this was measured: the sample is then the evenly spaced rows of that call's inputs
activations.CHUNK_TOKENS = 1 << 30
# the calibration forward reads gptq.second_moment through its module name: give it a copy with the held-out moment
activations.gptq = types.SimpleNamespace(**{**vars(gptq), "second_moment": held_out_moment})
if "GUARD_TOL" in os.environ:  # study_guard.py's row choice
    spec = importlib.util.spec_from_file_location("study_guard", HERE / "study_guard.py")
    guard = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(guard)
    calib._pick_rows = guard._pick_rows
script = HERE.parents[2] / "scripts" / "study_nested_fits.py"
sys.argv = [str(script), *sys.argv[1:]]
runpy.run_path(str(script), run_name="__main__")
