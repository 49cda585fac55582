"""Corrupt, truncated and forged packed checkpoints: always a FormatError naming the file, never a crash."""

from __future__ import annotations

import json
import random
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from d2moe.errors import FormatError, InputError
from d2moe.quantize import format as fmt


@pytest.fixture(scope="module")
def packed(packed_checkpoint_factory) -> Path:
    return packed_checkpoint_factory("mixtral")[1]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_manifest(path: Path, edit) -> None:
    m = json.loads((path / fmt.MANIFEST_NAME).read_text())
    edit(m)
    (path / fmt.MANIFEST_NAME).write_text(json.dumps(m))


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(m):
        obj = m
        for k in keys[:-1]:
            obj = obj[k]
        obj[keys[-1]] = value(obj[keys[-1]]) if callable(value) else value
    return edit


def _del(key):
    return lambda m: m.pop(key)


MANIFEST_CASES = [
    ("newer version", _set("version", 2), "version 2 was written by a newer d2moe.*upgrade"),
    ("zero version", _set("version", 0), "version 0 is not valid: re-pack"),
    ("string version", _set("version", "1"), "version '1' is not valid"),
    ("foreign format", _set("format", "gguf"), "not a d2moe checkpoint manifest"),
    ("missing field", _del("moe_layers"), "missing \\['moe_layers'\\]"),
    ("unknown field", _set("extra", 1), "unknown \\['extra'\\]"),
    ("levels not ascending", _set("levels", [4, 2, 3]), "distinct, ascending"),
    ("levels out of range", _set("levels", [2, 3, 9]), "levels\\[2\\] must be an integer in 1..8"),
    ("bool group size", _set("group_size", True), "group_size must be an integer"),
    ("bad scheme", _set("scheme", "magic"), "scheme 'magic' is unknown"),
    ("bad alignment", _set("alignment", 512), "alignment 512"),
    ("bad dtype", _set("dtype", "int8"), "dense dtype 'int8'"),
    ("wrong expert count", _set("num_experts", 8), "disagree with config.json"),
    ("wrong layers", _set("moe_layers", [0]), "disagree with config.json"),
    ("wrong shapes", _set("matrix_shapes", "gate", [128, 128]), "matrix_shapes .* disagree"),
    ("arch mismatch", _set("arch", "olmoe"), "arch 'olmoe' but config.json says 'mixtral'"),
    ("misaligned offset", _set("experts", 1, "offset", lambda x: x + 1), "layer 0 expert 1: offset \\d+ is not 4096-aligned"),
    ("overlapping blobs", _set("experts", 1, "offset", lambda x: x - 4096), "layer 0 expert 1: offset \\d+ overlaps"),
    ("offset past EOF", _set("experts", 7, "offset", lambda x: x + 4096 * 50), "experts-0001.safetensors: layer 1 expert 3: blob .* runs past the end"),
    ("offset moved onto the next blob", _set("experts", 2, "offset", lambda x: x + 4096 * 2), "layer 0 expert 3: offset \\d+ overlaps"),
    ("negative offset", _set("experts", 0, "offset", -4096), "layer 0 expert 0: offset must be an integer >= 4096"),
    ("entries out of order", lambda m: m["experts"].reverse(), "layer 0 expert 0: entry says layer 1 expert 3"),
    ("duplicate entry", lambda m: m["experts"].__setitem__(1, m["experts"][0]), "layer 0 expert 1: entry says layer 0 expert 0"),
    ("missing entry", lambda m: m["experts"].pop(), "7 expert entries, expected 2 layers x 4 experts"),
    ("wrong file", _set("experts", 0, "file", "../../etc/passwd"), "file '../../etc/passwd', expected 'experts-0000.safetensors'"),
    ("wrong level_ends", _set("experts", 3, "level_ends", [4096, 8192, 12288]), "layer 0 expert 3: level_ends .* differ"),
    ("crc out of range", _set("experts", 0, "crc32", [1, 2, 1 << 33]), "crc32 must be an integer in 0..4294967295"),
    ("crc count", _set("experts", 0, "crc32", [1, 2]), "crc32 must be a list of 3 items"),
    ("sqnr not a number", _set("experts", 0, "sqnr_db", ["x", 1, 2]), "sqnr_db must hold numbers"),
    ("dense file renamed", _set("dense", "file", "other.safetensors"), "dense.file must be 'dense.safetensors'"),
    ("dense size", _set("dense", "nbytes", lambda x: x + 1), "dense.safetensors: \\d+ bytes, manifest says"),
    ("gate without file", _set("gate", {"file": "gate.safetensors", "nbytes": 100, "crc32": 0, "levels": [2, 3, 4],
                                        "capacity": [0.3, 0.4, 0.3]}), "gate.safetensors: file is missing"),
    ("gate levels", _set("gate", {"file": "gate.safetensors", "nbytes": 100, "crc32": 0, "levels": [2, 4],
                                  "capacity": [0.5, 0.5]}), "gate levels \\[2, 4\\] differ"),
    ("manifest not an object", lambda m: m.clear() or m.update({"format": ["d2moe-mwq"]}), "not a d2moe checkpoint manifest"),
]


@pytest.mark.parametrize("name, edit, match", MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
def test_corrupt_manifest_table(packed, tmp_path, name, edit, match):
    ckpt = _copy(packed, tmp_path / "c")
    _edit_manifest(ckpt, edit)
    with pytest.raises(FormatError, match=match):
        fmt.open_checkpoint(ckpt)


RAW_CASES = [
    ("duplicate key", lambda raw: raw.replace(b'"arch":', b'"arch": "olmoe", "arch":', 1), "duplicate key 'arch'"),
    ("NaN", lambda raw: raw.replace(b'"group_size": 64', b'"group_size": NaN', 1), "non-standard JSON number NaN"),
    ("not UTF-8", lambda raw: raw.replace(b'"arch"', b'"\xff\xfe"', 1), "not UTF-8"),
    ("truncated", lambda raw: raw[: len(raw) // 2], "invalid JSON"),
    ("empty", lambda raw: b"", "invalid JSON"),
    ("array", lambda raw: b"[]", "not a d2moe checkpoint manifest"),
]


@pytest.mark.parametrize("name, edit, match", RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_corrupt_manifest_bytes(packed, tmp_path, name, edit, match):
    ckpt = _copy(packed, tmp_path / "c")
    path = ckpt / fmt.MANIFEST_NAME
    raw = json.dumps(json.loads(path.read_text())).encode()  # one line, `"key": value` spacing
    path.write_bytes(edit(raw))
    with pytest.raises(FormatError, match=match):
        fmt.open_checkpoint(ckpt)


def _truncate(path: Path, n: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(n)


FILE_CASES = [
    ("experts file missing", lambda c: (c / "experts-0001.safetensors").unlink(), "experts-0001.safetensors: file is missing"),
    ("config missing", lambda c: (c / "config.json").unlink(), "config.json is missing"),
    ("config foreign", lambda c: (c / "config.json").write_text('{"model_type": "llama"}'), "model_type 'llama' is not supported"),
    ("config remote code", lambda c: (c / "config.json").write_text('{"model_type": "mixtral", "auto_map": {"a": "b"}}'), "remote code"),
    ("experts truncated", lambda c: _truncate(c / "experts-0000.safetensors", 4096 * 5), "experts-0000.safetensors: layer 0 expert 1: blob .* runs past the end"),
    ("experts header cut", lambda c: _truncate(c / "experts-0000.safetensors", 100), "experts-0000.safetensors: .*run"),
    ("experts trailing bytes", lambda c: open(c / "experts-0000.safetensors", "ab").write(b"x" * 4096), "experts-0000.safetensors: 4096 unexplained bytes"),
    ("dense truncated", lambda c: _truncate(c / fmt.DENSE_NAME, 1000), "dense.safetensors: .*truncated"),
    ("huge header length", lambda c: _patch(c / "experts-0001.safetensors", 0, struct.pack("<Q", 1 << 62)), "experts-0001.safetensors: header length \\d+ exceeds"),
    ("header renamed tensor", lambda c: _patch_text(c / "experts-0000.safetensors", b'"expert.2"', b'"expert.9"'), "experts-0000.safetensors: holds tensors that disagree"),
    ("header reshaped", lambda c: _patch_text(c / "experts-0000.safetensors", b'"shape":[16384]', b'"shape":[16383]'), "experts-0000.safetensors: tensor 'expert.0' spans 16384 bytes but U8 \\[16383\\] needs 16383"),
]


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _patch_text(path: Path, old: bytes, new: bytes) -> None:
    raw = path.read_bytes()
    assert old in raw
    path.write_bytes(raw.replace(old, new, 1))


@pytest.mark.parametrize("name, damage, match", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_damaged_files(packed, tmp_path, name, damage, match):
    ckpt = _copy(packed, tmp_path / "c")
    damage(ckpt)
    with pytest.raises(FormatError, match=match):
        fmt.open_checkpoint(ckpt)


NOT_A_CHECKPOINT = [
    ("manifest missing", lambda c: (c / fmt.MANIFEST_NAME).unlink(), "d2moe.json is missing"),
    ("not a directory", lambda c: shutil.rmtree(c) or c.write_text("x"), "is not a packed checkpoint directory"),
]


@pytest.mark.parametrize("name, damage, match", NOT_A_CHECKPOINT, ids=[c[0] for c in NOT_A_CHECKPOINT])
def test_not_a_checkpoint_is_bad_input(packed, tmp_path, name, damage, match):
    ckpt = _copy(packed, tmp_path / "c")
    damage(ckpt)
    with pytest.raises(InputError, match=match):
        fmt.open_checkpoint(ckpt)


def test_verify_catches_a_flipped_bit_in_every_region(packed, tmp_path):
    clean = fmt.open_checkpoint(packed)
    e = clean.experts[(1, 2)]
    for target, offset in [("experts-0001.safetensors", e.offset + 7), ("experts-0001.safetensors", e.offset + e.level_ends[1] + 1),
                           (fmt.DENSE_NAME, (packed / fmt.DENSE_NAME).stat().st_size - 3)]:
        ckpt = _copy(packed, tmp_path / f"c{offset}")
        raw = bytearray((ckpt / target).read_bytes())
        raw[offset] ^= 0x01
        (ckpt / target).write_bytes(bytes(raw))
        fmt.open_checkpoint(ckpt)  # structure is intact: only the checksums can tell
        with pytest.raises(FormatError, match=f"{target}.*(crc32|checksum)"):
            fmt.open_checkpoint(ckpt, verify=True)


# ----------------------------------------------------------------------------- fuzzing


def _open_and_read_all(path: Path) -> None:
    ckpt = fmt.open_checkpoint(path, verify=True)
    for (layer, expert) in ckpt.experts:
        for b in ckpt.cfg.bits:
            ckpt.decode_expert(layer, expert, b, ckpt.read_prefix(layer, expert, b))
    ckpt.load_dense()


FUZZ_FILES = [fmt.MANIFEST_NAME, fmt.DENSE_NAME, "experts-0000.safetensors", "experts-0001.safetensors", "config.json"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.sampled_from(FUZZ_FILES), mode=st.sampled_from(["truncate", "flip", "flip_header", "splice"]),
       seed=st.integers(0, 2**32 - 1))
def test_fuzz_damage_gives_format_error_or_success(packed, target, mode, seed):
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _copy(packed, Path(tmp) / "c")
        path = ckpt / target
        raw = bytearray(path.read_bytes())
        header_end = 8 + struct.unpack("<Q", raw[:8])[0] if target.endswith(".safetensors") else len(raw)
        if mode == "truncate":
            raw = raw[: rng.randrange(len(raw))]
        elif mode == "flip":
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        elif mode == "flip_header":
            raw[rng.randrange(min(header_end, len(raw)))] ^= 1 << rng.randrange(8)
        else:  # overwrite a random run with random bytes
            at = rng.randrange(len(raw))
            raw[at: at + 16] = bytes(rng.randrange(256) for _ in range(16))
        path.write_bytes(bytes(raw))
        try:
            _open_and_read_all(ckpt)
        except FormatError as exc:
            assert target in str(exc) or "d2moe.json" in str(exc) or "config.json" in str(exc)
            return
        # success is acceptable only where the damage cannot matter to the weights
        must_fail = mode == "truncate" and target != "config.json"
        must_fail |= mode in ("flip", "splice") and target.endswith(".safetensors") and raw != bytearray((packed / target).read_bytes())
        assert not must_fail, f"damage to {target} ({mode}) went unnoticed"
