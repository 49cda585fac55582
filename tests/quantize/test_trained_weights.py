"""MWQ on the TRAINED embedded model's expert weights (not Gaussian): error falls with every level."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from d2moe.quantize import MWQConfig, dequantize, quantize_mwq, sqnr_db

MODEL = Path(__file__).resolve().parents[2] / "d2moe_cli" / "assets" / "tiny-mixtral" / "model.safetensors"
LEVELS = (2, 3, 4, 5, 6, 8)
# Floors with a margin under what the trained experts measure (median ~9.1 / 15.1 / 21.2 dB at 2/3/4 bits).
FLOOR_DB = {2: 8.0, 3: 14.0, 4: 20.0, 5: 26.0, 6: 32.0, 8: 43.0}


@pytest.fixture(scope="module")
def expert_matrices() -> dict[str, torch.Tensor]:
    """Every expert matrix (w1/w2/w3) of two layers of the trained model: 48 real [O, I] matrices."""
    with safe_open(str(MODEL), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()
                if ".experts." in k and (k.startswith("model.layers.0.") or k.startswith("model.layers.3."))}


@pytest.mark.parametrize("scheme", ["residual", "sliced"])
def test_error_falls_with_every_level_on_trained_experts(expert_matrices: dict, scheme: str) -> None:
    assert len(expert_matrices) == 48
    for name, w in expert_matrices.items():
        t = quantize_mwq(w, MWQConfig(bits=LEVELS, group_size=64, scheme=scheme))
        sqnr = [sqnr_db(w.float(), dequantize(t, b)) for b in LEVELS]
        for (lo, hi), (b_lo, b_hi) in zip(pairwise(sqnr), pairwise(LEVELS), strict=True):
            assert hi > lo + 4.0 * (b_hi - b_lo) * 0.9, f"{name} {scheme}: {b_lo}->{b_hi} bits {lo:.2f}->{hi:.2f} dB"
        for b, value in zip(LEVELS, sqnr, strict=True):
            assert value >= FLOOR_DB[b], f"{name} {scheme}: {b} bits {value:.2f} dB < {FLOOR_DB[b]}"


def test_residual_not_below_sliced_on_trained_experts(expert_matrices: dict) -> None:
    for name, w in list(expert_matrices.items())[:12]:
        res = quantize_mwq(w, MWQConfig(bits=(2, 3, 4), scheme="residual"))
        sli = quantize_mwq(w, MWQConfig(bits=(2, 3, 4), scheme="sliced"))
        for b in (2, 3, 4):
            r, s = sqnr_db(w.float(), dequantize(res, b)), sqnr_db(w.float(), dequantize(sli, b))
            assert r >= s - 0.05, f"{name} level {b}: residual {r:.2f} < sliced {s:.2f} dB"
