"""Nested GPTQ codes (d2moe.quantize.gptq), torch's and the C version's: the plain codes without correlation, nearer
outputs with it, and the two versions choosing the same codes."""

from __future__ import annotations

import platform

import pytest
import torch
from native_fits import random_matrix

from d2moe.kernels import cpu
from d2moe.quantize import dequantize, native
from d2moe.quantize.bitplanes import pack_bits, unpack_bits
from d2moe.quantize.gptq import (
    WINDOW,
    add_second_moment,
    block_size,
    inverse_factor,
    nested_codes,
    nested_planes,
    second_moment,
)


def _fit(scheme: str, rows: int = 64, cols: int = 256, seed: int = 0):
    lib, cfg, w, g = random_matrix(scheme, rows, cols, seed)
    return cfg, w, native.fit_sliced(lib, w, cfg, None, weighting="abs").tensor, g


IMPLS = ["torch", "native"]


def _codes(impl: str, w, h, scale, offset, cfg, window=WINDOW, pool=None):
    return nested_codes(w, h, scale, offset, cfg.bits, cfg.group_size, window,
                        native.load() if impl == "native" else None, pool)


def _with_codes(t, codes):
    from dataclasses import replace

    return replace(t, planes=pack_bits(codes, t.cfg.bk))


def _correlated_inputs(cols: int, g: torch.Generator, tokens: int = 2000) -> torch.Tensor:
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    return torch.randn(tokens, cols, generator=g) @ mix * torch.linspace(0.2, 2.0, cols)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scheme", ["subblock", "sliced"])
def test_uncorrelated_inputs_give_the_plain_codes(scheme, impl):
    cfg, w, t, _ = _fit(scheme)
    codes = _codes(impl, w, torch.eye(w.shape[1]).view(1, *w.shape[1:2] * 2), *t.group_params(), cfg)
    assert torch.equal(codes, unpack_bits(t.planes).to(torch.uint8))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("block", [256, 64])
def test_codes_bring_the_outputs_nearer(block, impl):
    """The lowest level's output error falls; the levels above, held inside its cells, may give back a part of it,
    but over the levels together the outputs are nearer."""
    cfg, w, t, g = _fit("subblock")
    x = _correlated_inputs(w.shape[1], g)
    codes = _codes(impl, w, second_moment(x, block), *t.group_params(), cfg)
    assert int(codes.max()) < 2**cfg.bk
    ours = _with_codes(t, codes)
    before, after = ([float((x @ (w - dequantize(q, b)).T).square().sum()) for b in cfg.bits] for q in (t, ours))
    assert after[0] < 0.97 * before[0]
    assert sum(after) < 0.97 * sum(before)


@pytest.mark.parametrize("impl", IMPLS)
def test_the_lowest_level_stays_within_the_window(impl):
    cfg, w, t, g = _fit("subblock")
    x = _correlated_inputs(w.shape[1], g)
    scale, offset = (v.float().repeat_interleave(cfg.group_size, dim=1) for v in t.group_params())
    codes = _codes(impl, w, second_moment(x, w.shape[1]), scale[:, ::cfg.group_size], offset[:, ::cfg.group_size], cfg)
    low = (codes >> (cfg.bk - cfg.bits[0])).float()
    lower_edge, upper_edge = offset + scale * low, offset + scale * (low + 1)
    top = low == 2 ** cfg.bits[0] - 1
    assert bool(((w >= lower_edge - WINDOW * scale - 1e-6) | (low == 0)).all())
    assert bool(((w <= upper_edge + WINDOW * scale + 1e-6) | top).all())
    assert bool((codes != unpack_bits(t.planes).to(torch.uint8)).any())  # and it does choose differently


@pytest.mark.parametrize("impl", IMPLS)
def test_columns_no_input_touched_are_rounded_to_nearest(impl):
    cfg, w, t, g = _fit("subblock")
    x = _correlated_inputs(w.shape[1], g)
    x[:, :32] = 0  # a group the calibration never reached
    codes = _codes(impl, w, second_moment(x, 128), *t.group_params(), cfg)
    plain = unpack_bits(t.planes).to(torch.uint8)
    assert torch.equal(codes[:, :32], plain[:, :32])
    assert torch.isfinite(dequantize(_with_codes(t, codes), 2)).all()


@pytest.mark.parametrize("block", [256, 64])
def test_the_c_version_chooses_torch_codes_whatever_the_threads(block):
    """The same choices, summed in another order (a code at a rounding boundary may differ: at most 1 in 1000), and
    rows split over threads change nothing."""
    from concurrent.futures import ThreadPoolExecutor

    cfg, w, t, g = _fit("subblock", rows=150)
    h = second_moment(_correlated_inputs(w.shape[1], g), block)
    for window in (0.25, 0.1):
        ours = _codes("native", w, h, *t.group_params(), cfg, window)
        assert float((ours == _codes("torch", w, h, *t.group_params(), cfg, window)).float().mean()) >= 0.999
        with ThreadPoolExecutor(3) as pool:
            assert torch.equal(ours, _codes("native", w, h, *t.group_params(), cfg, window, pool))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_c_version_reads_a_16_bit_source_as_its_float32_copy(dtype):
    """pack --calib hands GPTQ the source matrix in its own dtype (no float32 copy): the same codes."""
    cfg, w, t, g = _fit("subblock", rows=40)
    w16 = w.to(dtype)
    h = second_moment(_correlated_inputs(w.shape[1], g), 64)
    assert torch.equal(_codes("native", w16, h, *t.group_params(), cfg), _codes("native", w16.float(), h, *t.group_params(), cfg))


def test_second_moment_holds_the_diagonal_blocks_and_block_size_fits_the_budget():
    x = torch.randn(50, 256)
    full = x.T @ x
    blocks = second_moment(x, 64)
    for k in range(4):
        assert torch.allclose(blocks[k], full[64 * k:64 * (k + 1), 64 * k:64 * (k + 1)], rtol=1e-5, atol=1e-4)
    stepped = second_moment(x[:20], 64)
    add_second_moment(stepped, x[20:].bfloat16())  # the calibration's steps, in the inputs' own dtype
    torch.testing.assert_close(stepped, blocks, rtol=2e-2, atol=2e-2 * float(blocks.abs().max()))
    assert block_size(256, 8, 8 * 256 * 256 * 4) == 256
    assert block_size(256, 8, 8 * 256 * 256 * 4 - 1) == 128
    assert block_size(14336, 256, 1 << 30) == 64
    assert block_size(14336, 256, 1 << 20) == 0
    assert block_size(192, 1, 1 << 30) == 192  # all columns, though not a multiple of the blocks


def test_calibrated_fit_takes_each_row_from_the_nearest_cells_or_one_window():
    from d2moe.quantize.calib import ColumnStats, calibrated_fit
    from d2moe.quantize.gptq import WINDOWS

    cfg, w, _, g = _fit("subblock")
    x = _correlated_inputs(w.shape[1], g)
    stats = ColumnStats(x.square().mean(0) / x.square().mean(), x[:256].bfloat16(), second_moment(x, 128) / len(x))
    t, errs, _ = calibrated_fit(native.load(), w, cfg, stats, refits=1, weighting="abs")
    got = unpack_bits(t.planes).to(torch.uint8)
    nearest = _codes("native", w, torch.eye(w.shape[1])[None], *t.group_params(), cfg)
    per_window = [_codes("native", w, stats.hessian, *t.group_params(), cfg, v) for v in WINDOWS]
    source = torch.stack([(got == c).all(1) for c in [nearest, *per_window]])  # [1 + windows, rows]
    assert bool(source.any(0).all())  # every row is one candidate's codes on its own grid, bit for bit
    assert bool(source[1:].any(1).any())  # and GPTQ's win some rows
    for b, e in zip(cfg.bits, errs, strict=True):
        assert e == pytest.approx(float((w - dequantize(t, b)).double().square().sum()), rel=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_planes_are_the_codes_packed(impl):
    """nested_planes (the C tasks pack the rows they chose, from one inverse factor for every window) gives
    pack_bits of nested_codes, bit for bit, rows split over a pool or not."""
    from concurrent.futures import ThreadPoolExecutor

    cfg, w, t, g = _fit("subblock", rows=200)
    h = second_moment(_correlated_inputs(w.shape[1], g), 64)
    lib = native.load() if impl == "native" else None
    want = pack_bits(_codes(impl, w, h, *t.group_params(), cfg), cfg.bk)
    u = inverse_factor(h)
    with ThreadPoolExecutor(3) as pool:
        for p in (None, pool):
            assert torch.equal(nested_planes(w, u, *t.group_params(), cfg.bits, cfg.group_size, WINDOW, lib, p), want)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the portable build is x86-64 without FMA")
def test_a_build_without_vector_fma_or_avx_chooses_the_same_codes_and_grids():
    """The fit library for plain x86-64 (no AVX, no FMA: gptq.c's feedback through fmaf, lane by lane) gives what the
    -march=native build gives, bit for bit: the fits' planes and parameters, and GPTQ's codes at both windows."""
    lib, cfg, w, g = random_matrix("subblock", 128, 512, 3)  # skips without a compiler; unfused feedback flips 7 codes
    portable = native.build(cpu.compiler(), [f if f != "-march=native" else "-march=x86-64" for f in native.FLAGS])
    fits = [native.fit_sliced(x, w, cfg, None, 1, weighting="abs").tensor for x in (lib, portable)]
    assert all(torch.equal(getattr(fits[0], k), getattr(fits[1], k)) for k in ("planes", "scale", "offset"))
    h = second_moment(_correlated_inputs(w.shape[1], g), 512)
    for window in (0.25, 0.1):
        codes = [nested_codes(w, h, *fits[0].group_params(), cfg.bits, cfg.group_size, window, x) for x in (lib, portable)]
        assert torch.equal(codes[0], codes[1])
