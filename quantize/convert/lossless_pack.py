"""`pack --lossless`: each expert's exact source weights as one losslessly coded blob (the ZipMoE tier).

Per MoE layer one `lossless-LLLL.safetensors` beside the nested levels: a U8 tensor `expert.E` per
expert holding the d2moe.quantize.lossless blob of its gate, up and down matrices (adapter shapes
[O, I], source dtype, row major, in that order), zero-padded to 4096 bytes so every blob starts
aligned for O_DIRECT. Blobs are coded one expert at a time into a scratch file (memory: one expert),
then framed; the part is staged like the experts files (resumable, crc32-verified).
"""

from __future__ import annotations

from pathlib import Path

import torch

from d2moe.quantize import lossless as ll
from d2moe.quantize.format.constants import ALIGN, MATRICES, expert_tensor_name
from d2moe.quantize.format.crc import crc32
from d2moe.quantize.format.safetensors_io import AlignedSafetensorsWriter
from d2moe.quantize.format.sections import lossless_file_metadata, lossless_file_name

_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def _verify(path: Path, record: dict) -> bool:
    if not path.is_file() or path.stat().st_size != record["size"]:
        return False
    with open(path, "rb") as f:
        for e in record["entries"]:
            f.seek(e["offset"])
            if crc32(f.read(e["nbytes"])) != e["crc32"]:
                return False
    return True


def lossless_layer(experts, layer: int, num_experts: int, staging, codec: str, pool=None) -> tuple[list[dict], str]:
    """(manifest entries, source dtype name) of one layer's lossless file, written through `staging`."""
    name = lossless_file_name(layer)
    record = staging.done(name, _verify)
    if record is not None and record.get("codec") == codec:  # a resume with another --lossless-codec redoes it
        return record["entries"], record["dtype"]
    scratch = staging.part_path(name + ".blobs")
    sizes, dtype = [], None
    with open(scratch, "wb") as f:
        for e in range(num_experts):
            mats = [experts.matrix(layer, e, m).contiguous() for m in MATRICES]
            dtype = _DTYPES.get(mats[0].dtype)
            if dtype is None or any(m.dtype != mats[0].dtype for m in mats):
                from d2moe.errors import InputError

                raise InputError(f"layer {layer} expert {e}: --lossless handles bf16/f16/f32 experts, "
                                 f"found {[str(m.dtype) for m in mats]}")
            raw = b"".join(m.view(torch.uint8).reshape(-1).numpy().tobytes() for m in mats)
            blob = ll.encode_bytes(raw, mats[0].element_size(), codec)
            del raw, mats
            padded = -(-len(blob) // ALIGN) * ALIGN
            f.write(blob + bytes(padded - len(blob)))
            sizes.append((len(blob), padded, crc32(blob)))
    part = staging.part_path(name)
    tensors = [(expert_tensor_name(e), "U8", (padded,)) for e, (_, padded, _) in enumerate(sizes)]
    entries = []
    with open(scratch, "rb") as src, AlignedSafetensorsWriter(part, tensors, lossless_file_metadata(layer), ALIGN) as w:
        for e, (nbytes, padded, crc) in enumerate(sizes):
            w.write(expert_tensor_name(e), src.read(padded))
            entries.append({"layer": layer, "expert": e, "file": name, "offset": w.offsets[expert_tensor_name(e)],
                            "nbytes": nbytes, "raw_nbytes": 0, "crc32": crc})
        size = w.file_size
    scratch.unlink()
    raw_nbytes = sum(o * i for o, i in experts.shapes.values()) * {"float32": 4}.get(dtype, 2)
    for entry in entries:
        entry["raw_nbytes"] = raw_nbytes
    staging.finish(name, {"entries": entries, "dtype": dtype, "size": size, "codec": codec})
    return entries, dtype


def lossless_section(codec: str, dtype: str, entries: list[dict]) -> dict:
    return {"codec": codec, "dtype": dtype, "chunk_weights": ll.CHUNK_WEIGHTS,
            "experts": sorted(entries, key=lambda e: (e["layer"], e["expert"]))}
