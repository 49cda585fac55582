"""The two types every stage shares: how to quantize (`MWQConfig`) and what comes out (`MWQTensor`).

Shape letters: O = output features (rows), I = input features (columns), G = I // group_size
groups per row, P = bit-planes held.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from d2moe.errors import UsageError

SCHEMES = ("residual", "sliced", "subblock")
# What `pack` and `train-router` use unless told (BENCHMARKS.md §6.3: every level nearer the source than the
# K-quant of the same bits, in fewer bits than sliced/64, for ~10% of decode speed)
DEFAULT_SCHEME = "subblock"


def default_group_size(scheme: str) -> int:
    """Columns per group where --group-size is not given: 32 for subblock (its grids serve level b1 in small
    groups at 8 bits of codes each), 64 for the schemes with float16 parameters per group."""
    return 32 if scheme == "subblock" else 64


@dataclass(frozen=True)
class MWQConfig:
    """How a weight matrix is Matryoshka-quantized."""

    bits: tuple[int, ...] = (2, 3, 4)  # readable levels, ascending; b1 = bits[0], bk = bits[-1]
    group_size: int | None = None  # consecutive input columns sharing one scale/offset (None: default_group_size)
    # "sliced": tied plane magnitudes (MSB slicing), float16 (scale, offset) per group; "residual": plane
    # magnitudes fitted per group; "subblock": sliced, each group's (scale, offset) a 4-bit code pair against
    # float16 parameters per super-block of 256 columns (d2moe.quantize.subblock), its grid fitted for level b1
    scheme: str = DEFAULT_SCHEME

    def __post_init__(self) -> None:
        if self.group_size is None:
            object.__setattr__(self, "group_size", default_group_size(self.scheme))
        bits = tuple(int(b) for b in self.bits)
        object.__setattr__(self, "bits", bits)
        if not bits or list(bits) != sorted(set(bits)) or bits[0] < 1 or bits[-1] > 8:
            raise UsageError(f"bits {bits} must be distinct, ascending and within 1..8 (e.g. --bits 2,3,4)")
        if self.group_size < 8 or self.group_size % 8:
            raise UsageError(f"group size {self.group_size} must be a positive multiple of 8 (e.g. 64)")
        if self.scheme not in SCHEMES:
            raise UsageError(f"scheme {self.scheme!r} is unknown: use one of {', '.join(SCHEMES)}")
        if self.scheme == "subblock" and 256 % self.group_size:
            raise UsageError(f"--group-size {self.group_size} does not divide the subblock scheme's 256-column super-blocks: "
                             "use 8, 16, 32, 64, 128 or 256 (or --scheme sliced)")

    @property
    def b1(self) -> int:
        return self.bits[0]

    @property
    def bk(self) -> int:
        return self.bits[-1]

    def level_index(self, level: int) -> int:
        if level not in self.bits:
            raise UsageError(f"level {level} is not one of the packed levels {list(self.bits)}")
        return self.bits.index(level)


@dataclass(frozen=True)
class MWQTensor:
    """A bit-nested quantized matrix, holding everything up to `level` bits.

    Reconstruction at level b (b1 <= b <= level), per group g of row o:
        w = offset + scale * (q_b1 + 0.5) + sum_{j=1..b-b1} alpha_j * (2 * plane_{b1+j} - 1)
    where q_b1 is the b1-bit code read from the first b1 planes (MSB first) and
    alpha_j = scale * 2**-(j+1) for the "sliced" and "subblock" schemes (not stored) or the stored
    per-group magnitude for "residual". Bit c % 8 of byte c // 8 of a plane row is column c (little-endian).
    "subblock" stores (scale, offset) as codes: `scale` is uint8 [O, G] (low nibble: scale code, high
    nibble: offset code) and `offset` float16 [O, S, 2] per super-block (d2moe.quantize.subblock);
    `group_params()` gives every scheme's float16 (scale, offset) per group.
    """

    shape: tuple[int, int]  # (O, I)
    cfg: MWQConfig
    level: int  # highest bit-width whose planes are held
    scale: torch.Tensor  # float16 [O, G]: base step of the b1-bit grid
    offset: torch.Tensor  # float16 [O, G]: value of the grid's lower cell edge
    planes: torch.Tensor  # uint8 [level, O, I // 8]: bit-planes, most significant first
    alpha: torch.Tensor | None  # float16 [level - b1, O, G] for "residual"; None for "sliced"

    def group_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float16 (scale, offset) [O, G] of every group, whatever the scheme stores."""
        if self.cfg.scheme == "subblock":
            from d2moe.quantize.subblock import expand

            return expand(self.scale, self.offset, self.cfg.group_size)
        return self.scale, self.offset

    def rows(self, r0: int, r1: int) -> MWQTensor:
        """Rows r0..r1 as a tensor of their own (views: every field is per row)."""
        alpha = None if self.alpha is None else self.alpha[:, r0:r1]
        return replace(self, shape=(r1 - r0, self.shape[1]), scale=self.scale[r0:r1], offset=self.offset[r0:r1],
                       planes=self.planes[:, r0:r1], alpha=alpha)

    def truncate(self, level: int) -> MWQTensor:
        """The same tensor holding only what level `level` needs (a view: nothing is copied)."""
        self.cfg.level_index(level)
        if level > self.level:
            raise UsageError(f"cannot truncate a level-{self.level} tensor up to level {level}")
        alpha = None if self.alpha is None else self.alpha[: level - self.cfg.b1]
        return replace(self, level=level, planes=self.planes[:level], alpha=alpha)
