"""Interrupted packs: kill -9 at three points, `--resume` gives byte-identical output; stale folders go."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from d2moe.quantize import MWQConfig
from d2moe.quantize.convert import pack as pack_mod
from d2moe.quantize.convert.pack import pack_checkpoint


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _pack_cli(src: Path, out: Path, *extra: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ}
    env.pop(pack_mod.KILL_ENV, None)
    if kill_at:
        env[pack_mod.KILL_ENV] = kill_at
    return subprocess.run([sys.executable, "-m", "d2moe", "pack", str(src), str(out), "--json", *extra],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("src") / "mixtral")


@pytest.fixture(scope="module")
def uninterrupted(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "packed"
    pack_checkpoint(source, out, MWQConfig(), progress=False)
    return _files(out)


@pytest.mark.parametrize("kill_at", ["dense", "expert:1:2", "layer:1"])
def test_kill_minus_9_then_resume_is_byte_identical(source, uninterrupted, tmp_path, kill_at):
    out = tmp_path / "packed"
    killed = _pack_cli(source, out, kill_at=kill_at)
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()
    stale = list(tmp_path.glob(".packed.d2moe-tmp-*"))
    assert len(stale) == 1
    resumed = _pack_cli(source, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "kept" in resumed.stderr  # finished parts were verified and reused, not redone
    assert _files(out) == uninterrupted
    assert not list(tmp_path.glob(".packed.d2moe-*"))  # no temporary folder left


def test_resume_redoes_a_damaged_part(source, uninterrupted, tmp_path):
    out = tmp_path / "packed"
    assert _pack_cli(source, out, kill_at="layer:1").returncode == -9
    (stale,) = tmp_path.glob(".packed.d2moe-tmp-*")
    layer_file = sorted(stale.glob("experts-*.safetensors"))[0]
    data = bytearray(layer_file.read_bytes())
    data[-5] ^= 0xFF
    layer_file.write_bytes(bytes(data))
    resumed = _pack_cli(source, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"kept {layer_file.name}" not in resumed.stderr
    assert _files(out) == uninterrupted


def test_without_resume_stale_folders_are_removed_and_said(source, uninterrupted, tmp_path):
    out = tmp_path / "packed"
    assert _pack_cli(source, out, kill_at="expert:0:1").returncode == -9
    (tmp_path / ".packed.d2moe-tmp-999999999").mkdir()  # a dead PID's folder from long ago
    again = _pack_cli(source, out)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("left by an interrupted pack") == 2
    assert not list(tmp_path.glob(".packed.d2moe-*"))
    assert _files(out) == uninterrupted


def test_resume_with_other_options_names_them_and_keeps_the_interrupted_work(source, uninterrupted, tmp_path):
    """--resume with options the interrupted pack was not started with is refused, naming the option, and its folder
    stays (it used to be removed and the pack started afresh: hours lost on a large model); the original options
    continue it, and a pack without --resume removes it, as always."""
    out = tmp_path / "packed"
    assert _pack_cli(source, out, kill_at="layer:1").returncode == -9
    (stale,) = tmp_path.glob(".packed.d2moe-tmp-*")
    other = _pack_cli(source, out, "--resume", "--bits", "2,4")
    assert other.returncode == 2 and "other --bits;" in other.stderr and stale.name in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1 and stale.is_dir() and not out.exists()
    resumed = _pack_cli(source, out, "--resume")
    assert resumed.returncode == 0 and "kept" in resumed.stderr and _files(out) == uninterrupted
    assert _pack_cli(source, tmp_path / "p2", kill_at="layer:1").returncode == -9
    fresh = _pack_cli(source, tmp_path / "p2", "--bits", "2,4")
    assert fresh.returncode == 0 and "left by an interrupted pack" in fresh.stderr
    assert not list(tmp_path.glob(".p2.d2moe-*"))


def test_progress_lines_when_stderr_is_not_a_terminal(source, tmp_path):
    r = _pack_cli(source, tmp_path / "packed")
    assert r.returncode == 0
    assert r.stdout.strip().startswith("{") and r.stdout.count("\n") == 1  # --json alone on stdout
    lines = [line for line in r.stderr.splitlines() if line.startswith("pack: layer")]
    assert lines and "MB/s" in lines[-1] and "ETA" in lines[-1]


def test_progress_line_of_a_small_source_shows_its_megabytes():
    from d2moe.quantize.convert.progress import PackProgress

    bar = PackProgress(True, 460_000, 2, tty=False)
    bar.layer(1)
    bar.done = 460_000
    assert "layer 2/2, 0.46/0.46 MB" in bar.line(bar._t0 + 1)  # was "0/0 MB"
    big = PackProgress(True, 6_330_000_000, 2, tty=False)
    assert "0/6330 MB" in big.line(big._t0 + 1)


def test_progress_eta_counts_the_calibration_left_not_its_time_as_slow_bytes(monkeypatch):
    """With --calib each layer calibrates (moving no bytes) before its fits: 200 s of it, then 100 MB of 1000 fitted
    in 30 s, leaves 270 s of fits and one more 200 s calibration, where bytes over all the time said 2070 s."""
    from d2moe.quantize.convert import progress

    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    bar = progress.PackProgress(True, 1_000_000_000, 2, tty=False)
    with bar.stage("calibrating layer 1/2"):
        clock[0] = 200.0
    bar.layer(0)
    bar.done, clock[0] = 100_000_000, 230.0
    assert bar.eta(clock[0]) == pytest.approx(270 + 200)
    assert "ETA 470 s" in bar.line(clock[0])
    plain = progress.PackProgress(True, 1_000_000_000, 2, tty=False)  # no stages: bytes over the time
    plain.done, clock[0] = 250_000_000, 230.0 + 10
    assert plain.eta(clock[0]) == pytest.approx(30)


def test_a_calibrated_pack_resumed_calibrates_only_the_layers_it_redoes(source, tmp_path):
    """pack --calib gathers each layer's statistics as it fits that layer: after kill -9 past layer 0, --resume keeps
    layer 0 and runs it without statistics (the pass still needs its outputs), and the checkpoint and the report's
    calibration are the uninterrupted pack's."""
    calib = ("--calib", "d2moe_cli/assets/text/tinyshakespeare.train.txt", "--calib-tokens", "1024", "--workers", "1")
    whole = _pack_cli(source, tmp_path / "whole", *calib)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "packed"
    killed = _pack_cli(source, out, *calib, kill_at="layer:0")
    assert killed.returncode == -9, killed.stderr
    resumed = _pack_cli(source, out, *calib, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "--resume: kept experts" in resumed.stderr
    assert "decoder layer 1/2 run in " in resumed.stderr and "no statistics needed" in resumed.stderr
    assert "no statistics needed" not in whole.stderr
    assert _files(out) == _files(tmp_path / "whole")
    report, want = (json.loads(p.stdout)["calib"] for p in (resumed, whole))
    assert {k: v for k, v in report.items() if k != "seconds"} == {k: v for k, v in want.items() if k != "seconds"}
    record = json.loads((out / "d2moe.json").read_text())["calibration"]  # what inspect shows
    assert record == {"texts": ["tinyshakespeare.train.txt"], "tokens": report["tokens"], "sha256": record["sha256"],
                      "experts_without_enough_tokens": len(report["experts_without_enough_tokens"])}
    shown = subprocess.run([sys.executable, "-m", "d2moe", "inspect", str(out)], capture_output=True, text=True)
    assert f"calibrated: {report['tokens']} tokens of tinyshakespeare.train.txt" in shown.stdout


def test_resume_with_another_lossless_codec_recodes_the_kept_lossless_parts(source, tmp_path):
    """Audit: the layers' lossless files kept their first codec while d2moe.json named the second."""
    fresh = tmp_path / "fresh"
    assert _pack_cli(source, fresh, "--lossless", "--lossless-codec", "none").returncode == 0
    out = tmp_path / "packed"
    assert _pack_cli(source, out, "--lossless", kill_at="layer:1").returncode == -9  # zstd parts of layer 0 kept
    resumed = _pack_cli(source, out, "--lossless", "--lossless-codec", "none", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert _files(out) == _files(fresh)
