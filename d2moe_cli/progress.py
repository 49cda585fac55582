"""Progress for long commands, on a terminal and in CI logs.

On a terminal: rich bars. Elsewhere (CI, `2> log`, `--json`): plain, timestamped lines on stderr, one
per phase and one per progress step at most every `every_s` seconds (and at the end), with step,
loss and ETA, so a 20-minute job is never silent. Third-party bars (transformers, huggingface_hub,
datasets, tqdm) are switched off there: they write carriage-return junk into logs and noise next
to `--json` output.
"""

from __future__ import annotations

import os
import sys
import time

QUIET_BARS_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub, and transformers' loading bars through it
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}


def quiet_third_party_bars() -> None:
    """Switch off other libraries' progress bars (before they are imported; also after, where they allow it)."""
    for key, value in QUIET_BARS_ENV.items():
        os.environ.setdefault(key, value)
    if "transformers" in sys.modules:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        import huggingface_hub

        huggingface_hub.utils.disable_progress_bars()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()


_NOTED: set[str] = set()


def note(message: str) -> None:
    """One "note:" line on stderr, once per process (bench and eval open one session per configuration)."""
    if message not in _NOTED:
        _NOTED.add(message)
        print(f"note: {message}", file=sys.stderr)


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class LogLines:
    """Plain progress lines: `[d2moe train-router 0:01:02] step 40/200 (20%) loss 1.23 bits 3.01 · ETA 0:04:08`."""

    def __init__(self, name: str, total: int, every_s: float = 30.0, stream=None) -> None:
        self.name, self.total, self.every_s = name, total, every_s
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()
        self._last = -float("inf")
        self._phase_t0: float | None = None
        self._phase_step0 = 0

    def _print(self, text: str) -> None:
        print(f"[d2moe {self.name} {_clock(time.monotonic() - self.t0)}] {text}", file=self.stream, flush=True)

    def phase(self, message: str) -> None:
        self._print(message)

    def step(self, step: int, **fields) -> None:
        now = time.monotonic()
        if self._phase_t0 is None:
            self._phase_t0, self._phase_step0 = now, step - 1
        if now - self._last < self.every_s and step < self.total:
            return
        self._last = now
        done = step - self._phase_step0
        rate = done / (now - self._phase_t0) if now > self._phase_t0 and done > 0 else 0.0
        eta = f"ETA {_clock((self.total - step) / rate)}" if rate > 0 else "ETA ?"
        extra = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        self._print(f"step {step}/{self.total} ({step / max(1, self.total):.0%}) {extra} · {eta}")
