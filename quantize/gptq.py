"""Nested codes chosen with GPTQ's error feedback (`pack --calib`): every level's outputs, not its weights, nearer.

Rounding each weight to its nearest cell minimises the weight error; what the model feels is the output error
||X (w - q)||^2 over the inputs X the matrix sees. GPTQ (Frantar et al., 2023) chooses the codes column by
column and moves the columns not yet chosen to cancel the error already made, through the inverse of the
inputs' second moment H = X^T X. In the nested format a code serves every level, so the choice runs once per
level, lowest first, on the grids the fit chose (they are not changed):

- level b1 chooses among the cells within `window` cells of the weight itself. Free to go anywhere, GPTQ's
  level b1 moves weights across cells that the levels above must then stay inside (their code's prefix), and
  the top level's outputs get worse than plain rounding's (BENCHMARKS.md §6.7). A wide window helps level b1,
  a narrow one the levels above: pack tries WINDOWS, and each row keeps its nearest-cell codes unless one of
  them is clearly nearer on a sample of the inputs (calib.py);
- each level above starts again from the weights and chooses only the bits it adds (the children of the
  level below's cell), with its own feedback.

H is held as diagonal blocks of `block` columns (the whole matrix where that fits the calibration's memory):
feedback then stays inside a block, so blocks are solved side by side and memory is I x block per matrix.
With H = identity every choice is the nearest cell: the codes are the plain fit's, bit for bit.

The torch version here is the specification and the fallback; where the fit library is built, pack runs its C
version (quantize/native/gptq.c: the same choices, the feedback summed in another order; 3x faster on one thread
than this on two, BENCHMARKS.md §6.8).
"""

from __future__ import annotations

import ctypes

import torch

from d2moe.quantize.bitplanes import pack_bits

WINDOW = 0.25  # level b1 may leave the weight's own cell only for one within a quarter cell of the weight
WINDOWS = (0.25, 0.1)  # pack --calib tries both, beside the nearest-cell codes, and keeps the nearest per row (calib.py)
DAMP = 0.01  # of H's mean diagonal, added to it: GPTQ's damping, keeps the inverse well conditioned
BLOCKS = (512, 256, 128, 64, 32)  # block sizes tried when the whole matrix's H does not fit
CHUNK_ELEMS = 1 << 22  # weights per row chunk
INVERSE_BYTES = 16 << 20  # float64 bytes of the second-moment blocks inverse_factor takes at once
ROWS_PER_TASK = 64  # rows per task of the C version (its tiles are 16 rows)
LAZY = 32  # columns chosen one by one before the rest of the block is updated at once


def block_size(columns: int, matrices: int, budget_bytes: int) -> int:
    """The largest block (all columns, else one of BLOCKS dividing them) whose H for `matrices` inputs of
    `columns` columns fits budget_bytes in float32; 0 if not even the smallest does."""
    for b in (columns, *BLOCKS):
        if b <= columns and columns % b == 0 and matrices * columns * b * 4 <= budget_bytes:
            return b
    return 0


def second_moment(x: torch.Tensor, block: int) -> torch.Tensor:
    """Diagonal blocks of x^T x for inputs x [T, I]: float32 [I / block, block, block]."""
    moment = torch.zeros(x.shape[1] // block, block, block)
    add_second_moment(moment, x)
    return moment


def add_second_moment(moment: torch.Tensor, x: torch.Tensor) -> None:
    """moment [I / B, B, B] += the diagonal blocks of x^T x for inputs x [T, I], in place (the calibration adds
    its inputs a few hundred at a time without a temporary of the blocks' size)."""
    v = x.float().view(x.shape[0], moment.shape[0], moment.shape[1])
    moment.baddbmm_(v.permute(1, 2, 0), v.permute(1, 0, 2))


def inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of each block's damped inverse, U^T U = H^-1 (GPTQ's U): float32 [nb, B, B]. A column
    no input touched gets a unit diagonal, so it is rounded to nearest and passes no error on.

    With P the reversal of the columns and P H P = L L^T, U = P L^-1 P: one factorisation and one triangular solve
    (not a factorisation, an inverse and a second factorisation). Blocks go a few at a time: whole, the float64
    temporaries of a Mixtral down matrix's 28 blocks of 512 were 0.25 GiB of a calibrated fit's peak."""
    out = torch.empty(h.shape, dtype=torch.float32)
    step = max(1, INVERSE_BYTES // (8 * h.shape[-1] * h.shape[-1]))
    for b0 in range(0, h.shape[0], step):
        out[b0:b0 + step] = _inverse_factor(h[b0:b0 + step])
    return out


def _inverse_factor(h: torch.Tensor) -> torch.Tensor:
    h = h.double().clone()
    diag = h.diagonal(dim1=-2, dim2=-1)
    dead = diag <= 0
    diag[dead] = 1.0
    diag.add_(DAMP * diag.mean(-1, keepdim=True))
    low = torch.linalg.cholesky(h.flip(-1, -2))
    eye = torch.eye(h.shape[-1], dtype=h.dtype).expand_as(h)
    return torch.linalg.solve_triangular(low, eye, upper=False).flip(-1, -2).float()


def nested_codes(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: tuple[int, ...],
                 group: int, window: float = WINDOW, lib=None, pool=None) -> torch.Tensor:
    """bk-bit codes uint8 [O, I] of w [O, I] on the grids (scale: level-b1 cell width, offset: cell 0's lower edge,
    [O, G]), chosen level by level with error feedback through H's diagonal blocks h [nb, B, B]. With `lib`
    (d2moe.quantize.native.load()) the C version runs, its rows split over `pool`; else torch's, rows going
    CHUNK_ELEMS / I at a time (a few temporaries of 16 MiB)."""
    return _codes(w, inverse_factor(h), scale, offset, bits, group, window, lib, pool)


def nested_planes(w: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: tuple[int, ...],
                  group: int, window: float = WINDOW, lib=None, pool=None) -> torch.Tensor:
    """nested_codes as bit-planes uint8 [bits[-1], O, I / 8] (d2moe.quantize.bitplanes), from H's inverse factor
    u = inverse_factor(h), which every window of a matrix shares. With `lib` each C task packs the rows it chose."""
    bk = bits[-1]
    if lib is None:
        return pack_bits(_codes(w, u, scale, offset, bits, group, window, None, None), bk)
    planes = torch.empty(bk, w.shape[0], w.shape[1] // 8, dtype=torch.uint8)
    _codes(w, u, scale, offset, bits, group, window, lib, pool, planes)
    return planes


def _codes(w, u, scale, offset, bits, group, window, lib, pool, planes=None) -> torch.Tensor:
    codes = torch.empty(w.shape, dtype=torch.uint8)
    if lib is not None:
        return _native_codes(lib, w, u, scale, offset, bits, group, window, codes, pool, planes)
    step = max(1, CHUNK_ELEMS // w.shape[1])
    for r0 in range(0, w.shape[0], step):
        r1 = min(w.shape[0], r0 + step)
        codes[r0:r1] = _rows_codes(w[r0:r1], u, scale[r0:r1], offset[r0:r1], bits, group, window)
    return codes


def _native_codes(lib, w, u, scale, offset, bits, group, window, codes, pool, planes=None) -> torch.Tensor:
    from d2moe.quantize.native import DTYPES

    # the source's bfloat16/float16 read as it is (a float32 copy of a Mixtral matrix is 235 MB)
    w = w.contiguous() if w.dtype in DTYPES else w.float().contiguous()
    ut = u.transpose(1, 2).contiguous()  # the C side reads U's columns as rows
    cell1, off = scale.float().contiguous(), offset.float().contiguous()
    levels = (ctypes.c_int32 * len(bits))(*bits)
    rows, cols = w.shape
    if ut.shape[0] * ut.shape[1] != cols or scale.shape != (rows, cols // group) or offset.shape != scale.shape:
        raise ValueError(f"second moment blocks {tuple(ut.shape)} and grids {tuple(scale.shape)} do not fit a "
                         f"{rows}x{cols} matrix in groups of {group}")

    def run(r0: int) -> int:
        r1 = min(rows, r0 + ROWS_PER_TASK)
        failed = lib.d2q_gptq_rows(w.data_ptr(), DTYPES[w.dtype], cols, ut.data_ptr(), ut.shape[1], cell1.data_ptr(), off.data_ptr(),
                                   group, len(bits), levels, window, codes.data_ptr(), r0, r1)
        if planes is not None and not failed:
            lib.d2q_pack_rows(codes.data_ptr(), rows, cols, planes.shape[0], planes.data_ptr(), r0, r1)
        return failed

    starts = range(0, rows, ROWS_PER_TASK)
    if any(pool.map(run, starts) if pool is not None else map(run, starts)):
        raise MemoryError(f"native GPTQ: out of memory choosing the codes of a matrix of shape {tuple(w.shape)}")
    return codes


def _rows_codes(w: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: tuple[int, ...],
                group: int, window: float) -> torch.Tensor:
    """nested_codes on a few rows. Layout [B, O, nb]: position j of every block is one contiguous [O, nb] slice,
    so the blocks are solved side by side."""
    rows, cols = w.shape
    nb, block = u.shape[0], u.shape[1]
    b1 = bits[0]

    def by_position(v: torch.Tensor) -> torch.Tensor:  # [O, I] -> [B, O, nb]
        return v.reshape(rows, nb, block).permute(2, 0, 1).contiguous()

    cell1 = by_position(scale.float().repeat_interleave(group, dim=1))
    off = by_position(offset.float().repeat_interleave(group, dim=1))
    w3 = by_position(w.float())
    diag = u.diagonal(dim1=-2, dim2=-1).T.contiguous()  # [B, nb]
    ut = u.permute(1, 2, 0).contiguous()  # [B, B, nb]: ut[j, k] = u[:, j, k]
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
        for s0 in range(0, block, LAZY):  # GPTQ's lazy batches: the columns past this batch get one product
            s1 = min(block, s0 + LAZY)
            err = torch.empty(s1 - s0, rows, nb)
            for j in range(s0, s1):
                x = work[j]
                q = torch.minimum(torch.maximum(((x - off[j]) * inv[j]).floor_(), lo[j]), hi[j])
                codes[j] = q
                e = err[j - s0]
                torch.div(x - (off[j] + cell[j] * (q + 0.5)), diag[j], out=e)
                if j + 1 < s1:
                    work[j + 1:s1] -= e * ut[j, j + 1:s1].unsqueeze(1)
            if s1 < block:  # per block: [nb, O, L] @ [nb, L, rest]
                upd = torch.bmm(err.permute(2, 1, 0), u[:, s0:s1, s1:])  # [nb, O, rest]
                work[s1:] -= upd.permute(2, 1, 0)
        prefix, prev = codes, b
    return prefix.permute(1, 2, 0).reshape(rows, cols).to(torch.uint8)
