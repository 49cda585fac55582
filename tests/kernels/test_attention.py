"""Single-query attention on the native kernel against torch's SDPA; everything it does not take goes to SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from d2moe.kernels import attention, cpu

lib = cpu.load()
pytestmark = pytest.mark.skipif(lib is None, reason="no C compiler: the native kernels cannot be built here")


class _Attn(torch.nn.Module):
    is_causal = True

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups


@pytest.fixture(params=[1, 2])
def native(request, monkeypatch):
    monkeypatch.setitem(attention._state, "lib", lib)
    monkeypatch.setitem(attention._state, "splitter", cpu.RowSplitter(request.param))
    return request.param


def _reference(q, k, v, scale):
    groups = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(groups, 1) for t in (k, v))
    return F.scaled_dot_product_attention(q.double(), k, v, scale=scale).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 16, 16, 128, 128), (2, 8, 2, 64, 48), (3, 6, 3, 40, 40), (1, 4, 4, 24, 17)])
def test_one_query_matches_sdpa(native, dtype, shape):
    """Heads sharing KV heads (GQA), value width != key width, head sizes off the vector width, 1..700 keys,
    keys and values as views into a larger cache buffer (strided heads and positions)."""
    b, hq, hkv, dk, dv = shape
    torch.manual_seed(hq * dk + native)
    for length in (1, 5, 700):
        cache_k = torch.randn(b, hkv, length + 9, dk + 3, dtype=dtype)
        cache_v = torch.randn(b, hkv, length + 9, dv, dtype=dtype)
        k, v = cache_k[:, :, :length, :dk], cache_v[:, :, :length]
        q = torch.randn(b, hq, 1, dk, dtype=dtype)
        got, weights = attention.decode_attention(_Attn(hq // hkv), q, k, v, None, scaling=dk ** -0.5)
        assert weights is None and got.dtype == dtype and got.shape == (b, 1, hq, dv)
        want = _reference(q, k, v, dk ** -0.5)
        tol = 2e-6 if dtype == torch.float32 else 1e-2 * float(want.abs().max())  # the output's own rounding
        assert (got.double() - want).abs().max() <= tol


@pytest.mark.parametrize("case", ["mask", "two_queries", "window", "softcap"])
def test_what_it_does_not_take_goes_to_sdpa(native, case):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(1)
    q_len = 2 if case == "two_queries" else 1
    q, k, v = torch.randn(1, 4, q_len, 32), torch.randn(1, 4, 20, 32), torch.randn(1, 4, 20, 32)
    mask = torch.zeros(1, 1, q_len, 20, dtype=torch.bool).fill_(True) if case == "mask" else None
    kwargs = {"sliding_window": 8} if case == "window" else {}
    if case == "softcap":
        kwargs["softcap"] = 30.0
        with pytest.raises(ValueError, match="softcap"):  # SDPA's own refusal: the call went there
            attention.decode_attention(_Attn(1), q, k, v, None, **kwargs)
        return
    got = attention.decode_attention(_Attn(1), q, k, v, mask, scaling=0.2, **kwargs)[0]
    assert torch.equal(got, sdpa_attention_forward(_Attn(1), q, k, v, mask, scaling=0.2, **kwargs)[0])


def test_without_the_library_it_is_sdpa(monkeypatch):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    monkeypatch.setitem(attention._state, "lib", None)
    q, k, v = torch.randn(1, 4, 1, 32), torch.randn(1, 4, 20, 32), torch.randn(1, 4, 20, 32)
    assert torch.equal(attention.decode_attention(_Attn(1), q, k, v, None)[0],
                       sdpa_attention_forward(_Attn(1), q, k, v, None)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_narrower_than_keys_are_padded_for_the_prompt_and_the_output_cut_back(native, dtype):
    """DeepSeek's MLA (keys 24 wide, values 16 here): SDPA's math path kept a kernel per context length."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(2)
    q, k, v = torch.randn(1, 4, 6, 24, dtype=dtype), torch.randn(1, 4, 30, 24, dtype=dtype), torch.randn(1, 4, 30, 16, dtype=dtype)
    mask = torch.ones(1, 1, 6, 30, dtype=torch.bool).tril(24)
    got = attention.decode_attention(_Attn(1), q, k, v, mask, scaling=0.2)[0]
    want = sdpa_attention_forward(_Attn(1), q, k, v, mask, scaling=0.2)[0]
    assert got.shape == want.shape == (1, 6, 4, 16)
    assert torch.allclose(got.float(), want.float(), atol=1e-5 if dtype == torch.float32 else 2e-2)
