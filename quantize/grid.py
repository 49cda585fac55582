"""Uniform group grids: the clip search shared by the sliced MWQ fit and the dedicated RTN baseline.

A grid over one group of `group_size` weights is stored as (scale, offset) in float16:
    offset = lower edge of cell 0,  scale = the b1-bit cell width,
and its bk-bit codes q in [0, 2^bk) reconstruct at level b (b1 <= b <= bk) to the centre of
the b-bit cell holding them:  offset + scale * 2^-(b-b1) * ((q >> (bk-b)) + 0.5).
At b = bk that is exactly the grid point lo + step * q with lo = offset + step/2.

Shape letters: N = groups in a chunk (rows x groups per row), S = group size, C = candidates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from d2moe.errors import UsageError

# Scale factors of each group's [min, max] range (about its midpoint) tried by the clip search:
# a coarse sweep, then steps around each group's best (resolution 0.015 in 17 evaluations). Factors
# above 1 widen the grid so that a coarse level's outer cell centres can reach the extreme weights
# (K-quants' grids end on them): on a trained MoE that kept the large weights' gain and lowered
# perplexity at every level (BENCHMARKS.md §6.2).
COARSE_SHRINKS = (1.24, 1.16, 1.08) + tuple(1.0 - 0.06 * i for i in range(10))  # 1.24 ... 0.46
SHRINK_RANGE = (0.3, 1.3)
FINE_STEPS = (-0.03, 0.03, -0.015, 0.015)

# Elements per chunk: small enough that the search's temporaries stay in the CPU's L2 cache
# (measured 3x faster than 1M-element chunks), large enough to amortise per-op overhead.
CHUNK_ELEMS = 1 << 16

_FP16_MAX = 65504.0


def check_shape(shape: tuple[int, ...], group_size: int, what: str = "weight") -> tuple[int, int]:
    """(O, I) of a 2-D matrix whose columns split into whole groups and whole bytes, else UsageError."""
    if len(shape) != 2:
        raise UsageError(f"{what} of shape {tuple(shape)} is not a 2-D [out, in] matrix")
    rows, cols = shape
    if cols % 8:
        raise UsageError(f"{what} of shape {tuple(shape)}: {cols} input columns is not a multiple of 8 (bit-planes pack 8 columns per byte)")
    if group_size < 1 or cols % group_size:
        fits = [g for g in (128, 64, 32, 16, 8) if cols % g == 0]
        hint = f"use --group-size {fits[0]}" if fits else "pad the matrix"
        raise UsageError(f"{what} of shape {tuple(shape)}: {cols} input columns do not split into groups of {group_size}; {hint}")
    return rows, cols


def group_chunks(n_groups: int, group_size: int) -> list[tuple[int, int]]:
    step = max(1, CHUNK_ELEMS // group_size)
    return [(g0, min(n_groups, g0 + step)) for g0 in range(0, n_groups, step)]


def level_sq_errors(x: torch.Tensor, offset: torch.Tensor, step_bk: torch.Tensor, bk: int, levels: tuple[int, ...]) -> torch.Tensor:
    """Sum of squared reconstruction errors per group at each level: [L, N].

    x [N, S]; offset, step_bk [N] (float32). Codes at level b are floor((x - offset) / step_b)
    clamped to [0, 2^b), i.e. the top b bits of the bk-bit code, reconstructed at the cell centre.
    """
    inv = torch.where(step_bk > 0, 1.0 / step_bk, torch.zeros_like(step_bk)).unsqueeze(-1)  # [N, 1]
    u = (x - offset.unsqueeze(-1)).mul_(inv)  # [N, S] position in bk-bit cells
    errs = []
    for b in levels:
        t = u * 2.0 ** -(bk - b)  # position in b-bit cells
        q = t.floor().clamp_(0, 2**b - 1)
        e = t.sub_(q).sub_(0.5)  # offset from the cell centre, in cells
        errs.append(e.square_().sum(-1) * (step_bk * 2.0 ** (bk - b)).square())
    return torch.stack(errs)


def search_grid(x: torch.Tensor, bk: int, b1: int, levels: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip-search a bk-bit grid per group: float16 (scale [N], offset [N]).

    The objective is the mean over `levels` of log(MSE), so no level is sacrificed for another
    (with one level it is plain MSE). Candidates shrink [min, max] about its midpoint.
    """
    mn, mx = x.amin(-1), x.amax(-1)  # [N]
    mid, half = (mx + mn) * 0.5, (mx - mn) * 0.5
    n_codes = 2**bk - 1
    tiny = torch.finfo(torch.float32).tiny

    def objective(shrink: torch.Tensor) -> torch.Tensor:
        step = (2.0 * half * shrink) / n_codes
        offset = mid - half * shrink - step * 0.5
        return level_sq_errors(x, offset, step, bk, levels).add_(tiny).log_().mean(0)

    best_obj = torch.full_like(mn, float("inf"))
    best_shrink = torch.ones_like(mn)
    for shrink in COARSE_SHRINKS:
        best_obj, best_shrink = _keep_better(best_obj, best_shrink, objective, torch.full_like(mn, shrink))
    centre = best_shrink
    for delta in FINE_STEPS:
        shrink = (centre + delta).clamp_(*SHRINK_RANGE)
        best_obj, best_shrink = _keep_better(best_obj, best_shrink, objective, shrink)
        if delta > 0:  # refine around the best of the pass just done
            centre = best_shrink
    step = (2.0 * half * best_shrink) / n_codes
    return to_stored(x, mid - half * best_shrink - step * 0.5, step, bk, b1)


def _keep_better(
    best_obj: torch.Tensor, best_shrink: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor], shrink: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, keep `shrink` where its objective beats the best so far."""
    obj = objective(shrink)
    better = obj < best_obj
    return torch.where(better, obj, best_obj), torch.where(better, shrink, best_shrink)


def to_stored(x: torch.Tensor, offset: torch.Tensor, step_bk: torch.Tensor, bk: int, b1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round a grid to its stored float16 (scale, offset); a group too flat for float16 keeps its mean."""
    scale = (step_bk * 2.0 ** (bk - b1)).to(torch.float16)
    flat = scale == 0
    offset = torch.where(flat, x.mean(-1), offset).to(torch.float16)
    if not (torch.isfinite(scale).all() and torch.isfinite(offset).all()):
        worst = float(x.abs().max())
        raise UsageError(f"weights reach {worst:g}, beyond float16 range ({_FP16_MAX:g}) of the stored scales; rescale the matrix")
    return scale, offset


def grid_codes(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bk: int, b1: int) -> torch.Tensor:
    """bk-bit codes uint8 [N, S] of x [N, S] on the STORED float16 grid, so codes and parameters agree."""
    step = scale.float() * 2.0 ** -(bk - b1)
    inv = torch.where(step > 0, 1.0 / step, torch.zeros_like(step)).unsqueeze(-1)
    u = (x - offset.float().unsqueeze(-1)).mul_(inv)
    return u.floor_().clamp_(0, 2**bk - 1).to(torch.uint8)


def _check_finite(w: torch.Tensor, what: str) -> None:
    if not torch.isfinite(w).all():
        raise UsageError(f"{what} holds NaN or infinite values; quantize a finite matrix")


def rtn_codes(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dedicated (non-nested) asymmetric group-wise quantization with per-group clip search.

    Returns codes uint8 [O, I] in [0, 2^bits), scale float16 [O, G] and offset float16 [O, G] with
    w ~ offset + scale * (codes + 0.5), the same cell-centre convention as an MWQ tensor.
    """
    if not 1 <= bits <= 8:
        raise UsageError(f"bits {bits} must be within 1..8")
    rows, cols = check_shape(tuple(w.shape), group_size)
    _check_finite(w, "weight")
    groups = w.reshape(-1, group_size)  # [O*G, S]
    codes = torch.empty(groups.shape, dtype=torch.uint8)
    scale = torch.empty(groups.shape[0], dtype=torch.float16)
    offset = torch.empty(groups.shape[0], dtype=torch.float16)
    for g0, g1 in group_chunks(groups.shape[0], group_size):
        x = groups[g0:g1].float()
        s16, o16 = search_grid(x, bits, bits, (bits,))
        codes[g0:g1] = grid_codes(x, s16, o16, bits, bits)
        scale[g0:g1] = s16
        offset[g0:g1] = o16
    shape_g = (rows, cols // group_size)
    return codes.view(rows, cols), scale.view(shape_g), offset.view(shape_g)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dedicated RTN baseline, dequantized: [O, I] in `dtype` (the nesting tax is MWQ vs this)."""
    codes, scale, offset = rtn_codes(w, bits, group_size)
    rows, cols = codes.shape
    q = codes.view(rows, -1, group_size).float().add_(0.5)
    out = q.mul_(scale.float().unsqueeze(-1)).add_(offset.float().unsqueeze(-1))
    return out.view(rows, cols).to(dtype)
