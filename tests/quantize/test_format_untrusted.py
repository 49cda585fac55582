"""Issue 11: what a forged or damaged checkpoint can no longer do.

Dense and gate bytes are checked when they are loaded (a flipped bit or a wrong manifest crc32 is
exit 4, not garbage text); special files (FIFO, /dev/zero, directories) are refused without
blocking or allocating; the manifest's dtype, gate capacities and `gate: null` are checked against
the files; config.json values are bounded before anything is sized from them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from cli_runner import invoke

from d2moe.cli import main
from d2moe.errors import EXIT_CORRUPT, FormatError
from d2moe.quantize import format as fmt
from d2moe.quantize.format import manifest as manifest_mod


@pytest.fixture(autouse=True)
def _no_hang():
    """A FIFO that blocks would hang the suite: fail the test after 60 s instead."""
    def boom(*_):
        raise TimeoutError("hung (special file not refused?)")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def gated(packed_checkpoint_factory, tmp_path_factory) -> Path:
    """A tiny Mixtral packed with a (random) trained-gate file whose fingerprint matches it."""
    from d2moe.quantize import MWQConfig
    from d2moe.quantize.adapters import adapter_for
    from d2moe.quantize.convert.pack import pack_checkpoint
    from d2moe.runtime.gate import BitWidthGate, model_fingerprint, save_gate

    src, plain = packed_checkpoint_factory("mixtral")
    ckpt = fmt.open_checkpoint(plain)
    adapter = adapter_for(ckpt.config)
    dense = ckpt.load_dense()
    routers = [dense[adapter.router_key(layer)] for layer in ckpt.moe_layers]
    torch.manual_seed(0)
    gate = BitWidthGate(ckpt.config["hidden_size"], ckpt.num_experts, ckpt.moe_layers, (2, 3, 4), (0.3, 0.4, 0.3),
                        proj_dim=8)
    root = tmp_path_factory.mktemp("gated")
    path = save_gate(gate, root / "gate.safetensors", model_fingerprint(ckpt.config, routers))
    pack_checkpoint(src, root / "packed", MWQConfig(), router=path, progress=False)
    return root / "packed"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit(path: Path, edit, name: str = fmt.MANIFEST_NAME) -> None:
    doc = json.loads((path / name).read_text())
    edit(doc)
    (path / name).write_text(json.dumps(doc))


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))


def _run(capsys, ckpt: Path, *extra: str) -> tuple[int, str, str]:
    return invoke(capsys, "run", ckpt, "-p", "hello", "--max-new-tokens", "3", "--no-chat-template", "-m", "1GiB", *extra)


# ---- item 1: dense and gate bytes are checked on load --------------------------------------------

@pytest.mark.parametrize("where", ["data", "last byte", "manifest crc"])
def test_run_refuses_a_damaged_dense_file(gated, tmp_path, capsys, where):
    ckpt = _copy(gated, tmp_path / "c")
    dense = ckpt / fmt.DENSE_NAME
    if where == "manifest crc":
        _edit(ckpt, lambda m: m["dense"].__setitem__("crc32", m["dense"]["crc32"] ^ 1))
    else:
        _flip(dense, dense.stat().st_size // 2 if where == "data" else dense.stat().st_size - 1)
    fmt.open_checkpoint(ckpt)  # structure alone cannot see it...
    with pytest.raises(FormatError, match="dense.safetensors: crc32 differs"):
        fmt.open_checkpoint(ckpt).load_dense()  # ...loading does
    code, out, err = _run(capsys, ckpt)
    assert code == EXIT_CORRUPT and out == "" and "dense.safetensors: crc32 differs" in err
    assert len(err.strip().splitlines()) == 1


def test_run_refuses_a_damaged_gate_file(gated, tmp_path, capsys):
    code, _, _ = _run(capsys, gated)
    assert code == 0
    ckpt = _copy(gated, tmp_path / "c")
    gate = ckpt / fmt.GATE_NAME
    _flip(gate, gate.stat().st_size - 5)  # a weight byte: the gate's own checks would not see it
    code, out, err = _run(capsys, ckpt)
    assert code == EXIT_CORRUPT and "gate.safetensors: crc32 differs" in err and out == ""
    code, _, _ = _run(capsys, ckpt, "--level", "3")  # a policy that does not use the gate does not read it
    assert code == 0


def test_load_dense_equals_the_safetensors_library(gated):
    from safetensors.torch import load_file

    ours = fmt.open_checkpoint(gated).load_dense()
    ref = load_file(str(gated / fmt.DENSE_NAME))
    assert list(ours) == list(ref) and all(torch.equal(ours[k], ref[k]) and ours[k].dtype == ref[k].dtype for k in ref)


# ---- item 2: special files -----------------------------------------------------------------------

SPECIAL = [
    ("manifest -> /dev/zero", fmt.MANIFEST_NAME, lambda p: p.symlink_to("/dev/zero"), "a character device"),
    ("config -> /dev/urandom", fmt.CONFIG_NAME, lambda p: p.symlink_to("/dev/urandom"), "a character device"),
    ("manifest FIFO", fmt.MANIFEST_NAME, lambda p: os.mkfifo(p), "a FIFO \\(named pipe\\)"),
    ("config FIFO", fmt.CONFIG_NAME, lambda p: os.mkfifo(p), "a FIFO \\(named pipe\\)"),
    ("dense FIFO", fmt.DENSE_NAME, lambda p: os.mkfifo(p), "a FIFO \\(named pipe\\)"),
    ("experts FIFO", "experts-0001.safetensors", lambda p: os.mkfifo(p), "a FIFO \\(named pipe\\)"),
    ("gate -> /dev/zero", fmt.GATE_NAME, lambda p: p.symlink_to("/dev/zero"), "a character device"),
    ("tokenizer -> /dev/zero", "tokenizer.json", lambda p: p.symlink_to("/dev/zero"), "a character device"),
    ("chat template FIFO", "chat_template.jinja", lambda p: os.mkfifo(p), "a FIFO \\(named pipe\\)"),
    ("manifest is a directory", fmt.MANIFEST_NAME, lambda p: p.mkdir(), "a directory"),
]


@pytest.mark.parametrize("name, target, make, kind", SPECIAL, ids=[c[0] for c in SPECIAL])
def test_special_files_are_refused_at_once(gated, tmp_path, name, target, make, kind):
    ckpt = _copy(gated, tmp_path / "c")
    (ckpt / target).unlink(missing_ok=True)
    make(ckpt / target)
    with pytest.raises(FormatError, match=f"{target}: is {kind}, not a regular file"):
        fmt.open_checkpoint(ckpt)


def test_a_symlink_to_a_regular_file_is_fine(gated, tmp_path):
    ckpt = _copy(gated, tmp_path / "c")
    (ckpt / "tokenizer.json").rename(tmp_path / "tokenizer.json")
    (ckpt / "tokenizer.json").symlink_to(tmp_path / "tokenizer.json")
    fmt.open_checkpoint(ckpt)


def test_json_reads_stop_at_the_cap_whatever_st_size_says(gated, tmp_path, monkeypatch):
    ckpt = _copy(gated, tmp_path / "c")
    monkeypatch.setattr(manifest_mod, "MAX_MANIFEST_BYTES", 1000)
    with pytest.raises(FormatError, match="d2moe.json: more than the 1000-byte cap"):
        fmt.open_checkpoint(ckpt)


def test_prompts_file_that_is_a_device_or_fifo_is_refused(gated, tmp_path, capsys):
    os.mkfifo(tmp_path / "fifo")
    for path in ("/dev/zero", str(tmp_path / "fifo")):
        try:
            main(["run", str(gated), "--prompts-file", path])
        except SystemExit as exc:
            assert exc.code == 3
        assert "not a regular file" in capsys.readouterr().err


# ---- item 5: manifest fields checked against the files; config.json bounded ----------------------

def _set_gate(key, value):
    return lambda m: m["gate"].__setitem__(key, value)


MANIFEST_CASES = [
    ("dense dtype", lambda m: m.__setitem__("dtype", "bfloat16"), "tensor .* is F32 but d2moe.json says dtype 'bfloat16'"),
    ("capacity above 1", _set_gate("capacity", [0.3, 1.5, 0.3]), "must be numbers in \\[0, 1\\]"),
    ("capacity negative", _set_gate("capacity", [-0.2, 0.9, 0.3]), "must be numbers in \\[0, 1\\]"),
    ("capacity short of 1", _set_gate("capacity", [0.1, 0.1, 0.1]), "sums to 0.3"),
    ("gate null", lambda m: m.__setitem__("gate", None), "gate.safetensors is present but d2moe.json lists no gate"),
]


@pytest.mark.parametrize("name, edit, match", MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
def test_manifest_disagreeing_with_the_files(gated, tmp_path, name, edit, match):
    ckpt = _copy(gated, tmp_path / "c")
    _edit(ckpt, edit)
    with pytest.raises(FormatError, match=match):
        fmt.open_checkpoint(ckpt)


def test_manifest_capacity_must_match_the_gate_file(gated, tmp_path, capsys):
    ckpt = _copy(gated, tmp_path / "c")
    _edit(ckpt, _set_gate("capacity", [0.2, 0.5, 0.3]))  # valid on its own, not what the gate was trained with
    fmt.open_checkpoint(ckpt)
    code, _, err = _run(capsys, ckpt)
    assert code == EXIT_CORRUPT and "capacity [0.3, 0.4, 0.3] differs from d2moe.json's (0.2, 0.5, 0.3)" in err


CONFIG_CASES = [
    ("vocab 1e12", {"vocab_size": 10**12}, "vocab_size 1000000000000 must be an integer in 1..4194304"),
    ("top-k 0", {"num_experts_per_tok": 0}, "num_experts_per_tok 0 must be an integer in 1..4"),
    ("top-k 100", {"num_experts_per_tok": 100}, "num_experts_per_tok 100 must be an integer in 1..4"),
    ("heads 0", {"num_attention_heads": 0}, "num_attention_heads|invalid"),
    ("head_dim 1e6", {"head_dim": 10**6}, "head_dim 1000000 must be an integer in 1..2048"),
    ("kv heads not dividing", {"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
    ("max positions 1e12", {"max_position_embeddings": 10**12}, "max_position_embeddings"),
    ("negative eps", {"rms_norm_eps": -1.0}, "rms_norm_eps -1.0 must lie in \\(0, 1\\)"),
    ("pad id past vocab", {"pad_token_id": 10**6}, "pad_token_id 1000000 must be token ids"),
    ("layers 1e9", {"num_hidden_layers": 10**9}, "num_hidden_layers"),
    ("sliding window 0", {"sliding_window": 0}, "sliding_window 0 \\(a window of no tokens\\)"),  # fuzz: crashed run
]


@pytest.mark.parametrize("name, change, match", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_values_are_bounded_at_open(gated, tmp_path, name, change, match):
    ckpt = _copy(gated, tmp_path / "c")
    _edit(ckpt, lambda c: c.update(change), fmt.CONFIG_NAME)
    with pytest.raises(FormatError, match=match):
        fmt.open_checkpoint(ckpt)


def test_negative_rope_theta_is_refused(gated, tmp_path):
    ckpt = _copy(gated, tmp_path / "c")
    cfg = json.loads((ckpt / fmt.CONFIG_NAME).read_text())
    if isinstance(cfg.get("rope_parameters"), dict):
        cfg["rope_parameters"]["rope_theta"] = -1.0
    else:
        cfg["rope_theta"] = -1.0
    (ckpt / fmt.CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="rope_theta -1.0 must be a positive number"):
        fmt.open_checkpoint(ckpt)


# ---- found by scripts/fuzz_checkpoint.py -------------------------------------------------------

@pytest.mark.parametrize("value", [["mixtral"], {"a": 1}])
def test_model_type_of_the_wrong_json_type_is_a_format_error(gated, tmp_path, value):
    ckpt = _copy(gated, tmp_path / "c")
    _edit(ckpt, lambda c: c.update(model_type=value), fmt.CONFIG_NAME)
    with pytest.raises(FormatError, match="is not supported"):
        fmt.open_checkpoint(ckpt)


def test_config_that_no_longer_matches_the_dense_shapes_is_exit_4(gated, tmp_path, capsys):
    ckpt = _copy(gated, tmp_path / "c")
    _edit(ckpt, lambda c: c.update(num_key_value_heads=4), fmt.CONFIG_NAME)  # in bounds, but k/v weights are for 2
    code, out, err = _run(capsys, ckpt)
    assert code == EXIT_CORRUPT and "dense.safetensors does not match the model its config.json describes" in err


@pytest.mark.parametrize("change", [{"hidden_act": "sil5"}, {"hidden_act": "\u0000"}])
def test_config_transformers_cannot_build_is_exit_4(gated, tmp_path, capsys, change):
    ckpt = _copy(gated, tmp_path / "c")
    _edit(ckpt, lambda c: c.update(change), fmt.CONFIG_NAME)
    code, out, err = _run(capsys, ckpt)
    assert code == EXIT_CORRUPT and "config.json describes a mixtral model transformers cannot build" in err


@pytest.mark.parametrize("change", [{"model_max_length": [1, 2, 3]}, {"model_max_length": "x"}])
def test_a_damaged_model_max_length_is_not_read(gated, tmp_path, capsys, change):
    """It broke encoding in transformers; d2moe keeps the context from config.json and sets the field itself."""
    ckpt = _copy(gated, tmp_path / "c")
    _edit(ckpt, lambda c: c.update(change), "tokenizer_config.json")
    code, out, err = _run(capsys, ckpt)
    assert code == 0, err


@pytest.mark.parametrize("change", [{"bos_token": [1, 2]}, {"padding_side": 3}])
def test_damaged_tokenizer_config_is_one_line(gated, tmp_path, capsys, change):
    ckpt = _copy(gated, tmp_path / "c")
    _edit(ckpt, lambda c: c.update(change), "tokenizer_config.json")
    code, out, err = _run(capsys, ckpt)
    assert code == 3 and "has no usable tokenizer" in err and len(err.strip().splitlines()) == 1
