"""crc32: the checksum every manifest entry carries (zlib's polynomial), at memory speed.

zlib-ng's crc32 folds with carry-less multiplies (PCLMUL/VPCLMUL on x86, the crc32 instructions on
Arm): an 88 MB Mixtral expert in 5 ms where zlib takes 40-80 ms, which had made every cache miss
wait on its check longer than on its read at 2 GB/s. Same values; zlib where the wheel is absent.
Both release the GIL, so the I/O threads check while the kernels compute.
"""

from __future__ import annotations

try:
    from zlib_ng.zlib_ng import crc32
except ImportError:  # no wheel for this platform: the standard library's (same values, slower)
    from zlib import crc32

__all__ = ["crc32"]
