"""`run --lossless`: serve the exact source experts from the lossless tier (ZipMoE-style).

Three drop-ins for the runtime's parts, so the same pipeline (cache, HEBF loads, budget, meter) runs:
- `LosslessView(ckpt)`: the checkpoint as the pipeline sees it, with one level, the source's bit
  width (16 for bf16/f16, 32 for f32): `level_nbytes` = one expert's raw bytes; `decode_expert`
  gives `gate_up` [2I, H] and `down` [H, I] as views of the decoded bytes in the source dtype.
- `LosslessStore`: a read is the expert's coded blob (one aligned read on the I/O threads, crc32
  checked), then its chunks are decoded on a decode pool (zstandard and numpy release the GIL): the
  I/O threads keep reading the next experts while earlier ones decode. The future gives the raw bytes.
- `LosslessKernels`: the expert as transformers computes it (`linear(x, gate_up).chunk(2)`, act,
  `linear(., down)`) in the model's dtype. With the pipeline's exact mode (rows in transformers'
  order, no float32 cast, router weights as given) and torch's own dense layers, logits equal the
  transformers model's in the same dtype.

The cache holds decoded experts at their raw size (what the budget counts); only reads are compressed.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from d2moe.errors import FormatError, UsageError
from d2moe.quantize import lossless as codec
from d2moe.quantize.format.crc import crc32
from d2moe.runtime.store import ByteReader, Read

_TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class LosslessConfig:
    """MWQConfig's shape for one exact level."""

    bits: tuple[int, ...]
    group_size: int = 0
    scheme: str = "lossless"

    @property
    def b1(self) -> int:
        return self.bits[0]

    @property
    def bk(self) -> int:
        return self.bits[-1]

    def level_index(self, level: int) -> int:
        if level != self.bits[0]:
            raise UsageError(f"the lossless tier has one level ({self.bits[0]} bits), not {level}")
        return 0


class LosslessView:
    """A packed checkpoint with a lossless section, seen as one exact level (see the module docstring)."""

    def __init__(self, ckpt) -> None:
        section = ckpt.manifest.get("lossless")
        if section is None:
            raise UsageError(f"{ckpt.path} has no lossless tier: re-pack with `d2moe pack SRC OUT --lossless`")
        self.inner, self.section = ckpt, section
        self.dtype = _TORCH[section["dtype"]]
        self.level = torch.finfo(self.dtype).bits
        self.cfg = LosslessConfig((self.level,))
        self.entries = {(e["layer"], e["expert"]): e for e in section["experts"]}
        self.raw_nbytes = section["experts"][0]["raw_nbytes"]
        self.dtype_name = section["dtype"]

    def __getattr__(self, name: str):
        """Everything else (path, manifest, config, dense, gate...) is the packed checkpoint's."""
        return getattr(self.__dict__["inner"], name)

    def level_nbytes(self, level: int) -> int:
        self.cfg.level_index(level)
        return self.raw_nbytes

    def entry(self, layer: int, expert: int) -> dict:
        try:
            return self.entries[(layer, expert)]
        except KeyError:
            raise UsageError(f"{self.path}: no lossless expert {expert} in layer {layer}") from None

    def verify_read(self, layer, expert, data, have, want) -> None:
        """Decoded bytes: the coded blob's crc32 was checked when it was read (LosslessStore)."""

    def decode_expert(self, layer: int, expert: int, level: int, prefix, verify: bool = False) -> dict:
        (i, h), (_, inter) = self.matrix_shapes["gate"], self.matrix_shapes["down"]
        flat = torch.frombuffer(memoryview(prefix).cast("B"), dtype=self.dtype, count=self.raw_nbytes // self.dtype.itemsize)
        gate_up = flat[: 2 * i * h].view(2 * i, h)  # gate rows then up rows: transformers' fused layout
        return {"gate_up": gate_up, "down": flat[2 * i * h:].view(h, inter)}


class LosslessStore:
    """Reads coded blobs on I/O threads and decodes their chunks on `decode_threads` (see the module docstring)."""

    def __init__(self, view: LosslessView, io_threads: int = 4, bandwidth: float | None = None, direct: bool = True,
                 decode_threads: int = 2) -> None:
        self.view = view
        self.reader = ByteReader(io_threads=io_threads, bandwidth=bandwidth, direct=direct)
        self.pool = ThreadPoolExecutor(max(1, decode_threads), thread_name_prefix="d2moe-decode")
        self.decode_seconds = 0.0

    def plan(self, layer: int, expert: int, have, want: int) -> Read:
        """The whole coded blob (the exact tier has no levels: `have` is ignored, nothing is an upgrade)."""
        e = self.view.entry(layer, expert)
        return Read(layer, expert, None, want, self.view.path / e["file"], e["offset"], e["nbytes"])

    def _read_and_decode(self, layer: int, expert: int) -> bytearray:
        e = self.view.entry(layer, expert)
        blob = self.reader.read_range(self.view.path / e["file"], e["offset"], e["nbytes"])
        if crc32(blob) != e["crc32"]:
            raise FormatError(f"{e['file']}: layer {layer} expert {expert}: lossless blob fails its crc32 check "
                              "(corrupted file: re-pack or re-download)")
        t0 = time.perf_counter()
        out = bytearray(self.view.raw_nbytes)
        codec.decode_into(blob, out, self.pool)
        self.decode_seconds += time.perf_counter() - t0
        return memoryview(out)

    # `stream`: the coded blob is checked whole; `into`: unused, decoded bytes land in a buffer of their own
    def submit(self, read: Read, then=None, stream=None, into=None) -> Future:
        if then is None:
            return self.reader.run(lambda: self._read_and_decode(read.layer, read.expert))
        return self.reader.run(lambda: then(read, self._read_and_decode(read.layer, read.expert)))

    def read(self, read: Read):
        return self._read_and_decode(read.layer, read.expert)

    def stats(self):
        return self.reader.stats()

    def reset_stats(self) -> None:
        self.reader.reset_stats()
        self.decode_seconds = 0.0

    @property
    def bytes_read(self) -> int:
        return self.reader.bytes_read

    @property
    def busy_seconds(self) -> float:
        return self.reader.busy_seconds

    def close(self) -> None:
        self.reader.close()
        self.pool.shutdown(wait=True)


class LosslessKernels:
    """Exact expert compute in the model's dtype, as transformers' experts module does it."""

    name = "torch (lossless, exact)"
    lib = None
    grouped = False
    workspace_bytes = 0
    exact = True

    def __init__(self, threads: int = 1) -> None:
        self.splitter = SimpleNamespace(threads=threads)
        self.on_workspace = None

    def prepare(self, mats: dict, level: int) -> dict:
        return mats

    def forward(self, mats: dict, x: torch.Tensor, act) -> torch.Tensor:
        gate, up = F.linear(x, mats["gate_up"]).chunk(2, dim=-1)
        return F.linear(act(gate) * up, mats["down"])

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass
