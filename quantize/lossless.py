"""Lossless coding of float weights (the ZipMoE tier): exponents entropy-coded, sign and mantissa kept raw.

A float's exponent byte carries ~2-3 bits of entropy in trained and Gaussian weights; its sign and
mantissa bits are close to random. `encode_bytes` splits each weight into the exponent byte (one
stream, entropy-coded by a library codec) and the rest (sign + mantissa, stored as is), in chunks
coded independently so that `decode_into` can decode chunks on several threads (zstandard and numpy
release the GIL). Decoding gives back the input bytes exactly.

Widths: 2 (bfloat16: exponent = bits 7..14, rest = sign bit + 7 mantissa bits in one byte) and 4
(float32: exponent = bits 23..30, rest = sign + 23 mantissa bits in 3 bytes). Any 16/32-bit data
round-trips (a float16's "exponent byte" is just its high bits; it compresses less).

Blob = header (magic, version, width, codec, weights, chunk weights, chunks) | per chunk: exponent
length u32 | exponent bytes | rest bytes. Codecs: "zstd" (zstandard; its literals are Huffman
coded), "brotli", "none" (no split, no coding: the raw weights, for uncompressed offloading). Choice measured in BENCHMARKS.md §10.4 (scripts/bench_codecs.py).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np

from d2moe.errors import DependencyError, FormatError, UsageError

MAGIC = b"D2LL"
VERSION = 1
CODECS = ("zstd", "brotli", "none")
CODEC_IDS = {name: i for i, name in enumerate(CODECS)}
CHUNK_WEIGHTS = 1 << 20  # weights per independently coded chunk (2 MiB of bf16): the unit of parallel decoding
ZSTD_LEVEL = 3
_HEADER = struct.Struct("<4sBBBxQII")  # magic, version, width, codec, weights, chunk weights, chunks
_UINT = {2: np.uint16, 4: np.uint32}


def _codec(codec: str) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
    if codec == "zstd":
        import zstandard

        return (lambda b: zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(b),
                lambda b: zstandard.ZstdDecompressor().decompress(b))
    if codec == "brotli":
        try:
            import brotli
        except ImportError:
            raise DependencyError("the brotli lossless codec needs `pip install brotli` (or use the default zstd)") from None

        return (lambda b: brotli.compress(b, quality=5)), brotli.decompress
    if codec == "none":
        return bytes, bytes
    raise UsageError(f"lossless codec {codec!r} is unknown: use one of {', '.join(CODECS)}")


def split(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weights as unsigned ints [N] -> (exponent bytes [N], rest bytes [N * (width - 1)])."""
    if x.dtype == np.uint16:
        exp = ((x >> 7) & 0xFF).astype(np.uint8)
        rest = (((x >> 8) & 0x80) | (x & 0x7F)).astype(np.uint8)
        return exp, rest
    exp = ((x >> 23) & 0xFF).astype(np.uint8)
    rest = ((x & 0x7FFFFF) | ((x >> 8) & 0x800000)).astype(np.uint32)
    return exp, rest.view(np.uint8).reshape(-1, 4)[:, :3].reshape(-1)


def join(exp: np.ndarray, rest: np.ndarray, out: np.ndarray) -> None:
    """Inverse of `split`, written into `out` (unsigned ints [N])."""
    if out.dtype == np.uint16:  # byte arithmetic: high byte = sign | exp >> 1, low byte = exp << 7 | mantissa
        pair = out.view(np.uint8).reshape(-1, 2)
        t = np.right_shift(exp, 1)
        t |= rest & 0x80
        pair[:, 1] = t
        np.left_shift(exp, 7, out=t)
        t |= rest & 0x7F
        pair[:, 0] = t
        return
    r3 = np.zeros((len(exp), 4), dtype=np.uint8)
    r3[:, :3] = rest.reshape(-1, 3)
    r = r3.reshape(-1).view(np.uint32)
    np.bitwise_or((r & 0x800000) << 8, exp.astype(np.uint32) << 23, out=out)
    out |= r & 0x7FFFFF


def encode_bytes(raw, width: int, codec: str = "zstd", chunk_weights: int = CHUNK_WEIGHTS) -> bytes:
    """The blob of `raw` (little-endian weights of `width` bytes each)."""
    if width not in _UINT:
        raise UsageError(f"lossless coding handles 2- and 4-byte weights, not {width}-byte ones")
    view = memoryview(raw).cast("B")
    if view.nbytes % width:
        raise UsageError(f"{view.nbytes} bytes are not a whole number of {width}-byte weights")
    x = np.frombuffer(view, dtype=_UINT[width])
    compress, _ = _codec(codec)
    parts = []
    n_chunks = -(-len(x) // chunk_weights) if len(x) else 0
    for c in range(n_chunks):
        piece = x[c * chunk_weights:(c + 1) * chunk_weights]
        if codec == "none":  # no split either: the raw weights (uncompressed offloading, a plain copy to decode)
            parts += [struct.pack("<I", 0), piece.tobytes()]
            continue
        exp, rest = split(piece)
        coded = compress(exp.tobytes())
        parts += [struct.pack("<I", len(coded)), coded, rest.tobytes()]
    header = _HEADER.pack(MAGIC, VERSION, width, CODEC_IDS[codec], len(x), chunk_weights, n_chunks)
    return header + b"".join(parts)


def header(blob) -> tuple[int, str, int, int, int]:
    """(width, codec, weights, chunk weights, chunks) of a blob; FormatError when it is not one."""
    view = memoryview(blob).cast("B")
    if view.nbytes < _HEADER.size:
        raise FormatError(f"lossless blob of {view.nbytes} bytes is shorter than its header")
    magic, version, width, codec, n, chunk, chunks = _HEADER.unpack_from(view)
    if magic != MAGIC or version != VERSION or width not in _UINT or codec >= len(CODECS):
        raise FormatError(f"not a d2moe lossless blob (magic {magic!r}, version {version}, width {width}, codec {codec})")
    if chunk < 1 or chunks != -(-n // chunk):
        raise FormatError(f"lossless blob: {chunks} chunks of {chunk} weights cannot hold {n} weights")
    return width, CODECS[codec], n, chunk, chunks


def decode_into(blob, out, pool: Executor | None = None) -> None:
    """Decode `blob` into the writable buffer `out` (exactly the raw bytes), chunks on `pool`'s threads."""
    width, codec, n, chunk, chunks = header(blob)
    view = memoryview(blob).cast("B")
    dst = np.frombuffer(out, dtype=_UINT[width])
    if len(dst) != n:
        raise FormatError(f"lossless blob holds {n} weights, the buffer {len(dst)}")
    _, decompress = _codec(codec)
    jobs, pos = [], _HEADER.size
    rest_width = width if codec == "none" else width - 1
    for c in range(chunks):
        m = min(chunk, n - c * chunk)
        if pos + 4 > view.nbytes:
            raise FormatError("lossless blob is truncated")
        (elen,) = struct.unpack_from("<I", view, pos)
        end = pos + 4 + elen + m * rest_width
        if end > view.nbytes:
            raise FormatError("lossless blob is truncated")
        jobs.append((view[pos + 4:pos + 4 + elen], view[pos + 4 + elen:end], c * chunk, m))
        pos = end

    def one(job) -> None:
        coded, rest, start, m = job
        if codec == "none":
            dst[start:start + m] = np.frombuffer(rest, dtype=dst.dtype)
            return
        exp = np.frombuffer(decompress(coded), dtype=np.uint8)
        if len(exp) != m:
            raise FormatError(f"lossless blob chunk decodes to {len(exp)} exponents, expected {m}")
        join(exp, np.frombuffer(rest, dtype=np.uint8), dst[start:start + m])

    if pool is None or len(jobs) < 2:
        for job in jobs:
            one(job)
    else:
        for f in [pool.submit(one, job) for job in jobs]:
            f.result()


def decode_bytes(blob, pool: Executor | None = None) -> bytearray:
    width, _, n, _, _ = header(blob)
    out = bytearray(n * width)
    decode_into(blob, out, pool)
    return out
