"""Measuring what a run really holds, by category, against its memory plan.

The runtime registers what it holds (dense parameters, KV cache tensors, the expert cache,
staging buffers, workspaces) and calls `sample()` at the points where memory peaks (after a
layer's loads land, after a step). A sample adds up the actual bytes of the registered objects,
not the plan's numbers; the meter keeps the peak total and per-category peaks. Tensors that
share storage are counted once per sample.

Process RSS (psutil) is reported apart, as the peak delta over the RSS when the meter was made:
it includes the Python interpreter's and the allocator's own overheads, which the budget does
not cover, so it is a cross-check, not the measure of invariant 4.

Public API
----------
MemoryMeter()
    register(category, name, obj, static=False)
                                    # obj: tensor, nn.Module, bytes-like, ndarray, dict/list of them,
                                    # an ExpertCache (its held_objects()), or a callable -> int bytes;
                                    # static: obj never changes (e.g. loaded weights): measured once
    unregister(category, name)
    sample() -> MemorySample(total, by_category);  peak, peak_by_category, samples
    rss_peak_delta -> int;  cuda_peak() -> int | None  (torch.cuda.max_memory_allocated when CUDA is up)
    report() -> dict
The runtime registers under the categories dense, kv, expert_cache, staging and workspace.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psutil


@dataclass(frozen=True)
class MemorySample:
    total: int
    by_category: dict[str, int]


def _storage_of(obj: Any) -> tuple[Any, int] | None:
    """(identity of the storage, its bytes) for torch tensors, so shared storage counts once."""
    if hasattr(obj, "untyped_storage") and hasattr(obj, "device"):
        if obj.device.type == "meta":  # a shape without memory
            return None, 0
        st = obj.untyped_storage()
        return (str(obj.device), st.data_ptr()), st.nbytes()
    return None


def nbytes_of(obj: Any, seen: set | None = None) -> int:
    """Bytes held by `obj` (tensor storage, bytes-like, ndarray, or a container of them)."""
    if obj is None:
        return 0
    if hasattr(obj, "parameters") and hasattr(obj, "buffers"):  # torch.nn.Module (callable, but not a byte count)
        return sum(nbytes_of(t, seen) for t in [*obj.parameters(), *obj.buffers()])
    if callable(obj) and not hasattr(obj, "nbytes"):
        return int(obj())
    st = _storage_of(obj)
    if st is not None:
        ident, n = st
        if ident is not None and seen is not None:
            if ident in seen:
                return 0
            seen.add(ident)
        return n
    if hasattr(obj, "measured_bytes"):  # ExpertCache: measure what its entries hold, not its counters
        return obj.measured_bytes(lambda objs: nbytes_of(objs, set()))
    if isinstance(obj, dict):
        return sum(nbytes_of(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes_of(v, seen) for v in obj)
    if isinstance(obj, memoryview) and obj.obj is not None:
        # a view holds its whole buffer alive (e.g. the aligned mmap a read landed in)
        base = obj.obj
        if seen is not None:
            if ("buf", id(base)) in seen:
                return 0
            seen.add(("buf", id(base)))
        return len(memoryview(base).cast("B")) if not isinstance(base, (bytes, bytearray)) else len(base)
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    if hasattr(obj, "nbytes"):
        return int(obj.nbytes)
    return len(memoryview(obj).cast("B"))


@dataclass(frozen=True)
class _Static:
    nbytes: int
    idents: frozenset


class MemoryMeter:
    """Live bytes of registered objects by category, with peaks."""

    def __init__(self) -> None:
        self._objs: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._proc = psutil.Process()
        self._rss0 = self._proc.memory_info().rss
        self._rss_peak = self._rss0
        # Linux keeps the exact peak RSS (VmHWM); resetting it here makes it the peak since start-up, read
        # once at report time. Sampling RSS instead took 4-8 ms a call while I/O threads map and unmap
        # expert buffers (/proc reads wait on the address-space lock), and could miss a peak.
        self._hwm = _reset_peak_rss()
        self._code = 0  # file-backed pages (library code) first touched by the start-up warm-up
        self.peak = 0
        self.peak_by_category: dict[str, int] = {}
        self.samples = 0

    def register(self, category: str, name: str, obj: Any | Callable[[], int], static: bool = False) -> None:
        with self._lock:
            if static:  # measured now, once: (bytes, storage identities) re-used by every sample
                seen: set = set()
                obj = _Static(nbytes_of(obj, seen), frozenset(seen))
            self._objs.setdefault(category, {})[name] = obj

    def unregister(self, category: str, name: str) -> None:
        with self._lock:
            self._objs.get(category, {}).pop(name, None)

    def sample(self) -> MemorySample:
        with self._lock:
            seen: set = set()
            for objs in self._objs.values():  # static objects' storages first, so shared ones count once
                for o in objs.values():
                    if isinstance(o, _Static):
                        seen |= o.idents
            by_cat = {c: sum(o.nbytes if isinstance(o, _Static) else nbytes_of(o, seen) for o in objs.values())
                      for c, objs in self._objs.items()}
            total = sum(by_cat.values())
            self.samples += 1
            self.peak = max(self.peak, total)
            for c, n in by_cat.items():
                self.peak_by_category[c] = max(self.peak_by_category.get(c, 0), n)
            if not self._hwm:
                self._rss_peak = max(self._rss_peak, self._proc.memory_info().rss)
            return MemorySample(total, by_cat)

    @contextmanager
    def startup_code(self):
        """The start-up warm-up runs inside: the file-backed pages it maps (library code such as the
        torch kernels a forward pass takes, ~36 MiB of libtorch on an AMX CPU) are start-up, like the
        imports, and leave the RSS growth; everything else it touches still counts."""
        before = _status_kib("RssFile")
        try:
            yield
        finally:
            self._code += max(0, _status_kib("RssFile") - before) * 1024

    @property
    def rss_peak_delta(self) -> int:
        peak = max(self._rss_peak, _peak_rss()) if self._hwm else self._rss_peak
        return peak - self._rss0 - self._code

    @staticmethod
    def cuda_peak() -> int | None:
        try:
            import torch
        except ImportError:
            return None
        return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None

    def report(self) -> dict[str, Any]:
        return {
            "peak_bytes": self.peak,
            "peak_by_category": dict(self.peak_by_category),
            "samples": self.samples,
            "rss_peak_delta_bytes": self.rss_peak_delta,
            "cuda_peak_bytes": self.cuda_peak(),
        }


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux: `5` to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _peak_rss() > 0
    except OSError:
        return False


def _peak_rss() -> int:
    """The kernel's peak RSS of this process in bytes (VmHWM), 0 where it is not reported."""
    return _status_kib("VmHWM") * 1024


def _status_kib(field: str) -> int:
    """One kB field of /proc/self/status (VmHWM, RssFile, ...), 0 where it is not reported."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def limit_allocator_overhead() -> None:
    """glibc only: at most two malloc arenas, and blocks of 1 MiB or more mapped (and returned) on their
    own. By default each thread that allocates (I/O, kernel and torch threads) may get an arena that
    keeps freed memory, and the mmap threshold rises with every large free: RSS then grows past what
    the run holds (measured on the embedded model: 14 vs 28 MiB of growth between two runs)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return  # not glibc (musl, ...): nothing to tune
    mallopt(_M_ARENA_MAX, 2)
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    _GLIBC[:] = [libc]


_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8  # glibc's mallopt parameter numbers
MMAP_THRESHOLD = 1 << 20  # decode: blocks of 1 MiB or more mapped (and returned) on their own
PREFILL_MMAP_THRESHOLD = 256 << 20  # the prompt's forward: its large temporaries reuse heap memory
# pack --calib's fits: a source matrix read ahead (117 MB at Mixtral's shape) mapped and returned whole; from the
# heap, each left a hole and RSS grew a matrix at a time (1.6 -> 2.6 GiB over one layer)
FIT_MMAP_THRESHOLD = 64 << 20
_GLIBC: list = []  # libc, once limit_allocator_overhead has tuned it


@contextmanager
def prefill_allocator():
    """The prompt's forward with large blocks taken from the heap instead of fresh maps, then the heap
    trimmed back (malloc_trim). Mapping every temporary of 1 MiB or more cost a page fault per 4 KiB
    and serialised the kernel threads on the address-space lock: 128-token Mixtral prefill at 2 threads
    measured 142 tok/s mapped, 229 from the heap. Decode keeps the tight setting. No-op off glibc."""
    if not _GLIBC:
        yield
        return
    libc = _GLIBC[0]
    libc.mallopt(_M_MMAP_THRESHOLD, PREFILL_MMAP_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.malloc_trim(0)  # what the prompt's temporaries left in the heap goes back to the OS


@contextmanager
def tight_allocator():
    """A phase that frees many large temporaries of varying sizes under limit_allocator_overhead's setting, then
    blocks under FIT_MMAP_THRESHOLD from the heap again and the heap trimmed. pack --calib's forward: its
    freed per-expert temporaries stayed in the heap (the 2-layer Mixtral-shaped pass peaked 4.95 GiB, 3.38 GiB
    tight); the fits after it, tight, took 12% longer, output_errors twice as long, mapping and faulting in each
    temporary; from the heap, as fast as glibc's default (BENCHMARKS.md §6.12). The heap is trimmed on entry
    too: what the fits before it freed would otherwise stay resident under the pass's own peak (pack --calib
    alternates the two per layer; its second layer's pass peaked 0.3 GiB above the first's). No-op off glibc."""
    limit_allocator_overhead()
    if _GLIBC:
        _GLIBC[0].malloc_trim(0)
    try:
        yield
    finally:
        if _GLIBC:
            _GLIBC[0].mallopt(_M_MMAP_THRESHOLD, FIT_MMAP_THRESHOLD)
            _GLIBC[0].malloc_trim(0)
