"""Dense layers on the native kernel: every resident `nn.Linear` of the assembled model (attention
projections, routers, shared experts, the LM head) computes a few-token input with
`d2moe.kernels.cpu.dense_gemv` on the kernels' threads, and anything larger with torch.

Why: a decode step reads every dense weight once for one token, so it is bound by memory
bandwidth; torch's bf16 GEMV reached 10.6 GB/s on a Zen 4 core where a plain load-convert-FMA
loop reaches the memory's rate (BENCHMARKS.md), and torch's intra-op threads stall whenever
another process holds a core, where the kernels' row splitter hands a slowed thread fewer rows.

`weights="int8"` (run --dense-weights int8) also replaces each large weight by a per-row symmetric
int8 copy and a float32 scale per row (weight-only: activations stay float32): half the bytes of
bf16 to read per token. `weights="int4"` fits each large weight whose width is a multiple of 64 as a
one-level 4-bit MWQ matrix (the experts' own format and fit, group 64: 4.25 bits per weight) and
computes it with the expert kernels: a quarter of bf16's bytes. Both cost perplexity, measured in
BENCHMARKS.md. Weights shared with another module (tied embeddings) stay as they are. Results are
float32-accumulated and returned in the layer's dtype, like torch's.

A session converts while dense.safetensors is read (`StreamingConverter`): each converted weight arrives a
chunk of rows at a time, so its source is never whole in memory and the run's budget needs only the
converted layers plus one conversion in flight (`plan_bytes`), not the source dense weights.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from d2moe.errors import UsageError
from d2moe.kernels import cpu
from d2moe.kernels.packed import PackedMatrix

MAX_TOKENS = 8  # above: torch's GEMM (prefill), where the weights are reused across tokens
INT4_GROUP = 64
WEIGHTS = ("source", "int8", "int4")
INT8_MIN_ELEMS = 1 << 16  # smaller layers (routers, norms' neighbours) keep their dtype
INT8_CHUNK_ROWS = 4096  # rows converted to int8 at a time (a float32 copy of a whole LM head would be large)
TILE_ROWS = 512  # prefill: rows widened to float32 at a time (int8, or 16-bit without a native 16-bit GEMM)
_NATIVE_HALF_GEMM = cpu.has_bf16_gemm()


def check_weights(weights: str) -> None:
    """One error line for a `--dense-weights` value that is not one of WEIGHTS."""
    if weights not in WEIGHTS:
        raise UsageError(f"--dense-weights {weights!r} is unknown: use {', '.join(WEIGHTS)}")


def quantize_rows_int8(w: torch.Tensor, chunk_rows: int = INT8_CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: (q int8 [O, I], scale float32 [O]) with w ~ q * scale[:, None], a chunk of
    rows at a time (a float32 copy of a whole LM head would be several times its bf16 size)."""
    rows = w.shape[0]
    q = torch.empty(w.shape, dtype=torch.int8)
    scale = torch.empty(rows, dtype=torch.float32)
    for r0 in range(0, rows, chunk_rows):  # one float32 copy of the chunk and no other temporary of its size
        w32 = w[r0:r0 + chunk_rows].detach().to(torch.float32, copy=True)
        low, high = torch.aminmax(w32, dim=1)
        s = torch.maximum(high, -low).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
        q[r0:r0 + chunk_rows].copy_(w32.div_(s[:, None]).round_().clamp_(-127, 127))  # integral: exact in int8
        scale[r0:r0 + chunk_rows] = s
    return q, scale


def quantize_int4(w: torch.Tensor) -> PackedMatrix:
    """w [O, I] as a one-level 4-bit MWQ matrix (native fit, group INT4_GROUP), planes as the kernels read them."""
    return _kernel_layout(PackedMatrix.from_mwq(_fit_int4(w)))


def _fit_int4(w: torch.Tensor):
    """The one-level 4-bit MWQ fit of w's rows (each row's fit is its own: rows may come in chunks)."""
    from d2moe.quantize import MWQConfig, native

    qlib = native.load()
    if qlib is None:
        raise UsageError("--dense-weights int4 needs the native quantizer (a C compiler): use int8 or source")
    return native.fit_sliced(qlib, w.detach(), MWQConfig(bits=(4,), group_size=INT4_GROUP), refits=0, weighting="mse").tensor


def _kernel_layout(m: PackedMatrix) -> PackedMatrix:
    return cpu.blocked(m) if cpu.blocks_planes(INT4_GROUP) else m


def conversion(shape: tuple[int, ...], dtype: torch.dtype, weights: str, shared: bool = False,
               embedding: bool = False) -> str:
    """What a dense nn.Linear (or nn.Embedding) weight becomes under `weights` (WEIGHTS): "int4", "int8" or
    "source" (its own dtype; on the kernel for a Linear). Small layers (routers, norms' neighbours), shared weights
    and int8 sources stay. An embedding table becomes per-row int8 under either: a token reads one row of it, so
    only its bytes held matter, and a row's int8 error is int8 dense's."""
    rows, cols = shape
    if weights == "source" or rows * cols < INT8_MIN_ELEMS or shared or dtype == torch.int8:
        return "source"
    return "int4" if weights == "int4" and cols % INT4_GROUP == 0 and not embedding else "int8"


def converted_nbytes(shape: tuple[int, int], kind: str, source_nbytes: int) -> int:
    """Bytes a weight holds once converted (`conversion`'s kind): int8 codes and a float32 scale per row;
    the one-level 4-bit MWQ matrix (4 bits per weight and the scheme's parameters per INT4_GROUP columns)."""
    if kind == "source":
        return source_nbytes
    rows, cols = shape
    if kind == "int8":
        return rows * cols + 4 * rows
    if kind == "int4":
        from d2moe.quantize import MWQConfig
        from d2moe.quantize.subblock import SUPER_PARAMS, n_supers

        cfg, groups = MWQConfig(bits=(4,), group_size=INT4_GROUP), cols // INT4_GROUP
        params = groups + 2 * SUPER_PARAMS * n_supers(groups, INT4_GROUP) if cfg.scheme == "subblock" else 4 * groups
        return rows * (cols // 2 + params)
    raise ValueError(f"unknown conversion {kind!r}")


def conversion_scratch(shape: tuple[int, int], kind: str, chunk_rows: int) -> int:
    """Bytes converting a weight `chunk_rows` rows at a time holds for a moment beyond its result: the rows
    themselves, int8's float32 copy of them, int4's copy of the whole result into the kernels' layout."""
    rows, cols = shape
    chunk = min(rows, chunk_rows)
    if kind == "int8":
        return chunk * cols * (4 + 4)  # the rows read (at most float32) and their float32 copy
    if kind == "int4":
        return chunk * cols * 4 + converted_nbytes(shape, kind, 0)
    return 0


def convert_weight(w: torch.Tensor, kind: str):
    """The converted form of weight w: a PackedMatrix (int4) or (int8 codes, float32 row scales)."""
    return quantize_int4(w) if kind == "int4" else quantize_rows_int8(w)


class _RowConversion:
    """A weight converted as its rows arrive (`feed`, in order), into preallocated results: both forms are
    per row, so the result is the whole weight's bit for bit."""

    def __init__(self, shape: tuple[int, int], kind: str, done):
        self.rows, self.cols = shape
        self.kind, self.done, self.at, self.dtype = kind, done, 0, None
        if kind == "int8":
            self.q, self.scale = torch.empty(shape, dtype=torch.int8), torch.empty(self.rows, dtype=torch.float32)
        else:  # the fit's per-row fields, allocated at the first chunk's shapes
            self.planes = self.scale = self.offset = None

    def feed(self, rows: torch.Tensor) -> None:
        r0, r1 = self.at, self.at + rows.shape[0]
        self.dtype = rows.dtype
        if self.kind == "int8":
            self.q[r0:r1], self.scale[r0:r1] = quantize_rows_int8(rows)
        else:
            t = _fit_int4(rows)
            if self.planes is None:
                self.cfg = t.cfg
                self.planes = torch.empty(t.planes.shape[0], self.rows, *t.planes.shape[2:], dtype=t.planes.dtype)
                self.scale = torch.empty(self.rows, *t.scale.shape[1:], dtype=t.scale.dtype)
                self.offset = torch.empty(self.rows, *t.offset.shape[1:], dtype=t.offset.dtype)
            self.planes[:, r0:r1], self.scale[r0:r1], self.offset[r0:r1] = t.planes, t.scale, t.offset
        self.at = r1

    def finish(self) -> None:
        if self.kind == "int8":
            self.done((self.q, self.scale), self.dtype)
            return
        from d2moe.quantize.types import MWQTensor

        t = MWQTensor((self.rows, self.cols), self.cfg, 4, self.scale, self.offset, self.planes, None)
        self.done(_kernel_layout(PackedMatrix.from_mwq(t)), self.dtype)


class StreamingConverter:
    """Converts a model's dense Linear weights while dense.safetensors is read, a chunk of rows at a time,
    so loading never holds a converted layer's source whole (`plan_bytes` is the peak it holds).

    `model` is the meta skeleton (names, module types and tied weights are known before any byte is read);
    `keep` names weights that stay as they are (the routers, read by the runtime too). Its `sink_for` is the
    reader's (quantize.format.checked.read_checked_safetensors); `converted` holds each converted layer's
    form for `patch_linears`.
    """

    def __init__(self, model: nn.Module, weights: str, keep: set[str] = frozenset()):
        self.weights = weights
        shared = _shared_weights(model)
        self.linears = {f"{name}.weight": (name, tuple(m.weight.shape), type(m) is nn.Embedding)
                        for name, m in model.named_modules()
                        if type(m) in (nn.Linear, nn.Embedding) and id(m.weight) not in shared and f"{name}.weight" not in keep}
        self.converted: dict[str, tuple[str, object, torch.dtype]] = {}  # name: (kind, form, source dtype)

    def kind(self, key: str, shape: tuple[int, ...], dtype: torch.dtype | None) -> str:
        """How tensor `key` is loaded; a shape the model does not expect stays as read, for the loader's
        size check to name."""
        if key not in self.linears or tuple(shape) != self.linears[key][1] or dtype not in cpu.DENSE_DTYPES:
            return "source"
        return conversion(tuple(shape), dtype, self.weights, embedding=self.linears[key][2])

    def sink_for(self, key: str, shape: tuple[int, ...], dtype: torch.dtype):
        kind = self.kind(key, shape, dtype)
        if kind == "source":
            return None
        name = self.linears[key][0]
        return _RowConversion(tuple(shape), kind, lambda form, dt: self.converted.__setitem__(name, (kind, form, dt)))

    def int4_fallbacks(self) -> dict[str, tuple[int, ...]]:
        """{layer: shape} of the Linear weights --dense-weights int4 converted to int8 instead: a width that is not
        a multiple of INT4_GROUP has no whole 4-bit group."""
        if self.weights != "int4":
            return {}
        embeddings = {name for name, _, embedding in self.linears.values() if embedding}
        return {name: tuple(form[0].shape) for name, (kind, form, _) in self.converted.items()
                if kind == "int8" and name not in embeddings}

    def notes(self) -> list[str]:
        """What a run should be told once loading is done: nothing converted at all, or int4's int8 fallbacks."""
        if not self.converted:
            return [f"--dense-weights {self.weights}: no dense weight was converted (each is tied, a router, or under "
                    f"{INT8_MIN_ELEMS} elements): the dense layers keep their dtype"]
        fallbacks = self.int4_fallbacks()
        if not fallbacks:
            return []
        widths = ", ".join(str(w) for w in sorted({shape[1] for shape in fallbacks.values()}))
        return [f"--dense-weights int4: {len(fallbacks)} dense weight(s) of width {widths} (not a multiple of "
                f"{INT4_GROUP}) are int8 instead"]

    def plan_bytes(self, tensors: dict[str, tuple[tuple[int, ...], torch.dtype | None, int]]) -> int:
        """Peak bytes of loading `tensors` ({key: (shape, dtype, nbytes)}, the file's header) this way: every
        weight as it ends up, plus the largest moment of one conversion."""
        from d2moe.quantize.format.checked import sink_rows

        total, moment = 0, 0
        for key, (shape, dtype, nbytes) in tensors.items():
            kind = self.kind(key, shape, dtype)
            total += converted_nbytes(tuple(shape), kind, nbytes)
            if kind != "source":
                moment = max(moment, conversion_scratch(tuple(shape), kind, sink_rows(shape[1], dtype)))
        return total + moment


def patch_linears(model: nn.Module, lib, splitter: cpu.RowSplitter, weights: str = "source", keep=(),
                  converted: dict[str, tuple[str, object, torch.dtype]] | None = None) -> int:
    """Route the model's resident CPU `nn.Linear` layers through the kernel; count them. Weights in
    `keep` (the routers, read by the runtime too) and weights shared by two modules stay in their dtype;
    `weights` (WEIGHTS) is what the large others become. `converted` ({module name: (kind, form, source dtype)}, from a
    StreamingConverter) holds layers already converted while loading: their weights are not read again."""
    check_weights(weights)
    if lib is None:
        return 0
    converted = converted or {}
    shared = _shared_weights(model) | {id(p) for p in keep}
    n = 0
    for name, module in model.named_modules():
        embedding = type(module) is nn.Embedding
        if type(module) is not nn.Linear and not embedding:
            continue
        if name in converted:
            kind, form, dtype = converted[name]
        else:
            w = module.weight
            if w.device.type != "cpu" or w.dtype not in cpu.DENSE_DTYPES or w.is_meta or not w.is_contiguous():
                continue
            kind, dtype = conversion(tuple(w.shape), w.dtype, weights, id(w) in shared, embedding), w.dtype
            form = None if kind == "source" else convert_weight(w, kind)
        if embedding:
            if kind == "int8":
                _install_int8_embedding(module, *form, dtype)
            continue
        if kind == "int4":
            _swap_weight(module, weight_int4_offset=form.offset, weight_int4_scale=form.scale,
                         **{f"weight_int4_plane{i}": p for i, p in enumerate(form.planes)})
            module.forward = _int4_forward(module, lib, splitter, cpu.MatrixDesc(form, 4))
        elif kind == "int8":
            q, scale = form
            _swap_weight(module, weight_int8=q, weight_scale=scale)
            module.forward = _int8_forward(module, lib, splitter, q.shape)
        else:
            module.forward = _kernel_forward(module, lib, splitter)
        n += 1
    return n


def _swap_weight(module: nn.Module, **buffers: torch.Tensor) -> None:
    """The module's weight (real, or still meta when it was converted while read) replaced by its converted
    buffers: the source's bytes are freed, and the buffers are counted with the model's."""
    del module.weight
    for name, t in buffers.items():
        module.register_buffer(name, t)


def _install_int8_embedding(module: nn.Embedding, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
    """The table as per-row int8 + scale: a lookup widens only the rows it gathers, to the dtype the table had
    (the one the layers after it compute in)."""
    _swap_weight(module, weight_int8=q, weight_scale=scale)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return (F.embedding(ids, q).float() * F.embedding(ids, scale[:, None])).to(dtype)

    module.forward = forward


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters held by more than one module (tied embeddings)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, v in seen.items() if v > 1}


def _tokens(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _kernel_forward(module: nn.Linear, lib, splitter):
    def forward(x: torch.Tensor) -> torch.Tensor:
        w = module.weight
        tokens = _tokens(x)
        if tokens == 0 or x.device.type != "cpu" or (torch.is_grad_enabled() and w.requires_grad):
            return F.linear(x, w, module.bias)
        if tokens > MAX_TOKENS:
            if w.dtype == torch.float32 or _NATIVE_HALF_GEMM:
                return F.linear(x, w, module.bias)
            y = _tiled_fp32(w, x.reshape(tokens, x.shape[-1]))
        else:
            y = cpu.dense_gemv(lib, w, x.reshape(tokens, x.shape[-1]), splitter=splitter)
        if module.bias is not None:
            y += module.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])

    return forward


def _tiled_fp32(w: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, I] @ (w * scale per row)^T with TILE_ROWS rows of w at a time widened to float32, never the
    whole matrix: int8 prefill, and 16-bit prefill on a CPU without a native bf16/f16 GEMM (torch's runs in
    software there, ~10x slower than fp32)."""
    rows = w.shape[0]
    yt = torch.empty(rows, x.shape[0], dtype=torch.float32)  # W x^T, transposed at the end
    xt = x.float().t()
    for r0 in range(0, rows, TILE_ROWS):
        r1 = min(rows, r0 + TILE_ROWS)
        tile = w[r0:r1].float()
        torch.mm(tile if scale is None else tile.mul_(scale[r0:r1, None]), xt, out=yt[r0:r1])
    return yt.t()


def _int4_forward(module: nn.Linear, lib, splitter, desc: cpu.MatrixDesc):
    """The expert kernels' per-matrix path: int8-activation GEMV up to their measured limit against float32
    tiles, which serve above it (a dense layer's 4-bit error is its only one: no bf16 rounding on top)."""
    from d2moe.kernels.dispatch import gemv_limit, tiled_matmul

    rows, cols, limit = desc.rows, desc.cols, gemv_limit(8, torch.float32)
    one_call = os.environ.get("D2MOE_SPLIT") != "python"  # cpu.linear splits in the library only (A/B: gemv)

    def forward(x: torch.Tensor) -> torch.Tensor:
        tokens = _tokens(x)
        x2 = x.reshape(tokens, cols).float()
        if tokens <= limit and one_call:
            y = cpu.linear(lib, desc, x2, 8, splitter)
        elif tokens <= limit:
            y = cpu.gemv(lib, desc, cpu.QuantizedX(lib, x2, INT4_GROUP, 8), splitter)
        else:  # prefill
            y = tiled_matmul(lib, desc, x2, splitter, dtype=torch.float32)
        if module.bias is not None:
            y += module.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], rows)

    return forward


def _int8_forward(module: nn.Linear, lib, splitter, shape: torch.Size):
    rows, cols = shape

    def forward(x: torch.Tensor) -> torch.Tensor:
        q, scale = module.weight_int8, module.weight_scale
        tokens = _tokens(x)
        x2 = x.reshape(tokens, cols)
        if tokens <= MAX_TOKENS:
            y = cpu.dense_gemv(lib, q, x2, scale, splitter=splitter)
        else:  # prefill
            y = _tiled_fp32(q, x2, scale)
        if module.bias is not None:
            y += module.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], rows)

    return forward
