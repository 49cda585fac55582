"""Read buffers: the recycling pool within its limit, where a taken buffer's fresh pages start, and faulting
a fresh range in with one call (checked with mincore, bytes unchanged)."""

from __future__ import annotations

import ctypes
import mmap

import pytest

from d2moe.runtime import buffers
from d2moe.runtime.buffers import BufferPool, anonymous_map, populate

ALIGN = 4096


def resident_pages(m: mmap.mmap) -> int:
    """Pages of an anonymous map that are faulted in (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    pages = len(m) // mmap.PAGESIZE
    vec = ctypes.create_string_buffer(pages)
    anchor = (ctypes.c_char * len(m)).from_buffer(m)
    rc = libc.mincore(ctypes.addressof(anchor), len(m), vec)
    del anchor
    assert rc == 0, ctypes.get_errno()
    return sum(b & 1 for b in vec.raw)


def test_buffer_pool_keeps_free_buffers_within_its_limit():
    room = [3 * ALIGN]
    pool = BufferPool(limit=lambda: room[0])
    bufs = [pool.take(ALIGN) for _ in range(3)]
    for b in bufs:
        pool.recycle(memoryview(b)[:10])
    assert pool.free_bytes == 3 * ALIGN  # unviewed once the views above are gone
    room[0] = ALIGN  # reads now in flight take the staging room: the oldest free buffers are unmapped
    assert pool.free_bytes == ALIGN and [b.closed for b in bufs] == [True, True, False]
    assert pool.take(ALIGN) is bufs[2] and pool.free_bytes == 0


def test_buffer_pool_turns_itself_off_where_it_cannot_tell_a_viewed_buffer(monkeypatch):
    monkeypatch.setattr(buffers, "_unviewed", lambda m: None)  # e.g. no anonymous mremap on this OS
    pool = buffers.BufferPool(limit=lambda: 10 * ALIGN)
    buf = pool.take(ALIGN)
    pool.recycle(memoryview(buf))
    assert not pool.enabled and pool.free_bytes == 0 and pool.take(ALIGN) is not buf  # nothing retained


def test_take_span_says_where_fresh_pages_start():
    pool = BufferPool(limit=lambda: 64 * ALIGN)
    buf, fresh = pool.take_span(4 * ALIGN)
    assert (len(buf), fresh) == (4 * ALIGN, 0)  # nothing to recycle: a fresh map
    pool.recycle(memoryview(buf))
    grown, fresh = pool.take_span(6 * ALIGN)
    assert grown is buf and fresh == 4 * ALIGN  # grown in place: only the new pages are fresh
    pool.recycle(memoryview(grown))
    cut, fresh = pool.take_span(2 * ALIGN)
    assert cut is buf and fresh == 2 * ALIGN  # cut: every page was touched


@pytest.mark.skipif(not hasattr(mmap, "MAP_PRIVATE"), reason="POSIX maps only")
def test_populate_faults_whole_pages_in_and_keeps_the_bytes():
    m = anonymous_map(16 * mmap.PAGESIZE)
    m[: 2 * mmap.PAGESIZE] = b"x" * (2 * mmap.PAGESIZE)  # two pages touched, with bytes in them
    assert resident_pages(m) == 2
    view = memoryview(m)
    if not populate(view, mmap.PAGESIZE + 1, 10 * mmap.PAGESIZE):
        pytest.skip("no MADV_POPULATE_WRITE on this kernel")
    # pages 2..9 now resident; page 1 was already, and the partial first page of the range is left alone
    assert resident_pages(m) == 10
    assert bytes(m[: 2 * mmap.PAGESIZE]) == b"x" * (2 * mmap.PAGESIZE) and m[2 * mmap.PAGESIZE] == 0
    assert not populate(view, 5, 5) and not populate(memoryview(bytes(8)))  # empty range, read-only buffer
    view.release()
    m.resize(len(m))  # nothing is left exporting the map: it still resizes in place
    m.close()
