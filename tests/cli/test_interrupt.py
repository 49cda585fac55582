"""Ctrl-C: one line on stderr, exit 130, and what a run already generated kept (stdout streams to pipes too)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

ASSET = Path(__file__).parents[2] / "d2moe_cli" / "assets" / "tiny-mixtral"


def _packed(tmp_path) -> Path:
    packed = tmp_path / "packed"
    subprocess.run([sys.executable, "-m", "d2moe", "pack", str(ASSET), str(packed), "--bits", "2,4"], check=True,
                   capture_output=True, timeout=600)
    return packed


def test_an_interrupted_run_says_so_and_keeps_its_text(tmp_path):
    packed = _packed(tmp_path)
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


def test_ctrl_c_ends_a_run_on_a_slow_emulated_disk_at_once(tmp_path):
    """Audit: at --io-bandwidth 1kB/s the reads already booked were waited for, slot by slot (minutes)."""
    proc = subprocess.Popen([sys.executable, "-m", "d2moe", "run", str(_packed(tmp_path)), "-p", "Once upon a time",
                             "--io-bandwidth", "1kB/s", "-m", "10%", "--max-new-tokens", "3", "--no-chat-template"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(6)  # startup, then reads queued for minutes of the emulated disk
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and time.monotonic() - t0 < 10, err.decode()
    assert err.decode().strip().splitlines()[-1] == "error: interrupted"
