"""Child processes measured for scripts/bench_peers.py: wall time, peak RSS, peak anonymous memory.

`run_measured(cmd, timeout)` runs a command in its own process group, samples its anonymous memory
from /proc while it runs, and returns a `Proc` (exit code, output, peaks, seconds).

`run_measured(..., ram=BYTES, evict=[paths])` runs it as on a device with that much RAM: in a fresh
memory cgroup (v2 `memory.max`, or v1 `memory.limit_in_bytes`, under this process's own cgroup) whose
limit counts the page cache it faults in, after the files in `evict` were dropped from the page cache
(`POSIX_FADV_DONTNEED`: a page cached by an earlier run would be charged to that run, not to this one).
A tool that mmaps or re-reads weights must then read them from the disk, as it would on the device.
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
    cage_peak_bytes: int | None = None  # with `ram`: the cgroup's peak charge (anonymous + page cache)
    oom_killed: bool = False  # with `ram`: the cgroup's OOM killer ended a process of the run


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


def run_measured(cmd: list[str], timeout: float, env: dict | None = None, drop_caches: bool = False,
                 ram: int | None = None, evict: list[Path] | None = None) -> Proc:
    """Run `cmd` to completion; its own peak RSS from wait4 (ru_maxrss, KiB on Linux), peak RssAnon sampled;
    with `ram`, inside a memory cgroup of that limit after `evict`'s files left the page cache."""
    if drop_caches:
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    for path in evict or []:
        evict_page_cache(path)
    cage = MemoryCage(ram) if ram else None
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True,
                                preexec_fn=cage.enter if cage else None)
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
            cage_peak, oom = cage.close() if cage else (None, False)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        return Proc(proc.returncode, out.read(), err.read(), usage.ru_maxrss * 1024, sampler.peak, wall, cage_peak,
                    oom)


class MemoryCage:
    """A fresh memory cgroup with a hard limit (RAM + page cache, no swap) for one child process."""

    def __init__(self, limit: int) -> None:
        self.dir, self.v2 = _cgroup_parent()
        self.dir = self.dir / f"d2moe-bench-{os.getpid()}-{time.monotonic_ns()}"
        self.dir.mkdir()
        try:
            if self.v2:
                (self.dir / "memory.max").write_text(str(int(limit)))
                if (self.dir / "memory.swap.max").exists():
                    (self.dir / "memory.swap.max").write_text("0")
            else:
                (self.dir / "memory.limit_in_bytes").write_text(str(int(limit)))
                if (self.dir / "memory.memsw.limit_in_bytes").exists():
                    (self.dir / "memory.memsw.limit_in_bytes").write_text(str(int(limit)))
        except OSError:
            self.dir.rmdir()
            raise

    def enter(self) -> None:
        """In the child, before exec: join the cgroup (its allocations and page faults are charged there)."""
        (self.dir / "cgroup.procs").write_text(str(os.getpid()))

    def close(self) -> tuple[int | None, bool]:
        """(the peak charge in bytes, whether the OOM killer acted); the (now empty) cgroup is removed."""
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        try:
            peak = int((self.dir / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            peak = None
        try:  # v2 memory.events / v1 memory.oom_control: one "oom_kill N" line
            events = (self.dir / ("memory.events" if self.v2 else "memory.oom_control")).read_text().split()
            oom = int(events[events.index("oom_kill") + 1]) > 0
        except (OSError, ValueError, IndexError):
            oom = False
        for _ in range(50):  # the exited child leaves the cgroup asynchronously
            try:
                self.dir.rmdir()
                break
            except OSError:
                time.sleep(0.1)
        return peak, oom


def _cgroup_parent() -> tuple[Path, bool]:
    """(this process's memory cgroup directory, whether it is cgroup v2); RuntimeError saying why not."""
    root = Path("/sys/fs/cgroup")
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    if (root / "cgroup.controllers").exists() and "memory" in (root / "cgroup.controllers").read_text().split():
        rel = next(ln.split(":", 2)[2] for ln in lines if ln.startswith("0::"))
        return root / rel.lstrip("/"), True
    for ln in lines:
        _, controllers, rel = ln.split(":", 2)
        if "memory" in controllers.split(",") and (root / "memory").is_dir():
            return root / "memory" / rel.lstrip("/"), False
    raise RuntimeError("--device-ram needs a writable memory cgroup (v2 memory.max or v1 memory.limit_in_bytes)")


def evict_page_cache(path: Path) -> None:
    """Drop the clean cached pages of every file under `path` (no root needed: POSIX_FADV_DONTNEED)."""
    files = [path] if path.is_file() else [p for p in Path(path).rglob("*") if p.is_file()]
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fdatasync(fd)  # dirty pages (a file just written) cannot be dropped until they are on disk
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


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
