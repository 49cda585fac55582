"""Bit-plane packing: integer codes <-> one packed uint8 plane per bit.

Plane p holds bit (nbits - 1 - p) of every code (most significant first); within a plane row,
column c is bit c % 8 of byte c // 8 (little-endian). Level b of an MWQ tensor is exactly its
first b planes, which is what makes the storage nest.
"""

from __future__ import annotations

import torch

from d2moe.errors import UsageError
from d2moe.kernels.reference import codes_from_planes, unpack_plane

# Weight of column c % 8 within its byte.
_BYTE_WEIGHTS = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)


def pack_plane(bits: torch.Tensor) -> torch.Tensor:
    """0/1 (or bool) [..., I] -> uint8 [..., I // 8]; I must be a multiple of 8."""
    cols = bits.shape[-1]
    if cols % 8:
        raise UsageError(f"cannot pack {cols} columns into bytes: the column count must be a multiple of 8")
    grouped = bits.to(torch.uint8).reshape(*bits.shape[:-1], cols // 8, 8)
    # Each column lands on its own bit, so the byte sum never carries.
    return (grouped * _BYTE_WEIGHTS).sum(dim=-1, dtype=torch.uint8)


def pack_bits(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """uint8 codes [O, I] in [0, 2^nbits) -> uint8 planes [nbits, O, I // 8], MSB first."""
    if not 1 <= nbits <= 8:
        raise UsageError(f"cannot pack {nbits}-bit codes: bit-width must be within 1..8")
    if codes.dtype != torch.uint8:
        raise UsageError(f"codes must be uint8 to pack, got {codes.dtype}")
    if nbits < 8 and codes.numel() and int(codes.max()) >> nbits:
        raise UsageError(f"codes reach {int(codes.max())}, which does not fit in {nbits} bits")
    return torch.stack([pack_plane((codes >> (nbits - 1 - p)) & 1) for p in range(nbits)])


def unpack_bits(planes: torch.Tensor) -> torch.Tensor:
    """uint8 planes [P, O, I // 8], MSB first -> uint8 codes [O, I] in [0, 2^P)."""
    if planes.dtype != torch.uint8 or planes.dim() != 3 or not 1 <= planes.shape[0] <= 8:
        raise UsageError(f"planes must be uint8 [P, O, I/8] with 1 <= P <= 8, got {planes.dtype} {tuple(planes.shape)}")
    return codes_from_planes(planes)


__all__ = ["pack_bits", "pack_plane", "unpack_bits", "unpack_plane"]
