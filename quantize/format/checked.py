"""Reading whole files of a checkpoint with their crc32 checked on the bytes actually read.

`read_checked_safetensors` reads a safetensors file once, chunk by chunk, straight into the tensors'
own memory, and folds each chunk into the crc32 while it is still in the CPU cache: the check costs
one crc32 pass (no second read of the file, no copy of it), see BENCHMARKS.md "Reliability".
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from d2moe.errors import FormatError
from d2moe.quantize.format.constants import MANIFEST_NAME
from d2moe.quantize.format.crc import crc32
from d2moe.quantize.format.files import open_regular
from d2moe.quantize.format.safetensors_io import read_header

CHUNK = 4 << 20  # read and crc in 4 MiB pieces (stays in the last-level cache)

ST_TO_TORCH = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _corrupt(what: str) -> FormatError:
    return FormatError(f"{what}: crc32 differs from {MANIFEST_NAME} (corrupted file: re-pack or re-download)")


def _read_into(f, view: memoryview, crc: int, what: str) -> int:
    """Fill `view` from `f` chunk by chunk, returning the crc32 folded over it."""
    pos, n = 0, view.nbytes
    while pos < n:
        got = f.readinto(view[pos:min(n, pos + CHUNK)])
        if not got:
            raise FormatError(f"{what}: file shrank while it was read (truncated: re-pack or re-download)")
        crc = crc32(view[pos:pos + got], crc)
        pos += got
    return crc


SINK_CHUNK = 8 << 20  # bytes of rows handed to a sink at a time


def sink_rows(cols: int, dtype: torch.dtype) -> int:
    """Rows of a [rows, cols] tensor handed to a sink at a time: SINK_CHUNK bytes of them (at least one)."""
    return max(1, SINK_CHUNK // max(1, cols * dtype.itemsize))


def _read_rows_into(f, sink, shape: tuple[int, int], dtype: torch.dtype, crc: int, what: str) -> int:
    """Feed a [rows, cols] tensor to `sink` a chunk of rows at a time through one buffer; the crc32 folded over it."""
    rows, cols = shape
    step = sink_rows(cols, dtype)
    buf = torch.empty(min(rows, step), cols, dtype=dtype)
    for r0 in range(0, rows, step):
        chunk = buf[:min(step, rows - r0)]
        crc = _read_into(f, memoryview(chunk.view(-1).view(torch.uint8).numpy()).cast("B"), crc, what)
        sink.feed(chunk)
    sink.finish()
    return crc


def read_checked_safetensors(path: Path, expected_crc: int, what: str,
                             sink_for: Callable[[str, tuple[int, ...], torch.dtype], object] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of safetensors file `path` (framing validated first), FormatError unless the
    file's crc32 == `expected_crc`.

    `sink_for(name, shape, dtype)` may take a 2-D tensor instead: it returns an object whose `feed(rows)` is
    given the tensor SINK_CHUNK bytes of rows at a time, in order (one reused buffer), then `finish()`; the
    tensor is left out of the result and is never whole in memory. The crc32 still covers every byte, and
    is checked at the end: a sink must not let its work be used before this returns."""
    header = read_header(path, what)
    tensors: dict[str, torch.Tensor] = {}
    fd = open_regular(path, what)
    try:
        with open(fd, "rb", buffering=0) as f:
            head = f.read(header.data_start)
            if len(head) != header.data_start:
                raise FormatError(f"{what}: file shrank while it was read (truncated: re-pack or re-download)")
            crc = crc32(head)
            for name, info in header.tensors.items():  # file order, contiguous (read_header checked it)
                dtype = ST_TO_TORCH.get(info.dtype)
                if dtype is None:
                    raise FormatError(f"{what}: tensor {name!r} has dtype {info.dtype}, which d2moe does not load")
                sink = sink_for(name, tuple(info.shape), dtype) if sink_for and len(info.shape) == 2 and info.nbytes else None
                if sink is not None:
                    crc = _read_rows_into(f, sink, info.shape, dtype, crc, what)
                    continue
                t = torch.empty(info.shape, dtype=dtype)
                if info.nbytes:
                    crc = _read_into(f, memoryview(t.view(-1).view(torch.uint8).numpy()).cast("B"), crc, what)
                tensors[name] = t
            if f.read(1):
                raise FormatError(f"{what}: file grew while it was read (re-pack or re-download)")
    except OSError as exc:
        raise FormatError(f"{what}: cannot be read ({exc.strerror})") from None
    if crc != expected_crc:
        raise _corrupt(what)
    return tensors


def file_crc32_checked(path: Path, what: str) -> int:
    """crc32 of a whole regular file (FormatError for special files and read errors)."""
    fd = open_regular(path, what)
    crc = 0
    try:
        with open(fd, "rb", buffering=0) as f:
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            while got := f.readinto(buf):
                crc = crc32(view[:got], crc)
    except OSError as exc:
        raise FormatError(f"{what}: cannot be read ({exc.strerror})") from None
    return crc
