"""`PackedMatrix`: one level-b MWQ matrix as views into the bytes it was read from.

The blob stores a matrix's bit-planes in several level segments (b1 planes in the first, the
planes each higher level adds in the next ones), so a level-b matrix is a tuple of per-plane
views, never a concatenated copy. Kernels read the planes where they sit in the cache;
`to_mwq()` joins them (a copy) only for the torch reference and tests.

Its "terms" are how every kernel reads a level (see kernels/cpu/mwq_cpu.c):
    w[o, c] = offset[o, g] + sum_t mul_t * coef_t[o, g] * (code_t[o, c] + bias_t)
with code_t the unsigned number read from planes [first_t, first_t + n_t), most significant first.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from d2moe.quantize.types import MWQConfig, MWQTensor


@dataclass(frozen=True)
class Term:
    first: int  # first plane
    nplanes: int
    coef: torch.Tensor  # float16 [O, G]
    mul: float
    bias: float


@dataclass(frozen=True)
class PackedMatrix:
    shape: tuple[int, int]  # (O, I)
    cfg: MWQConfig
    level: int
    scale: torch.Tensor  # float16 [O, G] (scheme subblock: uint8 codes [O, G])
    offset: torch.Tensor  # float16 [O, G] (scheme subblock: super-block parameters float16 [O, S, 2])
    planes: tuple[torch.Tensor, ...]  # `level` uint8 [O, I/8] views, most significant first
    alphas: tuple[torch.Tensor, ...]  # residual: level - b1 float16 [O, G] views; sliced: ()
    blocked: bool = False  # planes and parameters in the CPU kernels' ready layout (kernels.cpu.ready_layout), not the file's

    @classmethod
    def from_mwq(cls, t: MWQTensor, level: int | None = None) -> PackedMatrix:
        t = t if level is None else t.truncate(level)
        alphas = () if t.alpha is None else tuple(t.alpha[j] for j in range(t.alpha.shape[0]))
        return cls(t.shape, t.cfg, t.level, t.scale, t.offset, tuple(t.planes[p] for p in range(t.level)), alphas)

    def expanded(self) -> PackedMatrix:
        """Scheme subblock as the sliced scheme with its float16 (scale, offset) per group expanded (a copy
        of the parameters on their device; the planes stay views): for kernels that read float16 parameters."""
        if self.cfg.scheme != "subblock":
            return self
        from d2moe.quantize.subblock import expand

        if self.blocked:
            raise ValueError("expand a subblock matrix before it is blocked")
        scale, offset = expand(self.scale, self.offset, self.cfg.group_size)
        return replace(self, cfg=replace(self.cfg, scheme="sliced"), scale=scale, offset=offset)

    def to_mwq(self) -> MWQTensor:
        if self.blocked:
            raise ValueError("blocked planes and parameters are for the CPU kernels only: the reference reads the file's layout")
        rows, cols = self.shape
        alpha = None
        if self.cfg.scheme == "residual":
            alpha = torch.stack(self.alphas) if self.alphas else torch.empty(0, *self.scale.shape, dtype=torch.float16)
        return MWQTensor(self.shape, self.cfg, self.level, self.scale, self.offset, torch.stack(self.planes), alpha)

    def terms(self, level: int) -> list[Term]:
        """How `level` (<= self.level) reads as terms: one for sliced, 1 + level - b1 for residual."""
        self.cfg.level_index(level)
        if level > self.level:
            raise ValueError(f"matrix holds levels up to {self.level}, not {level}")
        b1 = self.cfg.b1
        if self.cfg.scheme in ("sliced", "subblock"):  # subblock: coef = the codes (the kernels expand them)
            return [Term(0, level, self.scale, 2.0 ** -(level - b1), 0.5)]
        return [Term(0, b1, self.scale, 1.0, 0.5)] + [
            Term(b1 + j, 1, self.alphas[j], 2.0, -0.5) for j in range(level - b1)
        ]

    @property
    def nbytes(self) -> int:
        tensors = (self.scale, self.offset, *self.planes, *self.alphas)
        return sum(t.numel() * t.element_size() for t in tensors)
