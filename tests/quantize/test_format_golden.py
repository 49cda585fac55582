"""Golden bytes: the on-disk layout is pinned, so a change that stays self-consistent (writer and reader
moved together) still fails here. Inputs are integer-valued tensors built by hand: no quantizer floats,
so the digests do not depend on the machine. A deliberate format change bumps FORMAT_VERSION and
updates these digests in the same commit."""

from __future__ import annotations

import hashlib

import pytest
import torch

from d2moe.quantize import format as fmt
from d2moe.quantize.types import MWQConfig, MWQTensor

SHAPES = {"gate": (16, 64), "up": (16, 64), "down": (64, 16 * 8)}  # (O, I); I divisible by the group size

GOLDEN = {
    "sliced": {"blob": "615f3f154ea36925e19746367542d75b98e870071688656c7fb92ad6498ee835",
               "file": "642555b12352d57fca552c00d52e10982a702a6114a49c6b446bdf550998564f",
               "manifest": "271e88b0b87feeb271d07976d3adaa02fb34d10ead609037950deadfef6f0d2d"},
    "residual": {"blob": "4d8c3a3c2a603d0861dda4c38441291d936d1396ca033a1a6f094264e41d76db",
                 "file": "8bf163ad4d528cc1e9149f76dcc8dda150896d8081fca8411a750c21fbeb0fb8",
                 "manifest": "5d823ae3280f6925739a80929bfb456dc80fd420aac07e1045d92e2485ec1797"},
}


def _tensor(shape: tuple[int, int], cfg: MWQConfig, seed: int) -> MWQTensor:
    rows, cols = shape
    groups, k = cols // cfg.group_size, cfg.bk
    n = torch.arange(rows * groups, dtype=torch.float32).reshape(rows, groups)
    planes = ((torch.arange(k * rows * (cols // 8)) * (seed + 7) + seed) % 251).to(torch.uint8).reshape(k, rows, cols // 8)
    alpha = None
    if cfg.scheme == "residual":
        alpha = (torch.arange((k - cfg.b1) * rows * groups, dtype=torch.float32) / 64 + seed).reshape(k - cfg.b1, rows, groups).half()
    return MWQTensor(shape, cfg, k, (n / 8 + 1).half(), (-n / 4 - seed).half(), planes, alpha)


def _build(tmp_path, scheme: str):
    cfg = MWQConfig(bits=(2, 3, 4), group_size=32, scheme=scheme)
    layout = fmt.blob_layout(SHAPES, cfg)
    blobs = [fmt.encode_expert({m: _tensor(SHAPES[m], cfg, e * 3 + i) for i, m in enumerate(fmt.MATRICES)}, layout, cfg)
             for e in range(2)]
    with fmt.ExpertsFileWriter(tmp_path / fmt.experts_file_name(1), 1, 2, layout) as w:
        entries = [w.add(e, blob, [10.0 + e, 20.0, 30.5]) for e, blob in enumerate(blobs)]
    manifest = fmt.build_manifest({"path": "src", "sha256": "0" * 64}, "mixtral", cfg, "bfloat16", SHAPES, [1], 2,
                                  {"file": fmt.DENSE_NAME, "nbytes": 128, "crc32": 7}, entries, None)
    return blobs[0], (tmp_path / fmt.experts_file_name(1)).read_bytes(), fmt.manifest_bytes(manifest)


@pytest.mark.parametrize("scheme", ["sliced", "residual"])
def test_bytes_are_pinned(tmp_path, scheme):
    blob, file, manifest = _build(tmp_path, scheme)
    got = {k: hashlib.sha256(v).hexdigest() for k, v in (("blob", blob), ("file", file), ("manifest", manifest))}
    assert got == GOLDEN[scheme], f"format bytes changed: {got}"


def test_layout_numbers_are_pinned():
    """The readable half of the pin: segment ends and the first tensors' offsets."""
    cfg = MWQConfig(bits=(2, 3, 4), group_size=32, scheme="sliced")
    layout = fmt.blob_layout(SHAPES, cfg)
    assert layout.level_ends == (4096, 8192, 12288)
    first = layout.segments[0]
    assert [(s.matrix, s.name, s.start) for s in first[:4]] == [
        ("gate", "scale", 0), ("gate", "offset", 64), ("gate", "planes", 128), ("up", "scale", 384)]
