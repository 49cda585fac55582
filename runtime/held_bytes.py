"""The bytes a cache entry holds: their size, joined, grown in place and cut to a prefix.

Pure buffer handling, no cache policy (d2moe.runtime.cache owns that). A held expert is a memoryview of a private
anonymous map from the read-buffer pool (d2moe.runtime.buffers.BufferPool), a bytes-like object, or a uint8 tensor (a
GPU-resident cache). Maps that nothing else views grow and shrink in place (`mremap`: pages move, nothing is copied);
anything else is copied, and the old buffer goes to `on_drop` (the pool).
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from typing import Any


def size_of(data: Any) -> int:
    """Bytes a held buffer has: a memoryview, bytes-like object, numpy array or tensor."""
    if hasattr(data, "nbytes") and not isinstance(data, (bytes, bytearray)):
        return int(data.nbytes)  # memoryview, numpy array, torch tensor
    return len(data)


def concat(held: Any, extra: Any, alloc: Callable[[int], Any] | None = None) -> Any:
    """held + extra as one buffer of held's kind: a uint8 tensor on held's device, else a memoryview (of
    `alloc(n)` where given: the read-buffer pool's already-mapped pages)."""
    if hasattr(held, "untyped_storage"):  # a torch tensor (e.g. a GPU-resident cache)
        import torch

        if not hasattr(extra, "untyped_storage"):
            extra = torch.frombuffer(bytearray(extra), dtype=torch.uint8)
        return torch.cat([held.reshape(-1).view(torch.uint8), extra.reshape(-1).view(torch.uint8).to(held.device)])
    n_held, n_extra = size_of(held), size_of(extra)
    joined = memoryview(alloc(n_held + n_extra) if alloc else bytearray(n_held + n_extra))[: n_held + n_extra]
    joined[:n_held] = held
    joined[n_held:] = extra
    return joined


def whole_map(data: Any) -> bool:
    """Whether `data` views all of an mmap (a pool buffer): only such a buffer can be resized in place."""
    return isinstance(data, memoryview) and isinstance(data.obj, mmap.mmap) and len(data.obj) == data.nbytes


def resize_in_place(data: memoryview, n: int) -> tuple[memoryview, bool]:
    """`data`'s map (see `whole_map`) resized to `n` bytes, if nothing else views it (mremap: pages move, none
    are copied): (a view of all of it, True); else (a view of the map as it was, False). `data` is given up."""
    m = data.obj
    try:
        data.release()
        m.resize(n)
    except (BufferError, OSError, SystemError, ValueError):
        return memoryview(m), False
    return memoryview(m), True


def grow(held: Any, extra: Any, alloc: Callable[[int], Any] | None, on_drop: Callable[[Any], None] | None) -> Any:
    """held + extra as one buffer, `held` given up: a pool map grown in place when nothing else views it (only
    `extra` is copied, into the new tail), else a joined copy (`concat`) and the old buffer dropped."""
    if whole_map(held):
        n_held = held.nbytes
        held, grown = resize_in_place(held, n_held + size_of(extra))
        if grown:
            held[n_held:] = extra
            return held
    joined = concat(held, extra, alloc)
    if on_drop is not None:
        on_drop(held)
    return joined


def is_tail(held: Any, n_held: int, extra: memoryview) -> bool:
    """Whether `extra` is the view past the first `n_held` bytes of `held`'s map (ExpertCache.open_tail)."""
    return (isinstance(held, memoryview) and extra.obj is held.obj and size_of(held) == n_held + size_of(extra))


def release(view: memoryview) -> None:
    """Let go of a view now where nothing derived from it is alive (else the collector does it later)."""
    try:
        view.release()
    except BufferError:
        pass


def cut_to_prefix(data: Any, n: int, alloc: Callable[[int], Any] | None, on_drop: Callable[[Any], None] | None) -> Any:
    """The first `n` bytes of `data` as a buffer of their own, the rest freed: a pool map cut in place when
    nothing else views it (its tail pages go back, nothing is copied), else a copy (`alloc`'s pages) and the
    old buffer dropped."""
    if hasattr(data, "untyped_storage"):  # a torch tensor (a GPU-resident cache)
        import torch

        return data.reshape(-1).view(torch.uint8)[:n].clone()
    if whole_map(data):
        data, cut = resize_in_place(data, n)
        if cut:
            return data
    out = memoryview(alloc(n) if alloc else bytearray(n))[:n]
    out[:] = data[:n]
    if on_drop is not None:
        on_drop(data)
    return out
