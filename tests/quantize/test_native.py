"""The native sliced fit: grid.py's algorithm (the specification), refits that never lose, weights obeyed."""

from __future__ import annotations

import math

import pytest
import torch

from d2moe.quantize import MWQConfig, dequantize, native, quantize_mwq, sqnr_db

lib = native.load()
pytestmark = pytest.mark.skipif(lib is None, reason="no C compiler: pack uses the torch fit")


def _mean_log_err(w, t, cfg, col_weight=None):
    wt = torch.ones(w.shape[1]) if col_weight is None else col_weight
    return sum(math.log(((w - dequantize(t, b)).square() * wt).sum().item()) for b in cfg.bits) / len(cfg.bits)


@pytest.mark.parametrize("bits, group", [((2, 3, 4), 64), ((2, 4, 8), 32), ((3,), 128), ((1, 2), 16)])
def test_the_native_fit_is_the_torch_fit(bits, group):
    torch.manual_seed(0)
    w = torch.randn(96, 256) * 0.05
    w[3] = 0.0  # a flat row: keeps its mean
    cfg = MWQConfig(bits=bits, group_size=group, scheme="sliced")
    want, got = quantize_mwq(w, cfg), native.fit_sliced(lib, w, cfg)
    agree = (want.planes == got.tensor.planes).float().mean().item()
    assert agree > 0.999  # float ties aside, the same codes
    assert (want.scale == got.tensor.scale).float().mean().item() > 0.999
    for i, b in enumerate(bits):
        assert sqnr_db(w, dequantize(got.tensor, b)) == pytest.approx(sqnr_db(w, dequantize(want, b)), abs=0.02)
        err = (w.double() - dequantize(got.tensor, b).double()).square().sum().item()
        assert got.sq_error[i] == pytest.approx(err, rel=1e-4)  # the reported error is the real one
    assert got.signal == pytest.approx(w.double().square().sum().item(), rel=1e-6)


def test_bf16_is_read_in_place_and_threads_do_not_change_a_byte():
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(1)
    w = (torch.randn(600, 128) * 0.02).bfloat16()
    cfg = MWQConfig(bits=(2, 3, 4), group_size=64, scheme="sliced")
    one = native.fit_sliced(lib, w, cfg, refits=1)
    with ThreadPoolExecutor(2) as pool:
        two = native.fit_sliced(lib, w, cfg, refits=1, pool=pool)
    from_f32 = native.fit_sliced(lib, w.float(), cfg, refits=1)
    for a, b in ((one, two), (one, from_f32)):
        assert torch.equal(a.tensor.planes, b.tensor.planes) and torch.equal(a.tensor.scale, b.tensor.scale)
        assert torch.equal(a.tensor.offset, b.tensor.offset)


def test_refits_lower_the_objective_and_column_weights_steer_the_error():
    torch.manual_seed(2)
    w = torch.randn(128, 256) * 0.03
    cfg = MWQConfig(bits=(2, 3, 4), group_size=64, scheme="sliced")
    base = native.fit_sliced(lib, w, cfg)
    refit = native.fit_sliced(lib, w, cfg, refits=2)
    assert _mean_log_err(w, refit.tensor, cfg) <= _mean_log_err(w, base.tensor, cfg) + 1e-9
    weight = torch.ones(256)
    weight[:32] = 50.0  # the first half-group's columns matter most
    weighted = native.fit_sliced(lib, w, cfg, col_weight=weight)
    def hot(t, b):
        return (w[:, :32] - dequantize(t, b)[:, :32]).square().sum().item()

    for b in cfg.bits:
        assert hot(weighted.tensor, b) < hot(base.tensor, b)
    assert _mean_log_err(w, weighted.tensor, cfg, weight) < _mean_log_err(w, base.tensor, cfg, weight)


def test_bad_inputs_are_one_clear_error():
    from d2moe.errors import UsageError

    cfg = MWQConfig(bits=(2, 3, 4), group_size=64, scheme="sliced")
    with pytest.raises(UsageError, match="columns"):
        native.fit_sliced(lib, torch.zeros(4, 96), cfg)
    with pytest.raises(UsageError, match="column weights"):
        native.fit_sliced(lib, torch.zeros(4, 128), cfg, col_weight=torch.ones(64))
    with pytest.raises(UsageError, match="sliced"):
        native.fit_sliced(lib, torch.zeros(4, 128), MWQConfig(bits=(2, 3), group_size=64, scheme="residual"))
    with pytest.raises(UsageError, match="float16 range"):
        native.fit_sliced(lib, torch.full((4, 128), 1e6).index_fill_(1, torch.tensor([0]), -1e6), cfg)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(bad):
    from d2moe.errors import UsageError

    w = torch.zeros(8, 128)
    w[5, 77] = bad
    with pytest.raises(UsageError, match="NaN or infinite"):
        native.fit_sliced(lib, w.bfloat16(), MWQConfig(bits=(2, 3, 4), group_size=64, scheme="sliced"))


@pytest.mark.parametrize("weighting", ["magnitude", "abs"])
def test_magnitude_weightings_favour_the_large_weights(weighting):
    torch.manual_seed(3)
    w = torch.randn(256, 256) * 0.02
    cfg = MWQConfig(bits=(2, 3, 4), group_size=64, scheme="sliced")
    plain = native.fit_sliced(lib, w, cfg)
    weighted = native.fit_sliced(lib, w, cfg, weighting=weighting)
    big = w.abs() > 2 * w.abs().mean()  # the tails: what K-quants' weighting protects

    def err_big(t, b):
        return (w - dequantize(t, b))[big].square().sum().item()

    for b in cfg.bits:
        assert err_big(weighted.tensor, b) < err_big(plain.tensor, b)


def test_unknown_weighting_is_refused():
    from d2moe.errors import UsageError

    with pytest.raises(UsageError, match="weighting"):
        native.fit_sliced(lib, torch.zeros(8, 64), MWQConfig(bits=(2, 4), group_size=64), weighting="l1")
