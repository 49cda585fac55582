"""`d2moe train-router` end to end on a tiny model: gate file + report, and clean errors."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from d2moe.commands.train_router import parse_capacity, register
from d2moe.errors import UsageError
from d2moe.runtime.gate import load_gate


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:  # keep "train-router" a sub-command, as in the real CLI
        pass

    return app


def test_cli_end_to_end(app, tiny_mixtral, tmp_path):
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps({"text": "the quick brown fox jumps over the lazy dog " * 4}) for _ in range(40)))
    out, report = tmp_path / "out" / "gate.safetensors", tmp_path / "report.json"
    result = CliRunner().invoke(app, [
        "train-router", str(tiny_mixtral), "--data", str(data), "--bits", "2,3,4", "--capacity", "0.3,0.4,0.3",
        "-o", str(out), "--report", str(report), "--json", "--seq-len", "16", "--max-steps", "3", "--batch-size", "2",
        "--eval-blocks", "2",
    ])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    written = json.loads(report.read_text())
    assert printed == written
    assert written["levels"] == [2, 3, 4] and written["capacity"] == [0.3, 0.4, 0.3] and written["steps"] == 3
    assert set(written["bits_histogram"]) == {"0", "1"}
    for key in ("before", "after", "uniform", "full"):
        assert key in written["eval"]
    assert 2.0 <= written["avg_bits"] <= 4.0
    gate = load_gate(out, expect_fingerprint=written["fingerprint"], expect_levels=[2, 3, 4])
    assert gate.capacity == (0.3, 0.4, 0.3) and gate.capacity_scope == "model"  # the default: a model-wide budget
    assert set(gate.layer_capacity) == {0, 1} and written["capacity_scope"] == "model"
    # the default start is the router-weight rule (measured best): the head carries the direct router term
    assert written["options"]["init"] == "router" and gate.router_skip
    assert all(torch.count_nonzero(h.router_out) > 0 for h in gate.heads.values())
    assert (out.parent / "gate.safetensors.state" / "train_state.pt").is_file()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--capacity", "0.5,0.5"], "one fraction per level"),
        (["--capacity", "0.5,0.4,0.3"], "sum to 1"),
        (["--bits", "4,2"], "ascending"),
        (["--target", "teacher"], "--target"),
        (["--capacity-scope", "global"], "--capacity-scope"),
        (["--bit-cost", "nan"], "--bit-cost nan must be a number >= 0"),
    ],
)
def test_cli_bad_options(app, tiny_mixtral, tmp_path, args, message):
    data = tmp_path / "c.txt"
    data.write_text("hello world\n")
    result = CliRunner().invoke(app, ["train-router", str(tiny_mixtral), "--data", str(data), *args])
    assert isinstance(result.exception, UsageError)
    assert message in str(result.exception)


def test_missing_data_is_an_input_error(app, tiny_mixtral, tmp_path):
    from d2moe.errors import InputError

    result = CliRunner().invoke(app, ["train-router", str(tiny_mixtral), "--data", str(tmp_path / "nope.txt")])
    assert isinstance(result.exception, InputError) and "nope.txt does not exist" in str(result.exception)


def test_capacity_none_means_unlimited():
    assert parse_capacity("none", 3) == (1.0, 1.0, 1.0)


def test_outputs_are_checked_before_any_training(app, tiny_mixtral, tmp_path):
    """A gate file that cannot be written was found out after the training (minutes at real sizes)."""
    from d2moe.errors import IOFailure

    data = tmp_path / "c.txt"
    data.write_text("hello world\n")
    (tmp_path / "taken.safetensors").write_bytes(b"a gate")
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("")  # a folder that cannot be (tests may run as root, past permissions)
    for output, error, message in (
        (tmp_path / "taken.safetensors", UsageError, "exists: pass --force"),
        (tmp_path / "adir", UsageError, "is a directory: name the gate file"),
        (tmp_path / "afile" / "g.safetensors", IOFailure, "cannot write in"),
    ):
        result = CliRunner().invoke(app, ["train-router", str(tiny_mixtral), "--data", str(data), "-o", str(output)])
        assert isinstance(result.exception, error) and message in str(result.exception), result.exception
    assert (tmp_path / "taken.safetensors").read_bytes() == b"a gate"
    result = CliRunner().invoke(app, ["train-router", str(tiny_mixtral), "--data", str(data), "-o",
                                      str(tmp_path / "g.safetensors"), "--report", str(tmp_path / "afile" / "r.json")])
    assert isinstance(result.exception, IOFailure) and "--report" in str(result.exception), result.exception
    assert not (tmp_path / "g.safetensors").exists()  # refused before training, as the gate file's place is


def test_two_processes_train_the_gate_one_process_trains(tiny_mixtral, tmp_path):
    """torchrun on CPUs: one gloo group whose two halves of each batch give the one-process gate; the first
    process alone prints the report and writes the files (before: two unaware copies, two reports)."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    data = tmp_path / "calib.txt"
    data.write_text(" ".join(f"word{i % 97} the fox {i}" for i in range(3000)))
    common = ["train-router", str(tiny_mixtral), "--data", str(data), "--json", "--seq-len", "16",
              "--max-steps", "3", "--batch-size", "4", "--eval-blocks", "2", "--max-blocks", "24"]
    run = {}
    for name, launcher in (("one", [sys.executable, "-m", "d2moe"]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc-per-node", "2", "-m", "d2moe"])):
        out = tmp_path / name / "gate.safetensors"
        proc = subprocess.run([*launcher, *common, "-o", str(out)], capture_output=True, text=True, timeout=300,
                              env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        run[name] = (json.loads(proc.stdout), load_file(out))  # one JSON document on stdout
        assert proc.stderr.count("done: gate written") == 1
    (one, gate1), (two, gate2) = run["one"], run["two"]
    assert one["world_size"] == 1 and two["world_size"] == 2
    for key, value in gate1.items():
        torch.testing.assert_close(gate2[key], value, rtol=1e-4, atol=1e-5)
    assert two["train"]["last"]["loss"] == pytest.approx(one["train"]["last"]["loss"], rel=1e-4)


def test_more_processes_than_the_batch_is_one_error_line(tiny_mixtral, tmp_path):
    import subprocess
    import sys

    data = tmp_path / "calib.txt"
    data.write_text(" ".join(f"word{i % 97}" for i in range(2000)))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "d2moe", "train-router", str(tiny_mixtral), "--data", str(data), "--seq-len", "16",
                           "--batch-size", "1", "--max-steps", "1", "-o", str(tmp_path / "g.safetensors")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    # once, from the first process (torchrun then reports the failed children in its own words)
    assert proc.stderr.count("error: --batch-size 1 is the global batch and 2 processes share it") == 1
    assert "router_train/train.py" not in proc.stderr and "d2moe_cli/" not in proc.stderr  # no d2moe traceback
