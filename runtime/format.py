"""The packed checkpoint: the one module that knows its byte layout, key names and version.

A packed checkpoint is a directory:

    d2moe.json                  manifest (strict JSON, `format` = "d2moe-mwq", integer `version`)
    dense.safetensors           every non-expert weight, transformers-5 model keys, source dtype
    experts-LLLL.safetensors    one per MoE layer L (4 digits): one uint8 tensor "expert.E" per expert
    gate.safetensors            optional: the trained bit-width gate (d2moe.runtime.gate)
    config.json, generation_config.json, tokenizer files, chat template: copied from the source

Experts file: a valid safetensors file whose JSON header is space-padded so its data section
starts at a multiple of ALIGN (4096) bytes. Every expert blob is a multiple of ALIGN bytes long,
so every blob, and every level segment inside it, starts ALIGN-aligned in the file.

Expert blob = level segments in ascending level order, each zero-padded to a multiple of ALIGN.
Segment i holds, for each matrix in MATRICES order ("gate", "up", "down"), what level bits[i]
adds, as raw little-endian bytes with no padding in between:
    i = 0: scale f16 [O, G] | offset f16 [O, G] | planes u8 [b1, O, I/8]
    i > 0: alpha f16 [n, O, G] (scheme "residual" only) | planes u8 [n, O, I/8],  n = bits[i] - bits[i-1]
(O, I) = the matrix's shape, G = I / group_size; MWQTensor's docstring gives the reconstruction.
Level bits[i] = the blob's first level_ends[i] bytes; upgrading bits[i] -> bits[j] = the bytes
level_ends[i]:level_ends[j]. crc32[i] is zlib.crc32 of segment i including its padding.

Manifest fields (version 1; unknown fields are rejected):
    format, version, source {path, sha256}, arch, levels, group_size, scheme, dtype, alignment,
    matrices, matrix_shapes {name: [O, I]}, moe_layers, num_experts,
    dense {file, nbytes, crc32},
    experts [{layer, expert, file, offset, level_ends, crc32, sqnr_db}] sorted by (layer, expert);
        offset = absolute file offset of the blob; sqnr_db per level over the expert's 3 matrices
    gate {file, nbytes, crc32, levels, capacity} | null

Everything read is validated before it is trusted (see ../shared/RELIABILITY.md): errors are
FormatError naming the file and, where relevant, the expert.
"""

from __future__ import annotations

import sys
import warnings
import zlib
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import torch

from d2moe.errors import D2MoEError, FormatError, UsageError
from d2moe.kernels.packed import PackedMatrix
from d2moe.quantize.types import MWQConfig, MWQTensor
from d2moe.runtime.safetensors_io import read_header, strict_json

FORMAT_NAME = "d2moe-mwq"
FORMAT_VERSION = 1
MANIFEST_NAME = "d2moe.json"
DENSE_NAME = "dense.safetensors"
GATE_NAME = "gate.safetensors"
CONFIG_NAME = "config.json"
ALIGN = 4096
DENSE_ALIGN = 64
MATRICES = ("gate", "up", "down")
DENSE_DTYPES = ("float16", "bfloat16", "float32")
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
MAX_LAYERS = 4096
MAX_EXPERTS = 65536
MAX_DIM = 1 << 20
COPIED_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
    "chat_template.jinja", "chat_template.json", "tiktoken.model",
)

if sys.byteorder != "little":  # raw little-endian bytes are viewed in place
    raise ImportError("d2moe's packed format needs a little-endian machine")


def experts_file_name(layer: int) -> str:
    return f"experts-{layer:04d}.safetensors"


def expert_tensor_name(expert: int) -> str:
    return f"expert.{expert}"


# ----------------------------------------------------------------------------- blob layout


@dataclass(frozen=True)
class Slot:
    """One tensor inside a level segment."""

    matrix: str
    name: str  # "scale" | "offset" | "alpha" | "planes"
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset inside the segment

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * (2 if self.dtype == torch.float16 else 1)


@dataclass(frozen=True)
class BlobLayout:
    segments: tuple[tuple[Slot, ...], ...]  # per level
    level_ends: tuple[int, ...]  # padded prefix length per level

    @property
    def nbytes(self) -> int:
        return self.level_ends[-1]

    def segment_range(self, i: int) -> tuple[int, int]:
        return (self.level_ends[i - 1] if i else 0), self.level_ends[i]


@lru_cache(maxsize=64)
def _layout(shapes: tuple[tuple[str, int, int], ...], cfg: MWQConfig) -> BlobLayout:
    segments, ends, end = [], [], 0
    for i, bits in enumerate(cfg.bits):
        slots, cursor = [], 0
        for matrix, rows, cols in shapes:
            groups, row_bytes = cols // cfg.group_size, cols // 8
            if i == 0:
                names = [("scale", torch.float16, (rows, groups)), ("offset", torch.float16, (rows, groups)),
                         ("planes", torch.uint8, (bits, rows, row_bytes))]
            else:
                n = bits - cfg.bits[i - 1]
                names = [("alpha", torch.float16, (n, rows, groups))] if cfg.scheme == "residual" else []
                names.append(("planes", torch.uint8, (n, rows, row_bytes)))
            for name, dtype, shape in names:
                slot = Slot(matrix, name, dtype, shape, cursor)
                slots.append(slot)
                cursor += slot.nbytes
        end += -(-cursor // ALIGN) * ALIGN
        segments.append(tuple(slots))
        ends.append(end)
    return BlobLayout(tuple(segments), tuple(ends))


def blob_layout(matrix_shapes: dict[str, tuple[int, int]], cfg: MWQConfig) -> BlobLayout:
    """Where every tensor of one expert blob sits, from the matrix shapes and the MWQ config."""
    for matrix in MATRICES:
        rows, cols = matrix_shapes[matrix]
        if rows <= 0 or cols <= 0 or cols % cfg.group_size:
            raise UsageError(
                f"expert matrix {matrix} [{rows}, {cols}] cannot be split in groups of {cfg.group_size} columns: "
                "pick a --group-size that divides the hidden and intermediate sizes"
            )
    return _layout(tuple((m, *matrix_shapes[m]) for m in MATRICES), cfg)


def encode_expert(tensors: dict[str, MWQTensor], layout: BlobLayout, cfg: MWQConfig) -> bytearray:
    """The blob bytes of one expert's three quantized matrices (zero padding included)."""
    blob = bytearray(layout.nbytes)
    for i, slots in enumerate(layout.segments):
        base = layout.segment_range(i)[0]
        lo = 0 if i == 0 else cfg.bits[i - 1]
        lo_alpha = 0 if i == 0 else cfg.bits[i - 1] - cfg.b1
        for slot in slots:
            t = tensors[slot.matrix]
            if slot.name == "planes":
                src = t.planes[lo: cfg.bits[i]]
            elif slot.name == "alpha":
                src = t.alpha[lo_alpha: cfg.bits[i] - cfg.b1]
            else:
                src = getattr(t, slot.name)
            if src.dtype != slot.dtype or tuple(src.shape) != slot.shape:
                raise ValueError(f"{slot.matrix}.{slot.name}: got {src.dtype} {tuple(src.shape)}, layout wants {slot.dtype} {slot.shape}")
            raw = src.detach().contiguous().view(torch.uint8).reshape(-1).numpy()
            start = base + slot.start
            blob[start: start + slot.nbytes] = raw.tobytes()
    return blob


def segment_crcs(blob, layout: BlobLayout) -> list[int]:
    view = memoryview(blob)
    return [zlib.crc32(view[slice(*layout.segment_range(i))]) for i in range(len(layout.segments))]


def decode_blob(prefix, layout: BlobLayout, cfg: MWQConfig, level: int, shapes: dict[str, tuple[int, int]]) -> dict[str, PackedMatrix]:
    """Each matrix at `level` as views into `prefix` (nothing is copied: kernels read the bytes in place)."""
    k = cfg.level_index(level)
    view = memoryview(prefix).cast("B")
    parts: dict[str, dict[str, list[torch.Tensor]]] = {m: {"planes": [], "alpha": []} for m in MATRICES}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffers (bytes) are fine: we never write
        for i in range(k + 1):
            base = layout.segment_range(i)[0]
            for slot in layout.segments[i]:
                count = slot.nbytes // (2 if slot.dtype == torch.float16 else 1)
                t = torch.frombuffer(view, dtype=slot.dtype, count=count, offset=base + slot.start) if count else \
                    torch.empty(0, dtype=slot.dtype)
                t = t.view(slot.shape)
                if slot.name in ("planes", "alpha"):
                    parts[slot.matrix][slot.name].extend(t.unbind(0))
                else:
                    parts[slot.matrix][slot.name] = t
    return {m: PackedMatrix(tuple(shapes[m]), cfg, level, p["scale"], p["offset"], tuple(p["planes"]), tuple(p["alpha"]))
            for m, p in parts.items()}


# ----------------------------------------------------------------------------- reader


@dataclass(frozen=True)
class ExpertEntry:
    layer: int
    expert: int
    file: str
    offset: int  # absolute file offset of the blob
    level_ends: tuple[int, ...]
    crc32: tuple[int, ...]
    sqnr_db: tuple[float | None, ...]

    @property
    def nbytes(self) -> int:
        return self.level_ends[-1]


class PackedCheckpoint:
    """A validated packed checkpoint (see the module docstring). Build with `open_checkpoint`."""

    def __init__(self, path: Path, manifest: dict, config: dict, cfg: MWQConfig, experts: dict[tuple[int, int], ExpertEntry]):
        self.path = path
        self.manifest = manifest
        self.config = config
        self.cfg = cfg
        self.experts = experts
        self.arch: str = manifest["arch"]
        self.moe_layers: list[int] = list(manifest["moe_layers"])
        self.num_experts: int = manifest["num_experts"]
        self.dtype: str = manifest["dtype"]
        self.matrix_shapes: dict[str, tuple[int, int]] = {m: tuple(s) for m, s in manifest["matrix_shapes"].items()}
        self.layout = blob_layout(self.matrix_shapes, cfg)
        self.version: int = manifest["version"]

    @property
    def tokenizer_dir(self) -> Path:
        return self.path

    @property
    def dense_path(self) -> Path:
        return self.path / self.manifest["dense"]["file"]

    @property
    def gate_path(self) -> Path | None:
        gate = self.manifest["gate"]
        return None if gate is None else self.path / gate["file"]

    @property
    def gate_capacity(self) -> tuple[float, ...] | None:
        gate = self.manifest["gate"]
        return None if gate is None else tuple(gate["capacity"])

    @cached_property
    def adapter(self):
        from d2moe.runtime.adapters import adapter_for

        return adapter_for(self.config)

    def level_nbytes(self, level: int) -> int:
        """Bytes of one expert's prefix at `level` (the same for every expert)."""
        return self.layout.level_ends[self.cfg.level_index(level)]

    def entry(self, layer: int, expert: int) -> ExpertEntry:
        try:
            return self.experts[(layer, expert)]
        except KeyError:
            raise UsageError(f"{self.path}: no expert {expert} in layer {layer} (MoE layers {self.moe_layers[:8]}…, "
                             f"{self.num_experts} experts)") from None

    def byte_range(self, layer: int, expert: int, have_level: int | None, want_level: int) -> tuple[Path, int, int]:
        """(file, absolute offset, length) of what takes expert from `have_level` (None: nothing) to `want_level`."""
        e = self.entry(layer, expert)
        want = self.level_nbytes(want_level)
        have = 0 if have_level is None else self.level_nbytes(have_level)
        if have >= want:
            raise UsageError(f"layer {layer} expert {expert}: level {have_level} already covers level {want_level}")
        return self.path / e.file, e.offset + have, want - have

    def read_prefix(self, layer: int, expert: int, level: int) -> bytes:
        """One aligned read of the expert's prefix at `level` (convenience for tools and tests)."""
        path, offset, nbytes = self.byte_range(layer, expert, None, level)
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(nbytes)
        if len(data) != nbytes:
            raise FormatError(f"{path.name}: layer {layer} expert {expert} truncated ({len(data)} of {nbytes} bytes)")
        return data

    def decode_expert(self, layer: int, expert: int, level: int, prefix_bytes, verify: bool = True) -> dict[str, PackedMatrix]:
        """The expert's three MWQ tensors at `level` from (at least) its prefix bytes at that level."""
        e = self.entry(layer, expert)
        k = self.cfg.level_index(level)
        n = memoryview(prefix_bytes).nbytes
        if n < e.level_ends[k] or n > e.nbytes:
            raise FormatError(f"{e.file}: layer {layer} expert {expert}: {n} bytes given, level {level} needs "
                              f"{e.level_ends[k]} (at most {e.nbytes})")
        if verify:
            self._check_crc(e, prefix_bytes, k)
        return decode_blob(prefix_bytes, self.layout, self.cfg, level, self.matrix_shapes)

    def verify_read(self, layer: int, expert: int, data, have_level: int | None, want_level: int) -> None:
        """Check the crc32 of the segments that a `byte_range(layer, expert, have_level, want_level)` read brought."""
        e = self.entry(layer, expert)
        first = 0 if have_level is None else self.cfg.level_index(have_level) + 1
        base = 0 if have_level is None else self.level_nbytes(have_level)
        self._check_crc(e, data, self.cfg.level_index(want_level), first=first, base=base)

    def _check_crc(self, e: ExpertEntry, blob, upto: int, first: int = 0, base: int = 0) -> None:
        """Segments first..upto of `blob`, whose byte 0 is byte `base` of the expert's blob."""
        view = memoryview(blob).cast("B")
        for i in range(first, upto + 1):
            lo, hi = self.layout.segment_range(i)
            if hi - base > view.nbytes or zlib.crc32(view[lo - base:hi - base]) != e.crc32[i]:
                raise FormatError(f"{e.file}: layer {e.layer} expert {e.expert}: level-{self.cfg.bits[i]} segment fails its "
                                  f"crc32 check against {MANIFEST_NAME} (corrupted file: re-pack or re-download)")

    def verify(self) -> None:
        """Read every byte once: check every expert segment's and the dense/gate files' crc32."""
        for (layer, expert), e in sorted(self.experts.items()):
            self._check_crc(e, self.read_prefix(layer, expert, self.cfg.bk), len(self.cfg.bits) - 1)
        for section in ("dense", "gate"):
            info = self.manifest[section]
            if info is not None and _file_crc(self.path / info["file"]) != info["crc32"]:
                raise FormatError(f"{info['file']}: crc32 differs from {MANIFEST_NAME} (corrupted file: re-pack or re-download)")

    def load_dense(self, device: str = "cpu") -> dict[str, torch.Tensor]:
        """Every dense weight, keyed by transformers-5 model key, in its stored dtype."""
        from safetensors.torch import load_file

        try:
            return load_file(str(self.dense_path), device=device)
        except Exception as exc:  # framing was validated at open: this is a race or I/O error
            raise FormatError(f"{self.dense_path.name}: cannot be loaded ({exc})") from None

    def summary(self) -> dict:
        """What `d2moe inspect` shows: sizes, effective bits/weight and SQNR (min/median) per level."""
        import statistics

        weights = sum(r * c for r, c in self.matrix_shapes.values())  # per expert
        n = len(self.experts)
        levels = []
        for i, b in enumerate(self.cfg.bits):
            q = [e.sqnr_db[i] for e in self.experts.values() if e.sqnr_db[i] is not None]
            levels.append({
                "bits": b, "bytes_per_expert": self.layout.level_ends[i], "bytes_all_experts": self.layout.level_ends[i] * n,
                "bits_per_weight": 8 * self.layout.level_ends[i] / weights,
                "sqnr_db": {"min": min(q), "median": statistics.median(q)} if q else None,
            })
        gate = self.manifest["gate"]
        return {
            "path": str(self.path), "format": FORMAT_NAME, "version": self.version, "arch": self.arch,
            "source": self.manifest["source"]["path"], "moe_layers": len(self.moe_layers), "num_experts": self.num_experts,
            "matrix_shapes": {m: list(s) for m, s in self.matrix_shapes.items()}, "group_size": self.cfg.group_size,
            "scheme": self.cfg.scheme, "dtype": self.dtype, "dense_bytes": self.manifest["dense"]["nbytes"],
            "levels": levels, "gate": None if gate is None else {"capacity": gate["capacity"], "levels": gate["levels"]},
        }

    def __repr__(self) -> str:
        return (f"PackedCheckpoint({self.path}, arch={self.arch}, levels={list(self.cfg.bits)}, "
                f"layers={len(self.moe_layers)}, experts={self.num_experts})")


def _file_size(path: Path, what: str) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        raise FormatError(f"{what}: file is missing (re-pack the checkpoint)") from None
    except OSError as exc:
        raise FormatError(f"{what}: cannot be read ({exc.strerror})") from None


def _file_crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def file_crc32(path: Path) -> int:
    """zlib.crc32 of a whole file, read in 4 MiB chunks."""
    return _file_crc(path)


def open_checkpoint(path: str | Path, verify: bool = False) -> PackedCheckpoint:
    """Open and validate a packed checkpoint; FormatError (naming file and expert) if anything is off.

    verify=True also reads every byte and checks every crc32.
    """
    path = Path(path)
    if not path.is_dir():
        raise FormatError(f"{path} is not a packed checkpoint directory (make one with `d2moe pack SRC {path}`)")
    try:
        manifest = _read_json(path / MANIFEST_NAME)
        config = _read_json(path / CONFIG_NAME)
        if not isinstance(config, dict):
            raise FormatError(f"{path / CONFIG_NAME}: must hold a JSON object (copy the source's config.json back)")
        cfg, experts = _validate(manifest, config, path)
    except FormatError:
        raise
    except D2MoEError as exc:  # e.g. an adapter refusing the copied config
        raise FormatError(f"{path / MANIFEST_NAME}: {exc}") from None
    _check_files(path, manifest, cfg, experts)
    ckpt = PackedCheckpoint(path, manifest, config, cfg, experts)
    if verify:
        ckpt.verify()
    return ckpt


def _check_files(path: Path, manifest: dict, cfg: MWQConfig, experts: dict[tuple[int, int], ExpertEntry]) -> None:
    """Every file's safetensors framing agrees with the manifest, byte for byte."""
    by_file: dict[str, list[ExpertEntry]] = {}
    for e in experts.values():
        by_file.setdefault(e.file, []).append(e)
    for name, entries in sorted(by_file.items()):
        size = _file_size(path / name, name)
        for e in entries:
            if e.offset + e.nbytes > size:
                raise FormatError(f"{name}: layer {e.layer} expert {e.expert}: blob [{e.offset}, {e.offset + e.nbytes}) runs "
                                  f"past the end of the {size}-byte file (truncated: re-pack or re-download)")
        header = read_header(path / name, name)
        want = {expert_tensor_name(e.expert): e for e in entries}
        if set(header.tensors) != set(want):
            extra = sorted(set(header.tensors) ^ set(want))[:3]
            raise FormatError(f"{name}: holds tensors that disagree with {MANIFEST_NAME} (e.g. {extra}): re-pack")
        layer = entries[0].layer
        if header.metadata != {"format": FORMAT_NAME, "layer": str(layer)}:
            raise FormatError(f"{name}: metadata {header.metadata} should be format {FORMAT_NAME!r}, layer '{layer}' (re-pack)")
        if header.data_start % ALIGN:
            raise FormatError(f"{name}: data section starts at {header.data_start}, not {ALIGN}-aligned")
        for tname, e in want.items():
            info = header.tensors[tname]
            if info.dtype != "U8" or info.shape != (e.nbytes,) or info.begin != e.offset:
                raise FormatError(f"{name}: layer {e.layer} expert {e.expert}: tensor {tname} is {info.dtype} {list(info.shape)} "
                                  f"at offset {info.begin}, manifest says U8 [{e.nbytes}] at {e.offset}")
    for section in ("dense", "gate"):
        info = manifest[section]
        if info is None:
            continue
        header = read_header(path / info["file"], info["file"])
        if header.file_size != info["nbytes"]:
            raise FormatError(f"{info['file']}: {header.file_size} bytes, manifest says {info['nbytes']} (re-pack)")


# ----------------------------------------------------------------------------- manifest


def _read_json(path: Path) -> object:
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise FormatError(f"{path}: {size} bytes exceeds the {MAX_MANIFEST_BYTES}-byte cap (corrupt or foreign file)")
        data = path.read_bytes()
    except FileNotFoundError:
        hint = "not a packed checkpoint: make one with `d2moe pack`" if path.name == MANIFEST_NAME else "re-pack"
        raise FormatError(f"{path} is missing ({hint})") from None
    except OSError as exc:
        raise FormatError(f"{path}: cannot be read ({exc.strerror})") from None
    return strict_json(data, str(path))


_TOP_KEYS = {
    "format", "version", "source", "arch", "levels", "group_size", "scheme", "dtype", "alignment", "matrices",
    "matrix_shapes", "moe_layers", "num_experts", "dense", "experts", "gate",
}
_EXPERT_KEYS = {"layer", "expert", "file", "offset", "level_ends", "crc32", "sqnr_db"}
_DENSE_KEYS = {"file", "nbytes", "crc32"}
_GATE_KEYS = {"file", "nbytes", "crc32", "levels", "capacity"}


def _int(x, what: str, lo: int = 0, hi: int | None = None) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or x < lo or (hi is not None and x > hi):
        bounds = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise FormatError(f"{what} must be an integer {bounds}, found {x!r}")
    return x


def _list(x, what: str, n: int | None = None) -> list:
    if not isinstance(x, list) or (n is not None and len(x) != n):
        raise FormatError(f"{what} must be a list" + ("" if n is None else f" of {n} items") + f", found {str(x)[:60]}")
    return x


def _keys(obj, want: set[str], what: str) -> dict:
    if not isinstance(obj, dict):
        raise FormatError(f"{what} must be a JSON object")
    if set(obj) != want:
        missing, extra = sorted(want - set(obj)), sorted(set(obj) - want)
        raise FormatError(f"{what}: " + "; ".join(
            p for p in (f"missing {missing}" if missing else "", f"unknown {extra}" if extra else "") if p))
    return obj


def _validate(m, config: dict, path: Path) -> tuple[MWQConfig, dict[tuple[int, int], ExpertEntry]]:
    """Check every manifest field's type, bounds and agreement with the config and the layout."""
    where = str(path / MANIFEST_NAME)
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        found = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise FormatError(f"{where}: not a d2moe checkpoint manifest (format {found!r}, expected {FORMAT_NAME!r})")
    version = m.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FormatError(f"{where}: format version {version!r} is not valid: re-pack the checkpoint with this d2moe")
    if version > FORMAT_VERSION:
        raise FormatError(f"{where}: format version {version} was written by a newer d2moe (this one reads "
                          f"{FORMAT_VERSION}): upgrade d2moe")
    if version < FORMAT_VERSION:
        raise FormatError(f"{where}: format version {version} is older than this d2moe's {FORMAT_VERSION}: re-pack")
    _keys(m, _TOP_KEYS, where)
    src = _keys(m["source"], {"path", "sha256"}, f"{where}: source")
    if not isinstance(src["path"], str) or not isinstance(src["sha256"], str):
        raise FormatError(f"{where}: source.path and source.sha256 must be strings")
    if m["alignment"] != ALIGN:
        raise FormatError(f"{where}: alignment {m['alignment']!r}, this d2moe writes and reads {ALIGN}")
    if m["matrices"] != list(MATRICES):
        raise FormatError(f"{where}: matrices {m['matrices']!r}, expected {list(MATRICES)}")
    if m["dtype"] not in DENSE_DTYPES:
        raise FormatError(f"{where}: dense dtype {m['dtype']!r} is not one of {DENSE_DTYPES}")
    levels = [_int(b, f"{where}: levels[{i}]", 1, 8) for i, b in enumerate(_list(m["levels"], f"{where}: levels"))]
    try:
        cfg = MWQConfig(bits=tuple(levels), group_size=_int(m["group_size"], f"{where}: group_size", 8, MAX_DIM),
                        scheme=m["scheme"] if isinstance(m["scheme"], str) else repr(m["scheme"]))
    except UsageError as exc:
        raise FormatError(f"{where}: {exc}") from None
    if list(cfg.bits) != levels:
        raise FormatError(f"{where}: levels {levels} must be distinct and ascending")

    from d2moe.runtime.adapters import adapter_for

    adapter = adapter_for(config)
    if m["arch"] != adapter.model_type:
        raise FormatError(f"{where}: arch {m['arch']!r} but config.json says {adapter.model_type!r} (mixed-up files: re-pack)")
    shapes = _keys(m["matrix_shapes"], set(MATRICES), f"{where}: matrix_shapes")
    for name, shape in shapes.items():
        for d in _list(shape, f"{where}: matrix_shapes.{name}", 2):
            _int(d, f"{where}: matrix_shapes.{name}", 1, MAX_DIM)
    want_shapes = {k: list(v) for k, v in adapter.matrix_shapes(config).items()}
    if shapes != want_shapes:
        raise FormatError(f"{where}: matrix_shapes {shapes} disagree with config.json {want_shapes} (re-pack)")
    moe_layers = [_int(x, f"{where}: moe_layers", 0, MAX_LAYERS) for x in _list(m["moe_layers"], f"{where}: moe_layers")]
    num_experts = _int(m["num_experts"], f"{where}: num_experts", 1, MAX_EXPERTS)
    if moe_layers != adapter.moe_layers(config) or num_experts != adapter.num_experts(config):
        raise FormatError(f"{where}: {len(moe_layers)} MoE layers x {num_experts} experts disagree with config.json "
                          f"({len(adapter.moe_layers(config))} x {adapter.num_experts(config)}): re-pack")
    layout = blob_layout({k: tuple(v) for k, v in shapes.items()}, cfg)
    _validate_section(m["dense"], _DENSE_KEYS, DENSE_NAME, f"{where}: dense")
    if m["gate"] is not None:
        gate = _validate_section(m["gate"], _GATE_KEYS, GATE_NAME, f"{where}: gate")
        if gate["levels"] != levels:
            raise FormatError(f"{where}: gate levels {gate['levels']!r} differ from the checkpoint's {levels} (re-pack with a matching gate)")
        capacity = _list(gate["capacity"], f"{where}: gate.capacity", len(levels))
        if not all(isinstance(c, (int, float)) and not isinstance(c, bool) and 0 <= c <= 1 for c in capacity):
            raise FormatError(f"{where}: gate.capacity {capacity!r} must be numbers in [0, 1]")
    return cfg, _validate_experts(m["experts"], moe_layers, num_experts, layout, where)


def _validate_section(obj, keys: set[str], file: str, what: str) -> dict:
    _keys(obj, keys, what)
    if obj["file"] != file:
        raise FormatError(f"{what}.file must be {file!r}, found {obj['file']!r}")
    _int(obj["nbytes"], f"{what}.nbytes", 8)
    _int(obj["crc32"], f"{what}.crc32", 0, 0xFFFFFFFF)
    return obj


def _validate_experts(raw, moe_layers: list[int], num_experts: int, layout: BlobLayout, where: str) -> dict:
    raw = _list(raw, f"{where}: experts")
    if len(raw) != len(moe_layers) * num_experts:
        raise FormatError(f"{where}: {len(raw)} expert entries, expected {len(moe_layers)} layers x {num_experts} experts")
    order = [(layer, e) for layer in moe_layers for e in range(num_experts)]
    k = len(layout.level_ends)
    experts: dict[tuple[int, int], ExpertEntry] = {}
    prev_end: dict[str, int] = {}
    for (layer, expert), item in zip(order, raw, strict=True):
        what = f"{where}: layer {layer} expert {expert}"
        _keys(item, _EXPERT_KEYS, what)
        if item["layer"] != layer or item["expert"] != expert:
            raise FormatError(f"{what}: entry says layer {item['layer']!r} expert {item['expert']!r} (entries must be sorted, no duplicates)")
        if item["file"] != experts_file_name(layer):
            raise FormatError(f"{what}: file {item['file']!r}, expected {experts_file_name(layer)!r}")
        offset = _int(item["offset"], f"{what}: offset", ALIGN)
        if offset % ALIGN:
            raise FormatError(f"{what}: offset {offset} is not {ALIGN}-aligned")
        if offset < prev_end.get(item["file"], 0):
            raise FormatError(f"{what}: offset {offset} overlaps the previous expert (ends at {prev_end[item['file']]})")
        ends = [_int(x, f"{what}: level_ends", 1) for x in _list(item["level_ends"], f"{what}: level_ends", k)]
        if tuple(ends) != layout.level_ends:
            raise FormatError(f"{what}: level_ends {ends} differ from the layout of these shapes and levels {list(layout.level_ends)}")
        crcs = [_int(x, f"{what}: crc32", 0, 0xFFFFFFFF) for x in _list(item["crc32"], f"{what}: crc32", k)]
        sqnr = _list(item["sqnr_db"], f"{what}: sqnr_db", k)
        if not all(x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in sqnr):
            raise FormatError(f"{what}: sqnr_db must hold numbers or null")
        prev_end[item["file"]] = offset + layout.nbytes
        experts[(layer, expert)] = ExpertEntry(layer, expert, item["file"], offset, tuple(ends), tuple(crcs), tuple(sqnr))
    return experts


def build_manifest(
    source: dict, arch: str, cfg: MWQConfig, dtype: str, matrix_shapes: dict[str, tuple[int, int]],
    moe_layers: list[int], num_experts: int, dense: dict, experts: list[dict], gate: dict | None,
) -> dict:
    """The manifest dict pack writes (field names and order owned here)."""
    return {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "source": source, "arch": arch,
        "levels": list(cfg.bits), "group_size": cfg.group_size, "scheme": cfg.scheme, "dtype": dtype,
        "alignment": ALIGN, "matrices": list(MATRICES),
        "matrix_shapes": {m: list(matrix_shapes[m]) for m in MATRICES},
        "moe_layers": list(moe_layers), "num_experts": num_experts, "dense": dense,
        "experts": sorted(experts, key=lambda e: (e["layer"], e["expert"])), "gate": gate,
    }


def manifest_bytes(manifest: dict) -> bytes:
    """Deterministic serialisation: sorted keys, fixed separators, trailing newline."""
    import json

    return (json.dumps(manifest, sort_keys=True, indent=1, allow_nan=False) + "\n").encode()
