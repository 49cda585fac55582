"""Page-aligned buffers that expert reads land in: fresh anonymous maps, the pool that recycles them, and
faulting a fresh range in with one call.

A read's buffer is a private anonymous map: page-aligned (as O_DIRECT wants) and growable in place (`mremap`,
d2moe.runtime.held_bytes). Its pages cost a fault each on first touch; on a 2-core KVM guest that is most of
what landing an expert costs (44 MB: 26 ms to read into fresh pages, 5 ms into touched ones). Two answers:
`BufferPool` hands back dropped maps so the next read lands in touched pages, and `populate` faults a fresh
range in with one madvise(MADV_POPULATE_WRITE) call instead of a trap per page (44 MB: 14 ms, then 5 ms to
read), where the kernel has it (Linux 5.14+; elsewhere pages fault on first touch as before).

Public API
----------
anonymous_map(size) -> mmap.mmap                 # private, anonymous, growable
populate(view, start=0, stop=None) -> bool       # fault in view[start:stop] now; False where unsupported
BufferPool(limit: () -> int): take(size), take_span(size) -> (map, first fresh byte), recycle(view), clear(),
    free_bytes, reused, enabled
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import sys
import threading
from collections.abc import Callable

_MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault pages in writable, as a write would, in one call
_madvise = None  # libc's madvise once looked up; False where there is none or the kernel lacks the advice


def populate(view: memoryview, start: int = 0, stop: int | None = None) -> bool:
    """Fault in the whole pages of view[start:stop] now, writable, with one system call instead of a trap per
    page (a partial page at either end faults on first touch as usual). False where the platform has no
    MADV_POPULATE_WRITE or refused it; the bytes are unchanged either way."""
    global _madvise
    stop = view.nbytes if stop is None else min(stop, view.nbytes)
    if _madvise is False or stop <= start or view.readonly:
        return False
    if _madvise is None:
        if not sys.platform.startswith("linux"):  # the advice number is Linux's; elsewhere it means nothing or else
            _madvise = False
            return False
        try:
            fn = ctypes.CDLL(None, use_errno=True).madvise
        except (OSError, AttributeError):
            _madvise = False
            return False
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
        _madvise = fn
    anchor = (ctypes.c_char * view.nbytes).from_buffer(view)  # exports the buffer for this call only
    base = ctypes.addressof(anchor)
    lo = -(-(base + start) // mmap.PAGESIZE) * mmap.PAGESIZE
    hi = (base + stop) // mmap.PAGESIZE * mmap.PAGESIZE
    ok = hi <= lo or _madvise(lo, hi - lo, _MADV_POPULATE_WRITE) == 0
    del anchor
    if not ok and ctypes.get_errno() == errno.EINVAL:  # a kernel without the advice: stop asking
        _madvise = False
    return ok


class BufferPool:
    """Page-aligned read buffers handed back once their bytes are dropped, so the next read of that size
    lands in pages already mapped. A fresh buffer costs a page fault per 4 KiB on first touch and a munmap
    when dropped: measured on a 2-core KVM guest, 57 ms + 12 ms per 88 MB expert, more than the 15 ms the
    copy itself takes and slower than a 2 GB/s disk.

    `recycle(data)` takes a dropped memoryview of a pool buffer; the buffer is reused (resized to the size
    asked for: nested levels and upgrades read many sizes) only once nothing views it any more (an mmap
    refuses to resize while exported). Free buffers beyond `limit()` bytes (the staging room the memory
    plan leaves) are unmapped, oldest first, whenever the pool is touched."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._given: list[mmap.mmap] = []  # dropped by the cache, maybe still viewed; oldest first
        self.reused = 0
        probe = anonymous_map(mmap.PAGESIZE)
        self.enabled = _unviewed(probe) is True  # off where anonymous maps cannot be resized: it could not tell
        probe.close()

    def take(self, size: int) -> mmap.mmap:
        """A free buffer of `size` bytes (see `take_span`): the cache's `alloc` for joined copies."""
        return self.take_span(size)[0]

    def take_span(self, size: int) -> tuple[mmap.mmap, int]:
        """(a free buffer of `size` bytes, where its never-touched pages start): one of that size, else another
        resized to it (a shrink unmaps its tail, a growth adds fresh pages past its old end; the smallest larger
        one first), else a fresh map (fresh from byte 0)."""
        with self._lock:
            free = [m for m in reversed(self._given) if _unviewed(m)]  # newest first
            larger = sorted((m for m in free if len(m) > size), key=len)
            match = next((m for m in free if len(m) == size), None) or next(iter(larger), None) \
                or max(free, key=len, default=None)
            if match is not None:
                self._given.remove(match)
                fresh = min(size, len(match))
                try:
                    if len(match) != size:
                        match.resize(size)
                    self.reused += 1
                except (OSError, SystemError, ValueError, BufferError):
                    match.close()
                    match = None
            self._trim()
        return (match, fresh) if match is not None else (anonymous_map(size), 0)

    def recycle(self, data) -> None:
        if self.enabled and isinstance(data, memoryview) and isinstance(data.obj, mmap.mmap):
            with self._lock:
                if not any(m is data.obj for m in self._given):
                    self._given.append(data.obj)
                self._trim()

    def clear(self) -> None:
        """Unmap every retained buffer nothing views any more (the session is closing)."""
        with self._lock:
            self._trim(room=0)

    @property
    def free_bytes(self) -> int:
        """Bytes of retained buffers that nothing views (RSS the cache no longer counts), after a trim."""
        with self._lock:
            return self._trim()

    def _trim(self, room: int | None = None) -> int:
        """Unmap free buffers, oldest first, until at most `room` bytes of them stay (default: `limit()`)."""
        free = [m for m in self._given if _unviewed(m)]
        held, room = sum(len(m) for m in free), max(0, self.limit() if room is None else room)
        for m in free:
            if held <= room:
                break
            self._given.remove(m)
            held -= len(m)
            m.close()
        return held


def anonymous_map(size: int) -> mmap.mmap:
    """A private anonymous map: page-aligned (as O_DIRECT wants), and growable by `resize` (a shared
    anonymous map's grown tail has no pages behind it: reading into it fails with EFAULT)."""
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", getattr(mmap, "MAP_ANON", 0))
    return mmap.mmap(-1, size, flags=flags) if flags else mmap.mmap(-1, size)


def _unviewed(m: mmap.mmap) -> bool | None:
    """Whether no memoryview or tensor views `m` (a same-size resize is refused while one does); None where
    this platform cannot resize an anonymous map, so the test cannot tell."""
    if m.closed:
        return False
    try:
        m.resize(len(m))
        return True
    except BufferError:
        return False
    except (OSError, SystemError, ValueError):
        return None
