"""Expert I/O: aligned reads of packed expert bytes from disk, on a pool of I/O threads.

The disk cost is the point of the whole runtime, so reads must not be served from the page
cache by accident:

- O_DIRECT where the filesystem allows it: the file range is widened to 4096-byte boundaries
  (the packed format already aligns every level segment, so usually nothing is widened) and read
  into a page-aligned anonymous mmap with `os.preadv`.
- Elsewhere (tmpfs rejects O_DIRECT with EINVAL) a buffered read preceded by
  `posix_fadvise(..., POSIX_FADV_DONTNEED)`, which drops clean cached pages of that range.
- An optional bandwidth cap emulates a device disk (3.5e9 B/s NVMe, 1e9 B/s eMMC): one pacer
  shared by all threads hands out transfer slots on a virtual clock, so the threads together
  never exceed `bandwidth` and a read of n bytes takes at least n / bandwidth seconds. The
  emulated disk is then the pacer, not the host's: reads are buffered and may be served by the
  page cache, so a host disk slower than the emulated one (a cloud volume at 0.5 GB/s emulating
  a 2 GB/s phone) does not cap the emulation. Warm the page cache first for emulated runs.

Public API
----------
ByteReader(io_threads=4, bandwidth=None, direct=True)
    read_range(path, offset, nbytes) -> memoryview      # exactly those bytes, zero-copy view
    submit(path, offset, nbytes) -> Future[memoryview]; run(fn) -> Future   # fn on an I/O thread
    stats() -> IOStats; reset_stats(); close(); context manager
    direct_paths -> set of files read with O_DIRECT (the rest fell back to buffered)
ExpertStore(ckpt, io_threads=4, bandwidth=None, direct=True)
    plan(layer, expert, have, want) -> Read   # have=None: the prefix up to `want`; else the segments have -> want
    submit(read) -> Future[memoryview]; read(read) -> memoryview   # one Read descriptor per work item
    stats() / reset_stats() / close(), plus bytes_read, reads, busy_seconds properties
`ckpt` is anything with `byte_range(layer, expert, have_level|None, want_level) -> (path, offset, nbytes)`
(the packed checkpoint of `d2moe.quantize.format`).

The returned memoryview is writable and backed by its own mmap, so `torch.frombuffer(view,
dtype=torch.uint8)` wraps it without a copy.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from d2moe.errors import FormatError, InputError, UsageError
from d2moe.quantize.format.constants import (
    ALIGN,  # blobs are laid out for O_DIRECT: the same 4 KiB serves its reads
)
from d2moe.runtime.buffers import BufferPool, anonymous_map, populate

_O_DIRECT = getattr(os, "O_DIRECT", 0)


@dataclass(frozen=True)
class IOStats:
    """What the reader has done since the last reset."""

    bytes_read: int  # payload bytes returned to callers (not counting alignment widening)
    reads: int  # completed read_range calls
    busy_seconds: float  # wall time during which at least one read was in flight
    read_seconds: float  # sum of per-read durations (exceeds busy_seconds when reads overlap)
    direct_reads: int  # reads served with O_DIRECT

    @property
    def bandwidth(self) -> float:
        """Achieved bytes per busy second (0 when idle)."""
        return self.bytes_read / self.busy_seconds if self.busy_seconds > 0 else 0.0


class BandwidthPacer:
    """A zero-burst token bucket: transfers are laid end to end on a shared virtual clock.

    `acquire(n)` books the next n/rate seconds of the (emulated) device and returns the time at
    which that slot ends; the caller does its real read and then sleeps until then. Booked slots
    never overlap, so concurrent threads together move at most `rate` bytes per second.
    """

    def __init__(self, rate: float) -> None:
        if not rate or rate <= 0:
            raise UsageError(f"bandwidth {rate!r} must be a positive number of bytes per second")
        self.rate = float(rate)
        self._free_at = 0.0  # monotonic time at which the emulated device is next idle
        self._lock = threading.Lock()
        self._stopped = threading.Event()  # set by stop(): booked slots are no longer waited for

    def acquire(self, nbytes: int) -> float:
        with self._lock:
            start = max(time.monotonic(), self._free_at)
            self._free_at = start + nbytes / self.rate
            return self._free_at

    def wait_until(self, deadline: float) -> None:
        while (left := deadline - time.monotonic()) > 0 and not self._stopped.wait(left):
            pass

    def stop(self) -> None:
        """The store closes (an interrupt, the run's end): reads still booked finish at the real disk's speed. A
        slow emulated disk (1 kB/s) otherwise held Ctrl-C for the sum of every queued read's slot."""
        self._stopped.set()


class _InOrder:
    """Calls run one after another on `executor`, in the order added (one read's progress calls), without a
    worker waiting on another: a worker takes the queue while it has calls. The first failure skips the
    rest and is raised by `wait`."""

    def __init__(self, executor: ThreadPoolExecutor) -> None:
        self.executor = executor
        self.lock = threading.Lock()
        self.queue: deque = deque()
        self.busy = False
        self.error: BaseException | None = None
        self.idle = threading.Event()
        self.idle.set()

    def add(self, fn: Callable[..., None], *args) -> None:
        with self.lock:
            self.queue.append((fn, args))
            self.idle.clear()
            if self.busy:
                return
            self.busy = True
        self.executor.submit(self._drain)

    def _drain(self) -> None:
        while True:
            with self.lock:
                if not self.queue:
                    self.busy = False
                    self.idle.set()
                    return
                fn, args = self.queue.popleft()
            if self.error is None:
                try:
                    fn(*args)
                except BaseException as e:  # handed to wait()
                    self.error = e

    def cancel(self) -> None:
        with self.lock:
            self.queue.clear()

    def wait(self) -> None:
        self.idle.wait()
        if self.error is not None:
            raise self.error


class ByteReader:
    """Aligned reads of byte ranges from files, with stats, a thread pool and a bandwidth cap."""

    def __init__(self, io_threads: int = 4, bandwidth: float | None = None, direct: bool = True,
                 pool: BufferPool | None = None) -> None:
        if io_threads < 1:
            raise UsageError(f"io_threads {io_threads} must be at least 1")
        self.pool = pool
        self.pacer = BandwidthPacer(bandwidth) if bandwidth is not None else None
        # an emulated disk (the pacer) reads through the page cache; the real one bypasses it
        self.direct = bool(direct) and _O_DIRECT != 0 and self.pacer is None
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="d2moe-io")
        self._io_threads = io_threads
        self._fds: dict[Path, tuple[int, bool]] = {}  # path -> (fd, opened with O_DIRECT)
        self._fd_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self.direct_paths: set[Path] = set()
        self._helper: ThreadPoolExecutor | None = None  # runs streamed reads' progress calls (read_range)
        self.reset_stats()

    # ---- files -------------------------------------------------------------------------
    def _fd(self, path: Path) -> tuple[int, bool]:
        with self._fd_lock:
            if path in self._fds:
                return self._fds[path]
            fd, is_direct = -1, False
            if self.direct:
                try:
                    fd, is_direct = os.open(path, os.O_RDONLY | _O_DIRECT), True
                except OSError as e:
                    if e.errno != errno.EINVAL:  # EINVAL: this filesystem has no O_DIRECT
                        raise InputError(f"cannot open {path}: {e.strerror}; check the checkpoint path") from e
            if fd < 0:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise InputError(f"cannot open {path}: {e.strerror}; check the checkpoint path") from e
            self._fds[path] = (fd, is_direct)
            if is_direct:
                self.direct_paths.add(path)
            return fd, is_direct

    def _demote(self, path: Path, fd: int) -> int:
        """O_DIRECT was accepted at open but refused at read: reopen buffered."""
        with self._fd_lock:
            cur_fd, is_direct = self._fds[path]
            if is_direct and cur_fd == fd:
                new_fd = os.open(path, os.O_RDONLY)
                self._fds[path] = (new_fd, False)
                self.direct_paths.discard(path)
                os.close(fd)
                return new_fd
            return cur_fd

    # ---- reads -------------------------------------------------------------------------
    STREAM_CHUNK = 8 << 20  # bytes per chunk of a read with `progress` (a multiple of ALIGN)

    def read_range(self, path: str | os.PathLike, offset: int, nbytes: int,
                   progress: Callable[[memoryview, int], None] | None = None,
                   into: memoryview | None = None) -> memoryview:
        """Exactly `nbytes` bytes of `path` from `offset`, read past the page cache.

        `progress(payload, landed)` (optional) is called in order, on a helper thread, each time another
        chunk of the read has landed (`landed` payload bytes from the start), while this thread reads the
        next chunk: work on the bytes (their crc, the kernels' re-layout) overlaps the transfer instead of
        following it. The read returns once every call has; an exception in one is the read's.
        `into` (optional): a writable, page-aligned view of `nbytes` bytes the read lands in (an upgrade
        into the grown tail of its held entry); used when the range is ALIGN-aligned, else ignored."""
        path = Path(path)
        if offset < 0 or nbytes < 0:
            raise UsageError(f"bad byte range offset={offset} nbytes={nbytes} for {path}")
        if nbytes == 0:
            data = memoryview(bytearray())
            if progress is not None:
                progress(data, 0)
            return data
        fd, is_direct = self._fd(path)
        start = (offset // ALIGN) * ALIGN  # widen to aligned boundaries; slice the payload out after
        end = -(-(offset + nbytes) // ALIGN) * ALIGN
        if into is not None and (start, end) == (offset, offset + nbytes) and into.nbytes == nbytes:
            buf, fresh = into, 0  # a grown tail: its pages fault in here, on the I/O thread, as the chunks land
        elif self.pool is not None:  # a recycled map is already faulted in, up to `fresh`
            buf, fresh = self.pool.take_span(end - start)
        else:  # anonymous mmap: page-aligned, as O_DIRECT wants
            buf, fresh = anonymous_map(end - start), 0
        payload = memoryview(buf)[offset - start : offset - start + nbytes]
        deadline = self.pacer.acquire(nbytes) if self.pacer else None
        calls = _InOrder(self._landing()) if progress is not None else None
        chunk = self.STREAM_CHUNK if calls is not None else end - start
        self._begin()
        t0 = time.perf_counter()
        view, done = memoryview(buf), 0
        try:
            if not is_direct and self.pacer is None:  # drop cached pages of this range so the read really comes from disk
                os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
            while done < view.nbytes:
                if not is_direct and done + chunk > fresh:  # a buffered copy would trap once per fresh page;
                    populate(view, max(done, fresh), done + chunk)  # O_DIRECT pins its pages in bulk itself
                try:
                    n = os.preadv(fd, [view[done:done + chunk]], start + done)
                except OSError as e:
                    if not (is_direct and e.errno == errno.EINVAL):
                        raise
                    fd, is_direct = self._demote(path, fd), False  # O_DIRECT accepted at open, refused here
                    if self.pacer is None:
                        os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
                    continue  # go on buffered (the chunks already read stay)
                if n == 0:
                    break
                done += n
                if calls is not None:
                    landed = max(0, min(nbytes, start + done - offset))
                    if deadline is not None:  # the emulated disk delivers this chunk at its rate
                        self.pacer.wait_until(deadline - (nbytes - landed) / self.pacer.rate)
                    calls.add(progress, payload, landed)
            self._whole(path, offset, nbytes, start + done)
            if deadline is not None:  # the emulated disk: the time the whole read takes
                self.pacer.wait_until(deadline)
        except BaseException:
            if calls is not None:
                calls.cancel()
            raise
        finally:
            view.release()
            self._end(time.perf_counter() - t0)  # the transfer; the last chunk's work is not the disk's
        if calls is not None:
            calls.wait()  # the first failure of a progress call is the read's
        self._count(nbytes, is_direct)
        return payload

    @staticmethod
    def _whole(path: Path, offset: int, nbytes: int, file_end: int) -> None:
        """A read that ended at `file_end` brought all its bytes (else the file is truncated)."""
        if file_end < offset + nbytes:
            raise FormatError(f"{path} is truncated: needed bytes {offset}..{offset + nbytes} but the file ends at "
                              f"{file_end}; re-run `d2moe pack`")

    def _count(self, nbytes: int, is_direct: bool) -> None:
        with self._stats_lock:
            self._bytes += nbytes
            self._reads += 1
            self._direct_reads += int(is_direct)

    def _landing(self) -> ThreadPoolExecutor:
        """Threads for streamed reads' progress calls (one read's calls in order, reads in parallel)."""
        with self._fd_lock:
            if self._helper is None:
                self._helper = ThreadPoolExecutor(max_workers=self._io_threads, thread_name_prefix="d2moe-landing")
            return self._helper

    def submit(self, path: str | os.PathLike, offset: int, nbytes: int) -> Future:
        """`read_range` on an I/O thread."""
        return self._pool.submit(self.read_range, path, offset, nbytes)

    def run(self, fn: Callable[[], object]) -> Future:
        """`fn()` on an I/O thread (a read and the work that belongs with it)."""
        return self._pool.submit(fn)

    # ---- stats -------------------------------------------------------------------------
    def _begin(self) -> None:
        with self._stats_lock:
            if self._in_flight == 0:
                self._busy_since = time.perf_counter()
            self._in_flight += 1

    def _end(self, seconds: float) -> None:
        with self._stats_lock:
            self._in_flight -= 1
            self._read_seconds += seconds
            if self._in_flight == 0:
                self._busy += time.perf_counter() - self._busy_since

    def reset_stats(self) -> None:
        with self._stats_lock:
            self._bytes = self._reads = self._direct_reads = 0
            self._busy = self._read_seconds = 0.0
            self._in_flight = getattr(self, "_in_flight", 0)
            self._busy_since = time.perf_counter()

    def stats(self) -> IOStats:
        with self._stats_lock:
            busy = self._busy
            if self._in_flight:
                busy += time.perf_counter() - self._busy_since
            return IOStats(self._bytes, self._reads, busy, self._read_seconds, self._direct_reads)

    @property
    def bytes_read(self) -> int:
        return self.stats().bytes_read

    @property
    def reads(self) -> int:
        return self.stats().reads

    @property
    def busy_seconds(self) -> float:
        return self.stats().busy_seconds

    # ---- lifetime ----------------------------------------------------------------------
    def close(self) -> None:
        if self.pacer is not None:
            self.pacer.stop()
        self._pool.shutdown(wait=True, cancel_futures=True)  # reads not started are no one's now
        if self._helper is not None:
            self._helper.shutdown(wait=True)
        with self._fd_lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> ByteReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class Read:
    """One planned read: what it brings (expert `expert` of `layer` from level `have` to `want`) and where
    it lies (file, absolute offset, length). Planned once per work item; the pipeline, the cost model and
    the crc check all use this one descriptor."""

    layer: int
    expert: int
    have: int | None
    want: int
    path: Path
    offset: int
    nbytes: int


class ReadSource(Protocol):
    """What the pipeline reads experts through (ExpertStore, or the lossless tier's store)."""

    def plan(self, layer: int, expert: int, have: int | None, want: int) -> Read: ...

    def submit(self, read: Read, then: Callable[[Read, object], object] | None = None,
               stream: Callable[[Read], object] | None = None, into: memoryview | None = None) -> Future: ...

    def read(self, read: Read): ...


class ExpertStore:
    """Reads expert level prefixes (have=None) or upgrade segments (have -> want) of a packed checkpoint."""

    def __init__(self, ckpt, io_threads: int = 4, bandwidth: float | None = None, direct: bool = True,
                 pool: BufferPool | None = None) -> None:
        self.ckpt = ckpt
        self.reader = ByteReader(io_threads=io_threads, bandwidth=bandwidth, direct=direct, pool=pool)

    def plan(self, layer: int, expert: int, have: int | None, want: int) -> Read:
        """Where the bytes taking expert (layer, expert) from level `have` (None: nothing) to `want` lie."""
        path, offset, nbytes = self.ckpt.byte_range(layer, expert, have, want)
        return Read(layer, expert, have, want, Path(path), offset, nbytes)

    def read(self, read: Read) -> memoryview:
        return self.reader.read_range(read.path, read.offset, read.nbytes)

    def submit(self, read: Read, then: Callable[[Read, object], object] | None = None,
               stream: Callable[[Read], object] | None = None, into: memoryview | None = None) -> Future:
        """`read` on an I/O thread: Future[memoryview], or of `then(read, bytes)` run on that thread too
        (the crc check and the kernels' re-layout overlap other reads and the compute that way).
        `stream(read)` (optional) gives a check with `feed(bytes, landed)` and `finish(bytes)`
        (PackedCheckpoint.read_check): it is fed as the read's chunks land, overlapping the transfer.
        `into`: where the bytes land, with `stream` (ByteReader.read_range)."""
        if stream is not None:
            def streamed():
                check = stream(read)
                data = self.reader.read_range(read.path, read.offset, read.nbytes, progress=check.feed, into=into)
                check.finish(data)
                return data if then is None else then(read, data)
            return self.reader.run(streamed)
        if then is None:
            return self.reader.submit(read.path, read.offset, read.nbytes)
        return self.reader.run(lambda: then(read, self.read(read)))

    def stats(self) -> IOStats:
        return self.reader.stats()

    def reset_stats(self) -> None:
        self.reader.reset_stats()

    @property
    def bytes_read(self) -> int:
        return self.reader.bytes_read

    @property
    def reads(self) -> int:
        return self.reader.reads

    @property
    def busy_seconds(self) -> float:
        return self.reader.busy_seconds

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> ExpertStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
