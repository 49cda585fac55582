"""The source of a pack: a Hugging Face checkpoint directory (config.json + safetensors, single or sharded).

Tensors are read with positioned reads into buffers of their own (never memory maps): resident memory
is the tensors in flight, whatever the model's size, and a file read once does not stay mapped into
the process. Headers go through the format's validating parser, so a foreign or damaged shard is one
InputError naming it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from d2moe.errors import D2MoEError, FormatError, InputError
from d2moe.quantize.adapters import ExpertKey, FusedExpertKey
from d2moe.quantize.format.constants import MATRICES
from d2moe.quantize.format.safetensors_io import (
    DTYPE_SIZES,
    SafetensorsHeader,
    TensorInfo,
    read_header,
    strict_json,
)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
ST_TO_TORCH = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "U8": torch.uint8,
    "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def model_dir_name(path: str | Path) -> str:
    """A model folder's name: its last part, or for a Hugging Face cache snapshot (models--ORG--NAME/snapshots/HASH)
    the model's NAME, not the commit hash (run reads it for an Instruct/Chat marker)."""
    p = Path(path)
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return p.parent.parent.name.split("--")[-1]
    return p.name or str(path)


def _dangling(path: Path) -> str | None:
    """The target of a link that points at nothing (a cache download cut short), else None."""
    return os.readlink(path) if path.is_symlink() and not path.exists() else None


class SourceCheckpoint:
    """A HF checkpoint directory on disk: config + safetensors (single file or sharded with an index)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"SRC {self.path} does not exist: pass a Hugging Face checkpoint directory")
        if not self.path.is_dir():
            raise InputError(f"SRC {self.path} is not a directory: pass the folder holding config.json and *.safetensors")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise InputError(f"SRC {self.path} is not a Hugging Face checkpoint: it has no config.json")
        try:
            self.config_bytes = config_path.read_bytes()
            self.config = strict_json(self.config_bytes, str(config_path))
        except OSError as exc:
            raise InputError(f"{config_path}: cannot be read ({exc.strerror})") from None
        except D2MoEError as exc:
            raise InputError(str(exc)) from None
        self.weight_map: dict[str, str] = {}
        self.files: list[str] = []
        self._headers: dict[str, SafetensorsHeader] = {}

    def index_weights(self) -> None:
        """Find every tensor's file (index or single file); call once the architecture is known to be supported."""
        self.weight_map = self._weight_map()
        self.files = sorted(set(self.weight_map.values()))
        for name in self.files:
            missing = [k for k, f in self.weight_map.items() if f == name and k not in self.header(name).tensors]
            if missing:
                raise InputError(f"{self.path / name}: has no tensor {missing[0]!r} that {INDEX_NAME} puts there")

    def _weight_map(self) -> dict[str, str]:
        index, single = self.path / INDEX_NAME, self.path / SINGLE_NAME
        if index.is_file():
            try:
                data = strict_json(index.read_bytes(), str(index))
            except D2MoEError as exc:
                raise InputError(str(exc)) from None
            wmap = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(wmap, dict) or not wmap or not all(isinstance(v, str) for v in wmap.values()):
                raise InputError(f"{index}: has no weight_map of tensor names to shard files")
            for shard in set(wmap.values()):
                if "/" in shard or "\\" in shard or shard.startswith("."):
                    raise InputError(f"{index}: shard name {shard!r} must be a plain file name")
                if not (self.path / shard).is_file():
                    target = _dangling(self.path / shard)
                    link = f" (a link to {target}, which does not exist)" if target else ""
                    raise InputError(f"{index} names shard {shard} which is missing{link}: finish the download")
            return dict(wmap)
        if single.is_file():
            return {k: SINGLE_NAME for k in self.header(SINGLE_NAME).tensors}
        if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")):
            raise InputError(f"SRC {self.path} holds PyTorch pickles, not safetensors: d2moe never unpickles; "
                             "convert with `model.save_pretrained(dir, safe_serialization=True)`")
        for name in (INDEX_NAME, SINGLE_NAME, *(f.name for f in sorted(self.path.glob("*.safetensors")))):
            if target := _dangling(self.path / name):
                raise InputError(f"{self.path / name} is a link to {target}, which does not exist: finish the "
                                 "download (or copy the file in)")
        raise InputError(f"SRC {self.path} has no {SINGLE_NAME} or {INDEX_NAME}")

    def header(self, fname: str) -> SafetensorsHeader:
        if fname not in self._headers:
            try:
                self._headers[fname] = read_header(self.path / fname)
            except FormatError as exc:
                raise InputError(f"{exc} (a damaged or foreign shard: re-download it)") from None
        return self._headers[fname]

    def info(self, key: str) -> TensorInfo:
        return self.header(self.weight_map[key]).tensors[key]

    def read(self, key: str, start: int = 0, nbytes: int | None = None) -> torch.Tensor:
        """Bytes [start, start + nbytes) of tensor `key` as a fresh uint8 tensor (one positioned read)."""
        info = self.info(key)
        nbytes = info.nbytes - start if nbytes is None else nbytes
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        fname = self.weight_map[key]
        try:
            with open(self.path / fname, "rb", buffering=0) as f:
                f.seek(info.begin + start)
                got = 0
                while got < nbytes:
                    n = f.readinto(view[got:])
                    if not n:
                        raise InputError(f"{self.path / fname}: tensor {key} is cut short (file truncated: re-download)")
                    got += n
        except OSError as exc:
            raise InputError(f"{self.path / fname}: tensor {key} cannot be read ({exc.strerror})") from None
        return buf

    def get(self, key: str) -> torch.Tensor:
        """A whole tensor in its stored dtype and shape."""
        info = self.info(key)
        if info.dtype not in ST_TO_TORCH:
            raise InputError(f"{self.weight_map[key]}: tensor {key} has dtype {info.dtype}, which d2moe cannot read")
        return self.read(key).view(ST_TO_TORCH[info.dtype]).view(info.shape)

    def fingerprint(self) -> str:
        """sha256 of config.json and the safetensors file names + sizes (cheap: no weights hashed)."""
        h = hashlib.sha256(self.config_bytes)
        for name in self.files:
            h.update(f"\n{name}\t{(self.path / name).stat().st_size}".encode())
        return h.hexdigest()

    def nbytes(self) -> int:
        return sum((self.path / name).stat().st_size for name in self.files)


class ExpertSource:
    """Where each (layer, expert, matrix) lives in the source: per-expert keys or fused [E, ...] tensors."""

    def __init__(self, src: SourceCheckpoint, adapter, moe_layers: list[int], num_experts: int,
                 shapes: dict[str, tuple[int, int]]):
        self.src, self.shapes = src, shapes
        self.legacy: dict[tuple[int, int, str], str] = {}
        self.fused: dict[tuple[int, str], tuple[str, int, int]] = {}  # (layer, matrix) -> (key, row start, rows/expert)
        self.dense: list[tuple[str, str]] = []  # (source key, model key)
        moe = set(moe_layers)
        for key in sorted(src.weight_map):
            if adapter.is_ignored(key, src.config):
                continue
            ref = adapter.expert_key(key)
            if ref is None:
                self.dense.append((key, adapter.dense_key(key)))
                continue
            if ref.layer not in moe:
                raise InputError(f"{src.path}: tensor {key} is an expert of layer {ref.layer}, which config.json "
                                 "says is not a MoE layer (config and weights disagree)")
            if isinstance(ref, ExpertKey):
                if ref.expert >= num_experts:
                    raise InputError(f"{src.path}: tensor {key} names expert {ref.expert} but config.json has {num_experts}")
                self.legacy[(ref.layer, ref.expert, ref.matrix)] = key
            else:
                self._add_fused(key, ref, num_experts)
        model_keys = [k for _, k in self.dense]
        if len(set(model_keys)) != len(model_keys):
            raise InputError(f"{src.path}: two source tensors map to the same model key (mixed legacy and fused names?)")
        for layer in moe_layers:
            for e in range(num_experts):
                for m in MATRICES:
                    have_legacy, have_fused = (layer, e, m) in self.legacy, (layer, m) in self.fused
                    if have_legacy == have_fused:
                        what = "is missing" if not have_legacy else "is stored twice (per-expert and fused)"
                        raise InputError(f"{src.path}: layer {layer} expert {e} matrix {m} {what} (config.json implies "
                                         f"{num_experts} experts in each of {len(moe_layers)} MoE layers: does it "
                                         "describe these weights?)")
        for (_, _, m), key in self.legacy.items():
            self._check_float(key)
            shape = src.info(key).shape
            if shape != shapes[m]:
                raise InputError(f"{src.path}: tensor {key} is {list(shape)}, config.json implies {list(shapes[m])}")

    def _check_float(self, key: str) -> None:
        dtype = self.src.info(key).dtype
        if dtype not in ("F16", "BF16", "F32"):
            raise InputError(f"{self.src.weight_map[key]}: tensor {key} is {dtype}; d2moe packs F16/BF16/F32 weights")

    def _add_fused(self, key: str, ref: FusedExpertKey, num_experts: int) -> None:
        self._check_float(key)
        shape = self.src.info(key).shape
        rows = sum(self.shapes[m][0] for m in ref.matrices)
        want = (num_experts, rows, self.shapes[ref.matrices[0]][1])
        if shape != want:
            raise InputError(f"{self.src.path}: fused tensor {key} is {list(shape)}, config.json implies {list(want)}")
        start = 0
        for m in ref.matrices:
            self.fused[(ref.layer, m)] = (key, start, rows)
            start += self.shapes[m][0]

    def matrix_dtype(self, layer: int, matrix: str) -> torch.dtype:
        key = self.legacy.get((layer, 0, matrix)) or self.fused[(layer, matrix)][0]
        return ST_TO_TORCH[self.src.info(key).dtype]

    def matrix_nbytes(self, layer: int, matrix: str) -> int:
        rows, cols = self.shapes[matrix]
        return rows * cols * self.matrix_dtype(layer, matrix).itemsize

    def matrix(self, layer: int, expert: int, matrix: str) -> torch.Tensor:
        """One expert matrix [O, I] in its stored float dtype, read alone (a fused tensor's rows are contiguous)."""
        rows, cols = self.shapes[matrix]
        key = self.legacy.get((layer, expert, matrix))
        if key is not None:
            info = self.src.info(key)
            return self.src.read(key).view(ST_TO_TORCH[info.dtype]).view(rows, cols)
        key, start, rows_per_expert = self.fused[(layer, matrix)]
        info = self.src.info(key)
        size = DTYPE_SIZES[info.dtype]
        first = (expert * rows_per_expert + start) * cols * size
        return self.src.read(key, first, rows * cols * size).view(ST_TO_TORCH[info.dtype]).view(rows, cols)
