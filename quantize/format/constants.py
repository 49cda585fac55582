"""Names, limits and alignment of the packed checkpoint (the format's constants; see d2moe.quantize.format)."""

from __future__ import annotations

import sys

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
DENSE_ST_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}  # safetensors dtype codes
MAX_MANIFEST_BYTES = 256 * 1024 * 1024  # also the cap on config.json and the copied tokenizer files
MAX_FILE_BYTES = 1 << 44  # 16 TiB: no weight file is larger
MAX_LAYERS = 4096
MAX_EXPERTS = 65536
MAX_DIM = 1 << 20
COPIED_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
    "chat_template.jinja", "chat_template.json", "tiktoken.model",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")  # of those, any one is a tokenizer

if sys.byteorder != "little":  # raw little-endian bytes are viewed in place
    raise ImportError("d2moe's packed format needs a little-endian machine")


def experts_file_name(layer: int) -> str:
    return f"experts-{layer:04d}.safetensors"


def expert_tensor_name(expert: int) -> str:
    return f"expert.{expert}"
