"""The sliced MWQ fit in C (quantize/native/mwq_fit.c), built at first use like the CPU kernels, with
pack --calib's GPTQ codes (quantize/native/gptq.c, called by d2moe.quantize.gptq).

The same algorithm as the torch fit (d2moe.quantize.grid.search_grid: the readable specification and
the fallback where no compiler is found), about 40x faster per core: one pass per candidate grid over
a group held in registers instead of a dozen tensor ops over cache-sized chunks. It reads bf16/f16/f32
weights in place (no float32 copy of the matrix), writes the bit-planes directly, and returns each
level's squared error and the signal, so pack needs no dequantization pass for its SQNR report.
Rows are split across threads (ctypes releases the GIL); the result does not depend on the count.
"""

from __future__ import annotations

import ctypes
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from d2moe.errors import UsageError
from d2moe.kernels import cpu
from d2moe.quantize.grid import check_shape
from d2moe.quantize.subblock import SUPER_PARAMS, n_supers
from d2moe.quantize.types import MWQConfig, MWQTensor

SOURCES = [Path(__file__).parent / "native" / name for name in ("mwq_fit.c", "gptq.c")]
# No -ffast-math and no FMA contraction (bit-reproducible whatever the vector width: gptq.c fuses its feedback
# steps explicitly, the same on every target); no traps and errno let floorf vectorise without changing a result.
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno", "-shared", "-fPIC", "-std=gnu11"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ROWS_PER_TASK = 256
# Each element's share of the fit's error (the C side's weighting mode is the index): equal; sqrt(2 mean x^2 + x^2)
# (K-quants' weighting at 3-6 bits); |x| (Q2_K's: the large weights kept, measured best on trained MoEs).
WEIGHTINGS = ("mse", "magnitude", "abs")
DEFAULT_WEIGHTING = "abs"
NATIVE_SCHEMES = ("sliced", "subblock")


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled fit, or None (one warning) where it cannot be built: callers use the torch fit."""
    cc = cpu.compiler()
    if cc is None:
        warnings.warn("no C compiler found (set CC): pack uses the slower torch quantizer", stacklevel=2)
        return None
    try:
        return build(cc, FLAGS)
    except (OSError, RuntimeError) as exc:
        warnings.warn(f"building the native quantizer failed ({exc}): pack uses the slower torch quantizer", stacklevel=2)
        return None


def build(cc: str, flags: list[str]) -> ctypes.CDLL:
    """The fit library compiled by `cc` with `flags` (cached), its entry points typed. Raises OSError/RuntimeError."""
    lib = ctypes.CDLL(str(cpu.build_shared(cc, SOURCES, flags)))
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
    lib.d2q_fit_rows.argtypes = [p, i32, i64, i32, i32, i32, i32, i32, i32, p, p, i32, i32, i32, i32, p, p, p, p, p]
    lib.d2q_fit_rows.restype = ctypes.c_int
    lib.d2q_fit_rows_subblock.argtypes = [p, i32, i64, i32, i32, i32, i32, i32, i32, p, p, i32, i32, i32, i32, p, p, p, p, p]
    lib.d2q_fit_rows_subblock.restype = ctypes.c_int
    f32 = ctypes.c_float
    lib.d2q_gptq_rows.argtypes = [p, i32, i32, p, i32, p, p, i32, i32, p, f32, p, i32, i32]
    lib.d2q_gptq_rows.restype = ctypes.c_int
    lib.d2q_pack_rows.argtypes = [p, i32, i32, i32, p, i32, i32]
    lib.d2q_pack_rows.restype = None
    return lib


@dataclass
class Fit:
    """One fitted matrix: the MWQ tensor, each level's squared error (unweighted) and the signal."""

    tensor: MWQTensor
    sq_error: list[float]
    signal: float


def fit_sliced(lib, w: torch.Tensor, cfg: MWQConfig, col_weight: torch.Tensor | None = None, refits: int = 0,
               pool: ThreadPoolExecutor | None = None, weighting: str = "mse") -> Fit:
    """Fit a [O, I] float32/bfloat16/float16 matrix (row stride may exceed I) as a sliced or subblock MWQ
    tensor (subblock: d2moe.quantize.subblock, each grid fitted for level b1, parameters as codes).

    `weighting`: each element's share of the error, one of WEIGHTINGS (times its column weight)."""
    if weighting not in WEIGHTINGS:
        raise UsageError(f"--weighting {weighting!r} is unknown: use {', '.join(WEIGHTINGS)}")
    if cfg.scheme not in NATIVE_SCHEMES:
        raise UsageError(f"the native quantizer fits the {' and '.join(NATIVE_SCHEMES)} schemes, not {cfg.scheme!r}")
    rows, cols = check_shape(tuple(w.shape), cfg.group_size)
    if w.dtype not in DTYPES or w.stride(1) != 1:
        w = w.float().contiguous()
    weight = None
    if col_weight is not None:
        weight = col_weight.detach().float().contiguous()
        if weight.shape != (cols,):
            raise UsageError(f"column weights of shape {tuple(weight.shape)} do not match {cols} input columns")
    g = cols // cfg.group_size
    planes = torch.empty(cfg.bk, rows, cols // 8, dtype=torch.uint8)
    subblock = cfg.scheme == "subblock"
    if subblock:  # the tensor's "scale" and "offset" hold parameter codes and super-block parameters
        scale = torch.empty(rows, g, dtype=torch.uint8)
        offset = torch.empty(rows, n_supers(g, cfg.group_size), SUPER_PARAMS, dtype=torch.float16)
    else:
        scale = torch.empty(rows, g, dtype=torch.float16)
        offset = torch.empty(rows, g, dtype=torch.float16)
    fit_rows = lib.d2q_fit_rows_subblock if subblock else lib.d2q_fit_rows
    levels = (ctypes.c_int32 * len(cfg.bits))(*cfg.bits)
    chunks = [(r0, min(rows, r0 + ROWS_PER_TASK)) for r0 in range(0, rows, ROWS_PER_TASK)]
    errs = [(ctypes.c_double * len(cfg.bits))() for _ in chunks]
    signals = [ctypes.c_double() for _ in chunks]

    def run(k: int) -> int:
        r0, r1 = chunks[k]
        return fit_rows(
            w.data_ptr(), DTYPES[w.dtype], w.stride(0), rows, cols, cfg.group_size, cfg.bk, cfg.b1, len(cfg.bits),
            levels, None if weight is None else weight.data_ptr(), WEIGHTINGS.index(weighting), refits, r0, r1, planes.data_ptr(),
            scale.data_ptr(), offset.data_ptr(), errs[k], ctypes.byref(signals[k]))

    codes = list(pool.map(run, range(len(chunks)))) if pool is not None else [run(k) for k in range(len(chunks))]
    if any(c == -3 for c in codes):
        raise UsageError(f"weight of shape {tuple(w.shape)} holds NaN or infinite values; quantize a finite matrix")
    if any(c == -2 for c in codes):
        worst = float(w.float().abs().max())
        raise UsageError(f"weights reach {worst:g}, beyond float16 range of the stored scales; rescale the matrix")
    if any(c == -4 for c in codes):
        raise MemoryError(f"native quantizer: out of memory fitting a matrix of shape {tuple(w.shape)}")
    if any(codes):
        raise UsageError(f"native quantizer rejected shape {tuple(w.shape)} with {cfg}")
    tensor = MWQTensor((rows, cols), cfg, cfg.bk, scale, offset, planes, None)
    return Fit(tensor, [sum(e[i] for e in errs) for i in range(len(cfg.bits))], sum(s.value for s in signals))
