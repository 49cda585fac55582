"""Ctrl-C: one line on stderr, exit 130, and what a run already generated kept (stdout streams to pipes too)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

ASSET = Path(__file__).parents[2] / "d2moe_cli" / "assets" / "tiny-mixtral"


def test_an_interrupted_run_says_so_and_keeps_its_text(tmp_path):
    packed = tmp_path / "packed"
    subprocess.run([sys.executable, "-m", "d2moe", "pack", str(ASSET), str(packed), "--bits", "2,4"], check=True,
                   capture_output=True, timeout=600)
    proc = subprocess.Popen([sys.executable, "-m", "d2moe", "run", str(packed), "-p", "Once upon a time",
                             "--max-new-tokens", "1000", "--no-chat-template"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            # as from a terminal: a job started with `&` (CI in the background) ignores SIGINT
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = proc.stdout.read(1)  # text before the end: the run streams into the pipe (it printed all at the end)
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert err.decode().strip().splitlines()[-1] == "error: interrupted" and b"Traceback" not in err
    assert first  # read before the interrupt: what the run wrote stays written
