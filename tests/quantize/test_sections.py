"""Optional manifest sections: expert similarity, the lossless tier (pack --lossless) and the calibration record
(pack --calib), validated and exact."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.errors import FormatError
from d2moe.quantize import MWQConfig
from d2moe.quantize import lossless as ll
from d2moe.quantize.convert.pack import pack_checkpoint
from d2moe.quantize.format import open_checkpoint
from d2moe.quantize.similarity import SimilarityCollector


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=0, max_size=4000), st.sampled_from([2, 4]), st.sampled_from(ll.CODECS),
       st.integers(1, 300))
def test_lossless_codec_round_trips_any_bytes(data, width, codec, chunk):
    if codec == "brotli":
        pytest.importorskip("brotli")  # optional: the default codec is zstd
    raw = data[: len(data) // width * width]
    assert bytes(ll.decode_bytes(ll.encode_bytes(raw, width, codec, chunk))) == raw


def test_lossless_codec_compresses_gaussian_bf16_and_decodes_on_threads():
    from concurrent.futures import ThreadPoolExecutor

    w = torch.randn(512, 1024).bfloat16()
    raw = w.view(torch.uint8).numpy().tobytes()
    blob = ll.encode_bytes(raw, 2, "zstd", chunk_weights=1 << 16)
    assert len(raw) / len(blob) > 1.35  # exponent entropy ~2.6 bits of 8
    out = bytearray(len(raw))
    with ThreadPoolExecutor(2) as pool:
        ll.decode_into(blob, out, pool)
    assert bytes(out) == raw
    with pytest.raises(FormatError):
        ll.decode_bytes(blob[: len(blob) // 2])
    with pytest.raises(FormatError):
        ll.decode_bytes(b"XXXX" + blob[4:])


def test_similarity_finds_a_twin_expert():
    g = torch.Generator().manual_seed(1)
    mats = [{m: torch.randn(*s, generator=g) for m, s in (("gate", (32, 16)), ("up", (32, 16)), ("down", (16, 32)))}
            for _ in range(3)]
    mats.append({m: mats[1][m][torch.randperm(32, generator=g)] if m != "down" else mats[1][m] for m in mats[1]})
    perm = torch.randperm(32, generator=g)  # a twin of expert 1 with its neurons reordered
    mats[3] = {"gate": mats[1]["gate"][perm], "up": mats[1]["up"][perm], "down": mats[1]["down"][:, perm]}
    sim = SimilarityCollector(k=2)
    for e, m in enumerate(mats):
        for name in ("gate", "up", "down"):
            sim.observe(0, e, name, m[name])
    rows = sim.neighbors(0)
    assert rows[1][0] == [3, 1.0] and rows[3][0] == [1, 1.0] and len(rows[0]) == 2


@pytest.fixture(scope="module")
def lossless_pack(tmp_path_factory):
    from tiny_models import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("lossless")
    src = make_tiny_checkpoint("mixtral", root / "src", dtype="bfloat16", num_local_experts=4)
    out = root / "packed"
    pack_checkpoint(src, out, MWQConfig(bits=(2, 4)), progress=False, lossless="zstd")
    return src, out


def test_lossless_blobs_are_bit_identical_to_the_source(lossless_pack):
    from d2moe.quantize.adapters import adapter_for
    from d2moe.quantize.convert.source import ExpertSource, SourceCheckpoint

    src, out = lossless_pack
    ckpt = open_checkpoint(out)
    section = ckpt.manifest["lossless"]
    assert section["codec"] == "zstd" and section["dtype"] == "bfloat16"
    source = SourceCheckpoint(src)
    adapter = adapter_for(source.config)
    source.index_weights()
    experts = ExpertSource(source, adapter, ckpt.moe_layers, ckpt.num_experts, adapter.matrix_shapes(source.config))
    for item in section["experts"]:
        with open(out / item["file"], "rb") as f:
            f.seek(item["offset"])
            blob = f.read(item["nbytes"])
        raw = b"".join(experts.matrix(item["layer"], item["expert"], m).contiguous().view(torch.uint8).numpy().tobytes()
                       for m in ("gate", "up", "down"))
        assert bytes(ll.decode_bytes(blob)) == raw and len(raw) == item["raw_nbytes"]


CALIBRATION = {"texts": ["train.txt", "wikitext"], "tokens": 2048, "sha256": "0f" * 32, "experts_without_enough_tokens": 1}


def _edit(out, tmp_path, edit):
    copy = tmp_path / "edited"
    shutil.copytree(out, copy)
    m = json.loads((copy / "d2moe.json").read_text())
    edit(m)
    (copy / "d2moe.json").write_text(json.dumps(m))
    return copy


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["similarity"]["neighbors"]["0"][0].append([0, 0.5]), "neighbour"),
    (lambda m: m["similarity"]["neighbors"]["0"][1].__setitem__(0, [2, 7.0]), "neighbour"),
    (lambda m: m["similarity"]["neighbors"].pop("0"), "every MoE layer"),
    (lambda m: m["similarity"].pop("seed"), "keys"),
    (lambda m: m["lossless"]["experts"][0].__setitem__("raw_nbytes", 5), "raw_nbytes"),
    (lambda m: m["lossless"]["experts"][1].__setitem__("offset", 10**12), "runs past the end"),
    (lambda m: m["lossless"].__setitem__("codec", "lzma"), "codec"),
    (lambda m: m.__setitem__("extras", {}), "unknown"),
    (lambda m: m.__setitem__("calibration", {**CALIBRATION, "tokens": 0}), "calibration.tokens"),
    (lambda m: m.__setitem__("calibration", {**CALIBRATION, "texts": []}), "calibration.texts"),
    (lambda m: m.__setitem__("calibration", {**CALIBRATION, "texts": ["x" * 600]}), "calibration.texts"),
    (lambda m: m.__setitem__("calibration", {**CALIBRATION, "sha256": "Z" * 64}), "calibration.sha256"),
    (lambda m: m.__setitem__("calibration", {**CALIBRATION, "experts_without_enough_tokens": 999}), "experts_without_enough_tokens"),
    (lambda m: m.__setitem__("calibration", {k: v for k, v in CALIBRATION.items() if k != "texts"}), "keys"),
])
def test_bad_sections_are_rejected(lossless_pack, tmp_path, edit, match):
    with pytest.raises(FormatError, match=match):
        open_checkpoint(_edit(lossless_pack[1], tmp_path, edit))


def test_sections_are_optional(lossless_pack, tmp_path):
    copy = _edit(lossless_pack[1], tmp_path, lambda m: (m.pop("similarity"), m.pop("lossless")))
    assert "lossless" not in open_checkpoint(copy).manifest
    assert open_checkpoint(copy).summary()["calibration"] is None


def test_a_calibration_record_is_read_back_into_the_summary(lossless_pack, tmp_path):
    copy = _edit(lossless_pack[1], tmp_path, lambda m: m.__setitem__("calibration", CALIBRATION))
    assert open_checkpoint(copy).summary()["calibration"] == CALIBRATION


def test_codec_none_stores_raw_weights():
    x = np.arange(1000, dtype=np.uint16).tobytes()
    blob = ll.encode_bytes(x, 2, "none")
    assert x in blob and bytes(ll.decode_bytes(blob)) == x


def test_verify_reads_every_lossless_blob(lossless_pack, tmp_path):
    """inspect --verify said "every crc32 checked" over a corrupt lossless tier that run --lossless then refused."""
    copy = tmp_path / "flipped"
    shutil.copytree(lossless_pack[1], copy)
    ckpt = open_checkpoint(copy, verify=True)
    summary = ckpt.summary()["lossless"]
    items = ckpt.manifest["lossless"]["experts"]
    assert summary["codec"] == "zstd" and summary["bytes"] == sum(i["nbytes"] for i in items) < summary["raw_bytes"]
    item = items[-1]
    raw = bytearray((copy / item["file"]).read_bytes())
    raw[item["offset"] + item["nbytes"] // 2] ^= 0x01
    (copy / item["file"]).write_bytes(bytes(raw))
    open_checkpoint(copy)  # the structure still holds
    with pytest.raises(FormatError, match=f"layer {item['layer']} expert {item['expert']}: lossless blob fails its crc32"):
        open_checkpoint(copy, verify=True)


@pytest.mark.parametrize("edit,match", [
    ('"layer":"0"', "should be format 'd2moe-lossless', layer '0'"),  # the metadata names another layer
    ('"format":"d2moe-lossless"', "should be format 'd2moe-lossless'"),  # or another format
    ('"expert.1"', "disagree with the manifest"),  # a tensor renamed
])
def test_a_lossless_file_header_that_disagrees_with_the_manifest_is_refused(lossless_pack, tmp_path, edit, match):
    """The lossless files' headers are checked as the experts files' are (a flipped byte there passed before)."""
    copy = tmp_path / "edited"
    shutil.copytree(lossless_pack[1], copy)
    name = open_checkpoint(copy).manifest["lossless"]["experts"][0]["file"]
    raw = (copy / name).read_bytes()
    assert edit.encode() in raw[:4096], raw[:300]
    changed = edit.replace('"0"', '"1"').replace("lossless", "lossleZs").replace("expert.1", "expert.9")
    (copy / name).write_bytes(raw.replace(edit.encode(), changed.encode(), 1))
    with pytest.raises(FormatError, match=match):
        open_checkpoint(copy)
