"""Issue 11 item 8: train-router is never silent off a terminal, and `--json` output stays clean."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

from d2moe.progress import LogLines


def test_not_on_a_terminal_it_logs_phases_and_steps_and_json_stays_clean(tiny_mixtral, tmp_path):
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps({"text": "the quick brown fox jumps over the lazy dog " * 4}) for _ in range(40)))
    proc = subprocess.run(
        [sys.executable, "-m", "d2moe", "train-router", str(tiny_mixtral), "--data", str(data), "--bits", "2,3,4",
         "--capacity", "0.3,0.4,0.3", "-o", str(tmp_path / "gate.safetensors"), "--json", "--seq-len", "16",
         "--max-steps", "3", "--batch-size", "2", "--eval-blocks", "2"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["steps"] == 3  # stdout: the JSON report and nothing else
    lines = proc.stderr.splitlines()
    tagged = [x for x in lines if x.startswith("[d2moe train-router ")]
    for phase in ("reading calibration data", "loading and quantizing", "quantized MoE layer 1 (2/2)", "training",
                  "evaluating after training", "done"):
        assert any(phase in x for x in tagged), (phase, proc.stderr)
    assert any(re.search(r"step 3/3 \(100%\) loss [\d.]+ bits [\d.]+ · ETA", x) for x in tagged), proc.stderr
    assert "\r" not in proc.stderr and "%|" not in proc.stderr and "Loading weights" not in proc.stderr


def test_log_lines_are_throttled_and_end_with_the_last_step():
    out = io.StringIO()
    log = LogLines("job", total=100, every_s=3600, stream=out)
    log.phase("training")
    for step in range(1, 101):
        log.step(step, loss=1.0)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # the phase, the first step, the last
    assert "step 1/100 (1%)" in lines[1] and "step 100/100 (100%) loss 1 · ETA 0:00:00" in lines[2]
