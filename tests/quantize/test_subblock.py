"""Scheme subblock: 4-bit (scale, offset) codes per small group against float16 super-block parameters."""

from __future__ import annotations

import pytest
import torch

from d2moe.errors import UsageError
from d2moe.kernels.packed import PackedMatrix
from d2moe.quantize import MWQConfig, dequantize, native, quantize_mwq, sqnr_db, subblock


def test_expand_is_the_documented_arithmetic():
    # one row, 256 / 32 = 8 groups per super-block, 10 groups: a full super-block and a partial one
    codes = torch.tensor([[0x00, 0x31, 0xF7, 0x0F, 0x10, 0x22, 0x5A, 0xFF, 0x13, 0x40]], dtype=torch.uint8)
    supers = torch.tensor([[[0.5, 0.25], [0.125, 0.75]]]).half()
    scale, offset = subblock.expand(codes, supers, 32)
    d = ((0.5, 0.25),) * 8 + ((0.125, 0.75),) * 2  # (d, dmin) of each group's super-block
    assert scale.dtype == offset.dtype == torch.float16
    assert scale[0].tolist() == [d[g][0] * (int(c) & 15) for g, c in enumerate(codes[0])]
    assert offset[0].tolist() == [-d[g][1] * (int(c) >> 4) for g, c in enumerate(codes[0])]


def test_super_block_parameters_make_every_product_exact():
    """d and dmin keep 7 significant bits (and float16's 2^-24 step), so d * code is exact in float16 for every
    4-bit code: the kernels compute it in float32 registers and agree with the expanded float16 bit for bit."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(4000, generator=g) * 10.0 ** torch.randint(-9, 3, (4000,), generator=g).float(),
                   torch.tensor([0.0, 2.0**-24, 3 * 2.0**-20, 65504 / 15])])
    p = subblock.round_param(x).float()
    assert ((p - x).abs() <= x.abs() * 2.0**-7 + 2.0**-25).all()  # the nearest 7-bit value (or float16 step)
    for code in range(16):
        prod = p * code
        assert torch.equal(prod.half().float(), prod)
def test_config_needs_groups_that_tile_a_super_block():
    assert MWQConfig(group_size=32, scheme="subblock").scheme == "subblock"
    with pytest.raises(UsageError, match="256-column super-blocks"):
        MWQConfig(group_size=48, scheme="subblock")


@pytest.mark.parametrize("rows, cols, group", [(40, 256, 32), (17, 192, 32), (9, 544, 16), (12, 128, 64)])
def test_levels_nest_and_error_falls_with_bits(rows, cols, group):
    torch.manual_seed(rows)
    w = torch.randn(rows, cols) * 0.02 + torch.randn(rows, 1) * 0.01
    w[3] = 0.0  # a flat row
    cfg = MWQConfig(bits=(2, 3, 4, 8), group_size=group, scheme="subblock")
    t = quantize_mwq(w, cfg)
    assert t.scale.shape == (rows, cols // group) and t.scale.dtype == torch.uint8
    assert t.offset.shape == (rows, subblock.n_supers(cols // group, group), 2)
    errs = [(dequantize(t, b) - w).square().sum().item() for b in cfg.bits]
    # the grid serves level b1 first, so weights it clips stay clipped at every level: level 8 is ~13 dB
    # above level 2 here (Gaussian groups), not the ~36 dB of a grid spanning [min, max]
    assert errs == sorted(errs, reverse=True) and errs[-1] < errs[0] / 10
    assert torch.equal(dequantize(t, 2)[3], w[3])  # the flat row is exact
    for b in cfg.bits:  # level b reads only the first b planes: the truncated tensor gives the same weights
        assert torch.equal(dequantize(t.truncate(b), b), dequantize(t, b))
        assert torch.equal(PackedMatrix.from_mwq(t, b).to_mwq().planes, t.planes[:b])


def test_the_grid_is_fitted_for_the_lowest_level():
    """Small groups whose grid serves level b1 first: level 2 well above the sliced scheme's at group 64,
    in fewer bits per weight (8 / 32 + 32 / 256 of parameters against 32 / 64)."""
    torch.manual_seed(0)
    w = torch.randn(256, 512)
    sub = quantize_mwq(w, MWQConfig(bits=(2, 3, 4), group_size=32, scheme="subblock"))
    sliced = quantize_mwq(w, MWQConfig(bits=(2, 3, 4), group_size=64, scheme="sliced"))
    assert sqnr_db(w, dequantize(sub, 2)) > sqnr_db(w, dequantize(sliced, 2)) + 0.5
    params_bits = (sub.scale.numel() * 8 + sub.offset.numel() * 16) / w.numel()
    assert params_bits == pytest.approx(8 / 32 + 32 / 256) and params_bits < 32 / 64


lib = native.load()


@pytest.mark.skipif(lib is None, reason="no C compiler: pack uses the torch fit")
@pytest.mark.parametrize("bits, group", [((2, 3, 4), 32), ((2, 4, 8), 16), ((1, 2), 64), ((3,), 128)])
def test_the_native_fit_is_the_torch_fit(bits, group):
    torch.manual_seed(1)
    w = torch.randn(70, 384) * 0.05
    w[5] = 0.0
    w[6, :128] = 0.3  # a flat super-block in a row that is not
    cfg = MWQConfig(bits=bits, group_size=group, scheme="subblock")
    want, got = quantize_mwq(w, cfg), native.fit_sliced(lib, w, cfg, refits=0, weighting="mse")
    assert (want.planes == got.tensor.planes).float().mean().item() > 0.999  # float ties aside, the same codes
    assert (want.scale == got.tensor.scale).float().mean().item() > 0.999
    assert torch.equal(want.offset, got.tensor.offset)
    for i, b in enumerate(bits):
        err = (w.double() - dequantize(got.tensor, b).double()).square().sum().item()
        assert got.sq_error[i] == pytest.approx(err, rel=1e-4)


@pytest.mark.skipif(lib is None, reason="no C compiler: pack uses the torch fit")
def test_refits_and_weighting_lower_the_lowest_levels_weighted_error():
    torch.manual_seed(2)
    w = torch.randn(128, 256) * 0.03
    cfg = MWQConfig(bits=(2, 3, 4), group_size=32, scheme="subblock")
    plain = native.fit_sliced(lib, w, cfg, refits=0, weighting="mse").tensor
    refit = native.fit_sliced(lib, w, cfg, refits=2, weighting="mse").tensor
    assert sqnr_db(w, dequantize(refit, 2)) >= sqnr_db(w, dequantize(plain, 2)) - 0.01
    weighted = native.fit_sliced(lib, w, cfg, refits=1, weighting="abs").tensor
    big = w.abs() > 2 * w.abs().mean()
    err = {k: (dequantize(t, 2) - w)[big].square().sum().item() for k, t in (("mse", plain), ("abs", weighted))}
    assert err["abs"] < err["mse"]  # |x| weighting keeps the large weights
