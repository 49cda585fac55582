"""The manifest's checksum: the fast crc32 gives zlib's values, whole, chained and on views."""

from __future__ import annotations

import os
import zlib

from d2moe.quantize.format.crc import crc32


def test_crc32_equals_zlib_on_odd_lengths_offsets_and_chains():
    data = os.urandom(3 << 20)
    view = memoryview(data)
    for lo, hi in [(0, 0), (0, 1), (1, 4096), (7, 1 << 20), (4095, len(data))]:
        assert crc32(view[lo:hi]) == zlib.crc32(view[lo:hi])
    mid = 1_000_003
    assert crc32(view[mid:], crc32(view[:mid])) == zlib.crc32(data)


def test_fast_crc32_is_installed():
    """The dependency the runtime's read path relies on (zlib alone is 8x slower per miss)."""
    assert crc32.__module__.startswith("zlib_ng")
