"""Where every tensor of one expert blob sits: a pure function of the matrix shapes and the MWQ config."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from d2moe.errors import UnsupportedModelError, UsageError
from d2moe.quantize.format.constants import ALIGN, MATRICES
from d2moe.quantize.subblock import SUPER_PARAMS, n_supers
from d2moe.quantize.types import MWQConfig


@dataclass(frozen=True)
class Slot:
    """One tensor inside a level segment."""

    matrix: str
    name: str  # "scale" | "offset" | "alpha" | "planes" (subblock: "scale" holds codes, "offset" super-blocks)
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset inside the segment

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * (2 if self.dtype == torch.float16 else 1)


@dataclass(frozen=True)
class BlobLayout:
    segments: tuple[tuple[Slot, ...], ...]  # per level
    level_ends: tuple[int, ...]  # padded prefix length per level

    @property
    def nbytes(self) -> int:
        return self.level_ends[-1]

    def segment_range(self, i: int) -> tuple[int, int]:
        return (self.level_ends[i - 1] if i else 0), self.level_ends[i]


@lru_cache(maxsize=64)
def _layout(shapes: tuple[tuple[str, int, int], ...], cfg: MWQConfig) -> BlobLayout:
    segments, ends, end = [], [], 0
    for i, bits in enumerate(cfg.bits):
        slots, cursor = [], 0
        for matrix, rows, cols in shapes:
            groups, row_bytes = cols // cfg.group_size, cols // 8
            if i == 0 and cfg.scheme == "subblock":  # parameter codes, super-block parameters (quantize.subblock)
                names = [("scale", torch.uint8, (rows, groups)),
                         ("offset", torch.float16, (rows, n_supers(groups, cfg.group_size), SUPER_PARAMS)),
                         ("planes", torch.uint8, (bits, rows, row_bytes))]
            elif i == 0:
                names = [("scale", torch.float16, (rows, groups)), ("offset", torch.float16, (rows, groups)),
                         ("planes", torch.uint8, (bits, rows, row_bytes))]
            else:
                n = bits - cfg.bits[i - 1]
                names = [("alpha", torch.float16, (n, rows, groups))] if cfg.scheme == "residual" else []
                names.append(("planes", torch.uint8, (n, rows, row_bytes)))
            for name, dtype, shape in names:
                slot = Slot(matrix, name, dtype, shape, cursor)
                slots.append(slot)
                cursor += slot.nbytes
        end += -(-cursor // ALIGN) * ALIGN
        segments.append(tuple(slots))
        ends.append(end)
    return BlobLayout(tuple(segments), tuple(ends))


def blob_layout(matrix_shapes: dict[str, tuple[int, int]], cfg: MWQConfig) -> BlobLayout:
    """Where every tensor of one expert blob sits, from the matrix shapes and the MWQ config."""
    for matrix in MATRICES:
        rows, cols = matrix_shapes[matrix]
        if rows <= 0 or cols <= 0 or cols % cfg.group_size:
            raise _no_groups(matrix, rows, cols, [matrix_shapes[m][1] for m in MATRICES], cfg)
    return _layout(tuple((m, *matrix_shapes[m]) for m in MATRICES), cfg)


def usable_group_sizes(widths: list[int], scheme: str) -> list[int]:
    """Group sizes (multiples of 8; for subblock, dividing its 256-column super-blocks) dividing every width."""
    g = math.gcd(*widths)
    return [s for s in range(8, g + 1, 8) if g % s == 0 and (scheme != "subblock" or 256 % s == 0)]


def _no_groups(matrix: str, rows: int, cols: int, widths: list[int], cfg: MWQConfig) -> Exception:
    """The error for a group size that does not divide an expert width: the sizes that would, or that none does
    (8 divides every scheme's super-block, so a width a multiple of 8 always has one)."""
    where = f"expert matrix {matrix} [{rows}, {cols}] cannot be split in groups of {cfg.group_size} columns"
    usable = usable_group_sizes(widths, cfg.scheme) if min(widths) > 0 else []
    if usable:
        return UsageError(f"{where}: use --group-size {' or '.join(str(s) for s in usable[-3:])} (they divide every "
                          "expert width)")
    return UnsupportedModelError(f"expert widths {sorted(set(widths))} have no common divisor that is a multiple of 8, "
                                 "so no group size fits them: d2moe cannot pack this model")
