"""Safetensors framing, read and written by hand where d2moe needs more than the library gives.

- `read_header(path)`: parses and checks a safetensors file's framing before anything is trusted
  (header length bounded and inside the file, strict JSON without duplicate keys, dtypes and
  shapes typed, every tensor's byte count == elements x dtype size, tensors contiguous from the
  start of the data section to the end of the file: no gaps, no overlaps, no trailing bytes).
- `AlignedSafetensorsWriter`: streams tensors into a valid safetensors file whose header is
  space-padded so the data section starts at an `align`-byte file offset; tensors must be written
  in the declared order with exactly the declared sizes (a state machine, as gguf's writer).

File layout (safetensors): u64 little-endian N | N bytes of JSON header (may end in spaces) | data.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from d2moe.errors import FormatError
from d2moe.quantize.format.files import open_regular

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the cap safetensors itself enforces
MAX_RANK = 8

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
TORCH_TO_ST = {
    "float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64",
    "uint8": "U8", "int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype code, e.g. "U8", "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    data_start: int  # absolute offset of the data section (8 + header length)
    file_size: int
    tensors: dict[str, TensorInfo]  # in file order
    metadata: dict[str, str]


def strict_json(data: bytes, what: str) -> object:
    """Parse JSON strictly: UTF-8 only, duplicate keys and NaN/Infinity rejected. FormatError naming `what`."""

    def no_duplicates(pairs):
        obj = {}
        for key, value in pairs:
            if key in obj:
                raise FormatError(f"{what}: duplicate key {key!r} in JSON (corrupt or forged file)")
            obj[key] = value
        return obj

    def no_constants(name):
        raise FormatError(f"{what}: non-standard JSON number {name} (corrupt file)")

    try:
        text = data.decode("utf-8", errors="strict")
        return json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except FormatError:
        raise
    except UnicodeDecodeError as exc:
        raise FormatError(f"{what}: not UTF-8 text at byte {exc.start} (corrupt or foreign file)") from None
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{what}: invalid JSON ({exc}) (corrupt or truncated file)") from None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_header(path: Path, what: str | None = None) -> SafetensorsHeader:
    """Read and validate the framing of safetensors file `path` (no tensor data is read)."""
    path = Path(path)
    what = what or str(path)
    fd = open_regular(path, what)
    try:
        file_size = os.fstat(fd).st_size
        with open(fd, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise FormatError(f"{what}: {file_size} bytes is too short for a safetensors file (truncated)")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise FormatError(f"{what}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte cap (corrupt or foreign file)")
            if 8 + n > file_size:
                raise FormatError(f"{what}: header length {n} runs past the end of the {file_size}-byte file (truncated)")
            raw = f.read(n)
    except OSError as exc:
        raise FormatError(f"{what}: cannot be read ({exc.strerror})") from None
    if len(raw) != n:
        raise FormatError(f"{what}: header truncated ({len(raw)} of {n} bytes)")
    if not raw.startswith(b"{"):
        raise FormatError(f"{what}: header is not a JSON object (not a safetensors file)")
    header = strict_json(raw, f"{what} header")
    if not isinstance(header, dict):
        raise FormatError(f"{what}: header is not a JSON object (not a safetensors file)")
    data_start = 8 + n
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise FormatError(f"{what}: __metadata__ must map strings to strings")
    infos: list[tuple[str, TensorInfo]] = []
    for name, entry in header.items():
        infos.append((name, _tensor_info(entry, name, data_start, what)))
    infos.sort(key=lambda item: (item[1].begin, item[1].end))
    cursor = data_start
    for name, info in infos:
        if info.begin != cursor:
            kind = "overlaps the previous tensor" if info.begin < cursor else "leaves a gap before it"
            raise FormatError(f"{what}: tensor {name!r} at data offset {info.begin - data_start} {kind}")
        cursor = info.end
    if cursor != file_size:
        if cursor > file_size:
            raise FormatError(f"{what}: tensors need {cursor} bytes but the file has {file_size} (truncated)")
        raise FormatError(f"{what}: {file_size - cursor} unexplained bytes after the last tensor (corrupt or forged file)")
    return SafetensorsHeader(path, data_start, file_size, dict(infos), dict(metadata))


def _tensor_info(entry, name: str, data_start: int, what: str) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise FormatError(f"{what}: tensor {name!r} entry must have exactly dtype, shape, data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_SIZES:
        raise FormatError(f"{what}: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_int(d) and d >= 0 for d in shape):
        raise FormatError(f"{what}: tensor {name!r} shape {shape!r} must be a list of at most {MAX_RANK} dims >= 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) and o >= 0 for o in offsets):
        raise FormatError(f"{what}: tensor {name!r} data_offsets {offsets!r} must be two integers >= 0")
    begin, end = offsets
    expected = math.prod(shape) * DTYPE_SIZES[dtype]  # Python ints: no overflow
    if end < begin or end - begin != expected:
        raise FormatError(
            f"{what}: tensor {name!r} spans {end - begin} bytes but {dtype} {shape} needs {expected}"
        )
    return TensorInfo(dtype, tuple(shape), data_start + begin, data_start + end)


class AlignedSafetensorsWriter:
    """Write a safetensors file tensor by tensor, data section starting at an `align`-byte offset.

    `tensors`: (name, safetensors dtype, shape) in file order. Write each with `write(name, data)`
    in that order; `close()` checks every tensor was written and fsyncs.
    """

    def __init__(self, path: Path, tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str], align: int = 8):
        if align < 8 or align & (align - 1):
            raise ValueError(f"alignment {align} must be a power of two >= 8")
        self.path = Path(path)
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        self._plan: list[tuple[str, int]] = []
        cursor = 0
        for name, dtype, shape in tensors:
            nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [cursor, cursor + nbytes]}
            self._plan.append((name, nbytes))
            cursor += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        padded = -(-(8 + len(raw)) // align) * align - 8
        raw += b" " * (padded - len(raw))
        self.data_start = 8 + len(raw)
        self.offsets: dict[str, int] = {}  # absolute file offset of each tensor
        pos = self.data_start
        for name, nbytes in self._plan:
            self.offsets[name] = pos
            pos += nbytes
        self.file_size = pos
        self._next = 0
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, data) -> None:
        if self._next >= len(self._plan):
            raise RuntimeError(f"{self.path.name}: all tensors already written, got {name!r}")
        want_name, want_bytes = self._plan[self._next]
        view = memoryview(data).cast("B")
        if name != want_name or view.nbytes != want_bytes:
            raise RuntimeError(
                f"{self.path.name}: expected tensor {want_name!r} ({want_bytes} bytes) next, got {name!r} ({view.nbytes} bytes)"
            )
        self._f.write(view)
        self._next += 1

    def close(self) -> None:
        if self._f.closed:
            return
        try:
            if self._next != len(self._plan):
                raise RuntimeError(f"{self.path.name}: {len(self._plan) - self._next} tensors were never written")
            self._f.flush()
            os.fsync(self._f.fileno())
        finally:
            self._f.close()

    def abort(self) -> None:
        self._f.close()

    def __enter__(self) -> AlignedSafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
