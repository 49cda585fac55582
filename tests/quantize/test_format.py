"""The packed format's layout, encoding and reader: nesting through the file, alignment, framing."""

from __future__ import annotations

import os
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from d2moe.errors import FormatError, UnsupportedModelError, UsageError
from d2moe.quantize import MWQConfig, dequantize, quantize_mwq
from d2moe.quantize import format as fmt
from d2moe.quantize.format.safetensors_io import AlignedSafetensorsWriter, read_header

SHAPES = {"gate": (128, 64), "up": (128, 64), "down": (64, 128)}


def _random_expert(cfg: MWQConfig, shapes=SHAPES, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {m: quantize_mwq(torch.randn(*s, generator=g) * 0.02, cfg) for m, s in shapes.items()}


def _same(a, b) -> bool:
    return (a.shape == b.shape and a.level == b.level and torch.equal(a.scale, b.scale) and torch.equal(a.offset, b.offset)
            and torch.equal(a.planes, b.planes)
            and ((a.alpha is None and b.alpha is None) or torch.equal(a.alpha, b.alpha)))


@pytest.mark.parametrize("bits", [(2, 3, 4), (2, 4, 8), (3,), (1, 2, 3, 4, 5, 6, 7, 8)])
@pytest.mark.parametrize("scheme", ["residual", "sliced", "subblock"])
def test_layout_segments_are_aligned_and_tile_the_blob(bits, scheme):
    cfg = MWQConfig(bits=bits, scheme=scheme)
    layout = fmt.blob_layout(SHAPES, cfg)
    assert all(end % fmt.ALIGN == 0 for end in layout.level_ends)
    assert list(layout.level_ends) == sorted(set(layout.level_ends))
    for i, slots in enumerate(layout.segments):
        lo, hi = layout.segment_range(i)
        cursor = 0
        for slot in slots:  # tensors back to back in MATRICES order, inside the segment
            assert slot.start == cursor
            cursor += slot.nbytes
        assert [s.matrix for s in slots] == sorted((s.matrix for s in slots), key=fmt.MATRICES.index)
        assert cursor <= hi - lo < cursor + fmt.ALIGN
        names = [s.name for s in slots if s.matrix == "gate"]
        assert names == (["scale", "offset", "planes"] if i == 0 else (["alpha", "planes"] if scheme == "residual" else ["planes"]))


def test_layout_refuses_shapes_the_group_size_does_not_divide_and_names_the_sizes_that_do():
    with pytest.raises(UsageError, match="use --group-size 8 or 16 or 32 "):
        fmt.blob_layout({"gate": (128, 96), "up": (128, 96), "down": (96, 128)}, MWQConfig(group_size=64))
    with pytest.raises(UsageError, match="use --group-size 8 .they divide every expert width"):  # OLMoE-like 200
        fmt.blob_layout({"gate": (200, 96), "up": (200, 96), "down": (96, 200)}, MWQConfig())
    with pytest.raises(UnsupportedModelError, match=r"expert widths \[96, 100\] have no common divisor"):
        fmt.blob_layout({"gate": (100, 96), "up": (100, 96), "down": (96, 100)}, MWQConfig())


@settings(max_examples=15, deadline=None)
@given(bits=st.lists(st.integers(1, 8), min_size=1, max_size=4, unique=True).map(sorted),
       scheme=st.sampled_from(["residual", "sliced", "subblock"]), seed=st.integers(0, 2**16))
def test_encode_decode_round_trips_bit_for_bit_at_every_level(bits, scheme, seed):
    cfg = MWQConfig(bits=tuple(bits), scheme=scheme)
    shapes = {"gate": (8, 64), "up": (8, 64), "down": (64, 64)}
    expert = _random_expert(cfg, shapes, seed)
    layout = fmt.blob_layout(shapes, cfg)
    blob = bytes(fmt.encode_expert(expert, layout, cfg))
    for i, b in enumerate(cfg.bits):
        got = fmt.decode_blob(blob[: layout.level_ends[i]], layout, cfg, b, shapes)
        got = {m: t.to_mwq() for m, t in got.items()}  # packed views -> MWQ tensors
        for m in fmt.MATRICES:
            assert _same(got[m], expert[m].truncate(b))


def test_level_b_read_from_the_file_prefix_equals_the_whole_blob(packed_checkpoint_factory):
    _, out = packed_checkpoint_factory("mixtral")
    ckpt = fmt.open_checkpoint(out, verify=True)
    cfg = ckpt.cfg
    for (layer, expert), entry in ckpt.experts.items():
        path, off, n = ckpt.byte_range(layer, expert, None, cfg.bk)
        fd = os.open(path, os.O_RDONLY)
        try:
            whole = os.pread(fd, n, off)
            for i, b in enumerate(cfg.bits):
                _, off_b, n_b = ckpt.byte_range(layer, expert, None, b)
                assert off_b == entry.offset and off_b % fmt.ALIGN == 0 and n_b == ckpt.level_nbytes(b)
                prefix = os.pread(fd, n_b, off_b)  # only the prefix is read
                from_prefix = ckpt.decode_expert(layer, expert, b, prefix)
                from_prefix = {m: t.to_mwq() for m, t in from_prefix.items()}  # packed views -> MWQ tensors
                from_whole = ckpt.decode_expert(layer, expert, b, whole)
                from_whole = {m: t.to_mwq() for m, t in from_whole.items()}  # packed views -> MWQ tensors
                for m in fmt.MATRICES:
                    assert _same(from_prefix[m], from_whole[m])
                    assert torch.equal(dequantize(from_prefix[m], b), dequantize(from_whole[m], b))
                for b2 in cfg.bits[i + 1:]:  # upgrade = exactly the bytes between, one aligned read
                    _, off_u, n_u = ckpt.byte_range(layer, expert, b, b2)
                    assert off_u % fmt.ALIGN == 0
                    assert prefix + os.pread(fd, n_u, off_u) == os.pread(fd, ckpt.level_nbytes(b2), entry.offset)
        finally:
            os.close(fd)


def test_decode_checks_lengths_and_crc(packed_checkpoint_factory):
    _, out = packed_checkpoint_factory("mixtral")
    ckpt = fmt.open_checkpoint(out)
    prefix = bytearray(ckpt.read_prefix(1, 2, 3))
    with pytest.raises(FormatError, match="layer 1 expert 2.*needs"):
        ckpt.decode_expert(1, 2, 3, prefix[:-1])
    with pytest.raises(FormatError, match="needs"):
        ckpt.decode_expert(1, 2, 2, prefix + bytes(ckpt.level_nbytes(4)))  # longer than the whole blob
    prefix[ckpt.level_nbytes(2) + 5] ^= 0x10  # a flip inside the level-3 segment
    with pytest.raises(FormatError, match="experts-0001.safetensors: layer 1 expert 2: level-3 segment fails its crc32"):
        ckpt.decode_expert(1, 2, 3, prefix)
    ckpt.decode_expert(1, 2, 2, prefix)  # level 2 never touches the flipped segment
    with pytest.raises(UsageError, match="no expert 9"):
        ckpt.byte_range(0, 9, None, 2)
    with pytest.raises(UsageError, match="already covers"):
        ckpt.byte_range(0, 0, 4, 3)


def test_every_file_is_valid_safetensors(packed_checkpoint_factory):
    _, out = packed_checkpoint_factory("qwen2_moe")
    ckpt = fmt.open_checkpoint(out)
    for path in sorted(out.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if path.name.startswith("experts-"):
            header = read_header(path)
            assert header.data_start % fmt.ALIGN == 0
            layer = int(path.stem.split("-")[1])
            for e in range(ckpt.num_experts):
                blob = tensors[fmt.expert_tensor_name(e)]
                assert blob.dtype == torch.uint8 and header.tensors[f"expert.{e}"].begin % fmt.ALIGN == 0
                assert blob.numpy().tobytes() == ckpt.read_prefix(layer, e, ckpt.cfg.bk)
    assert set(ckpt.load_dense()) == set(safe_open(str(out / fmt.DENSE_NAME), "pt").keys())


def test_summary_reports_sizes_and_quality(packed_checkpoint_factory):
    _, out = packed_checkpoint_factory("olmoe")
    s = fmt.open_checkpoint(out).summary()
    assert s["arch"] == "olmoe" and s["moe_layers"] == 2 and s["num_experts"] == 4 and s["version"] == fmt.FORMAT_VERSION
    bpw = [lv["bits_per_weight"] for lv in s["levels"]]
    assert bpw == sorted(bpw) and all(lv["bits_per_weight"] >= lv["bits"] for lv in s["levels"])
    medians = [lv["sqnr_db"]["median"] for lv in s["levels"]]
    assert medians == sorted(medians) and medians[0] > 5  # error falls with every level


# ----------------------------------------------------------------------------- safetensors framing


def test_aligned_writer_is_read_by_safetensors_and_enforces_order(tmp_path):
    path = tmp_path / "x.safetensors"
    a, b = torch.arange(10, dtype=torch.float32), torch.arange(3, dtype=torch.uint8)
    with AlignedSafetensorsWriter(path, [("a", "F32", (10,)), ("b", "U8", (3,))], {"k": "v"}, align=4096) as w:
        with pytest.raises(RuntimeError, match="expected tensor 'a'"):
            w.write("b", b.numpy())
        w.write("a", a.numpy())
        w.write("b", b.numpy())
    assert read_header(path).data_start == 4096 and path.stat().st_size == 4096 + 43
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"k": "v"} and torch.equal(f.get_tensor("a"), a) and torch.equal(f.get_tensor("b"), b)
    with pytest.raises(RuntimeError, match="never written"):
        AlignedSafetensorsWriter(tmp_path / "y.safetensors", [("a", "U8", (1,))], {}).close()


@pytest.mark.parametrize("header, size_delta, match", [
    (b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}', 0, None),
    (b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}', 0, "duplicate key 'a'"),
    (b'{"a":{"dtype":"U8","shape":[5],"data_offsets":[0,4]}}', 0, "needs 5"),
    (b'{"a":{"dtype":"X9","shape":[4],"data_offsets":[0,4]}}', 0, "unknown dtype"),
    (b'{"a":{"dtype":"U8","shape":[-4],"data_offsets":[0,4]}}', 0, "dims >= 0"),
    (b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}', 0, "overlaps"),
    (b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}', 0, "gap"),
    (b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}', 3, "unexplained bytes"),
    (b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}', -1, "truncated"),
    (b'[1,2]', 0, "not a JSON object"),
    (b'{"a":NaN}', 0, "non-standard"),
    (b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"__metadata__":{"x":1}}', 0, "__metadata__"),
    (b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}\xff}', 0, "not UTF-8"),
])
def test_read_header_rejects_bad_framing(tmp_path, header, size_delta, match):
    path = tmp_path / "t.safetensors"
    data = struct.pack("<Q", len(header)) + header + bytes(4)
    path.write_bytes(data[: len(data) + size_delta] if size_delta < 0 else data + bytes(size_delta))
    if match is None:
        assert set(read_header(path).tensors) == {"a"}
    else:
        with pytest.raises(FormatError, match=match):
            read_header(path)


def test_read_header_bounds_the_header_length(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(FormatError, match="exceeds"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(FormatError, match="runs past the end"):
        read_header(path)
    path.write_bytes(b"\x01\x00")
    with pytest.raises(FormatError, match="too short"):
        read_header(path)


def test_verify_read_checks_only_the_segments_read(packed_checkpoint_factory):
    _, out = packed_checkpoint_factory("mixtral")
    ckpt = fmt.open_checkpoint(out)
    whole = ckpt.read_prefix(0, 1, 4)
    lo2, lo3 = ckpt.level_nbytes(2), ckpt.level_nbytes(3)
    ckpt.verify_read(0, 1, whole, None, 4)
    ckpt.verify_read(0, 1, whole[lo2:], 2, 4)  # an upgrade read: segments 3 and 4 only
    upgrade = bytearray(whole[lo2:])
    upgrade[lo3 - lo2 + 7] ^= 0x01  # a flip inside the level-4 segment of the upgrade bytes
    with pytest.raises(FormatError, match="layer 0 expert 1: level-4 segment fails its crc32"):
        ckpt.verify_read(0, 1, upgrade, 2, 4)
    ckpt.verify_read(0, 1, upgrade[: lo3 - lo2], 2, 3)  # the level-3 part alone is intact
    with pytest.raises(FormatError, match="level-4 segment"):
        ckpt.verify_read(0, 1, whole[lo2:-1], 2, 4)  # short read


def test_verify_read_visits_every_tensor_it_checked_and_still_refuses_damage(packed_checkpoint_factory):
    """The visit hook (the kernels' in-place re-layout) sees each tensor of the segments read, as views of the
    read bytes with the slot's shape, after their bytes entered the checksum; damage still raises."""
    _, out = packed_checkpoint_factory("mixtral")
    ckpt = fmt.open_checkpoint(out)
    whole = bytearray(ckpt.read_prefix(0, 1, 4))
    lo2 = ckpt.level_nbytes(2)
    seen = []

    def visit(slot, t):
        seen.append((slot.matrix, slot.name, tuple(t.shape)))
        t.view(torch.uint8).bitwise_not_()  # what a re-layout may do: rewrite the bytes in place

    upgrade = whole[lo2:]
    ckpt.verify_read(0, 1, upgrade, 2, 4, visit=visit)
    want = [(s.matrix, s.name, s.shape) for i in (1, 2) for s in ckpt.layout.segments[i] if s.nbytes]
    assert seen == want and upgrade != whole[lo2:]  # every slot, in order, and the bytes were rewritten
    damaged = bytearray(whole[lo2:])
    damaged[-5] ^= 0x10
    with pytest.raises(FormatError, match="level-4 segment fails its crc32"):
        ckpt.verify_read(0, 1, damaged, 2, 4, visit=lambda slot, t: None)
    with pytest.raises(FormatError, match="level-4 segment"):
        ckpt.verify_read(0, 1, whole[lo2:-1], 2, 4, visit=lambda slot, t: None)  # short read
