"""Pure-torch reference for MWQ dequantization: unpack bit-planes, rebuild the weight.

This is the CPU path at inference and the oracle every CuPy kernel is tested against.
Shape letters: O = rows, I = columns, G = I // group_size groups per row, P = bit-planes.

Reconstruction at level b (see d2moe.quantize.types.MWQTensor), per group:
    w = offset + scale * (q_b1 + 0.5) + sum_{j=1..b-b1} alpha_j * (2 * plane_{b1+j} - 1)
For the "sliced" scheme (alpha_j = scale * 2**-(j+1)) that sum telescopes to the centre of the
b-bit cell holding the b-bit code q_b read from the first b planes:
    w = offset + (scale * 2**-(b-b1)) * (q_b + 0.5)
which is what `dequantize_sliced` computes (same value, one pass instead of b-b1). Both compute
in float32 in a fixed order (documented on each), so results are deterministic; a kernel is
compared to them within float32 rounding, not bit for bit.
Both functions read only `planes[:level]` and `alpha[:level-b1]`, so a truncated tensor
dequantizes to the same bits as the full one.
"""

from __future__ import annotations

import torch

# Bits of each byte value, column order: _BYTE_BITS[v, k] = bit k of v (column 8*byte + k).
_BYTE_BITS = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1).to(torch.uint8)  # [256, 8]
_BYTE_BITS_F32 = _BYTE_BITS.float()

# Elements per chunk when rebuilding: keeps the temporaries in cache (measured on a 2-core CPU).
_ROW_CHUNK_ELEMS = 1 << 17


def _lookup(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Per-byte table lookup: [..., I/8] bytes -> [..., I] entries (embedding is the fast gather)."""
    rows = plane.reshape(-1, plane.shape[-1]).int()
    if table.device != plane.device:  # the reference also runs on a GPU (the CUDA kernels' oracle there)
        table = table.to(plane.device)
    out = torch.nn.functional.embedding(rows, table)  # [R, I/8, 8]
    return out.reshape(*plane.shape[:-1], plane.shape[-1] * 8)


def unpack_plane(plane: torch.Tensor) -> torch.Tensor:
    """uint8 [..., I // 8] packed bits -> uint8 [..., I] of 0/1."""
    return _lookup(plane, _BYTE_BITS)


def codes_from_planes(planes: torch.Tensor) -> torch.Tensor:
    """uint8 [P, O, I // 8] planes, most significant first -> uint8 [O, I] codes in [0, 2^P)."""
    n = planes.shape[0]
    codes = _lookup(planes[0], _BYTE_BITS << (n - 1))
    for p in range(1, n):
        codes |= _lookup(planes[p], _BYTE_BITS << (n - 1 - p))
    return codes


def _row_chunks(rows: int, cols: int) -> list[tuple[int, int]]:
    step = max(1, _ROW_CHUNK_ELEMS // max(cols, 1))
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def dequantize_sliced(
    scale: torch.Tensor,  # f16 [O, G]
    offset: torch.Tensor,  # f16 [O, G]
    planes: torch.Tensor,  # u8 [>=level, O, I/8]
    b1: int,
    level: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Tied-magnitude reconstruction at `level`: the centre of the level-bit cell.

    Computed in float32 as (offset + step/2) + step * q_level with step = scale * 2^-(level-b1).
    """
    rows, groups = scale.shape
    cols = groups * group_size
    out = torch.empty(rows, cols, dtype=torch.float32, device=scale.device)
    step_all = scale.float().mul_(2.0 ** -(level - b1))  # [O, G] exact power-of-two rescale
    base_all = step_all * 0.5 + offset.float()  # [O, G] centre of cell 0
    for r0, r1 in _row_chunks(rows, cols):
        n = r1 - r0
        codes = codes_from_planes(planes[:level, r0:r1]).view(n, groups, group_size)
        torch.addcmul(base_all[r0:r1].unsqueeze(-1), codes.float(), step_all[r0:r1].unsqueeze(-1),
                      out=out[r0:r1].view(n, groups, group_size))
    return out if dtype == torch.float32 else out.to(dtype)


def dequantize_residual(
    scale: torch.Tensor,  # f16 [O, G]
    offset: torch.Tensor,  # f16 [O, G]
    planes: torch.Tensor,  # u8 [>=level, O, I/8]
    alpha: torch.Tensor | None,  # f16 [>=level-b1, O, G]
    b1: int,
    level: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Fitted-magnitude reconstruction: base cell centre plus one signed alpha per extra plane.

    Computed in float32 as (offset + scale/2 - sum_j alpha_j) + scale * q_b1 + sum_j 2 alpha_j bit_j,
    the formula's value with each +-alpha_j folded into a 0/2*alpha_j step on a lowered base.
    """
    rows, groups = scale.shape
    cols = groups * group_size
    depth = level - b1
    out = torch.empty(rows, cols, dtype=torch.float32, device=scale.device)
    scale_all = scale.float()  # [O, G]
    alpha_all = alpha[:depth].float() if depth else scale_all.new_zeros(0, rows, groups)  # [D, O, G]
    base_all = scale_all * 0.5 + offset.float() - alpha_all.sum(0)  # [O, G]
    twice_alpha = alpha_all * 2.0
    for r0, r1 in _row_chunks(rows, cols):
        n = r1 - r0
        w = out[r0:r1].view(n, groups, group_size)
        codes = codes_from_planes(planes[:b1, r0:r1]).view(n, groups, group_size)
        torch.addcmul(base_all[r0:r1].unsqueeze(-1), codes.float(), scale_all[r0:r1].unsqueeze(-1), out=w)
        for j in range(depth):
            bits = _lookup(planes[b1 + j, r0:r1], _BYTE_BITS_F32).view(n, groups, group_size)
            w.addcmul_(bits, twice_alpha[j, r0:r1].unsqueeze(-1))
    return out if dtype == torch.float32 else out.to(dtype)


def dequantize_reference(
    scale: torch.Tensor,
    offset: torch.Tensor,
    planes: torch.Tensor,
    alpha: torch.Tensor | None,
    b1: int,
    level: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rebuild the [O, I] weight at `level` (alpha None = sliced scheme)."""
    if alpha is None:
        return dequantize_sliced(scale, offset, planes, b1, level, group_size, dtype)
    return dequantize_residual(scale, offset, planes, alpha, b1, level, group_size, dtype)
