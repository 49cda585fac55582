"""`d2moe pack` and `d2moe inspect` from the command line: JSON output, one-line errors, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from cli_runner import invoke

from d2moe.errors import EXIT_CORRUPT, EXIT_INPUT, EXIT_IO, EXIT_USAGE
from d2moe.quantize import format as fmt


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    return invoke(capsys, *argv)


def test_pack_then_inspect_json(tiny_checkpoint_factory, tmp_path, capsys):
    src = tiny_checkpoint_factory("qwen2_moe")
    out = tmp_path / "packed"
    code, stdout, _ = _run(capsys, "pack", str(src), str(out), "--bits", "2,3,4", "--group-size", "64",
                           "--scheme", "sliced", "--dtype", "float16", "--json")
    assert code == 0
    report = json.loads(stdout)  # exactly one JSON object on stdout
    assert report["arch"] == "qwen2_moe" and report["levels"] == [2, 3, 4] and report["scheme"] == "sliced"
    assert report["dtype"] == "float16" and report["moe_layers"] == 2 and report["experts_per_layer"] == 4
    assert list(report["bytes_per_level"].values()) == sorted(report["bytes_per_level"].values())

    code, stdout, _ = _run(capsys, "inspect", str(out), "--json", "--verify")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["valid"] and "crc32" in summary["validation"] and summary["version"] == fmt.FORMAT_VERSION
    assert [lv["bits"] for lv in summary["levels"]] == [2, 3, 4]
    assert [lv["bytes_all_experts"] for lv in summary["levels"]] == list(report["bytes_per_level"].values())
    assert [lv["sqnr_db"]["min"] for lv in summary["levels"]] == [report["sqnr_db"][b]["min"] for b in ("2", "3", "4")]

    code, stdout, _ = _run(capsys, "inspect", str(out))
    assert code == 0 and "qwen2_moe" in stdout and "bits/weight" in stdout and "validation" in stdout


def test_pack_calib_json_reports_the_second_moments_kept(tiny_checkpoint_factory, tmp_path, capsys):
    src = tiny_checkpoint_factory("qwen2_moe")
    out = tmp_path / "calibrated"
    code, stdout, _ = _run(capsys, "pack", str(src), str(out), "--calib", "d2moe_cli/assets/text/grimm_tales.train.txt",
                           "--calib-tokens", "2048", "--quiet", "--json")
    assert code == 0
    calib = json.loads(stdout)["calib"]
    config = json.loads((src / "config.json").read_text())
    assert calib["tokens"] == 2048
    assert calib["hessian_block"] == {"gate": config["hidden_size"], "down": config["moe_intermediate_size"]}
    assert calib["products"]["forward"] == "float32"  # a float32 source runs in float32 on every CPU
    assert calib["products"]["judge"] in ("float32", "bfloat16")  # the bfloat16 sample's: natively where it can
    code, stdout, _ = _run(capsys, "inspect", str(out), "--json", "--verify")
    assert code == 0 and json.loads(stdout)["valid"]


def test_pack_calib_human_report_names_the_calibration(tiny_checkpoint_factory, tmp_path, capsys):
    code, stdout, _ = _run(capsys, "pack", str(tiny_checkpoint_factory("mixtral")), str(tmp_path / "o"), "--calib",
                           "d2moe_cli/assets/text/grimm_tales.train.txt", "--calib-tokens", "1024", "--quiet")
    line = next(x for x in stdout.splitlines() if x.startswith("calibration:"))  # one line, however wide
    assert code == 0 and line.startswith("calibration: 1024 tokens") and "products float32" in line
    assert line.endswith("of 8 experts weighted") or "fitted unweighted for want of tokens: layer" in line


def test_a_calibration_text_shorter_than_calib_tokens_is_said(tiny_checkpoint_factory, tmp_path, capsys):
    """--calib-tokens is a ceiling: a short text calibrates on what it has, and says so (it was silent)."""
    code, out, err = _run(capsys, "pack", str(tiny_checkpoint_factory("mixtral")), str(tmp_path / "o"), "--bits", "2,4",
                          "--calib", "d2moe_cli/assets/text/grimm_tales.heldout.txt", "--quiet", "--json")
    assert code == 0, err
    got = json.loads(out)["calib"]["tokens"]
    assert got < 32768 and f"--calib gives {got} tokens in sequences of 512, fewer than --calib-tokens 32768" in err


def test_pack_human_report(tiny_checkpoint_factory, tmp_path, capsys):
    code, stdout, _ = _run(capsys, "pack", str(tiny_checkpoint_factory("mixtral")), str(tmp_path / "o"), "--bits", "2,4")
    assert code == 0 and "2-bit" in stdout and "4-bit" in stdout and "SQNR" in stdout


def test_paths_that_look_like_markup_are_printed_as_they_are(tiny_checkpoint_factory, tmp_path, capsys):
    """A folder named "m[/]q" or "packed [v2]" is a path: the reports printed it cut or ended in a traceback."""
    for name in ("m[/]q", "packed [v2]"):
        code, out, err = invoke(capsys, "pack", tiny_checkpoint_factory("mixtral"), tmp_path / name, "--bits", "2",
                                "--quiet")
        assert code == 0 and f"{name}:" in out, err
        code, out, err = invoke(capsys, "inspect", tmp_path / name)
        assert code == 0 and f"{tmp_path / name}:" in out.replace("\n", ""), err


@pytest.mark.parametrize("argv, message, want", [
    (["pack", "{tmp}/missing", "{tmp}/o"], "SRC {tmp}/missing does not exist", EXIT_INPUT),
    (["pack", "{tmp}", "{tmp}/o"], "is not a Hugging Face checkpoint: it has no config.json", EXIT_INPUT),
    (["pack", "{src}", "{tmp}/o", "--bits", "2,x"], "--bits '2,x' is not a list of integers", EXIT_USAGE),
    (["pack", "{src}", "{tmp}/o", "--bits", "4,2"], "must be distinct, ascending", EXIT_USAGE),
    (["pack", "{src}", "{tmp}/o", "--scheme", "magic"], "scheme 'magic' is unknown", EXIT_USAGE),
    (["pack", "{src}", "{tmp}/o", "--group-size", "48"], "group-size", EXIT_USAGE),
    (["pack", "{src}", "{tmp}/o", "--dtype", "int4"], "--dtype 'int4'", EXIT_USAGE),
    (["pack", "{src}", "{tmp}/o", "--calib", "{tmp}/none.txt", "--calib-tokens", "0"], "--calib-tokens 0 is less than one",
     EXIT_USAGE),
    (["pack", "{src}", "{tmp}/o", "--calib", "{tmp}/none.txt"], "does not exist: pass --calib", EXIT_INPUT),
    (["pack", "{src}", "{tmp}/o", "--calib", "{tmp}/short.txt"], "fewer than one sequence of 512 tokens: add text to "
     "--calib", EXIT_INPUT),
    (["pack", "{src}", "{tmp}/exists"], "already exists: pass --force", EXIT_USAGE),
    (["pack", "{src}", "{tmp}/o", "--calib-tokens", "512"], "--calib-tokens applies to --calib", EXIT_USAGE),
    (["pack", "{src}", "{tmp}/o", "--lossless-codec", "none"], "--lossless-codec applies to --lossless", EXIT_USAGE),
    # usage errors too: one line, not typer's box under a usage line
    (["pack", "{src}", "{tmp}/o", "--no-such-option"], "No such option: --no-such-option (see `d2moe pack --help`)",
     EXIT_USAGE),
    (["pack"], "Missing argument 'src'. (see `d2moe pack --help`)", EXIT_USAGE),
    (["pack", "{src}", "/proc/d2moe-out"], "cannot pack into /proc/d2moe-out", EXIT_IO),
    (["inspect", "{tmp}/missing"], "is not a packed checkpoint directory", EXIT_INPUT),
    (["inspect", "{tmp}/exists"], "d2moe.json is missing", EXIT_INPUT),
])
def test_errors_are_one_red_line_with_the_exit_code_of_their_class(tiny_checkpoint_factory, tmp_path, capsys, argv,
                                                                     message, want):
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "notes.txt").write_text("x")  # not empty (an empty directory is packed into)
    (tmp_path / "short.txt").write_text("Only a few words.\n")
    subst = {"tmp": str(tmp_path), "src": str(tiny_checkpoint_factory("mixtral"))}
    capsys.readouterr()  # what building the checkpoint printed (the first test to ask for it builds it)
    code, stdout, stderr = _run(capsys, *(a.format(**subst) for a in argv))
    assert code == want, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("error: ")
    assert message.format(**subst) in stderr.replace("\n", "")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture(tiny_checkpoint_factory, tmp_path, capsys):
    src = tmp_path / "src"
    (src).mkdir()
    cfg = json.loads((tiny_checkpoint_factory("mixtral") / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    code, _, stderr = _run(capsys, "pack", str(src), str(tmp_path / "o"))
    assert code == EXIT_INPUT and "model_type 'gpt2' is not supported: d2moe supports" in stderr and "mixtral" in stderr


def test_latent_attention_with_fewer_kv_heads_is_refused_before_any_work(tiny_checkpoint_factory, tmp_path, capsys):
    """transformers' DeepSeek attention cannot run kv heads != heads: pack (with and without --calib) says so in one
    line instead of a traceback from inside the calibration pass (or from `run` later)."""
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint_factory("deepseek_v2"), src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 2}))
    (tmp_path / "calib.txt").write_text("the quick brown fox jumps over the lazy dog . " * 200)
    for extra in ([], ["--calib", str(tmp_path / "calib.txt"), "--calib-tokens", "512"]):
        code, _, stderr = _run(capsys, "pack", str(src), str(tmp_path / "o"), *extra)
        assert code == EXIT_INPUT and stderr.count("\n") == 1, stderr
        assert "num_key_value_heads 2 but num_attention_heads 4" in stderr and "set both to 4" in stderr
        assert not (tmp_path / "o").exists()


def test_inspect_json_reports_a_corrupt_checkpoint(packed_checkpoint_factory, tmp_path, capsys):
    import shutil

    ckpt = shutil.copytree(packed_checkpoint_factory("mixtral")[1], tmp_path / "c")
    raw = bytearray((ckpt / "experts-0001.safetensors").read_bytes())
    raw[-100] ^= 0xFF
    (ckpt / "experts-0001.safetensors").write_bytes(bytes(raw))
    code, stdout, _ = _run(capsys, "inspect", str(ckpt), "--json")
    assert code == 0 and json.loads(stdout)["valid"]  # structure alone cannot see it
    code, stdout, stderr = _run(capsys, "inspect", str(ckpt), "--json", "--verify")
    result = json.loads(stdout)
    assert code == EXIT_CORRUPT and result["valid"] is False and "experts-0001.safetensors: layer 1 expert 3" in result["validation"]
    assert "crc32" in stderr


def test_verify_loads_the_tokenizer_and_a_damaged_config_is_named_by_run_too(packed_checkpoint_factory, tmp_path,
                                                                              capsys):
    """The tokenizer files are outside the crc32s: --verify said ok over an emptied tokenizer.json that run refused.
    And a config.json that fails transformers' checks is named as config.json, by inspect and by run alike (run
    blamed the tokenizer, which reads it too)."""
    ckpt = shutil.copytree(packed_checkpoint_factory("mixtral")[1], tmp_path / "c")
    code, out, err = _run(capsys, "inspect", str(ckpt), "--verify")
    assert code == 0 and "the tokenizer loads" in out, err
    (ckpt / "tokenizer.json").write_text("")
    code, _, err = _run(capsys, "inspect", str(ckpt), "--verify")
    assert code == EXIT_INPUT and "no usable tokenizer" in err
    bad = shutil.copytree(packed_checkpoint_factory("mixtral")[1], tmp_path / "b")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": "x"}))
    for argv in (["inspect", str(bad)], ["run", str(bad), "-p", "hi", "-m", "64MiB"]):
        code, _, err = _run(capsys, *argv)
        assert code == EXIT_CORRUPT and f"{bad / 'config.json'}: config.json of this" in err and err.count("\n") == 1, err


def test_module_entry_point_prints_one_line(tmp_path):
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "d2moe", "inspect", str(tmp_path / "none")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == EXIT_INPUT and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'none'} is not a packed checkpoint directory "
                                                f"(make one with `d2moe pack SRC {tmp_path / 'none'}`)"]


def test_the_calibration_line_names_experts_fitted_unweighted():
    from d2moe.commands.pack import _calibration_line

    calib = {"tokens": 4096, "seconds": 3.2, "experts": 64, "products": {"forward": "bfloat16", "judge": "bfloat16"},
             "experts_without_enough_tokens": [[1, e, e % 8] for e in range(10)]}
    line = _calibration_line(calib)
    assert line.startswith("calibration: 4096 tokens in 3 s, products bfloat16 (judge bfloat16); 54 of 64 experts")
    assert "layer 1 expert 0 (0 tokens)" in line and "layer 1 expert 7 (7 tokens) and 2 more" in line


def test_version_names_the_package_and_the_format(capsys):
    from importlib.metadata import version

    from d2moe.quantize.format.manifest import FORMAT_VERSION

    code, out, _ = invoke(capsys, "--version")
    assert code == 0 and out.strip() == f"d2moe {version('d2moe')} (checkpoint format {FORMAT_VERSION})"


def test_inspect_of_an_unpacked_model_says_to_pack_it(tmp_path, capsys):
    from tiny_models import make_tiny_checkpoint

    src = make_tiny_checkpoint("mixtral", tmp_path / "src")
    code, _, err = invoke(capsys, "inspect", src)
    assert code == 3 and "is a model checkpoint, not a packed one" in err and f"d2moe pack {src} OUT" in err
