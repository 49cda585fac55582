"""Pack progress on stderr: a rich bar (ETA, MB/s) on a terminal; elsewhere (CI logs) one plain line
every few seconds. Never on stdout, which carries the `--json` report."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

LINE_EVERY_S = 5.0


class PackProgress:
    def __init__(self, enabled: bool, total_bytes: int, layers: int, tty: bool | None = None):
        self.enabled = enabled
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.total, self.layers = max(1, total_bytes), layers
        self.done = 0
        self.layer_no = 0
        self.stages, self.stage_seconds = 0, 0.0  # per-layer stages that move no bytes (--calib's pass), timed
        self._t0 = self._last = time.monotonic()
        self._bar = None

    def __enter__(self) -> PackProgress:
        if self.enabled and self.tty:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                 TimeRemainingColumn(), transient=True, console=_stderr_console())
            self._bar.__enter__()
            self._task = self._bar.add_task("packing", total=self.total)
        return self

    def layer(self, index: int) -> None:
        self.layer_no = index + 1
        if self._bar is not None:
            self._bar.update(self._task, description=f"packing layer {index + 1}/{self.layers}")

    @contextmanager
    def stage(self, what: str):
        """A layer's stage that moves no bytes (its calibration), said as the bar's description or one line, and
        timed: the ETA counts the remaining layers' stages at the mean time of those done, and the bytes at the
        rate they moved outside them (with --calib, the rate over all the time said hours where minutes were left)."""
        if self.enabled:
            if self._bar is not None:
                self._bar.update(self._task, description=what)
            else:
                print(f"pack: {what}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.stages += 1
            self.stage_seconds += time.monotonic() - t0

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
            return
        now = time.monotonic()
        if now - self._last >= LINE_EVERY_S or self.done >= self.total:
            self._last = now
            print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now: float) -> str:
        elapsed = max(1e-9, now - self._t0)
        rate = self.done / elapsed
        eta = self.eta(now)
        digits = 2 if self.total < 10e6 else 0  # a small model's layers are fractions of a MB ("0/0 MB" said nothing)
        return (f"pack: layer {self.layer_no}/{self.layers}, {self.done / 1e6:.{digits}f}/{self.total / 1e6:.{digits}f} MB, "
                f"{rate / 1e6:.1f} MB/s, ETA {eta:.0f} s")

    def eta(self, now: float) -> float:
        """Seconds left: the bytes left at the rate bytes moved outside the stages, plus the layers' stages left at
        their mean time so far."""
        if self.done <= 0:
            return float("inf")
        moving = max(1e-9, now - self._t0 - self.stage_seconds)
        left = (self.total - self.done) * moving / self.done
        if self.stages:
            left += self.stage_seconds / self.stages * max(0, self.layers - self.stages)
        return left

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)
