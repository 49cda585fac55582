"""Bit-plane packing: exact round trips and the documented byte layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.errors import UsageError
from d2moe.quantize import pack_bits, unpack_bits
from d2moe.quantize.bitplanes import pack_plane, unpack_plane


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 9),
    col_bytes=st.integers(1, 12),
    nbits=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip_bit_for_bit(rows: int, col_bytes: int, nbits: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**nbits, (rows, col_bytes * 8), generator=gen, dtype=torch.int32).to(torch.uint8)
    planes = pack_bits(codes, nbits)
    assert planes.dtype == torch.uint8 and planes.shape == (nbits, rows, col_bytes)
    assert torch.equal(unpack_bits(planes), codes)


@settings(max_examples=30, deadline=None)
@given(nbits=st.integers(2, 8), keep=st.integers(1, 7), seed=st.integers(0, 2**31 - 1))
def test_leading_planes_are_the_top_bits(nbits: int, keep: int, seed: int) -> None:
    """The first b planes alone decode to the top b bits of every code: what makes levels nest."""
    keep = min(keep, nbits)
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**nbits, (3, 16), generator=gen, dtype=torch.int32).to(torch.uint8)
    assert torch.equal(unpack_bits(pack_bits(codes, nbits)[:keep]), codes >> (nbits - keep))


def test_layout_is_little_endian_columns_msb_first_planes() -> None:
    codes = torch.zeros(1, 16, dtype=torch.uint8)
    codes[0, 0] = 0b10  # column 0: high plane 1, low plane 0
    codes[0, 9] = 0b01  # column 9: byte 1, bit 1 of the low plane
    codes[0, 7] = 0b11  # column 7: bit 7 of byte 0 in both planes
    planes = pack_bits(codes, 2)
    assert planes[0, 0].tolist() == [0b1000_0001, 0]
    assert planes[1, 0].tolist() == [0b1000_0000, 0b0000_0010]


def test_pack_plane_round_trip_and_bool_input() -> None:
    bits = torch.rand(4, 7, 24) > 0.5
    packed = pack_plane(bits)
    assert packed.shape == (4, 7, 3)
    assert torch.equal(unpack_plane(packed), bits.to(torch.uint8))


@pytest.mark.parametrize(
    ("codes", "nbits", "match"),
    [
        (torch.full((2, 8), 4, dtype=torch.uint8), 2, "does not fit in 2 bits"),
        (torch.zeros(2, 8, dtype=torch.int64), 2, "must be uint8"),
        (torch.zeros(2, 12, dtype=torch.uint8), 2, "multiple of 8"),
        (torch.zeros(2, 8, dtype=torch.uint8), 9, "within 1..8"),
    ],
)
def test_pack_rejects_bad_input(codes: torch.Tensor, nbits: int, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        pack_bits(codes, nbits)


def test_unpack_rejects_bad_planes() -> None:
    with pytest.raises(UsageError, match="planes must be uint8"):
        unpack_bits(torch.zeros(2, 8, dtype=torch.uint8))
