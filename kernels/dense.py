"""Decode-time dense layers on the native kernel: every `nn.Linear` of the assembled model (attention
projections, routers, shared experts, the LM head) computes a few-token input with
`d2moe.kernels.cpu.dense_gemv` on the expert kernels' threads, and anything larger with torch.

Why: a decode step reads every dense weight once for one token, so it is bound by memory
bandwidth; torch's bf16 GEMV reached 10.6 GB/s on a Zen 4 core where a plain load-convert-FMA
loop reaches the memory's rate (BENCHMARKS.md), and torch's intra-op threads stall whenever
another process holds a core, where the kernels' row splitter hands a slowed thread fewer rows.
The weights stay where the model holds them (no copy); results are float32-accumulated and
returned in the layer's dtype, like torch's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from d2moe.kernels import cpu

MAX_TOKENS = 8  # above: torch's GEMM (prefill), where the weights are reused across tokens


def patch_linears(model: nn.Module, lib, splitter: cpu.RowSplitter, skip: tuple[type, ...] = ()) -> int:
    """Route the model's resident CPU `nn.Linear` layers through the kernel for small inputs; count them."""
    if lib is None:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, skip) or type(module) is not nn.Linear:
            continue
        w = module.weight
        if w.device.type != "cpu" or w.dtype not in cpu.DENSE_DTYPES or w.is_meta or not w.is_contiguous():
            continue
        module.forward = _kernel_forward(module, lib, splitter)
        n += 1
    return n


def _kernel_forward(module: nn.Linear, lib, splitter):
    def forward(x: torch.Tensor) -> torch.Tensor:
        w = module.weight
        tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if tokens == 0 or tokens > MAX_TOKENS or x.device.type != "cpu" or torch.is_grad_enabled() and w.requires_grad:
            return F.linear(x, w, module.bias)
        y = cpu.dense_gemv(lib, w, x.reshape(tokens, x.shape[-1]), splitter=splitter)
        if module.bias is not None:
            y += module.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])

    return forward
