"""What the CUDA kernels (kernels/cuda/mwq.cu) take: argument records, launch geometry, limits.

Pure functions over numpy and PackedMatrix: nothing here needs CuPy or a GPU, so the bookkeeping a
GPU run depends on (struct layout, term and plane pointers, grid sizes) is tested on any CPU. A
"pointer" is whatever `ptr_of(tensor)` returns: a CUDA address on a GPU, a CPU address under the
emulator (kernels/cuda_emulator.py), which resolves it back to its tensor.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from d2moe.kernels.packed import PackedMatrix

SOURCE = Path(__file__).parent / "cuda" / "mwq.cu"


@lru_cache(maxsize=1)
def constants() -> dict[str, int]:
    """The source's `#define D2_*` integers: one place states the limits and tile sizes."""
    return {k: int(v) for k, v in re.findall(r"^#define (D2_\w+) (\d+)$", SOURCE.read_text(), re.M)}


def _c(name: str) -> int:
    return constants()[f"D2_{name}"]


MAX_TERMS, MAX_PLANES, MAX_TOKENS = _c("MAX_TERMS"), _c("MAX_PLANES"), _c("MAX_TOKENS")
GEMV_THREADS = 32 * _c("GEMV_WARPS")
GEMV_ROWS_PER_BLOCK = _c("GEMV_WARPS") * _c("ROWS_PER_WARP")
DEQUANT_THREADS = _c("DEQUANT_THREADS")
OUT_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# struct D2Mat / D2Problem of mwq.cu, field for field (natural C alignment; tests compare the
# offsets with the host compiler's offsetof on the same struct text)
MAT_DTYPE = np.dtype([
    ("rows", "<i8"), ("cols", "<i8"), ("group_size", "<i8"), ("nterms", "<i8"),
    ("planes", "<u8", (MAX_PLANES,)), ("offset", "<u8"), ("coef", "<u8", (MAX_TERMS,)),
    ("first", "<i4", (MAX_TERMS,)), ("nplanes", "<i4", (MAX_TERMS,)),
    ("mul", "<f4", (MAX_TERMS,)), ("bias", "<f4", (MAX_TERMS,)),
    ("words_aligned", "<i4"), ("pad", "<i4"),
], align=True)
PROBLEM_DTYPE = np.dtype([("m", MAT_DTYPE), ("x", "<u8"), ("y", "<u8"), ("ntok", "<i8"), ("pad", "<i8")], align=True)

PtrOf = Callable[[torch.Tensor], int]


def mat_record(m: PackedMatrix, level: int, ptr_of: PtrOf) -> np.ndarray:
    """One D2Mat (a 0-d record array) describing `m` at `level`: its first `level` planes and the
    level's terms. Raises ValueError for what the kernels cannot take (too many planes/terms)."""
    rows, cols = m.shape
    terms = m.terms(level)
    if level > MAX_PLANES or len(terms) > MAX_TERMS:
        raise ValueError(f"level {level} with {len(terms)} terms exceeds the CUDA kernels' {MAX_PLANES} planes")
    views = [m.offset, *m.planes[:level], *(t.coef for t in terms)]
    if any(not v.is_contiguous() for v in views):
        raise ValueError("packed matrix views must be contiguous")
    rec = np.zeros((), MAT_DTYPE)
    rec["rows"], rec["cols"], rec["group_size"], rec["nterms"] = rows, cols, m.cfg.group_size, len(terms)
    planes = [ptr_of(m.planes[p]) for p in range(level)]
    rec["planes"][:level] = planes
    rec["offset"] = ptr_of(m.offset)
    for i, t in enumerate(terms):
        rec["coef"][i] = ptr_of(t.coef)
        rec["first"][i], rec["nplanes"][i], rec["mul"][i], rec["bias"][i] = t.first, t.nplanes, t.mul, t.bias
    rec["words_aligned"] = int(words_aligned(cols, planes))
    return rec


def words_aligned(cols: int, plane_ptrs: list[int]) -> bool:
    """Whether every plane row can be read as whole uint32 words (else the kernel assembles bytes)."""
    return cols % 32 == 0 and all(p % 4 == 0 for p in plane_ptrs)


def problem_records(items: list[tuple[np.ndarray, int, int, int]]) -> np.ndarray:
    """D2Problem array for a grouped GEMV from (mat record, x ptr, y ptr, tokens) items."""
    out = np.zeros(len(items), PROBLEM_DTYPE)
    for i, (mat, x, y, ntok) in enumerate(items):
        if not 1 <= ntok <= MAX_TOKENS:
            raise ValueError(f"a GEMV problem takes 1..{MAX_TOKENS} tokens, not {ntok}")
        out[i]["m"], out[i]["x"], out[i]["y"], out[i]["ntok"] = mat, x, y, ntok
    return out


def dequant_geometry(rows: int, cols: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(grid, block) of d2_dequant: one thread per (row, 32-column word)."""
    words = -(-cols // 32)
    return (rows, -(-words // DEQUANT_THREADS), 1), (DEQUANT_THREADS, 1, 1)


def gemv_geometry(rows: list[int]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(grid, block) of a grouped d2_gemv over problems with these row counts: x covers the tallest
    (blocks past a shorter problem's rows return at once), y the problems."""
    return (-(-max(rows) // GEMV_ROWS_PER_BLOCK), len(rows), 1), (GEMV_THREADS, 1, 1)


def token_chunks(ntok: int) -> list[tuple[int, int]]:
    """Token ranges of at most MAX_TOKENS (a decode batch above it becomes several problems)."""
    return [(t0, min(ntok, t0 + MAX_TOKENS)) for t0 in range(0, ntok, MAX_TOKENS)]
