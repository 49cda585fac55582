"""The CUDA expert kernels (kernels/cuda/mwq.cu) behind one small interface, on a "launcher".

A launcher owns device memory and launches: `CupyLauncher` (a GPU: cupy.RawModule on torch's
current stream, pointers are CUDA addresses of torch tensors) or `EmulatedLauncher`
(kernels/cuda_emulator.py: the kernels' arithmetic in torch on CPU, reading the same argument
records through the same pointers). Everything above the launcher (records, geometry, token chunks,
grouping, the self-check and the fallback) is the same code on both, so CPU tests cover it.

`CudaExperts` is what the dispatcher (kernels/dispatch.py) holds for `--device cuda`:
  describe(m, level) -> GpuMat        # the D2Mat record, uploaded once (kept on the cache entry)
  dequant(desc, dtype) -> [O, I]      # (a) level-b weight in float16/bfloat16/float32
  gemv(items) -> [y]                  # (b)+(c) one grouped launch over (desc, x [N, I]) items
  forward(prepared, x, act) / forward_group([(prepared, x)], act)
Kernels disabled by the self-check (kernels/selfcheck.py) fall back to the torch reference on the
same device, one kernel at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from d2moe.kernels import cuda_abi as abi
from d2moe.kernels.packed import PackedMatrix

KERNEL_NAMES = ("dequant_f16", "dequant_bf16", "gemv", "gemv_grouped")


class CupyLauncher:
    """Launches on a real GPU, on torch's current stream (no host synchronisation)."""

    def __init__(self, device: torch.device | str = "cuda", defines: tuple[str, ...] = ()) -> None:
        from d2moe.kernels.cuda_build import module, require_cuda

        require_cuda()
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        import cupy

        self._cupy = cupy
        with cupy.cuda.Device(self.device.index):
            self._module = module(defines)
        self._functions: dict[str, object] = {}

    def ptr(self, t: torch.Tensor) -> int:
        return t.data_ptr()

    def upload(self, rec: np.ndarray) -> torch.Tensor:
        """The record's bytes on the device: a pinned host copy and an async copy on the current
        stream (torch's pinned allocator keeps the host block until that copy has run)."""
        host = torch.from_numpy(np.frombuffer(rec.tobytes(), np.uint8).copy()).pin_memory()
        return host.to(self.device, non_blocking=True)

    def launch(self, name: str, grid, block, args: tuple) -> None:
        fn = self._functions.get(name)
        if fn is None:
            fn = self._functions[name] = self._module.get_function(name)
        cargs = tuple(np.uint64(a) if isinstance(a, int) else a for a in args)
        stream = self._cupy.cuda.ExternalStream(torch.cuda.current_stream(self.device).cuda_stream)
        with self._cupy.cuda.Device(self.device.index), stream:
            fn(tuple(grid), tuple(block), cargs)


@dataclass
class GpuMat:
    """One matrix at one level, described for the kernels; holds the views its pointers point into."""

    record: np.ndarray  # D2Mat
    struct: torch.Tensor  # the record on the device
    matrix: PackedMatrix
    level: int
    rows: int
    cols: int


@dataclass
class GpuPrepared:
    level: int
    gate: GpuMat
    up: GpuMat
    down: GpuMat


class CudaExperts:
    def __init__(self, launcher, enabled: dict[str, bool] | None = None) -> None:
        self.launcher = launcher
        self.device = launcher.device
        self.enabled = {k: True for k in KERNEL_NAMES} | (enabled or {})

    # ---- the kernels ---------------------------------------------------------------------
    def describe(self, m: PackedMatrix, level: int) -> GpuMat:
        # the kernels read float16 (scale, offset) per group: scheme subblock's are expanded on the device
        # (+32 bits per group held with the descriptor, outside the cache's count)
        m = m.expanded()
        rec = abi.mat_record(m, level, self.launcher.ptr)
        rows, cols = m.shape
        return GpuMat(rec, self.launcher.upload(rec), m, level, rows, cols)

    def dequant(self, d: GpuMat, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        out = torch.empty(d.rows, d.cols, dtype=dtype, device=self.device)
        grid, block = abi.dequant_geometry(d.rows, d.cols)
        self.launcher.launch("d2_dequant", grid, block,
                             (self.launcher.ptr(d.struct), self.launcher.ptr(out), np.int32(abi.OUT_KINDS[dtype])))
        return out

    def gemv(self, items: list[tuple[GpuMat, torch.Tensor]]) -> list[torch.Tensor]:
        """y_i [N_i, O_i] = x_i W_i^T for every item in one launch (tokens split by MAX_TOKENS)."""
        ptr = self.launcher.ptr
        xs = [x.to(device=self.device, dtype=torch.float32).contiguous() for _, x in items]
        ys = [torch.empty(x.shape[0], d.rows, dtype=torch.float32, device=self.device) for (d, _), x in zip(items, xs, strict=True)]
        problems, rows = [], []
        for (d, _), x, y in zip(items, xs, ys, strict=True):
            for t0, t1 in abi.token_chunks(x.shape[0]):
                problems.append((d.record, ptr(x[t0:t1]), ptr(y[t0:t1]), t1 - t0))
                rows.append(d.rows)
        if problems:
            recs = self.launcher.upload(abi.problem_records(problems))
            grid, block = abi.gemv_geometry(rows)
            self.launcher.launch("d2_gemv", grid, block, (ptr(recs),))
        return ys

    # ---- the expert (SwiGLU) on the enabled kernels ----------------------------------------
    def prepare(self, mats: dict[str, PackedMatrix], level: int) -> GpuPrepared:
        return GpuPrepared(level, *(self.describe(mats[m], level) for m in ("gate", "up", "down")))

    def forward(self, p: GpuPrepared, x: torch.Tensor, act_fn: Callable, gemv_max_tokens: int = 16) -> torch.Tensor:
        return self.forward_group([(p, x)], act_fn, gemv_max_tokens)[0]

    def forward_group(self, work: list[tuple[GpuPrepared, torch.Tensor]], act_fn: Callable,
                      gemv_max_tokens: int = 16) -> list[torch.Tensor]:
        """Every (expert, tokens) of a layer step: decode-sized ones as two grouped GEMV launches
        (gate+up of all, then down of all), larger ones through dequantized bf16 tiles and torch."""
        small = [i for i, (_, x) in enumerate(work) if x.shape[0] <= gemv_max_tokens]
        out: list[torch.Tensor | None] = [None] * len(work)
        if small and self._gemv_ok(len(small)):
            gu = self.gemv([(m, work[i][1]) for i in small for m in (work[i][0].gate, work[i][0].up)])
            hs = [act_fn(gu[2 * j]) * gu[2 * j + 1] for j in range(len(small))]
            ys = self.gemv([(work[i][0].down, h) for i, h in zip(small, hs, strict=True)])
            for i, y in zip(small, ys, strict=True):
                out[i] = y
        for i, (p, x) in enumerate(work):
            if out[i] is None:
                out[i] = self._forward_dense(p, x.to(self.device, torch.float32), act_fn)
        return out

    def _gemv_ok(self, n: int) -> bool:
        return self.enabled["gemv"] and (n == 1 or self.enabled["gemv_grouped"])

    def weight(self, d: GpuMat, dtype: torch.dtype) -> torch.Tensor:
        """The [O, I] weight in `dtype` from the kernel, or from the torch reference when disabled."""
        name = {torch.float16: "dequant_f16", torch.bfloat16: "dequant_bf16"}.get(dtype)
        if name is not None and self.enabled[name]:
            return self.dequant(d, dtype)
        from d2moe.kernels.dispatch import dequantize_packed

        return dequantize_packed(d.matrix, d.level, dtype).to(self.device)

    def _forward_dense(self, p: GpuPrepared, x: torch.Tensor, act_fn: Callable) -> torch.Tensor:
        # one matrix's weight at a time (bf16: the tensor cores' rate; a bf16 checkpoint computes so)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        xb = x.to(dtype)
        h = act_fn(F.linear(xb, self.weight(p.gate, dtype)).float()) * F.linear(xb, self.weight(p.up, dtype)).float()
        return F.linear(h.to(dtype), self.weight(p.down, dtype)).float()


def relocate(m: PackedMatrix, device: torch.device | str, misalign: int = 0) -> PackedMatrix:
    """`m` with every tensor copied into ONE uint8 buffer on `device` (as a cached prefix is), starting
    `misalign` bytes into it (so the kernels' unaligned-plane path can be exercised)."""
    parts = [m.scale, m.offset, *m.planes, *m.alphas]
    sizes = [t.numel() * t.element_size() for t in parts]
    starts, pos = [], misalign
    for n in sizes:
        starts.append(pos)
        pos += n + (n % 2)  # float16 views need even offsets
    buf = torch.zeros(pos, dtype=torch.uint8)
    for t, s, n in zip(parts, starts, sizes, strict=True):
        buf[s:s + n] = t.contiguous().view(-1).view(torch.uint8)
    buf = buf.to(device)
    views = [buf[s:s + n].view(t.dtype).view(t.shape) for t, s, n in zip(parts, starts, sizes, strict=True)]
    k = len(m.planes)
    return PackedMatrix(m.shape, m.cfg, m.level, views[0], views[1], tuple(views[2:2 + k]), tuple(views[2 + k:]))


_checked: dict[str, CudaExperts] = {}


def checked_experts(device: str = "cuda") -> CudaExperts:
    """The process's CudaExperts for `device`, self-checked at first use (kernels/selfcheck.py).
    D2MOE_CUDA_EMULATE=1: on the CPU emulator (tests); D2MOE_CUDA_CORRUPT=k1,k2 corrupts those
    emulated kernels (to watch the check disable them)."""
    import os

    emulate = os.environ.get("D2MOE_CUDA_EMULATE", "") == "1"
    key = "emulated" if emulate else device
    if key not in _checked:
        from d2moe.kernels.selfcheck import checked

        if emulate:
            from d2moe.kernels.cuda_emulator import EmulatedLauncher

            corrupt = {k for k in os.environ.get("D2MOE_CUDA_CORRUPT", "").split(",") if k}
            launcher = EmulatedLauncher(corrupt)
        else:
            launcher = CupyLauncher(device)
        _checked[key] = checked(CudaExperts(launcher))[0]
    return _checked[key]
