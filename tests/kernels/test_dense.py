"""Dense layers converted while dense.safetensors is read (--dense-weights int8/int4): the same result as
converting whole weights, the peak the memory plan counts, and the file still checked end to end."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from d2moe.errors import FormatError
from d2moe.kernels import cpu
from d2moe.kernels.dense import (
    INT8_MIN_ELEMS,
    StreamingConverter,
    conversion,
    conversion_scratch,
    convert_weight,
    converted_nbytes,
    patch_linears,
)
from d2moe.quantize.format.checked import SINK_CHUNK, read_checked_safetensors
from d2moe.quantize.format.crc import crc32
from d2moe.quantize.format.safetensors_io import read_header

lib = cpu.load()
pytestmark = pytest.mark.skipif(lib is None, reason="no C compiler: dense weights stay in their dtype")


class Tiny(nn.Module):
    """Names as a transformers model's: a big projection (converted), an odd-width one (int8 under int4), a
    small one (kept), a router (kept by name), an untied embedding table (int8 under either) and a tied pair
    (kept: shared)."""

    def __init__(self, wide: int = 320):
        super().__init__()
        self.proj = nn.Linear(256, wide, bias=True)
        self.odd = nn.Linear(264, 256, bias=False)
        self.small = nn.Linear(256, 8, bias=False)
        self.router = nn.Linear(256, 300, bias=False)
        self.table = nn.Embedding(600, 256)
        self.embed = nn.Embedding(300, 256)
        self.head = nn.Linear(256, 300, bias=False)
        self.head.weight = self.embed.weight


def _source(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) * 0.05).bfloat16() for k, v in Tiny().state_dict().items()}


def _write(tmp_path, state):
    path = tmp_path / "dense.safetensors"
    save_file(state, str(path))
    return path, crc32(path.read_bytes())


def _bytes(forms) -> int:
    ts = forms if isinstance(forms, tuple) else (forms.scale, forms.offset, *forms.planes)
    return sum(t.numel() * t.element_size() for t in ts)


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_rows_converted_as_they_are_read_equal_the_whole_weights_conversion(tmp_path, weights, monkeypatch):
    from d2moe.quantize.format import checked

    monkeypatch.setattr(checked, "SINK_CHUNK", 7 * 256 * 2)  # 7 rows at a time: chunks that do not divide the rows
    state = _source()
    path, crc = _write(tmp_path, state)
    with torch.device("meta"):
        skeleton = Tiny()
    conv = StreamingConverter(skeleton, weights, keep={"router.weight"})
    loaded = read_checked_safetensors(path, crc, "dense.safetensors", conv.sink_for)
    assert set(conv.converted) == {"proj", "odd", "table"}  # small, router and the tied pair keep their source
    assert set(state) - set(loaded) == {"proj.weight", "odd.weight", "table.weight"}
    want_kind = {"proj": "int4" if weights == "int4" else "int8", "odd": "int8", "table": "int8"}
    for name, (kind, form, dtype) in conv.converted.items():
        assert kind == want_kind[name] and dtype == torch.bfloat16
        whole = convert_weight(state[f"{name}.weight"], kind)
        if kind == "int8":
            assert all(torch.equal(a, b) for a, b in zip(form, whole, strict=True))
        else:
            assert torch.equal(form.scale, whole.scale) and torch.equal(form.offset, whole.offset)
            assert all(torch.equal(a, b) for a, b in zip(form.planes, whole.planes, strict=True))
            assert form.blocked == whole.blocked
        assert _bytes(form) == converted_nbytes(tuple(state[f"{name}.weight"].shape), kind, 0)
    # what run notes: under int4 the odd-width Linear is int8 (the embedding table is int8 under either, by design)
    assert conv.int4_fallbacks() == ({"odd": (256, 264)} if weights == "int4" else {})


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_a_model_loaded_this_way_computes_what_converting_after_loading_computes(tmp_path, weights):
    state = _source(1)
    path, crc = _write(tmp_path, state)
    after = Tiny().bfloat16().eval()
    after.load_state_dict(state)
    patch_linears(after, lib, cpu.RowSplitter(1), weights=weights, keep=[after.router.weight])
    with torch.device("meta"):
        streamed = Tiny().bfloat16().eval()
    conv = StreamingConverter(streamed, weights, keep={"router.weight"})
    streamed.load_state_dict(read_checked_safetensors(path, crc, "dense", conv.sink_for), strict=False, assign=True)
    patch_linears(streamed, lib, cpu.RowSplitter(1), weights=weights, keep=[streamed.router.weight], converted=conv.converted)
    g = torch.Generator().manual_seed(2)
    x, x_odd = torch.randn(3, 256, generator=g).bfloat16(), torch.randn(3, 264, generator=g).bfloat16()
    with torch.no_grad():
        assert torch.equal(streamed.proj(x), after.proj(x))
        assert torch.equal(streamed.odd(x_odd), after.odd(x_odd))
        assert torch.equal(streamed.router(x), after.router(x))
        ids = torch.tensor([[0, 599, 7, 7]])
        looked_up = streamed.table(ids)
        assert torch.equal(looked_up, after.table(ids)) and looked_up.dtype == torch.bfloat16
        table = state["table.weight"].float()[ids]
        assert ((looked_up.float() - table).abs() <= table.abs().amax(-1, keepdim=True) / 127).all()  # a row's int8 step


def test_the_plan_counts_the_converted_layers_and_one_conversion_in_flight(tmp_path):
    state = _source()
    with torch.device("meta"):
        skeleton = Tiny()
    conv = StreamingConverter(skeleton, "int4", keep={"router.weight"})
    header = {k: (tuple(t.shape), t.dtype, t.numel() * t.element_size()) for k, t in state.items()}
    source = sum(n for *_, n in header.values())
    plan = conv.plan_bytes(header)
    path, crc = _write(tmp_path, state)
    kept = read_checked_safetensors(path, crc, "dense", conv.sink_for)
    held = sum(t.numel() * t.element_size() for t in kept.values()) + sum(_bytes(f) for _, f, _ in conv.converted.values())
    chunk_rows = SINK_CHUNK // (256 * 2)
    moment = max(conversion_scratch((320, 256), "int4", chunk_rows), conversion_scratch((256, 264), "int8", chunk_rows),
                 conversion_scratch((600, 256), "int8", chunk_rows))
    assert plan == held + moment  # every layer as it ends up, plus the largest conversion in flight
    assert held < source
    assert conversion((256, 320), torch.bfloat16, "int4") == "int4"
    assert conversion((INT8_MIN_ELEMS // 256 - 1, 256), torch.bfloat16, "int8") == "source"  # small: kept


def test_a_flipped_byte_in_a_converted_tensor_is_still_a_format_error(tmp_path):
    state = _source()
    path, crc = _write(tmp_path, state)
    info = read_header(path).tensors["proj.weight"]
    raw = bytearray(path.read_bytes())
    raw[(info.begin + info.end) // 2] ^= 0x10  # inside a tensor that is converted, never held whole
    path.write_bytes(bytes(raw))
    with torch.device("meta"):
        skeleton = Tiny()
    conv = StreamingConverter(skeleton, "int8")
    assert conv.kind("proj.weight", (320, 256), torch.bfloat16) == "int8"
    assert conv.kind("proj.weight", (321, 256), torch.bfloat16) == "source"  # not the model's shape: the loader names it
    with pytest.raises(FormatError, match="crc32"):
        read_checked_safetensors(path, crc, "dense.safetensors", conv.sink_for)
