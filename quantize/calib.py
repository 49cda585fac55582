"""Calibration for `pack --calib`: what the statistics are, and how a fit is chosen from them.

Per (layer, expert, matrix) the calibration run (d2moe.router_train.activations) gives
- `weight` [I]: each input column's mean squared activation over the tokens routed to the expert,
  normalised to mean 1: imatrix's diagonal, which weights the grid search's error;
- `sample` [N, I]: N of those routed inputs, spread over the calibration text;
- `hessian` [I / B, B, B]: diagonal blocks of their mean x x^T, from which d2moe.quantize.gptq chooses the
  codes on the grids chosen here.

The diagonal weighting alone ignores how columns co-vary and can clip the columns it rates low into
errors that add up in the output (BENCHMARKS.md §6.3: on its own it made every level worse). So pack
fits each matrix twice, weighted and unweighted, and keeps for every row the fit whose outputs on
the sample are nearer the source's: ||X (w_o - q_o)||^2, summed in log over the levels within
JUDGED_SPAN bits of the lowest (each counts alike), staying with the unweighted fit unless the other is
clearly nearer on each half of the sample. Rows are independent in the format (a row's groups and
super-blocks are its own), so the chosen rows form one valid tensor. On those grids, GPTQ's codes (two
windows) compete with the nearest-cell codes by the same rule (`calibrated_fit`). Held-out text never
enters. The grid choice alone did not beat the uncalibrated pack's perplexity (BENCHMARKS.md §6.4); with
GPTQ's codes, three trained MoEs lose 35-60% less (§6.7).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch

from d2moe.kernels import cpu
from d2moe.kernels.packed import PackedMatrix
from d2moe.quantize import gptq, native
from d2moe.quantize.mwq import dequantize
from d2moe.quantize.types import MWQConfig, MWQTensor

SAMPLE_TOKENS = 256  # routed inputs kept per expert: the row choice needs a few hundred to be stable
ROW_CHUNK = 512  # rows per pass in output_errors: a few MiB of float32 temporaries
JUDGED_SPAN = 3  # rows are judged on the levels within 3 bits of the lowest: an 8-bit level's error is 1/4096
# of a 2-bit one's, near lossless either way, and would veto a choice on its relative change alone (§6.7, §6.8)
SWITCH_MARGIN = 0.05  # a row leaves the unweighted fit only for outputs 5% nearer: the sample's error is an estimate


class LayerCalibration(Protocol):
    """What pack asks calibration for (d2moe.router_train.activations.CalibrationPass): each MoE layer's statistics,
    in order, as that layer is fitted."""

    calib_id: str  # names the calibration in --resume's key
    starved: list[list[int]]  # [layer, expert, tokens] of the experts fitted unweighted

    def layer_stats(self, layer: int, scratch: Path | None = None) -> Mapping[tuple[int, int, str], ColumnStats]: ...
    # (scratch: a folder for files the calibration may spill, pack's staging folder; a mapping with close() may
    # hold them there until read)

    def manifest_section(self) -> dict: ...  # the checkpoint's `calibration` (format.sections), once every layer is fitted


@dataclass(frozen=True)
class ColumnStats:
    """One expert matrix's calibration statistics (see the module docstring)."""

    weight: torch.Tensor  # float32 [I], mean 1
    sample: torch.Tensor  # bfloat16 [N, I]
    hessian: torch.Tensor | None = None  # float32 [I / B, B, B]: diagonal blocks of the inputs' mean x x^T (gptq.py)


def product_dtype(source: torch.dtype) -> torch.dtype:
    """The dtype calibration multiplies a `source`-dtype model or sample in: bfloat16's own where the CPU multiplies
    it natively (AMX, AVX512-BF16: 6x float32's rate on a 2-core AMX Xeon, BENCHMARKS.md §6.12), float32 elsewhere
    (without those instructions torch converts a bfloat16 GEMM in software, at a sixth of float32's rate, §6.11)
    and for every other dtype. Statistics are summed in float32 or wider either way."""
    return torch.bfloat16 if source == torch.bfloat16 and cpu.has_bf16_gemm() else torch.float32


def output_errors(w: torch.Tensor, t: MWQTensor, sample: torch.Tensor, judged: list[int] | None = None
                  ) -> torch.Tensor:
    """float64 [3 * levels, O]: per level and row ||X (w_o - q_o)||^2 over the first half of the sample's tokens,
    the same over the second half, then per level and row ||w_o - q_o||^2 (for the pack report's SQNR). Levels
    whose index is not in `judged` (None: all) skip the product and get output errors of 0: no choice weighs them.
    Rows go ROW_CHUNK at a time (cache-sized temporaries), w's in its own dtype read as float32; the product runs
    in product_dtype(sample.dtype), so a bfloat16 sample is multiplied natively where the CPU can, whatever the
    source's dtype."""
    n = len(t.cfg.bits)
    out = torch.zeros(3 * n, t.shape[0], dtype=torch.float64)
    dtype = product_dtype(sample.dtype)
    x = sample.to(dtype)
    half = max(1, x.shape[0] // 2)
    level_rows = _dequantizer(t)
    for r0 in range(0, t.shape[0], ROW_CHUNK):
        r1 = min(t.shape[0], r0 + ROW_CHUNK)
        rows = w[r0:r1].float()  # once per chunk: torch adds a bfloat16 operand to float32 at a quarter of the speed
        for i, b in enumerate(t.cfg.bits):
            e = level_rows(b, r0, r1).neg_().add_(rows)
            out[2 * n + i, r0:r1] = e.square().sum(1)
            if judged is not None and i not in judged:
                continue
            y = (x @ e.to(dtype).T).float().square()
            out[i, r0:r1] = y[:half].sum(0)
            out[n + i, r0:r1] = y[half:].sum(0) if x.shape[0] > 1 else out[i, r0:r1]
    return out


def _dequantizer(t: MWQTensor):
    """(level, r0, r1) -> float32 rows [r0, r1) of t at that level: the CPU kernels' dequantization where they built
    (the reference's values bit for bit, a third of its time), else the reference's."""
    lib = cpu.load()
    if lib is None:
        return lambda b, r0, r1: dequantize(t.rows(r0, r1), b)
    matrix = PackedMatrix.from_mwq(t)
    descs = {b: cpu.MatrixDesc(matrix, b) for b in t.cfg.bits}
    return lambda b, r0, r1: cpu.dequant_rows(lib, descs[b], r0, r1)


def pick_rows(candidates: list[MWQTensor], errors: list[torch.Tensor], judged: list[int] | None = None
              ) -> tuple[MWQTensor, list[float]]:
    """The tensor taking each row from the candidate with the least sum over levels of log output error, the
    first candidate unless another is SWITCH_MARGIN nearer at every level's geometric mean on each half of
    the sample (a switch the other half does not confirm is the sample's noise); and its unweighted squared
    error per level (errors: output_errors of each candidate)."""
    tensor, chosen = _pick_rows(candidates, errors, judged)
    n = len(candidates[0].cfg.bits)
    return tensor, [float(v) for v in chosen[2 * n:].sum(1)]


def _pick_rows(candidates: list[MWQTensor], errors: list[torch.Tensor], judged: list[int] | None
               ) -> tuple[MWQTensor, torch.Tensor]:
    """pick_rows' tensor, and its output_errors [3n, O] (each row's from the candidate it came from)."""
    n = len(candidates[0].cfg.bits)
    judged = list(range(n)) if judged is None else judged  # indices of the levels the choice weighs
    errs = torch.stack(errors).clamp_min(1e-300)  # [C, 3n, O]
    halves = errs[:, : 2 * n].log().view(len(errors), 2, n, -1)[:, :, judged].sum(2)  # [C, 2, O]: log error per half
    margin = len(judged) * math.log1p(SWITCH_MARGIN)
    confirmed = (halves[1:] + margin < halves[:1]).all(1)  # [C-1, O]: nearer than the first on both halves
    score = halves.sum(1)  # [C, O]
    score[1:] = score[1:].masked_fill(~confirmed, math.inf)
    best = score.argmin(0)  # the first minimum on ties
    first = candidates[0]
    scale, offset, planes = first.scale.clone(), first.offset.clone(), first.planes.clone()
    alpha = None if first.alpha is None else first.alpha.clone()
    for c in range(1, len(candidates)):
        rows, t = best == c, candidates[c]
        scale[rows], offset[rows], planes[:, rows] = t.scale[rows], t.offset[rows], t.planes[:, rows]
        if alpha is not None:
            alpha[:, rows] = t.alpha[:, rows]
    chosen = torch.stack(errors).gather(0, best.view(1, 1, -1).expand(1, 3 * n, -1))[0]  # [3n, O]
    tensor = MWQTensor(first.shape, first.cfg, first.level, scale, offset, planes, alpha)
    return tensor, chosen


def calibrated_fit(lib, w: torch.Tensor, cfg: MWQConfig, stats: ColumnStats, refits: int, pool=None,
                   weighting: str = "mse", windows: tuple[float, ...] = gptq.WINDOWS
                   ) -> tuple[MWQTensor, list[float], float]:
    """pack --calib's fit of one matrix: (tensor, squared error per level, signal). The native fit weighted by the
    column statistics and unweighted, each row from the one nearer on the sample's outputs (`pick_rows`); then,
    where the second moment was kept, the codes on those grids chosen by their outputs (d2moe.quantize.gptq,
    in C with `lib`) with each of `windows` for the lowest level. Each row keeps its nearest-cell codes unless
    one of those is clearly nearer on both halves of the sample (GPTQ can trade the top level for the lowest,
    BENCHMARKS.md §6.7). Both choices weigh the levels within JUDGED_SPAN bits of the lowest."""
    weighted = native.fit_sliced(lib, w, cfg, stats.weight, refits, pool, weighting=weighting)
    plain = native.fit_sliced(lib, w, cfg, None, refits, pool, weighting=weighting)
    cands = [plain.tensor, weighted.tensor]  # w stays in the source's dtype: its rows are read as float32, exactly
    judged = [i for i, b in enumerate(cfg.bits) if b - cfg.bits[0] <= JUDGED_SPAN]
    tensor, chosen = _pick_rows(cands, [output_errors(w, t, stats.sample, judged) for t in cands], judged)
    if stats.hessian is not None and tensor.alpha is None:
        grids, u = tensor.group_params(), gptq.inverse_factor(stats.hessian)
        gptqs = [replace(tensor, planes=gptq.nested_planes(w, u, *grids, cfg.bits, cfg.group_size, window, lib, pool))
                 for window in windows]
        # the nearest-cell tensor's errors are its rows' from the first choice: not computed again
        tensor, chosen = _pick_rows([tensor, *gptqs], [chosen, *(output_errors(w, t, stats.sample, judged) for t in gptqs)],
                                    judged)
    n = len(cfg.bits)
    return tensor, [float(v) for v in chosen[2 * n:].sum(1)], weighted.signal
