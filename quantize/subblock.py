"""Scheme "subblock": each group's grid parameters stored as a 4-bit code pair against its super-block.

K-quants' sub-block scales brought into the nested grid (Q2_K's form). Per super-block of SUPER_COLS = 256
columns of a row: float16 (d, dmin); per group of `group_size` columns: one byte, scale code s (low nibble)
and offset code k (high nibble):
    scale  = d * s        the group's level-b1 cell width (MWQTensor's `scale` of the sliced scheme)
    offset = -dmin * k    the lower edge of its cell 0 (at most 0, as Q2_K's minimum)
d and dmin carry at most 7 significant bits (`round_param`), so both products are exact in float16 and in
float32: the kernels compute them in registers (no rounding step) and every reader gets the same grid.
Levels read the top bits of one bk-bit code per weight, as in the sliced scheme.

Why: one grid per small group is what a low level needs, and it must be chosen for that level (the
grid is fitted for level b1; the levels above refine inside its cells). At 32 columns the parameters
cost 8/32 + 32/256 = 0.375 bits per weight, against 0.5 for float16 (scale, offset) per 64 columns.
BENCHMARKS.md §6.3 has the measurements behind each choice, on two trained MoEs.

Shape letters: O rows, G groups per row, S = ceil(G / (256 / group_size)) super-blocks per row.
"""

from __future__ import annotations

import torch

from d2moe.quantize.grid import check_shape, grid_codes, search_grid

SUPER_COLS = 256
CODE_MAX = 15  # 4-bit codes
SUPER_PARAMS = 2  # d, dmin
PARAM_BITS = 7  # significant bits of d and dmin: times a 4-bit code, 11 bits (float16's precision)



def groups_per_super(group_size: int) -> int:
    return SUPER_COLS // group_size


def n_supers(groups: int, group_size: int) -> int:
    return -(-groups // groups_per_super(group_size))


def round_param(x: torch.Tensor) -> torch.Tensor:
    """Non-negative float32 -> float16 holding the nearest value of PARAM_BITS significant bits (and a multiple of
    2^-24, float16's finest step), ties to even: times any 4-bit code it is exact in float16."""
    m, e = torch.frexp(x.float())  # x = m 2^e, 0.5 <= m < 1
    v = torch.ldexp(torch.round(m * 2**PARAM_BITS), e - PARAM_BITS)
    return torch.where(v < 2.0**-14, torch.round(v * 2.0**24) * 2.0**-24, v).half()


def expand(codes: torch.Tensor, supers: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 codes [O, G] and float16 super-block parameters [O, S, 2] -> float16 (scale, offset) [O, G]."""
    g = codes.shape[-1]
    at = torch.arange(g, device=codes.device) // groups_per_super(group_size)
    s = supers.float()[..., at, :]  # [O, G, 2]
    c = codes.to(torch.int32)
    return (s[..., 0] * (c & 15).float()).half(), (-(s[..., 1] * (c >> 4).float())).half()


def first_level_error(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, b1: int,
                      weight: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error [O, G] of groups x [O, G, S] read at level b1 on float16 grids (scale = its cell width,
    offset = cell 0's lower edge): every weight at the centre of its clamped cell (offset for a zero scale)."""
    cell, off = scale.float().unsqueeze(-1), offset.float().unsqueeze(-1)
    inv = torch.where(cell > 0, 1.0 / torch.where(cell > 0, cell, 1.0), 0.0)
    q = ((x - off) * inv).floor_().clamp_(0, 2**b1 - 1)
    e = (x - (off + cell * (q + 0.5))).square_()
    return (e if weight is None else e * weight).sum(-1)


def quantize_params(scale: torch.Tensor, offset: torch.Tensor, group_size: int, error) -> tuple[torch.Tensor, torch.Tensor]:
    """Fitted float (scale, offset) [O, G] -> (codes uint8 [O, G], super-block parameters float16 [O, S, 2]).

    Per super-block: d = round_param(max scale / 15), dmin = round_param(max(-offset, 0) / 15); each group
    then takes the best of its 4 neighbouring code pairs (floor and floor + 1 of each) by
    `error(scale16, offset16)` -> [O, G], the fit's own objective; ties keep the first tried.
    """
    rows, groups = scale.shape
    gps = groups_per_super(group_size)
    n_sup = n_supers(groups, group_size)
    pad = n_sup * gps - groups
    below = (-offset).clamp(min=0)  # how far cell 0 starts below zero

    def per_super_max(v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(v, (0, pad)).view(rows, n_sup, gps).amax(-1)

    d = round_param(per_super_max(scale) / CODE_MAX).float()  # [O, S]
    dmin = round_param(per_super_max(below) / CODE_MAX).float()
    at = torch.arange(groups) // gps
    d_g, dmin_g = d[:, at], dmin[:, at]  # [O, G]
    sc0 = torch.where(d_g > 0, (scale / torch.where(d_g > 0, d_g, 1.0)).floor(), 0.0)
    sc_min = torch.where(d_g > 0, 1.0, 0.0)  # a zero scale only where the whole super-block is flat
    k0 = torch.where(dmin_g > 0, (below / torch.where(dmin_g > 0, dmin_g, 1.0)).floor(), 0.0)
    supers = torch.stack([d, dmin], dim=-1).half()  # [O, S, 2], exact
    best_codes, best_err = None, None
    for ds, dk in ((0, 0), (0, 1), (1, 0), (1, 1)):
        sc = torch.maximum(sc0 + ds, sc_min).clamp(max=CODE_MAX).to(torch.uint8)
        k = (k0 + dk).clamp(0, CODE_MAX).to(torch.uint8)
        codes = sc | (k << 4)
        err = error(*expand(codes, supers, group_size))
        if best_codes is None:
            best_codes, best_err = codes, err
        else:
            better = err < best_err
            best_codes, best_err = torch.where(better, codes, best_codes), torch.where(better, err, best_err)
    return best_codes, supers


def fit(w: torch.Tensor, bits: tuple[int, ...], group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch fit (the native fit's specification, mse weighting, no refit) of a [O, I] matrix:
    bk-bit codes uint8 [O, I], parameter codes uint8 [O, G], super-block parameters float16 [O, S, 2].

    Each group's grid is clip-searched for level b1 alone (grid.search_grid with one level), its
    parameters quantized per super-block (`quantize_params`), and the codes taken on the stored grid.
    """
    rows, cols = check_shape(tuple(w.shape), group_size)
    b1, bk = bits[0], bits[-1]
    x = w.detach().float().reshape(rows, cols // group_size, group_size)
    scale, offset = search_grid(x.reshape(-1, group_size), bk, b1, (b1,))
    scale, offset = scale.float().view(rows, -1), offset.float().view(rows, -1)

    def error(s16: torch.Tensor, o16: torch.Tensor) -> torch.Tensor:
        return first_level_error(x, s16, o16, b1)

    pcodes, supers = quantize_params(scale, offset, group_size, error)
    s16, o16 = expand(pcodes, supers, group_size)
    codes = grid_codes(x.reshape(-1, group_size), s16.reshape(-1), o16.reshape(-1), bk, b1)
    return codes.view(rows, cols), pcodes, supers
