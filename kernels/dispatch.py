"""Which code computes an expert: the native CPU kernels where they build, else the torch reference.

`ExpertKernels(backend="auto"|"native"|"reference", threads=1)` is what the runtime holds. For
one expert at one level it gives `prepare(mats, level)` (kernel-ready descriptors over the packed
views: cheap, and kept with the cache entry so a resident expert is not re-described every step)
and `forward(prepared, x, act_fn) -> y` for the SwiGLU expert y = down(act(gate x) * up x).

Decode quantizes the activations per group of the weight grid, as int8 (llama.cpp's Q8 activations:
one VNNI dot product per chunk, ~20% faster on 14336x4096) or int16 as two int8 halves (within
~1e-4 of the float reference). By default (`run --activations auto`) levels up to 4 use int8 (their
weights' own error, SQNR ~21 dB at 4 bits, is far above int8 activations' ~40 dB) and higher
levels int16, so that an 8-bit expert is not limited by its activations.

Token counts pick the path (crossovers measured at 14336x4096 on a Zen 4 and an AVX2 Zen 3, BENCHMARKS.md):
up to `gemv_limit(level)` rows the integer kernel reads a row tile's planes once per 4-token register
block; above it (prefill) the weights are dequantized a tile of rows at a time into a bounded
buffer per thread feeding torch's GEMM (bf16 where the CPU multiplies bf16 natively, as a bf16
checkpoint runs in transformers; fp32 elsewhere), so the dequantization is paid once for all
tokens. Neither path ever holds an fp32 copy of a whole matrix: `workspace_bytes` is what they hold.

`D2MOE_KERNELS=reference` forces the torch reference (tests use it as the oracle).

`device="cuda"` puts the CUDA kernels (kernels/cuda.py) behind the same calls, self-checked on the
device at first use (kernels/selfcheck.py; a failing kernel falls back to the reference on the
device); `forward_group` then runs all resident experts of a layer step in one grouped launch.
`D2MOE_CUDA_EMULATE=1` runs that path on CPU with the emulated kernels (tests).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from d2moe.errors import UsageError
from d2moe.kernels import cpu
from d2moe.kernels.packed import PackedMatrix
from d2moe.kernels.reference import dequantize_reference

BACKENDS = ("auto", "native", "reference")
GEMV_MAX_TOKENS = 16  # above: tile dequantization + GEMM (crossover measured at real shapes)
# int8 activations against float32 tiles (CPUs without a native bf16 GEMM): the integer kernel stays ahead
# to ~64-128 tokens (14336x4096, AVX2 Zen 3: level 4 at 32 tokens 85 ms vs 107 for tiles, level 2 68 vs 112;
# level 8's int16 activations lose from ~10 tokens, so they keep the default)
# The same holds for int8 activations on AVX-512's ROWS16 layout, whatever the tiles (14336x4096, Zen 4, bf16
# tiles: level 4 at 64 tokens 42 ms vs 49, level 2 34 vs 45; at 128 a tie for level 4)
GEMV_MAX_TOKENS_INT8_FP32 = 64
# ROWS16 after its accumulators went back in registers (BENCHMARKS.md §0.16): 14336x4096 on an Ice Lake (fp32 tiles),
# int8 at 128 tokens 45-49 ms vs 95-102 for tiles, at 256 94-98 vs 156-157; bf16 tiles (Zen 4) tied at 128 before
# the kernel gained 25-35% there, so 128 is kept where tiles are bf16
GEMV_MAX_TOKENS_ROWS16 = {torch.float32: 256, torch.bfloat16: 128}
INT8_ACTIVATIONS_UP_TO = 4  # auto: int8 activations for levels <= 4, int16 above
TILE_ROWS = 256  # rows per dequantized tile: 256 x 14336 x 2 B = 7 MiB at Mixtral's widest (bf16)
# Prefill tiles in bf16 where the CPU has a native bf16 GEMM, else fp32 (a software bf16 GEMM is far slower)
TILE_DTYPE = torch.bfloat16 if cpu.has_bf16_gemm() else torch.float32
# bf16 tiles' GEMM columns (tokens) padded up: oneDNN keeps the kernel it builds for each GEMM shape, and a
# prompt's every distinct count of tokens routed to an expert kept one more on the heap, outside the budget (115 MB
# after a 3500-token prompt on the embedded model, whose budget was 79 MiB). Multiples of 16 columns (one AMX tile)
# still left 32 shapes per matrix shape for a 512-token chunk at 0.5-1 MiB each (DeepSeek-V3 with 96-wide experts:
# 68 MiB of a 59 MiB budget). Four widths per octave leave 16, padding at most a quarter: a ladder of 1.5x steps
# left 10 but cost 1.15-1.19x at 257 tokens of a 14336x4096 matrix. torch's fp32 GEMM (MKL) keeps none.
TOKEN_BUCKET = {torch.bfloat16: 16}


def gemm_width(tokens: int, dtype: torch.dtype) -> int:
    """The GEMM's column count for `tokens` tokens: for bf16 tiles the next multiple of 16 up to 128, of 32 up to
    256, of 64 up to 512, ...; `tokens` itself for the others."""
    step = TOKEN_BUCKET.get(dtype)
    if step is None:
        return tokens
    while tokens > 8 * step:
        step *= 2
    return -(-tokens // step) * step


def _is_silu(act_fn) -> bool:
    """Whether the experts' activation is SiLU (the fused call computes it in C): torch's, or transformers'
    SiLUActivation (which calls F.silu)."""
    return act_fn is F.silu or isinstance(act_fn, torch.nn.SiLU) or type(act_fn).__name__ == "SiLUActivation"


def dequantize_packed(m: PackedMatrix, level: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The torch reference's [O, I] weight at `level` from a packed matrix (a full copy: oracle only)."""
    t = m.to_mwq()
    alpha = None if t.alpha is None else t.alpha[: level - m.cfg.b1]
    scale, offset = t.group_params()
    return dequantize_reference(scale, offset, t.planes[:level], alpha, m.cfg.b1, level, m.cfg.group_size, dtype)


@dataclass
class Prepared:
    """One expert at one level, ready to compute: descriptors (native) or packed matrices (reference)."""

    level: int
    gate: object
    up: object
    down: object


class ExpertKernels:
    def __init__(self, backend: str = "auto", threads: int = 1, gemv_max_tokens: int | None = None,
                 activation_bits: int | None = None, device: str = "cpu") -> None:
        if backend not in BACKENDS:
            raise UsageError(f"--kernels {backend!r} is unknown: use one of {', '.join(BACKENDS)}")
        if activation_bits not in (None, 8, 16):
            raise UsageError(f"--activations int{activation_bits} is unknown: use auto, int8 or int16")
        self.activation_bits = activation_bits  # None: by level (INT8_ACTIVATIONS_UP_TO)
        if os.environ.get("D2MOE_KERNELS", "").lower() == "reference":
            backend = "reference"
        self.device = device
        self.gpu = None  # CudaExperts for --device cuda (None: the reference there)
        if device != "cpu":
            self.lib = None
            if backend != "reference":
                from d2moe.kernels.cuda import checked_experts

                self.gpu = checked_experts()
        else:
            self.lib = None if backend == "reference" else cpu.load()
        if backend == "native" and self.lib is None and self.gpu is None:
            raise UsageError("native CPU kernels are unavailable here (no C compiler?): use --kernels auto or reference")
        self.splitter = cpu.RowSplitter(threads)
        # decode experts in one library call; D2MOE_FUSED_EXPERT=0 (or D2MOE_SPLIT=python) keeps the composed form (A/B)
        self.fused = os.environ.get("D2MOE_FUSED_EXPERT", "1") != "0" and os.environ.get("D2MOE_SPLIT") != "python"
        self.gemv_max_tokens = gemv_max_tokens  # None: by level and CPU (gemv_limit)
        self.workspace_bytes = 0  # what forward holds right now (activations, quantized x, a weight tile)
        self.on_workspace: Callable[[], None] | None = None  # called when the workspace reaches a new peak
        self._peak = 0

    @property
    def name(self) -> str:
        if self.gpu is not None:
            off = [k for k, on in self.gpu.enabled.items() if not on]
            return "cuda" + (f" (reference for {', '.join(off)})" if off else "")
        return cpu.simd_name() if self.lib is not None else "torch reference"

    @property
    def grouped(self) -> bool:
        """Whether `forward_group` runs several experts in one call: one launch on the GPU, one library call
        on the CPU (d2_experts_silu, small experts on the pool's threads at once)."""
        return self.gpu is not None or (self.lib is not None and self.fused)

    def forward_group(self, work: list[tuple[object, torch.Tensor]], act_fn) -> list[torch.Tensor]:
        """forward() of each (prepared, x): one grouped launch on the GPU, one library call for the decode-sized
        SiLU experts on the CPU, one call each otherwise."""
        if self.gpu is not None:
            return self.gpu.forward_group(work, act_fn, self.gemv_max_tokens or GEMV_MAX_TOKENS)
        fusable = self.lib is not None and self.fused and _is_silu(act_fn)
        batch = [i for i, (p, x) in enumerate(work) if fusable and isinstance(p.gate, cpu.MatrixDesc)
                 and x.shape[0] <= self.gemv_limit(p.level, p.gate.struct.layout)]
        out: list[torch.Tensor | None] = [None] * len(work)
        if batch:
            ys, workspace = cpu.experts_silu(self.lib, [(work[i][0].gate, work[i][0].up, work[i][0].down, work[i][1],
                                                        self.activation_bits_for(work[i][0].level)) for i in batch],
                                             self.splitter)
            self._hold(extra=workspace)
            for i, y in zip(batch, ys, strict=True):
                out[i] = y
        for i, (p, x) in enumerate(work):
            if out[i] is None:
                out[i] = self.forward(p, x, act_fn)
        return out

    def prepare(self, mats: dict[str, PackedMatrix], level: int) -> Prepared:
        if self.gpu is not None:
            return self.gpu.prepare(mats, level)
        if self.lib is None:
            return Prepared(level, mats["gate"], mats["up"], mats["down"])
        return Prepared(level, *(cpu.MatrixDesc(mats[m], level) for m in ("gate", "up", "down")))

    def forward(self, p: Prepared, x: torch.Tensor, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """y [N, H] = down(act(gate x) * (up x)) for x [N, H] float32."""
        if self.gpu is not None:
            return self.gpu.forward(p, x, act_fn, self.gemv_max_tokens or GEMV_MAX_TOKENS)
        if self.lib is None:
            return self._forward_reference(p, x, act_fn)
        if x.shape[0] > self.gemv_limit(p.level, p.gate.struct.layout):
            gate, up = self._tiled(p.gate, x), self._tiled(p.up, x)
            h = act_fn(gate) * up
            return self._tiled(p.down, h)
        bits = self.activation_bits_for(p.level)
        if self.fused and _is_silu(act_fn):  # one library call: no Python between the three GEMVs
            y, workspace = cpu.expert_silu(self.lib, p.gate, p.up, p.down, x, bits, self.splitter)
            self._hold(extra=workspace)
            return y
        qx = cpu.QuantizedX(self.lib, x, p.gate.group_size, bits)
        gate, up = self._gemv(p.gate, qx), self._gemv(p.up, qx)
        h = act_fn(gate) * up
        self._hold(qx, h)
        return self._gemv(p.down, cpu.QuantizedX(self.lib, h, p.down.group_size, bits))

    def activation_bits_for(self, level: int) -> int:
        return self.activation_bits or (8 if level <= INT8_ACTIVATIONS_UP_TO else 16)

    def gemv_limit(self, level: int, layout: int = cpu.ROWS) -> int:
        """Most rows the integer kernel takes at `level` on planes in `layout`; above, dequantized tiles
        feed a GEMM."""
        if self.gemv_max_tokens is not None:
            return self.gemv_max_tokens
        return gemv_limit(self.activation_bits_for(level), layout=layout)

    def _gemv(self, desc, qx) -> torch.Tensor:
        return cpu.gemv(self.lib, desc, qx, self.splitter)

    def _tiled(self, desc, x: torch.Tensor) -> torch.Tensor:
        return tiled_matmul(self.lib, desc, x, self.splitter, self._hold)

    def _forward_reference(self, p: Prepared, x, act_fn) -> torch.Tensor:
        level = p.level
        gate = dequantize_packed(p.gate, level)
        up = dequantize_packed(p.up, level)
        self._hold(gate, up)
        h = act_fn(F.linear(x, gate)) * F.linear(x, up)
        del gate, up
        down = dequantize_packed(p.down, level)
        self._hold(down, h)
        return F.linear(h, down)

    def _hold(self, *objs, extra: int = 0) -> None:
        """Record the bytes forward holds now (the memory meter samples them)."""
        n = extra
        for o in objs:
            for t in (o.tensors if isinstance(o, cpu.QuantizedX) else (o,)):
                n += t.numel() * t.element_size()
        self.workspace_bytes = n
        if n > self._peak:  # only a new peak can raise the meter's: sampling every call costs more than compute
            self._peak = n
            if self.on_workspace is not None:
                self.on_workspace()

    def release(self) -> None:
        self.workspace_bytes = 0

    def close(self) -> None:
        self.splitter.close()


def gemv_limit(activation_bits: int, tile_dtype: torch.dtype = TILE_DTYPE, layout: int = cpu.ROWS) -> int:
    """Most rows the integer kernel takes with these activations on planes in `layout` before `tile_dtype`
    tiles + GEMM win (measured)."""
    if activation_bits == 8 and layout == cpu.ROWS16:
        return GEMV_MAX_TOKENS_ROWS16.get(tile_dtype, GEMV_MAX_TOKENS_INT8_FP32)
    if activation_bits == 8 and tile_dtype == torch.float32:
        return GEMV_MAX_TOKENS_INT8_FP32
    return GEMV_MAX_TOKENS


def tiled_matmul(lib, desc, x: torch.Tensor, splitter: cpu.RowSplitter, hold: Callable[..., None] | None = None,
                 dtype: torch.dtype = TILE_DTYPE) -> torch.Tensor:
    """x [N, I] @ W^T float32 by dequantizing at most TILE_ROWS rows at a time per thread into a reused
    `dtype` buffer feeding torch's GEMM (one torch thread each: the splitter spreads the tiles). TILE_DTYPE
    is bf16 where the CPU has native bf16 (its GEMM has twice fp32's rate), fp32 elsewhere. `hold(*tensors,
    extra=bytes)` is told what the call holds (the memory meter)."""
    rows, tokens = desc.rows, x.shape[0]
    width = gemm_width(tokens, dtype)
    out = torch.empty(rows, width, dtype=dtype)  # W x^T, transposed at the end
    if width == tokens:
        xt = x.to(dtype).t()
    else:  # zero columns past the tokens: a GEMM shape oneDNN has already built
        xt = torch.zeros(width, x.shape[1], dtype=dtype)
        xt[:tokens] = x
        xt = xt.t()
    # the splitter spreads tiles over threads, each dequantizing and multiplying its own with one torch
    # thread: in the prefill forward torch has every thread (run.decode's prefill_threads), which left the
    # dequantization on one core and a small GEMM per tile paying a fork/join (measured at 2 threads:
    # 128-token prefill slower than at 1)
    threads = min(splitter.threads, max(1, rows // TILE_ROWS))
    if hold is not None:
        hold(out, x, xt, extra=threads * min(TILE_ROWS, rows) * desc.cols * dtype.itemsize)

    inference = torch.is_inference_mode_enabled()  # thread-local: the splitter's threads enter it too

    def rows_of(r0: int, r1: int) -> None:
        # one torch thread on every thread that runs tiles: OpenMP's thread count is per calling thread, so
        # the splitter's own threads would otherwise each start a full team and share the cores with it
        with torch.inference_mode(inference), torch_threads(1):
            tile = _tile_buffer(min(TILE_ROWS, r1 - r0) * desc.cols, dtype).view(-1, desc.cols)
            for t0 in range(r0, r1, TILE_ROWS):
                t1 = min(r1, t0 + TILE_ROWS)
                w = cpu.dequant_rows(lib, desc, t0, t1, tile[: t1 - t0])
                torch.mm(w, xt, out=out[t0:t1])

    if threads == 1:
        rows_of(0, rows)
    else:
        splitter.run(rows_of, rows, rows * desc.cols * tokens, min_rows=TILE_ROWS)
    return out[:, :tokens].t().float()


_TILES = threading.local()


def _tile_buffer(n: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's reused tile of at least `n` elements. A fresh one per call was an mmap and a page
    fault per 4 KiB (the run's allocator maps blocks of 1 MiB or more on their own, for RSS's sake):
    with two threads faulting at once a 14336x4096 tile pass took 19 ms against 10 ms reused. Held
    for the thread's life; the memory plan's workspace counts a tile per kernel thread."""
    buf = getattr(_TILES, "buf", None)
    if buf is None or buf.dtype != dtype or buf.numel() < n:
        buf = _TILES.buf = None  # the old one goes before the larger one is made
        buf = _TILES.buf = torch.empty(n, dtype=dtype)
    return buf[:n]


@contextmanager
def torch_threads(n: int):
    """torch's intra-op threads for the calling thread set to `n` inside, restored after."""
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before != n:
            torch.set_num_threads(before)


# what oneDNN keeps per bf16 GEMM shape it has built (0.52-1.08 MiB measured, 96x128 to 256x14336 tiles)
GEMM_KERNEL_BYTES = 1 << 20


def tile_kernel_bytes(matrix_shapes: dict[str, tuple[int, int]], tokens: int) -> int:
    """What the GEMM kernels oneDNN keeps for bf16 tiles can add up to over a run whose forwards take at most
    `tokens` tokens: one per matrix shape, tile height (one, or a whole tile and a remainder) and gemm_width up to
    `tokens`'s; none for fp32 tiles."""
    if TILE_DTYPE not in TOKEN_BUCKET or tokens <= 0:
        return 0
    widths, width = 0, 0
    while width < tokens:  # up the ladder, one width at a time
        width, widths = gemm_width(width + 1, TILE_DTYPE), widths + 1
    heights = sum(1 if rows <= TILE_ROWS else 2 for rows, _ in set(matrix_shapes.values()))
    return widths * heights * GEMM_KERNEL_BYTES


def workspace_bound(matrix_shapes: dict[str, tuple[int, int]], tokens: int, threads: int) -> int:
    """Most bytes `forward` holds for `tokens` rows on `threads` threads: the larger path's working set, and the
    GEMM kernels its bf16 tiles leave behind (tile_kernel_bytes)."""
    hidden = matrix_shapes["down"][0]
    inter = matrix_shapes["gate"][0]
    widest = max(i for _, i in matrix_shapes.values())
    acts = 4 * tokens * (hidden + 3 * inter)  # x, gate, up, h (float32)
    quantized = tokens * (2 * max(hidden, inter) + 8 * max(hidden, inter) // 8)  # hi/lo + steps/sums
    tile = TILE_DTYPE.itemsize * min(TILE_ROWS, max(o for o, _ in matrix_shapes.values())) * widest * threads
    out_t = 4 * tokens * max(hidden, inter)
    return acts + max(quantized, tile + out_t) + tile_kernel_bytes(matrix_shapes, tokens)
