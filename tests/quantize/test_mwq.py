"""MWQ quality and nesting on Gaussian weights (the DESIGN.md figures), format and error cases."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.errors import UsageError
from d2moe.quantize import MWQConfig, dequantize, quantize_mwq, quantize_rtn, rtn_codes, sqnr_db
from d2moe.quantize.naive import quantize_naive_residual

LEVELS = tuple(range(2, 9))
# Floors per level with ~0.3-0.5 dB margin under the measured figures (sliced 9.08 15.10 21.13 ...).
SQNR_FLOOR_DB = {2: 8.7, 3: 14.7, 4: 20.7, 5: 26.7, 6: 32.8, 7: 38.9, 8: 45.0}
# DESIGN.md's measured sliced row, reproduced here within half a dB.
DESIGN_SLICED_DB = {2: 9.1, 3: 15.1, 4: 21.1, 5: 27.1, 6: 33.2, 7: 39.2, 8: 45.2}


@pytest.fixture(scope="module")
def gaussian() -> torch.Tensor:
    return torch.randn(512, 1024, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def sqnr_table(gaussian: torch.Tensor) -> dict[str, dict[int, float]]:
    """SQNR (dB) per level of every quantizer on the 512x1024 Gaussian, group 64."""
    table: dict[str, dict[int, float]] = {}
    for scheme in ("sliced", "residual"):
        t = quantize_mwq(gaussian, MWQConfig(bits=LEVELS, group_size=64, scheme=scheme))
        table[scheme] = {b: sqnr_db(gaussian, dequantize(t, b)) for b in LEVELS}
    naive = quantize_naive_residual(gaussian, LEVELS, 64)
    table["naive"] = {b: sqnr_db(gaussian, dequantize(naive, b)) for b in LEVELS}
    table["rtn"] = {b: sqnr_db(gaussian, quantize_rtn(gaussian, b, 64)) for b in LEVELS}
    return table


@pytest.mark.parametrize("scheme", ["sliced", "residual"])
def test_sqnr_rises_with_every_level_above_floors(sqnr_table: dict, scheme: str) -> None:
    row = sqnr_table[scheme]
    for b in LEVELS:
        assert row[b] >= SQNR_FLOOR_DB[b], f"{scheme} level {b}: {row[b]:.2f} dB < {SQNR_FLOOR_DB[b]}"
    for lo, hi in pairwise(LEVELS):
        assert row[hi] - row[lo] > 5.5, f"{scheme}: level {lo}->{hi} gains only {row[hi] - row[lo]:.2f} dB"


def test_sliced_reproduces_design_figures(sqnr_table: dict) -> None:
    for b, design in DESIGN_SLICED_DB.items():
        assert abs(sqnr_table["sliced"][b] - design) < 0.5, f"level {b}: {sqnr_table['sliced'][b]:.2f} vs DESIGN {design}"


def test_residual_never_below_sliced(sqnr_table: dict) -> None:
    for b in LEVELS:
        assert sqnr_table["residual"][b] >= sqnr_table["sliced"][b] - 0.05, f"level {b}"
    # and the refit is worth something where the tied magnitudes are loosest (the top levels)
    assert sqnr_table["residual"][8] > sqnr_table["sliced"][8] + 0.1


def test_nesting_tax_against_dedicated_rtn(sqnr_table: dict) -> None:
    """Sliced tracks a dedicated per-level quantizer: the nesting tax stays small at every level.

    The base level pays most (one grid serves seven levels; measured 0.48 dB at level 2).
    """
    for b in LEVELS:
        tax = sqnr_table["rtn"][b] - sqnr_table["sliced"][b]
        assert tax < (0.6 if b == LEVELS[0] else 0.35), f"level {b}: nesting tax {tax:.2f} dB"


def test_naive_residual_saturates(sqnr_table: dict) -> None:
    """DESIGN.md's warning: greedy sign planes with alpha = mean|r| gain ~1 dB per bit at the top."""
    naive, sliced = sqnr_table["naive"], sqnr_table["sliced"]
    assert naive[8] < sliced[8] - 10.0
    assert naive[8] - naive[7] < 2.0 and naive[7] - naive[6] < 2.0
    assert 24.0 < naive[8] < 29.0  # DESIGN measured 27.1 (our base grid clips a little harder)


def test_rtn_gains_about_six_db_per_bit(sqnr_table: dict) -> None:
    row = sqnr_table["rtn"]
    for lo, hi in pairwise(LEVELS):
        assert 5.5 < row[hi] - row[lo] < 6.8


@settings(max_examples=12, deadline=None)
@given(
    rows=st.integers(1, 6),
    n_groups=st.integers(1, 4),
    group_size=st.sampled_from([8, 16, 32]),
    bits=st.sampled_from([(2, 3, 4), (1, 2), (3,), (2, 4, 8), (4, 5, 6, 7, 8)]),
    scheme=st.sampled_from(["sliced", "residual"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_nesting_bit_for_bit(rows: int, n_groups: int, group_size: int, bits: tuple, scheme: str, seed: int) -> None:
    w = torch.randn(rows, n_groups * group_size, generator=torch.Generator().manual_seed(seed))
    t = quantize_mwq(w, MWQConfig(bits=bits, group_size=group_size, scheme=scheme))
    for b in bits:
        prefix = t.truncate(b)
        assert prefix.planes.shape[0] == b
        full, alone = dequantize(t, b), dequantize(prefix, b)
        assert torch.equal(full.view(torch.int32), alone.view(torch.int32))
        # what a reader holding only the prefix bytes has: fresh copies, nothing shared
        copied = type(prefix)(
            shape=prefix.shape, cfg=prefix.cfg, level=b, scale=prefix.scale.clone(), offset=prefix.offset.clone(),
            planes=prefix.planes.clone(), alpha=None if prefix.alpha is None else prefix.alpha.clone(),
        )
        assert torch.equal(dequantize(copied, b), full)


@pytest.mark.parametrize("scheme", ["sliced", "residual"])
def test_tensor_fields_have_documented_shapes_and_dtypes(scheme: str) -> None:
    w = torch.randn(24, 128, dtype=torch.bfloat16)
    t = quantize_mwq(w, MWQConfig(bits=(2, 3, 4), group_size=32, scheme=scheme))
    assert t.shape == (24, 128) and t.level == 4
    assert t.scale.dtype == t.offset.dtype == torch.float16 and t.scale.shape == t.offset.shape == (24, 4)
    assert t.planes.dtype == torch.uint8 and t.planes.shape == (4, 24, 16)
    if scheme == "sliced":
        assert t.alpha is None
    else:
        assert t.alpha.dtype == torch.float16 and t.alpha.shape == (2, 24, 4)
    assert dequantize(t, 3, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_top_level_is_the_nearest_point_of_the_stored_grid() -> None:
    """Codes are taken on the float16-rounded grid, so each weight sits within half a step of its value."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3)) * 0.02
    cfg = MWQConfig(bits=(2, 3, 4), group_size=64, scheme="sliced")
    t = quantize_mwq(w, cfg)
    step = (t.scale.float() / 4).repeat_interleave(64, dim=1)  # bk step = scale * 2^-(bk-b1)
    lo = t.offset.float().repeat_interleave(64, dim=1)
    inside = (w >= lo) & (w <= lo + 16 * step)
    err = (w - dequantize(t, 4)).abs()
    assert inside.float().mean() > 0.9  # clipping touches only the tails
    assert (err[inside] <= step[inside] * 0.5 * (1 + 1e-5)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_is_deterministic_for_every_input_dtype(dtype: torch.dtype) -> None:
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    cfg = MWQConfig(bits=(2, 3, 4), group_size=32, scheme="residual")
    a, b = quantize_mwq(w, cfg), quantize_mwq(w.clone(), cfg)
    for name in ("scale", "offset", "planes", "alpha"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert sqnr_db(w.float(), dequantize(a, 4)) > 19.0


@pytest.mark.parametrize("scheme", ["sliced", "residual"])
def test_constant_and_zero_groups_are_exact(scheme: str) -> None:
    w = torch.zeros(3, 64)
    w[1] = 0.125
    w[2, :32] = -2.0
    t = quantize_mwq(w, MWQConfig(bits=(2, 3), group_size=32, scheme=scheme))
    for b in (2, 3):
        out = dequantize(t, b)
        assert torch.isfinite(out).all()
        assert torch.equal(out, w)


def test_rtn_codes_reconstruct_to_quantize_rtn() -> None:
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(2))
    codes, scale, offset = rtn_codes(w, 3, 64)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 7 and scale.shape == offset.shape == (8, 2)
    rebuilt = offset.float().repeat_interleave(64, 1) + scale.float().repeat_interleave(64, 1) * (codes.float() + 0.5)
    assert torch.allclose(rebuilt, quantize_rtn(w, 3, 64), rtol=0, atol=1e-6)


def test_sqnr_db_values() -> None:
    ref = torch.randn(100)
    assert sqnr_db(ref, ref) == math.inf
    assert sqnr_db(ref, ref * 0.9) == pytest.approx(20.0)


@pytest.mark.parametrize(
    ("shape", "group_size", "match"),
    [
        ((4, 96), 64, r"\(4, 96\).*groups of 64; use --group-size 32"),
        ((4, 100), 8, "not a multiple of 8"),
        ((4, 8, 8), 8, "not a 2-D"),
    ],
)
def test_bad_shapes_raise_usage_error(shape: tuple, group_size: int, match: str) -> None:
    w = torch.randn(*shape)
    with pytest.raises(UsageError, match=match):
        quantize_mwq(w, MWQConfig(bits=(2, 3), group_size=group_size))
    with pytest.raises(UsageError, match=match):
        quantize_rtn(w, 3, group_size)


def test_bad_values_and_levels_raise_usage_error() -> None:
    w = torch.randn(4, 64)
    w[0, 0] = float("nan")
    with pytest.raises(UsageError, match="NaN or infinite"):
        quantize_mwq(w, MWQConfig())
    with pytest.raises(UsageError, match="float16 range"):
        quantize_mwq(torch.randn(4, 64) * 1e6, MWQConfig())
    t = quantize_mwq(torch.randn(4, 64), MWQConfig(bits=(2, 3, 4)))
    with pytest.raises(UsageError, match="not one of the packed levels"):
        dequantize(t, 5)
    with pytest.raises(UsageError, match="levels up to 3"):
        dequantize(t.truncate(3), 4)


@pytest.mark.parametrize("scheme", ["sliced", "residual"])
def test_heavy_tailed_weights_improve_with_every_level(scheme: str) -> None:
    """LLM weights are heavy-tailed with outlier columns: error must still fall level by level."""
    gen = torch.Generator().manual_seed(4)
    normal = torch.randn(4, 128, 512, generator=gen)
    w = normal[0] / (normal[1:].square().sum(0) / 3.0).sqrt() * 0.02  # Student t, 3 degrees of freedom
    w[:, torch.randint(0, 512, (4,), generator=gen)] *= 8.0  # outlier input channels
    bits = (2, 3, 4, 6, 8)
    sqnr = {}
    for sch in ("sliced", scheme):
        t = quantize_mwq(w, MWQConfig(bits=bits, group_size=64, scheme=sch))
        sqnr[sch] = [sqnr_db(w, dequantize(t, b)) for b in bits]
    assert all(hi > lo + 3.0 for lo, hi in pairwise(sqnr[scheme]))
    assert all(r >= s - 0.05 for r, s in zip(sqnr[scheme], sqnr["sliced"], strict=True))
