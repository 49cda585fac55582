"""Child processes measured for scripts/bench_peers.py: wall time, peak RSS, peak anonymous memory.

`run_measured(cmd, timeout)` runs a command in its own process group, samples its anonymous memory
from /proc while it runs, and returns a `Proc` (exit code, output, peaks, seconds).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Proc:
    rc: int
    stdout: str
    stderr: str
    peak_rss_bytes: int  # ru_maxrss: anonymous memory plus the file pages it has mapped (mmap'd weights)
    peak_anon_bytes: int  # RssAnon sampled every 50 ms: memory the kernel cannot reclaim by dropping pages
    wall_s: float


class AnonSampler(threading.Thread):
    """Polls /proc/PID/status for the largest RssAnon until stopped."""

    def __init__(self, pid: int, period_s: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.period_s, self.peak = pid, period_s, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        self.peak = max(self.peak, int(line.split()[1]) * 1024)
            except (OSError, ValueError):
                pass
            self.done.wait(self.period_s)


def run_measured(cmd: list[str], timeout: float, env: dict | None = None, drop_caches: bool = False) -> Proc:
    """Run `cmd` to completion; its own peak RSS from wait4 (ru_maxrss, KiB on Linux), peak RssAnon sampled."""
    if drop_caches:
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
        timer = threading.Timer(timeout, _kill_group, (proc.pid,))
        sampler = AnonSampler(proc.pid)
        timer.start()
        sampler.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
            sampler.done.set()
            sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        return Proc(proc.returncode, out.read(), err.read(), usage.ru_maxrss * 1024, sampler.peak, wall)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, 9)
    except ProcessLookupError:
        pass


def last_json(text: str):
    """The JSON value (object or array) the output ends with, skipping any log lines before it."""
    for start in (i for i in range(len(text)) if text[i] in "[{" and (i == 0 or text[i - 1] == "\n")):
        try:
            return json.loads(text[start:])
        except json.JSONDecodeError:
            continue
    raise ValueError("no JSON in output")


def _tail(text: str, n: int = 600) -> str:
    return text.strip()[-n:]


# ----------------------------------------------------------------------------- transformers child
