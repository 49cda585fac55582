"""Reading and validating the manifest (d2moe.json): every field's type, bounds and agreement with
config.json and the blob layout, before anything is trusted."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from d2moe.errors import FormatError, UsageError
from d2moe.quantize.format.config_bounds import check_config_bounds
from d2moe.quantize.format.constants import (
    ALIGN,
    CONFIG_NAME,
    DENSE_DTYPES,
    DENSE_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    GATE_NAME,
    MANIFEST_NAME,
    MATRICES,
    MAX_DIM,
    MAX_EXPERTS,
    MAX_LAYERS,
    MAX_MANIFEST_BYTES,
    experts_file_name,
)
from d2moe.quantize.format.files import read_capped
from d2moe.quantize.format.layout import BlobLayout, blob_layout
from d2moe.quantize.format.safetensors_io import strict_json
from d2moe.quantize.format.sections import (
    OPTIONAL_KEYS,
    validate_calibration,
    validate_lossless,
    validate_similarity,
)
from d2moe.quantize.types import MWQConfig


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


def read_json(path: Path) -> object:
    """A JSON file of the checkpoint: a regular file, at most MAX_MANIFEST_BYTES, strict JSON."""
    if not os.path.lexists(path):
        hint = "not a packed checkpoint: make one with `d2moe pack`" if path.name == MANIFEST_NAME else "re-pack"
        raise FormatError(f"{path} is missing ({hint})")
    return strict_json(read_capped(path, MAX_MANIFEST_BYTES), str(path))


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


def validate_manifest(m, config: dict, path: Path) -> tuple[MWQConfig, dict[tuple[int, int], ExpertEntry]]:
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
    _keys(m, _TOP_KEYS | (set(m) & set(OPTIONAL_KEYS)), where)
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

    from d2moe.quantize.adapters import adapter_for

    adapter = adapter_for(config)
    check_config_bounds(adapter.hf_config(config), _int(adapter.num_experts(config), f"{where}: config.json experts",
                                                        1, MAX_EXPERTS), f"{path / CONFIG_NAME}")
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
        if sum(capacity) < 1 - 1e-6:  # the gate's own rule (runtime.gate.validate_capacity): 1.0 each = no limit
            raise FormatError(f"{where}: gate.capacity {capacity!r} sums to {sum(capacity):.4g}: the fractions must "
                              "cover every (token, expert) pair (sum >= 1)")
    if "similarity" in m:
        validate_similarity(m["similarity"], moe_layers, num_experts, where)
    if "calibration" in m:
        validate_calibration(m["calibration"], moe_layers, num_experts, where)
    if "lossless" in m:
        weights = sum(o * i for o, i in (tuple(v) for v in shapes.values()))
        validate_lossless(m["lossless"], moe_layers, num_experts, weights, where)
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


FLOAT_ST_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' float dtype codes


def main_float_dtype(tensors: Iterable[tuple[str, Sequence[int]]]) -> str | None:
    """The manifest's `dtype` (as a safetensors code) for a dense file of these (dtype, shape) tensors: that of most
    float elements; the other tensors keep their source's dtype (transformers keeps DeepSeek-V3's router in float32
    in a bfloat16 model). None where there is no float tensor."""
    elements: dict[str, int] = {}
    for dtype, shape in tensors:
        if dtype in FLOAT_ST_DTYPES:
            elements[dtype] = elements.get(dtype, 0) + math.prod(shape)
    return max(sorted(elements), key=lambda d: elements[d]) if elements else None
