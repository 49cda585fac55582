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
one-level 4-bit MWQ matrix (the experts' own format and fit, group 64: 4.5 bits per weight) and
computes it with the expert kernels: a quarter of bf16's bytes. Both cost perplexity, measured in
BENCHMARKS.md. Weights shared with another module (tied embeddings) stay as they are. Results are
float32-accumulated and returned in the layer's dtype, like torch's.
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
TILE_ROWS = 512  # prefill: rows widened to float32 at a time (int8, or 16-bit without a native 16-bit GEMM)
_NATIVE_HALF_GEMM = cpu.has_bf16_gemm()


def quantize_rows_int8(w: torch.Tensor, chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: (q int8 [O, I], scale float32 [O]) with w ~ q * scale[:, None], a chunk of
    rows at a time (a float32 copy of a whole LM head would be several times its bf16 size)."""
    rows = w.shape[0]
    q = torch.empty(w.shape, dtype=torch.int8)
    scale = torch.empty(rows, dtype=torch.float32)
    for r0 in range(0, rows, chunk_rows):
        w32 = w[r0:r0 + chunk_rows].detach().float()
        s = w32.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
        q[r0:r0 + chunk_rows] = torch.round(w32 / s[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[r0:r0 + chunk_rows] = s
    return q, scale


def quantize_int4(w: torch.Tensor) -> PackedMatrix:
    """w [O, I] as a one-level 4-bit MWQ matrix (native fit, group INT4_GROUP), planes as the kernels read them."""
    from d2moe.quantize import MWQConfig, native

    qlib = native.load()
    if qlib is None:
        raise UsageError("--dense-weights int4 needs the native quantizer (a C compiler): use int8 or source")
    fit = native.fit_sliced(qlib, w.detach(), MWQConfig(bits=(4,), group_size=INT4_GROUP), refits=0, weighting="mse")
    m = PackedMatrix.from_mwq(fit.tensor)
    return cpu.blocked(m) if cpu.blocks_planes(INT4_GROUP) else m


def patch_linears(model: nn.Module, lib, splitter: cpu.RowSplitter, weights: str = "source", keep=()) -> int:
    """Route the model's resident CPU `nn.Linear` layers through the kernel; count them. Weights in
    `keep` (the routers, read by the runtime too) and weights shared by two modules stay in their dtype;
    `weights` (WEIGHTS) is what the large others become."""
    if weights not in WEIGHTS:
        raise UsageError(f"--dense-weights {weights!r} is unknown: use {', '.join(WEIGHTS)}")
    if lib is None:
        return 0
    shared = _shared_weights(model) | {id(p) for p in keep}
    n = 0
    for module in model.modules():
        if type(module) is not nn.Linear:
            continue
        w = module.weight
        if w.device.type != "cpu" or w.dtype not in cpu.DENSE_DTYPES or w.is_meta or not w.is_contiguous():
            continue
        small = w.numel() < INT8_MIN_ELEMS or id(w) in shared or w.dtype == torch.int8
        if weights == "int4" and not small and w.shape[1] % INT4_GROUP == 0:
            m = quantize_int4(w)
            del module.weight  # the packed copy replaces it: its bytes are freed
            for name, t in (("offset", m.offset), ("scale", m.scale), *((f"plane{i}", p) for i, p in enumerate(m.planes))):
                module.register_buffer(f"weight_int4_{name}", t)  # counted with the model's buffers
            module.forward = _int4_forward(module, lib, splitter, cpu.MatrixDesc(m, 4))
        elif weights != "source" and not small:
            q, scale = quantize_rows_int8(w)
            del module.weight  # the int8 copy replaces it: its bytes are freed
            module.register_buffer("weight_int8", q)
            module.register_buffer("weight_scale", scale)
            module.forward = _int8_forward(module, lib, splitter, w.shape)
        else:
            module.forward = _kernel_forward(module, lib, splitter)
        n += 1
    return n


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
