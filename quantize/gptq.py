"""Nested codes chosen with GPTQ's error feedback (`pack --calib`): every level's outputs, not its weights, nearer.

Rounding each weight to its nearest cell minimises the weight error; what the model feels is the output error
||X (w - q)||^2 over the inputs X the matrix sees. GPTQ (Frantar et al., 2023) chooses the codes column by
column and moves the columns not yet chosen to cancel the error already made, through the inverse of the
inputs' second moment H = X^T X. In the nested format a code serves every level, so the choice runs once per
level, lowest first, on the grids the fit chose (they are not changed):

- level b1 chooses among the cells within WINDOW cells of the weight itself. Free to go anywhere, GPTQ's
  level b1 moves weights across cells that the levels above must then stay inside (their code's prefix);
  on tiny-k256 an unbounded level 4 lost what level 2 gained (BENCHMARKS.md §6.7);
- each level above starts again from the weights and chooses only the bits it adds (the children of the
  level below's cell), with its own feedback.

H is held as diagonal blocks of `block` columns (the whole matrix where that fits the calibration's memory):
feedback then stays inside a block, so blocks are solved side by side and memory is I x block per matrix.
With H = identity every choice is the nearest cell: the codes are the plain fit's, bit for bit.
"""

from __future__ import annotations

import torch

WINDOW = 0.25  # level b1 may leave the weight's own cell only for one within a quarter cell of the weight
DAMP = 0.01  # of H's mean diagonal, added to it: GPTQ's damping, keeps the inverse well conditioned
BLOCKS = (512, 256, 128, 64, 32)  # block sizes tried when the whole matrix's H does not fit
ROW_CHUNK = 256


def block_size(columns: int, matrices: int, budget_bytes: int) -> int:
    """The largest block (all columns, else one of BLOCKS dividing them) whose H for `matrices` inputs of
    `columns` columns fits budget_bytes in float32; 0 if not even the smallest does."""
    for b in (columns, *BLOCKS):
        if b <= columns and columns % b == 0 and matrices * columns * b * 4 <= budget_bytes:
            return b
    return 0


def second_moment(x: torch.Tensor, block: int) -> torch.Tensor:
    """Diagonal blocks of x^T x for inputs x [T, I]: float32 [I / block, block, block]."""
    v = x.float().view(x.shape[0], -1, block)
    return torch.einsum("tnb,tnc->nbc", v, v)


def inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of each block's damped inverse (GPTQ's U): float32 [nb, B, B]. A column no input
    touched gets a unit diagonal, so it is rounded to nearest and passes no error on."""
    h = h.double().clone()
    diag = h.diagonal(dim1=-2, dim2=-1)
    dead = diag <= 0
    diag[dead] = 1.0
    diag.add_(DAMP * diag.mean(-1, keepdim=True))
    inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inv, upper=True).float()


def nested_codes(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: tuple[int, ...],
                 group: int, window: float = WINDOW) -> torch.Tensor:
    """bk-bit codes uint8 [O, I] of w [O, I] on the grids (scale: level-b1 cell width, offset: cell 0's lower edge,
    [O, G]), chosen level by level with error feedback through H's diagonal blocks h [nb, B, B]. Rows are
    independent: they go ROW_CHUNK at a time (a few dozen MiB of temporaries at 14336 columns)."""
    u = inverse_factor(h)
    codes = torch.empty(w.shape, dtype=torch.uint8)
    for r0 in range(0, w.shape[0], ROW_CHUNK):
        r1 = min(w.shape[0], r0 + ROW_CHUNK)
        codes[r0:r1] = _rows_codes(w[r0:r1], u, scale[r0:r1], offset[r0:r1], bits, group, window)
    return codes


def _rows_codes(w: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: tuple[int, ...],
                group: int, window: float) -> torch.Tensor:
    rows, cols = w.shape
    nb, block = u.shape[0], u.shape[1]
    b1 = bits[0]

    def per_column(v: torch.Tensor) -> torch.Tensor:  # [O, G] -> [O, nb, B]
        return v.float().repeat_interleave(group, dim=1).view(rows, nb, block)

    cell1, off = per_column(scale), per_column(offset)
    w3 = w.float().view(rows, nb, block)
    diag = u.diagonal(dim1=-2, dim2=-1)  # [nb, B]
    prefix, prev = None, b1
    for b in bits:
        cell = cell1 * 2.0 ** (b1 - b)
        inv = torch.where(cell > 0, 1.0 / torch.where(cell > 0, cell, 1.0), 0.0)
        if prefix is None:  # cells within `window` cells of the weight
            lo = ((w3 - window * cell - off) * inv).floor_().clamp_(0, 2**b - 1)
            hi = ((w3 + window * cell - off) * inv).floor_().clamp_(0, 2**b - 1)
        else:  # the children of the level below's cell
            lo = prefix * 2 ** (b - prev)
            hi = lo + (2 ** (b - prev) - 1)
        work, codes = w3.clone(), torch.empty_like(w3)
        for j in range(block):
            x = work[:, :, j]
            q = torch.minimum(torch.maximum(((x - off[:, :, j]) * inv[:, :, j]).floor_(), lo[:, :, j]), hi[:, :, j])
            codes[:, :, j] = q
            e = (x - (off[:, :, j] + cell[:, :, j] * (q + 0.5))) / diag[:, j]
            work[:, :, j + 1:] -= e.unsqueeze(-1) * u[:, j, j + 1:]
        prefix, prev = codes, b
    return prefix.view(rows, cols).to(torch.uint8)
