"""The CUDA kernels check themselves against the torch reference before they are trusted.

At first use on a device (and in `d2moe doctor --device cuda`), every kernel runs every level of
both schemes on small random blobs of odd shapes (columns not a multiple of 32, group sizes 8-64,
planes at unaligned addresses) on that device, beside the reference's result on the same device.
A kernel with any case out of tolerance is disabled with one warning naming it; the run goes on
with the reference for that kernel.

Tolerances (stated, per element): dequantization to fp16/bf16 within one unit in the last place of
the output type (|k - ref| <= eps * |ref| + 1e-6 max|ref|); GEMV (float32 accumulation, any order)
within 1e-4 of sum |w x| (+1e-6). A single wrong bit moves an output by ~|w x| / I, far outside.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import torch

from d2moe.kernels.cuda import KERNEL_NAMES, CudaExperts, relocate
from d2moe.kernels.packed import PackedMatrix
from d2moe.quantize.subblock import SUPER_COLS, n_supers, round_param
from d2moe.quantize.types import MWQConfig

CASES = ((37, 96, 32, 0), (5, 200, 8, 2), (64, 192, 64, 0), (3, 72, 24, 6))  # rows, cols, group, misalign
BITS = (2, 3, 4, 8)
SCHEMES = ("sliced", "residual", "subblock")  # subblock: its parameters expanded on the device, then sliced
# d2_gemv's fast path is compiled per first-term plane count (sliced: the level; residual: the first
# level's bits); these layouts reach the counts BITS does not, on one word-aligned case each
FAST_LAYOUTS = (("sliced", (1, 5, 6)), ("residual", (1, 2)), ("residual", (3, 4)), ("residual", (4, 5)))
FAST_CASE = (24, 128, 32, 0)
GEMV_TOKENS = (1, 3, 8)
GEMV_RTOL = 1e-4
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@dataclass(frozen=True)
class CheckRow:
    kernel: str
    scheme: str
    level: int
    shape: str  # rows x cols / group
    tokens: int
    max_ratio: float  # max over elements of error / tolerance: <= 1 passes
    ok: bool


def random_matrix(rows: int, cols: int, group_size: int, scheme: str, gen: torch.Generator,
                  bits: tuple[int, ...] = BITS) -> PackedMatrix:
    """A packed matrix at the top level with random planes and plausible scales (no quantizer needed)."""
    cfg = MWQConfig(bits=bits, group_size=group_size, scheme=scheme)
    groups = cols // group_size

    def f16(lo: float, hi: float, *shape) -> torch.Tensor:
        return (torch.rand(*shape, generator=gen) * (hi - lo) + lo).half()

    planes = torch.randint(0, 256, (cfg.bk, rows, cols // 8), generator=gen, dtype=torch.uint8)
    if scheme == "subblock":  # parameter codes and (d, dmin) per super-block (d2moe.quantize.subblock)
        codes = torch.randint(0, 256, (rows, groups), generator=gen, dtype=torch.uint8)
        n_sup = n_supers(groups, group_size)
        supers = torch.stack([round_param(f16(0.001, 0.015, rows, n_sup)), round_param(f16(0.01, 0.03, rows, n_sup))], -1)
        return PackedMatrix((rows, cols), cfg, cfg.bk, codes, supers, tuple(planes), ())
    alphas = tuple(f16(0.002, 0.05, rows, groups) for _ in range(cfg.bk - cfg.b1)) if scheme == "residual" else ()
    return PackedMatrix((rows, cols), cfg, cfg.bk, f16(0.01, 0.2, rows, groups), f16(-0.5, 0.1, rows, groups),
                        tuple(planes), alphas)


def _reference(m: PackedMatrix, level: int) -> torch.Tensor:
    from d2moe.kernels.dispatch import dequantize_packed

    return dequantize_packed(m, level)


def _ratio_dequant(k: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    tol = EPS[dtype] * ref.abs() + 1e-6 * float(ref.abs().max())
    return float(((k.float() - ref).abs() / tol).max())


def _ratio_gemv(y: torch.Tensor, x: torch.Tensor, ref: torch.Tensor) -> float:
    tol = GEMV_RTOL * (x.abs() @ ref.abs().t()) + 1e-6
    return float(((y - x @ ref.t()).abs() / tol).max())


def run_selfcheck(experts: CudaExperts, seed: int = 0) -> list[CheckRow]:
    """Every kernel x scheme x level x case on the experts' device; rows of the table."""
    dev = experts.device
    gen = torch.Generator().manual_seed(seed)
    rows_out: list[CheckRow] = []

    def check_alone(m: PackedMatrix, shape: str, scheme: str, level: int) -> tuple:
        ref = _reference(m, level)
        d = experts.describe(m, level)
        for dtype, name in ((torch.float16, "dequant_f16"), (torch.bfloat16, "dequant_bf16")):
            ratio = _ratio_dequant(experts.dequant(d, dtype), ref, dtype)
            rows_out.append(CheckRow(name, scheme, level, shape, 0, ratio, ratio <= 1.0))
        for n in GEMV_TOKENS:
            x = torch.randn(n, m.shape[1], generator=gen).to(dev)
            ratio = _ratio_gemv(experts.gemv([(d, x)])[0], x, ref)
            rows_out.append(CheckRow("gemv", scheme, level, shape, n, ratio, ratio <= 1.0))
        return d, ref

    for scheme in SCHEMES:
        mats = [(relocate(random_matrix(r, c, g, scheme, gen), dev, misalign), f"{r}x{c}/g{g}")
                for r, c, g, misalign in CASES if scheme != "subblock" or SUPER_COLS % g == 0]
        grouped = []  # (desc, x, ref, shape, level): one launch over all cases at mixed levels
        for ci, (m, shape) in enumerate(mats):
            for li, level in enumerate(BITS):
                d, ref = check_alone(m, shape, scheme, level)
                if (li + ci) % 2 == 0 or level == BITS[-1]:
                    n = (1, 5, 8, 11)[(li + ci) % 4]  # 11: two token chunks of one expert
                    grouped.append((d, torch.randn(n, m.shape[1], generator=gen).to(dev), ref, shape, level))
        ys = experts.gemv([(d, x) for d, x, *_ in grouped])
        for y, (_, x, ref, shape, level) in zip(ys, grouped, strict=True):
            ratio = _ratio_gemv(y, x, ref)
            rows_out.append(CheckRow("gemv_grouped", scheme, level, shape, x.shape[0], ratio, ratio <= 1.0))
    r, c, g, misalign = FAST_CASE
    for scheme, bits in FAST_LAYOUTS:
        m = relocate(random_matrix(r, c, g, scheme, gen, bits), dev, misalign)
        for level in bits:
            check_alone(m, f"{r}x{c}/g{g} bits {','.join(map(str, bits))}", scheme, level)
    return rows_out


def failures(rows: list[CheckRow]) -> dict[str, CheckRow]:
    """The worst failing row of each kernel that failed."""
    bad: dict[str, CheckRow] = {}
    for r in rows:
        if not r.ok and (r.kernel not in bad or r.max_ratio > bad[r.kernel].max_ratio):
            bad[r.kernel] = r
    return bad


def apply(experts: CudaExperts, rows: list[CheckRow], warn: bool = True) -> dict[str, CheckRow]:
    """Disable every kernel that failed (one warning each); return the failures."""
    bad = failures(rows)
    for name in KERNEL_NAMES:
        if name in bad:
            experts.enabled[name] = False
            r = bad[name]
            if warn:
                warnings.warn(f"CUDA kernel {name} failed its self-check on {experts.device} ({r.scheme} level "
                              f"{r.level}, {r.shape}, error {r.max_ratio:.3g}x the tolerance): it is disabled and "
                              "the torch reference computes in its place", stacklevel=2)
    return bad


def checked(experts: CudaExperts, seed: int = 0) -> tuple[CudaExperts, list[CheckRow]]:
    """Self-check `experts` and disable what fails; the experts and the table."""
    with torch.inference_mode(False), torch.no_grad():
        rows = run_selfcheck(experts, seed)
    apply(experts, rows)
    return experts, rows


def summary(rows: list[CheckRow]) -> list[dict]:
    """One line per kernel: cases, worst ratio, pass/fail (the doctor's table)."""
    out = []
    for name in KERNEL_NAMES:
        mine = [r for r in rows if r.kernel == name]
        if mine:
            worst = max(mine, key=lambda r: r.max_ratio)
            out.append({"kernel": name, "cases": len(mine), "failed": sum(not r.ok for r in mine),
                        "worst_ratio": worst.max_ratio, "worst_case": f"{worst.scheme} L{worst.level} {worst.shape}",
                        "ok": all(r.ok for r in mine)})
    return out


def as_dicts(rows: list[CheckRow]) -> list[dict]:
    return [asdict(r) for r in rows]
