"""Reading a packed checkpoint: `open_checkpoint` validates it whole (framing, manifest, sizes) and
returns a `PackedCheckpoint` that reads, checks and decodes expert prefixes."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import torch

from d2moe.errors import D2MoEError, FormatError, InputError, UsageError
from d2moe.kernels.packed import PackedMatrix
from d2moe.quantize.format.checked import file_crc32_checked, read_checked_safetensors
from d2moe.quantize.format.constants import (
    ALIGN,
    CONFIG_NAME,
    COPIED_FILES,
    DENSE_NAME,
    DENSE_ST_DTYPES,
    FORMAT_NAME,
    GATE_NAME,
    MANIFEST_NAME,
    MATRICES,
    MAX_FILE_BYTES,
    MAX_MANIFEST_BYTES,
    expert_tensor_name,
)
from d2moe.quantize.format.crc import crc32
from d2moe.quantize.format.files import check_regular
from d2moe.quantize.format.layout import BlobLayout, Slot, blob_layout
from d2moe.quantize.format.manifest import ExpertEntry, main_float_dtype, read_json, validate_manifest
from d2moe.quantize.format.safetensors_io import read_header
from d2moe.quantize.format.writer import experts_file_metadata
from d2moe.quantize.types import MWQConfig


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
        from d2moe.quantize.adapters import adapter_for

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

    def verify_read(self, layer: int, expert: int, data, have_level: int | None, want_level: int,
                    visit: Callable[[Slot, torch.Tensor], None] | None = None) -> None:
        """Check the crc32 of the segments that a `byte_range(layer, expert, have_level, want_level)` read brought.

        `visit(slot, tensor)` (optional) is called on each tensor of those segments (a view into `data`
        of the slot's shape and dtype) right after its bytes entered the checksum, while they are still in
        the CPU's cache: the kernels re-lay out planes and parameters in place there instead of in a pass
        of their own over memory. A failed check still raises; the bytes are then not to be used."""
        check = self.read_check(layer, expert, have_level, want_level, visit)
        check.feed(data, memoryview(data).nbytes)
        check.finish(data)

    def read_check(self, layer: int, expert: int, have_level: int | None, want_level: int,
                   visit: Callable[[Slot, torch.Tensor], None] | None = None) -> ReadCheck:
        """verify_read as a stream: `feed(data, upto)` as the read's first `upto` bytes land (checksums and
        visits what they complete), then `finish(data)`."""
        e = self.entry(layer, expert)
        first, base = self._read_start(have_level)
        segments = [(i, *self.layout.segment_range(i)) for i in range(first, self.cfg.level_index(want_level) + 1)]
        return ReadCheck(self, e, [(i, lo - base, hi - base) for i, lo, hi in segments], visit)

    def _read_start(self, have_level: int | None) -> tuple[int, int]:
        """(first segment, its byte offset in the blob) of a read that starts above `have_level`."""
        if have_level is None:
            return 0, 0
        return self.cfg.level_index(have_level) + 1, self.level_nbytes(have_level)

    def _check_crc(self, e: ExpertEntry, blob, upto: int, first: int = 0, base: int = 0) -> None:
        """Segments first..upto of `blob`, whose byte 0 is byte `base` of the expert's blob."""
        view = memoryview(blob).cast("B")
        for i in range(first, upto + 1):
            lo, hi = self.layout.segment_range(i)
            if hi - base > view.nbytes or crc32(view[lo - base:hi - base]) != e.crc32[i]:
                raise _segment_error(e, self.cfg.bits[i])

    def verify(self) -> None:
        """Read every byte once: check every expert segment's, the dense/gate files' and every lossless blob's crc32."""
        for (layer, expert), e in sorted(self.experts.items()):
            self._check_crc(e, self.read_prefix(layer, expert, self.cfg.bk), len(self.cfg.bits) - 1)
        for section in ("dense", "gate"):
            self.verify_file(section)
        if "lossless" in self.manifest:
            from d2moe.quantize.format.sections import verify_lossless_blobs

            verify_lossless_blobs(self.path, self.manifest["lossless"])

    def load_dense(self, device: str = "cpu", sink_for=None) -> dict[str, torch.Tensor]:
        """Every dense weight, keyed by transformers-5 model key, in its stored dtype.

        The file is read once, straight into the tensors, and its crc32 is computed on those same
        bytes: a flipped bit anywhere in dense.safetensors is a FormatError before any weight is used.
        `sink_for` may take 2-D tensors a chunk of rows at a time instead (read_checked_safetensors).
        """
        info = self.manifest["dense"]
        tensors = read_checked_safetensors(self.dense_path, info["crc32"], DENSE_NAME, sink_for)
        return tensors if device == "cpu" else {k: v.to(device) for k, v in tensors.items()}

    def verify_file(self, section: str) -> None:
        """Check the crc32 of the dense or gate file (`section`) against the manifest; FormatError if it differs."""
        info = self.manifest[section]
        if info is not None and file_crc32_checked(self.path / info["file"], info["file"]) != info["crc32"]:
            raise FormatError(f"{info['file']}: crc32 differs from {MANIFEST_NAME} (corrupted file: re-pack or re-download)")

    def summary(self) -> dict:
        """What `d2moe inspect` shows: sizes, effective bits/weight and SQNR (min/median) per level."""
        import statistics

        from d2moe.quantize.format.sections import lossless_summary

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
            "calibration": self.manifest.get("calibration"),
            "lossless": lossless_summary(self.manifest.get("lossless")),
        }

    def __repr__(self) -> str:
        return (f"PackedCheckpoint({self.path}, arch={self.arch}, levels={list(self.cfg.bits)}, "
                f"layers={len(self.moe_layers)}, experts={self.num_experts})")


def _file_size(path: Path, what: str) -> int:
    return check_regular(path, MAX_FILE_BYTES, what)


def open_checkpoint(path: str | Path, verify: bool = False) -> PackedCheckpoint:
    """Open and validate a packed checkpoint; FormatError (naming file and expert) if anything is off.

    verify=True also reads every byte and checks every crc32.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path} is not a packed checkpoint directory (make one with `d2moe pack SRC {path}`)")
    if not os.path.lexists(path / MANIFEST_NAME):
        if os.path.lexists(path / CONFIG_NAME) and not os.path.lexists(path / DENSE_NAME):  # a model, not a pack
            raise InputError(f"{path} is a model checkpoint, not a packed one (no {MANIFEST_NAME}): pack it first, "
                             f"`d2moe pack {path} OUT`, and give OUT")
        raise InputError(f"{path / MANIFEST_NAME} is missing (not a packed checkpoint: make one with `d2moe pack`)")
    try:
        manifest = read_json(path / MANIFEST_NAME)
        config = read_json(path / CONFIG_NAME)
        if not isinstance(config, dict):
            raise FormatError(f"{path / CONFIG_NAME}: must hold a JSON object (copy the source's config.json back)")
        cfg, experts = validate_manifest(manifest, config, path)
    except FormatError:
        raise
    except D2MoEError as exc:  # e.g. an adapter refusing the copied config: that file is named
        named = CONFIG_NAME if str(exc).startswith(CONFIG_NAME) else MANIFEST_NAME
        raise FormatError(f"{path / named}: {exc}") from None
    _check_files(path, manifest, experts)
    for name in COPIED_FILES:  # read later by transformers (tokenizer, chat template): regular files, bounded
        if os.path.lexists(path / name):
            check_regular(path / name, MAX_MANIFEST_BYTES, name)
    ckpt = PackedCheckpoint(path, manifest, config, cfg, experts)
    if verify:
        ckpt.verify()
    return ckpt


def _check_files(path: Path, manifest: dict, experts: dict[tuple[int, int], ExpertEntry]) -> None:
    """Every file's safetensors framing agrees with the manifest, byte for byte."""
    by_file: dict[str, list[ExpertEntry]] = {}
    for e in experts.values():
        by_file.setdefault(e.file, []).append(e)
    for name, entries in sorted(by_file.items()):
        check_blob_file(path, name, [(e.layer, e.expert, e.offset, e.nbytes, e.nbytes) for e in entries],
                        experts_file_metadata(entries[0].layer), MANIFEST_NAME, "re-pack")
    if manifest["gate"] is None and os.path.lexists(path / GATE_NAME):
        raise FormatError(f"{GATE_NAME} is present but {MANIFEST_NAME} lists no gate (`gate: null`): the manifest was "
                          "edited or the files mixed up; re-pack (with or without --router)")
    if "lossless" in manifest:
        from d2moe.quantize.format.sections import check_lossless_files, validate_lossless

        weights = sum(o * i for o, i in manifest["matrix_shapes"].values())
        check_lossless_files(path, validate_lossless(manifest["lossless"], manifest["moe_layers"],
                                                     manifest["num_experts"], weights, str(path)))
    for section in ("dense", "gate"):
        info = manifest[section]
        if info is None:
            continue
        header = read_header(path / info["file"], info["file"])
        if header.file_size != info["nbytes"]:
            raise FormatError(f"{info['file']}: {header.file_size} bytes, manifest says {info['nbytes']} (re-pack)")
        if section == "dense":
            _check_dense_dtype(header, manifest["dtype"])


def check_blob_file(path: Path, name: str, blobs: list[tuple[int, int, int, int, int]], metadata: dict[str, str],
                    what: str, fix: str) -> None:
    """One file of expert blobs (an experts file, a lossless file) against the manifest, byte for byte: every blob
    (layer, expert, offset, nbytes, tensor bytes) inside the file, its tensors exactly the blobs' (U8 of the tensor
    bytes at the offset), its `__metadata__` equal to `metadata`, its data aligned. `what` names the manifest's part
    in errors, `fix` the remedy."""
    size = _file_size(path / name, name)
    for layer, expert, offset, nbytes, _ in blobs:
        if offset + nbytes > size:
            raise FormatError(f"{name}: layer {layer} expert {expert}: blob [{offset}, {offset + nbytes}) runs past the "
                              f"end of the {size}-byte file (truncated: re-pack or re-download)")
    header = read_header(path / name, name)
    want = {expert_tensor_name(blob[1]): blob for blob in blobs}
    if set(header.tensors) != set(want):
        extra = sorted(set(header.tensors) ^ set(want))[:3]
        raise FormatError(f"{name}: holds tensors that disagree with {what} (e.g. {extra}): {fix}")
    if header.metadata != metadata:
        raise FormatError(f"{name}: metadata {header.metadata} should be format {metadata['format']!r}, layer "
                          f"'{metadata['layer']}' ({fix})")
    if header.data_start % ALIGN:
        raise FormatError(f"{name}: data section starts at {header.data_start}, not {ALIGN}-aligned")
    for tname, (layer, expert, offset, _, tensor_nbytes) in want.items():
        info = header.tensors[tname]
        if info.dtype != "U8" or info.shape != (tensor_nbytes,) or info.begin != offset:
            raise FormatError(f"{name}: layer {layer} expert {expert}: tensor {tname} is {info.dtype} {list(info.shape)} "
                              f"at offset {info.begin}, manifest says U8 [{tensor_nbytes}] at {offset}")


def _check_dense_dtype(header, dtype: str) -> None:
    """The manifest's dtype is main_float_dtype of the dense file's tensors, as pack writes it."""
    want = DENSE_ST_DTYPES[dtype]
    main = main_float_dtype((t.dtype, t.shape) for t in header.tensors.values()) or want
    if main != want:
        name = max((n for n, t in header.tensors.items() if t.dtype == main),
                   key=lambda n: math.prod(header.tensors[n].shape))
        raise FormatError(f"{DENSE_NAME}: tensor {name!r} is {main} but {MANIFEST_NAME} says dtype {dtype!r} ({want}), "
                          f"and so are most of its weights: mixed-up or edited files, re-pack")


class ReadCheck:
    """The crc32 check of one read's segments, fed as its bytes land (PackedCheckpoint.read_check)."""

    def __init__(self, ckpt: PackedCheckpoint, entry: ExpertEntry, segments: list[tuple[int, int, int]],
                 visit: Callable[[Slot, torch.Tensor], None] | None) -> None:
        self.ckpt, self.entry, self.visit = ckpt, entry, visit
        self.segments = segments  # (segment index, start, end) relative to the read's bytes
        self.k = 0  # segment being checked
        self.at = segments[0][1] if segments else 0  # bytes up to here are in the running crc
        self.crc = 0
        self.slot = 0  # next slot of segment k to visit

    def feed(self, data, upto: int) -> None:
        """The read's bytes [0, upto) have landed: checksum them, visit every slot they complete, and
        check every segment they complete."""
        view = memoryview(data).cast("B")
        while self.k < len(self.segments):
            i, lo, hi = self.segments[self.k]
            end = min(upto, hi)
            if end > self.at:
                self.crc = crc32(view[self.at:end], self.crc)
                self.at = end
            slots = self.ckpt.layout.segments[i]
            while self.slot < len(slots) and lo + slots[self.slot].start + slots[self.slot].nbytes <= self.at:
                slot = slots[self.slot]
                self.slot += 1
                if self.visit is not None and slot.nbytes:
                    count = slot.nbytes // (2 if slot.dtype == torch.float16 else 1)
                    self.visit(slot, torch.frombuffer(view, dtype=slot.dtype, count=count, offset=lo + slot.start)
                               .view(slot.shape))
            if self.at < hi:
                return
            if self.crc != self.entry.crc32[i]:
                self._fail(i)
            self.k, self.crc, self.slot = self.k + 1, 0, 0
            if self.k < len(self.segments):
                self.at = self.segments[self.k][1]

    def finish(self, data) -> None:
        """Every byte has landed: any segment not complete is a short read."""
        if self.k < len(self.segments):
            self.feed(data, memoryview(data).nbytes)
        if self.k < len(self.segments):
            self._fail(self.segments[self.k][0])

    def _fail(self, i: int) -> None:
        raise _segment_error(self.entry, self.ckpt.cfg.bits[i])


def _segment_error(e: ExpertEntry, bits: int) -> FormatError:
    return FormatError(f"{e.file}: layer {e.layer} expert {e.expert}: level-{bits} segment fails its "
                       f"crc32 check against {MANIFEST_NAME} (corrupted file: re-pack or re-download)")
