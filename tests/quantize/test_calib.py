"""Calibration's row choice (d2moe.quantize.calib): valid tensors, rows from the nearer fit, never worse."""

from __future__ import annotations

import pytest
import torch
from native_fits import random_matrix

from d2moe.kernels import cpu
from d2moe.quantize import dequantize, native
from d2moe.quantize.calib import SWITCH_MARGIN, output_errors, pick_rows, product_dtype
from d2moe.quantize.format import blob_layout, decode_blob, encode_expert


def _fits(scheme: str, rows: int = 48, cols: int = 256, seed: int = 0):
    lib, cfg, w, g = random_matrix(scheme, rows, cols, seed)
    x = torch.randn(200, cols, generator=g) * torch.linspace(0.1, 3.0, cols)  # columns of unequal energy
    weight = x.square().mean(0)
    plain = native.fit_sliced(lib, w, cfg, None).tensor
    weighted = native.fit_sliced(lib, w, cfg, weight / weight.mean()).tensor
    return cfg, w, x.bfloat16(), [plain, weighted]


@pytest.mark.parametrize("scheme", ["subblock", "sliced"])
def test_rows_come_from_the_candidate_nearer_on_the_sample(scheme):
    cfg, w, x, cands = _fits(scheme)
    errs = [output_errors(w, t, x) for t in cands]
    t, sq = pick_rows(cands, errs)
    n = len(cfg.bits)
    margin = n * torch.log1p(torch.tensor(SWITCH_MARGIN, dtype=torch.float64))
    first, second = ([e[h * n : (h + 1) * n].log().sum(0) for e in errs] for h in (0, 1))
    took = (first[1] + margin < first[0]) & (second[1] + margin < second[0])  # nearer on both halves
    assert 0 < int(took.sum()) < len(took)  # both fits win some rows here
    once = (first[1] + margin < first[0]) | (second[1] + margin < second[0])
    assert int(once.sum()) > int(took.sum())  # a half alone would have switched more rows
    for b in cfg.bits:
        want = torch.where(took[:, None], dequantize(cands[1], b), dequantize(cands[0], b))
        assert torch.equal(dequantize(t, b), want)  # whole rows, every level, bit for bit
    picked = output_errors(w, t, x)
    for h, base in enumerate((first[0], second[0])):  # never worse than the unweighted fit on either half
        assert torch.all(picked[h * n : (h + 1) * n].log().sum(0) <= base + 1e-9)
    assert sq == pytest.approx([float(v) for v in picked[2 * n :].sum(1)], rel=1e-9)


def test_the_chosen_tensor_encodes_and_decodes_like_any_fit():
    cfg, w, x, cands = _fits("subblock", rows=64, cols=512, seed=1)
    t, _ = pick_rows(cands, [output_errors(w, c, x) for c in cands])
    shapes = {m: t.shape for m in ("gate", "up", "down")}
    layout = blob_layout(shapes, cfg)
    blob = encode_expert({m: t for m in shapes}, layout, cfg)
    back = decode_blob(blob, layout, cfg, cfg.bits[-1], shapes)
    for b in cfg.bits:
        assert torch.equal(dequantize(back["down"].to_mwq(), b), dequantize(t, b))


def test_levels_left_out_of_the_judgement_do_not_veto_a_row():
    """A candidate nearer at the judged levels wins its rows even when far worse at a level left out (an 8-bit
    level whose tiny error GPTQ multiplies)."""
    cfg, w, x, cands = _fits("subblock")
    n, rows = len(cfg.bits), w.shape[0]
    base = torch.ones(3 * n, rows, dtype=torch.float64)
    other = base.clone()
    other[[0, n]] = 0.5  # level 2 halved on both halves of the sample
    other[[n - 1, 2 * n - 1]] = 50.0  # the top level fifty times worse
    t, _ = pick_rows(cands, [base, other])
    assert torch.equal(t.planes, cands[0].planes)  # judged on every level: the top level vetoes the switch
    t, _ = pick_rows(cands, [base, other], judged=list(range(n - 1)))
    assert torch.equal(t.planes, cands[1].planes)  # judged without it: every row switches


def test_levels_left_out_of_the_judgement_skip_their_products_only():
    """output_errors with `judged` gives the same errors at the judged levels, 0 output error at the others, every
    level's weight error, and the row choice over the judged levels is the same either way."""
    cfg, w, x, cands = _fits("subblock")
    n = len(cfg.bits)
    judged = list(range(n - 1))  # the top level left out, as an 8-bit level of a 2,3,4,8 pack is
    full = [output_errors(w, t, x) for t in cands]
    part = [output_errors(w, t, x, judged) for t in cands]
    for f, p in zip(full, part, strict=True):
        for h in (0, 1):
            assert torch.equal(p[h * n : h * n + n - 1], f[h * n : h * n + n - 1])
            assert torch.all(p[h * n + n - 1] == 0)
        assert torch.equal(p[2 * n :], f[2 * n :])
    t_full, sq_full = pick_rows(cands, full, judged)
    t_part, sq_part = pick_rows(cands, part, judged)
    assert torch.equal(t_full.planes, t_part.planes) and sq_full == sq_part


@pytest.mark.parametrize("source, native_bf16, want", [
    (torch.bfloat16, True, torch.bfloat16), (torch.bfloat16, False, torch.float32),
    (torch.float16, True, torch.float32), (torch.float32, True, torch.float32)])
def test_products_run_in_bfloat16_only_for_bfloat16_on_a_cpu_that_has_it(source, native_bf16, want, monkeypatch):
    monkeypatch.setattr(cpu, "has_bf16_gemm", lambda: native_bf16)
    assert product_dtype(source) == want


def test_bfloat16_products_judge_rows_as_float32_ones_do(monkeypatch):
    """Where the CPU multiplies bfloat16 natively the judge's product runs in it: output errors within its rounding
    of the float32 product's, weight errors (no product) equal, and the rows chosen the same but for near ties."""
    cfg, w, x, cands = _fits("subblock", rows=96)
    n = len(cfg.bits)
    errors = {}
    for native_bf16 in (False, True):
        monkeypatch.setattr(cpu, "has_bf16_gemm", lambda native_bf16=native_bf16: native_bf16)
        errors[native_bf16] = [output_errors(w, t, x) for t in cands]
    for f32, b16 in zip(errors[False], errors[True], strict=True):
        assert torch.equal(f32[2 * n:], b16[2 * n:])
        rel = (b16[: 2 * n] - f32[: 2 * n]).abs() / f32[: 2 * n]
        assert rel.median() < 0.01 and rel.max() < 0.05
    t32, _ = pick_rows(cands, errors[False])
    t16, _ = pick_rows(cands, errors[True])
    same_rows = (t32.scale == t16.scale).all(-1) & (t32.offset == t16.offset).all(-1)
    assert same_rows.float().mean() > 0.9
