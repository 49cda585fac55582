"""Writing a packed checkpoint: blob bytes, segment crc32s and the manifest (field names and order owned here)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from d2moe.quantize.format.constants import (
    ALIGN,
    DENSE_ALIGN,
    FORMAT_NAME,
    FORMAT_VERSION,
    MATRICES,
    expert_tensor_name,
    experts_file_name,
)
from d2moe.quantize.format.crc import crc32
from d2moe.quantize.format.layout import BlobLayout
from d2moe.quantize.format.safetensors_io import AlignedSafetensorsWriter
from d2moe.quantize.types import MWQConfig, MWQTensor


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
    return [crc32(view[slice(*layout.segment_range(i))]) for i in range(len(layout.segments))]


def build_manifest(
    source: dict, arch: str, cfg: MWQConfig, dtype: str, matrix_shapes: dict[str, tuple[int, int]],
    moe_layers: list[int], num_experts: int, dense: dict, experts: list[dict], gate: dict | None,
    similarity: dict | None = None, lossless: dict | None = None, calibration: dict | None = None,
) -> dict:
    """The manifest dict pack writes (field names and order owned here); optional sections
    (d2moe.quantize.format.sections) only when given."""
    optional = {k: v for k, v in (("similarity", similarity), ("lossless", lossless), ("calibration", calibration))
                if v is not None}
    return {**optional,
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "source": source, "arch": arch,
        "levels": list(cfg.bits), "group_size": cfg.group_size, "scheme": cfg.scheme, "dtype": dtype,
        "alignment": ALIGN, "matrices": list(MATRICES),
        "matrix_shapes": {m: list(matrix_shapes[m]) for m in MATRICES},
        "moe_layers": list(moe_layers), "num_experts": num_experts, "dense": dense,
        "experts": sorted(experts, key=lambda e: (e["layer"], e["expert"])), "gate": gate,
    }


def manifest_bytes(manifest: dict) -> bytes:
    """Deterministic serialisation: sorted keys, fixed separators, trailing newline."""
    return (json.dumps(manifest, sort_keys=True, indent=1, allow_nan=False) + "\n").encode()


class ExpertsFileWriter:
    """One layer's experts file, written blob by blob in expert order; `add` returns the manifest entry."""

    def __init__(self, path: Path, layer: int, num_experts: int, layout: BlobLayout):
        """`path`: where to write (a temporary name is fine: entries name the file experts_file_name(layer))."""
        self.layer, self.layout = layer, layout
        self.name = experts_file_name(layer)
        tensors = [(expert_tensor_name(e), "U8", (layout.nbytes,)) for e in range(num_experts)]
        self._w = AlignedSafetensorsWriter(Path(path), tensors, experts_file_metadata(layer), ALIGN)
        self.file_size = self._w.file_size

    def add(self, expert: int, blob, sqnr_db: list[float | None]) -> dict:
        name = expert_tensor_name(expert)
        self._w.write(name, blob)
        return {"layer": self.layer, "expert": expert, "file": self.name, "offset": self._w.offsets[name],
                "level_ends": list(self.layout.level_ends), "crc32": segment_crcs(blob, self.layout), "sqnr_db": sqnr_db}

    def __enter__(self) -> ExpertsFileWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._w.__exit__(*exc)


def experts_file_metadata(layer: int) -> dict[str, str]:
    """The safetensors `__metadata__` of an experts file (the reader checks it equals this)."""
    return {"format": FORMAT_NAME, "layer": str(layer)}


def dense_file_writer(path: Path, tensors: list[tuple[str, str, tuple[int, ...]]]) -> AlignedSafetensorsWriter:
    """dense.safetensors: a plain safetensors file (loadable by any tool), tensors DENSE_ALIGN-aligned."""
    return AlignedSafetensorsWriter(path, tensors, {"format": "pt"}, DENSE_ALIGN)


def file_entry(path: Path, name: str | None = None, **extra) -> dict:
    """The manifest section of a whole file (dense, gate): name (default: path's), size and crc32."""
    return {"file": name or path.name, "nbytes": path.stat().st_size, "crc32": file_crc32(path), **extra}


def file_crc32(path: Path) -> int:
    """zlib.crc32 of a whole file, read in 4 MiB chunks."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = crc32(chunk, crc)
    return crc
