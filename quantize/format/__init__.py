"""The packed checkpoint format. This package is its one owner (split like gguf-py):
`constants` (names, limits), `layout` (where a blob's tensors sit), `manifest` (validation of d2moe.json),
`reader` (open_checkpoint), `writer` (blob bytes, crc32s, manifest, files), `safetensors_io` (framing).


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
           (scheme "subblock": codes u8 [O, G] | super-block parameters f16 [O, S, 2] | planes, see
           d2moe.quantize.subblock; S = ceil(I / 256))
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
    optional: similarity {...}, lossless {...}, calibration {...} (d2moe.quantize.format.sections; absent when not packed)

Everything read is validated before it is trusted (see ../shared/RELIABILITY.md): errors are
FormatError naming the file and, where relevant, the expert.
"""

from d2moe.quantize.format.constants import (
    ALIGN,
    CONFIG_NAME,
    COPIED_FILES,
    DENSE_ALIGN,
    DENSE_DTYPES,
    DENSE_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    GATE_NAME,
    MANIFEST_NAME,
    MATRICES,
    TOKENIZER_FILES,
    expert_tensor_name,
    experts_file_name,
)
from d2moe.quantize.format.layout import BlobLayout, Slot, blob_layout
from d2moe.quantize.format.manifest import FLOAT_ST_DTYPES, ExpertEntry, main_float_dtype
from d2moe.quantize.format.reader import PackedCheckpoint, decode_blob, open_checkpoint
from d2moe.quantize.format.sections import LOSSLESS_CODECS, lossless_file_name
from d2moe.quantize.format.writer import (
    ExpertsFileWriter,
    build_manifest,
    dense_file_writer,
    encode_expert,
    file_crc32,
    file_entry,
    manifest_bytes,
    segment_crcs,
)

__all__ = [
    "ALIGN", "CONFIG_NAME", "COPIED_FILES", "DENSE_ALIGN", "DENSE_DTYPES", "DENSE_NAME", "FORMAT_NAME", "FORMAT_VERSION",
    "GATE_NAME", "MANIFEST_NAME", "MATRICES", "TOKENIZER_FILES", "BlobLayout", "ExpertsFileWriter", "dense_file_writer", "file_entry", "ExpertEntry", "FLOAT_ST_DTYPES", "main_float_dtype", "PackedCheckpoint", "Slot", "blob_layout",
    "build_manifest", "decode_blob", "encode_expert", "expert_tensor_name", "experts_file_name", "file_crc32",
    "manifest_bytes", "open_checkpoint", "segment_crcs", "LOSSLESS_CODECS", "lossless_file_name",
]
