"""The torch reference dequantizer against a slow, literal per-element reading of the MWQ formula."""

from __future__ import annotations

import pytest
import torch

from d2moe.kernels.reference import codes_from_planes, dequantize_reference, unpack_plane


def _bit(planes: torch.Tensor, p: int, o: int, c: int) -> int:
    """Bit of column c in plane p, row o: bit c % 8 of byte c // 8."""
    return (int(planes[p, o, c // 8]) >> (c % 8)) & 1


def _slow_dequantize(scale, offset, planes, alpha, b1: int, level: int, group_size: int) -> torch.Tensor:
    """w = offset + scale*(q_b1 + 0.5) + sum_j alpha_j*(2*plane_{b1+j} - 1), one element at a time, float64."""
    rows, groups = scale.shape
    out = torch.empty(rows, groups * group_size, dtype=torch.float64)
    for o in range(rows):
        for c in range(groups * group_size):
            g = c // group_size
            s, z = float(scale[o, g]), float(offset[o, g])
            q = 0
            for p in range(b1):
                q = 2 * q + _bit(planes, p, o, c)
            w = z + s * (q + 0.5)
            for j in range(1, level - b1 + 1):
                a = s * 2.0 ** -(j + 1) if alpha is None else float(alpha[j - 1, o, g])
                w += a * (2 * _bit(planes, b1 + j - 1, o, c) - 1)
            out[o, c] = w
    return out


def _random_tensor_parts(seed: int, rows: int, groups: int, group_size: int, bk: int, b1: int, residual: bool):
    gen = torch.Generator().manual_seed(seed)
    scale = (torch.rand(rows, groups, generator=gen) * 0.1 + 0.01).half()
    offset = (torch.randn(rows, groups, generator=gen) * 0.1).half()
    planes = torch.randint(0, 256, (bk, rows, groups * group_size // 8), generator=gen, dtype=torch.int32).to(torch.uint8)
    alpha = (torch.rand(bk - b1, rows, groups, generator=gen) * 0.02).half() if residual else None
    return scale, offset, planes, alpha


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize(("b1", "bk", "group_size"), [(2, 4, 16), (1, 3, 8), (3, 8, 32), (4, 4, 8)])
def test_reference_matches_per_element_formula(residual: bool, b1: int, bk: int, group_size: int) -> None:
    rows, groups = 3, 2
    scale, offset, planes, alpha = _random_tensor_parts(b1 * 10 + bk, rows, groups, group_size, bk, b1, residual)
    for level in range(b1, bk + 1):
        a = None if alpha is None else alpha[: level - b1]
        fast = dequantize_reference(scale, offset, planes[:level], a, b1, level, group_size)
        slow = _slow_dequantize(scale, offset, planes, a, b1, level, group_size)
        assert fast.dtype == torch.float32 and fast.shape == slow.shape
        # float32 with a different summation order: agreement to float32 rounding of the magnitudes
        assert torch.allclose(fast.double(), slow, rtol=0, atol=4e-7 * (1 + slow.abs().max().item())), level


def test_sliced_equals_residual_with_tied_alphas() -> None:
    """alpha_j = scale * 2^-(j+1) makes the fitted formula the sliced cell centre."""
    b1, bk, gs = 2, 6, 16
    scale, offset, planes, _ = _random_tensor_parts(7, 4, 3, gs, bk, b1, residual=False)
    tied = torch.stack([scale.float() * 2.0 ** -(j + 1) for j in range(1, bk - b1 + 1)]).half()
    for level in range(b1, bk + 1):
        sliced = dequantize_reference(scale, offset, planes[:level], None, b1, level, gs)
        fitted = dequantize_reference(scale, offset, planes[:level], tied[: level - b1], b1, level, gs)
        assert torch.allclose(sliced, fitted, rtol=0, atol=1e-6), level


def test_unpack_and_codes_follow_the_bit_layout() -> None:
    planes = torch.randint(0, 256, (3, 2, 4), generator=torch.Generator().manual_seed(5), dtype=torch.int32).to(torch.uint8)
    bits = unpack_plane(planes[1])
    codes = codes_from_planes(planes)
    for o in range(2):
        for c in range(32):
            assert int(bits[o, c]) == _bit(planes, 1, o, c)
            assert int(codes[o, c]) == 4 * _bit(planes, 0, o, c) + 2 * _bit(planes, 1, o, c) + _bit(planes, 2, o, c)


def test_output_dtype_and_chunking_do_not_change_values(monkeypatch: pytest.MonkeyPatch) -> None:
    import d2moe.kernels.reference as ref

    scale, offset, planes, alpha = _random_tensor_parts(11, 9, 2, 16, 4, 2, residual=True)
    whole = dequantize_reference(scale, offset, planes, alpha, 2, 4, 16)
    monkeypatch.setattr(ref, "_ROW_CHUNK_ELEMS", 40)  # one row per chunk
    assert torch.equal(dequantize_reference(scale, offset, planes, alpha, 2, 4, 16), whole)
    assert torch.equal(dequantize_reference(scale, offset, planes, alpha, 2, 4, 16, dtype=torch.bfloat16), whole.bfloat16())
