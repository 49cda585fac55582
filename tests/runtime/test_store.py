"""ExpertStore / ByteReader: exact bytes from real files, O_DIRECT and buffered paths, bandwidth cap, stats."""

from __future__ import annotations

import ctypes
import errno
import itertools
import mmap
import os
import random
import time
from pathlib import Path

import pytest
import torch

from d2moe.errors import FormatError, InputError, UsageError
from d2moe.runtime import store
from d2moe.runtime.buffers import anonymous_map
from d2moe.runtime.store import ALIGN, ByteReader, ExpertStore

REPO = Path(__file__).resolve().parents[2]


def _o_direct_supported(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        assert e.errno == errno.EINVAL
        return False
    os.close(fd)
    return True


def _write(path: Path, nbytes: int, seed: int = 0) -> bytes:
    data = random.Random(seed).randbytes(nbytes)
    path.write_bytes(data)
    return data


@pytest.fixture(params=["repo", "tmp", "shm"])
def data_file(request, tmp_path):
    """A random file on the repo's filesystem, on the pytest tmp dir, and on /dev/shm (tmpfs)."""
    if request.param == "repo":
        path = REPO / f".test_store_{os.getpid()}.bin"
    elif request.param == "tmp":
        path = tmp_path / "data.bin"
    else:
        if not Path("/dev/shm").is_dir():
            pytest.skip("no /dev/shm")
        path = Path("/dev/shm") / f"d2moe_test_store_{os.getpid()}.bin"
    data = _write(path, 7 * ALIGN + 123)
    yield path, data
    path.unlink(missing_ok=True)


RANGES = [(0, ALIGN), (ALIGN, 3 * ALIGN), (0, 7 * ALIGN + 123), (5, 10), (ALIGN - 1, 2), (6 * ALIGN, ALIGN + 123), (100, 0)]


@pytest.mark.parametrize("direct", [True, False])
def test_reads_exact_bytes(data_file, direct):
    path, data = data_file
    with ByteReader(io_threads=2, direct=direct) as r:
        for off, n in RANGES:
            got = r.read_range(path, off, n)
            assert bytes(got) == data[off : off + n]
        st = r.stats()
        assert st.reads == len(RANGES) - 1  # the empty range is not a read
        assert st.bytes_read == sum(n for _, n in RANGES)
        if direct and _o_direct_supported(path):
            assert path in r.direct_paths and st.direct_reads == st.reads
        else:
            assert path not in r.direct_paths and st.direct_reads == 0


def _resident_pages(path: Path) -> int:
    """Pages of `path` in the page cache (mincore on a read-only shared mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as f:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
    assert addr not in (None, ctypes.c_void_p(-1).value)
    vec = (ctypes.c_ubyte * pages)()
    try:
        assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) == 0
    finally:
        libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    return sum(v & 1 for v in vec)


def test_direct_reads_bypass_the_page_cache(tmp_path):
    path = tmp_path / "cold.bin"
    data = _write(path, 64 * ALIGN, seed=5)
    if not _o_direct_supported(path):
        pytest.skip(f"{tmp_path} has no O_DIRECT")
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    if _resident_pages(path) != 0:
        pytest.skip("this kernel keeps the pages cached after POSIX_FADV_DONTNEED")
    with ByteReader(direct=True) as r:
        assert bytes(r.read_range(path, 0, len(data))) == data
    assert _resident_pages(path) == 0  # the bytes came from disk and left no cached copy
    with ByteReader(direct=False) as r:
        r.read_range(path, 0, len(data))
    assert _resident_pages(path) > 0  # the buffered fallback does go through the page cache


def test_concurrent_reads_share_fds(tmp_path):
    path = tmp_path / "big.bin"
    data = _write(path, 64 * ALIGN, seed=1)
    rng = random.Random(2)
    offsets = [rng.randrange(0, len(data) - 1) for _ in range(200)]
    ranges = [(off, rng.randrange(1, min(3 * ALIGN, len(data) - off) + 1)) for off in offsets]
    with ByteReader(io_threads=4) as r:
        futures = [(off, n, r.submit(path, off, n)) for off, n in ranges]
        for off, n, f in futures:
            assert bytes(f.result()) == data[off : off + n]
        assert len(r._fds) == 1


def test_result_is_writable_zero_copy_buffer(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "d.bin"
    data = _write(path, 2 * ALIGN)
    with ByteReader() as r:
        view = r.read_range(path, ALIGN, ALIGN)
        t = torch.frombuffer(view, dtype=torch.uint8)
        assert bytes(t.numpy()) == data[ALIGN:]


def test_truncated_and_missing_files_raise_clear_errors(tmp_path):
    path = tmp_path / "short.bin"
    _write(path, ALIGN + 10)
    with ByteReader() as r:
        with pytest.raises(FormatError, match="short.bin is truncated"):
            r.read_range(path, ALIGN, ALIGN)
        with pytest.raises(InputError, match="nope.bin"):
            r.read_range(tmp_path / "nope.bin", 0, 10)
        with pytest.raises(UsageError):
            r.read_range(path, -1, 10)


def test_bandwidth_cap_is_respected_across_threads(tmp_path):
    path = tmp_path / "bw.bin"
    mb = 1_000_000
    data = _write(path, 8 * mb + ALIGN, seed=3)
    with ByteReader(io_threads=4, bandwidth=40e6) as r:
        t0 = time.perf_counter()
        futures = [r.submit(path, i * mb, mb) for i in range(8)]
        out = [bytes(f.result()) for f in futures]
        elapsed = time.perf_counter() - t0
        st = r.stats()
    assert out == [data[i * mb : (i + 1) * mb] for i in range(8)]
    assert elapsed >= 8 * mb / 40e6  # 0.2 s: four threads together never beat the cap
    assert st.bytes_read == 8 * mb and st.reads == 8
    assert st.busy_seconds >= 0.2 - 1e-3 and st.busy_seconds <= elapsed + 1e-3
    assert st.bandwidth <= 40e6 * 1.01


def test_single_read_takes_at_least_nbytes_over_bandwidth(tmp_path):
    path = tmp_path / "bw1.bin"
    _write(path, 2_000_000)
    with ByteReader(bandwidth=20e6) as r:
        t0 = time.perf_counter()
        r.read_range(path, 0, 1_000_000)
        assert time.perf_counter() - t0 >= 0.05
        r.reset_stats()
        assert r.stats().bytes_read == 0 and r.stats().reads == 0 and r.busy_seconds == 0


def test_an_emulated_disk_reads_through_the_page_cache(tmp_path):
    """With a bandwidth cap the pacer is the disk: no O_DIRECT and no dropped pages, so a host disk slower
    than the emulated one cannot cap the emulation; without one, reads bypass the page cache."""
    path = tmp_path / "emu.bin"
    data = _write(path, 4 * ALIGN, seed=5)
    with ByteReader(bandwidth=1e9) as r:
        assert not r.direct
        assert bytes(r.read_range(path, 100, 3000)) == data[100:3100]
        assert r.stats().direct_reads == 0
    with ByteReader() as r:
        assert r.direct == (store._O_DIRECT != 0)


def test_uncapped_reader_is_not_paced(tmp_path):
    path = tmp_path / "fast.bin"
    _write(path, 4_000_000)
    with ByteReader() as r:
        t0 = time.perf_counter()
        r.read_range(path, 0, 4_000_000)
        assert time.perf_counter() - t0 < 0.5  # far from the 4 s a 1 MB/s cap would give


class _PlainCheckpoint:
    """Blobs of level-ordered, 4096-aligned segments in one file per layer: the byte_range contract."""

    LEVELS = (2, 3, 4)

    def __init__(self, root: Path, layers: int = 2, experts: int = 3) -> None:
        self.blobs, self.entries = {}, {}
        rng = random.Random(4)
        for layer in range(layers):
            path = root / f"experts-{layer:04d}.bin"
            out = bytearray(ALIGN)  # a header page, so blobs do not start at 0
            for e in range(experts):
                start, ends = len(out), []
                for _level in self.LEVELS:
                    seg = rng.randbytes(rng.randrange(1, 3 * ALIGN))
                    seg += bytes(-len(seg) % ALIGN)
                    out += seg
                    ends.append(len(out) - start)
                self.blobs[layer, e] = bytes(out[start:])
                self.entries[layer, e] = (path, start, ends)
            path.write_bytes(out)

    def byte_range(self, layer, expert, have, want):
        path, start, ends = self.entries[layer, expert]
        lo = 0 if have is None else ends[self.LEVELS.index(have)]
        return path, start + lo, ends[self.LEVELS.index(want)] - lo

    def prefix(self, layer, expert, level):
        return self.blobs[layer, expert][: self.entries[layer, expert][2][self.LEVELS.index(level)]]


def test_expert_store_prefix_and_upgrade_segments(tmp_path):
    ckpt = _PlainCheckpoint(tmp_path)
    with ExpertStore(ckpt, io_threads=2) as store:
        for key in ckpt.entries:
            for lo, want in ((None, 2), (None, 3), (None, 4)):
                assert bytes(store.read(store.plan(*key, lo, want))) == ckpt.prefix(*key, want)
            base = bytes(store.submit(store.plan(*key, None, 2)).result())
            upgrade = store.plan(*key, 2, 4)
            up = bytes(store.submit(upgrade).result())
            assert base + up == ckpt.prefix(*key, 4)  # upgrade 2 -> 4 == direct read of 4
            assert upgrade.nbytes == len(up) and (upgrade.have, upgrade.want) == (2, 4)
        assert store.reads == len(ckpt.entries) * 5
        sizes = {lv: sum(len(ckpt.prefix(*k, lv)) for k in ckpt.entries) for lv in ckpt.LEVELS}
        assert store.bytes_read == sizes[2] + sizes[3] + 2 * sizes[4]  # reads of 2, 3, 4, then 2 + (2->4)


@pytest.fixture(scope="module")
def packed_mixtral(tiny_mixtral, tmp_path_factory):
    """The tiny Mixtral packed at levels 2,3,4 by the real `pack`."""
    from d2moe.quantize import MWQConfig
    from d2moe.quantize.convert.pack import pack_checkpoint
    from d2moe.quantize.format import open_checkpoint

    out = tmp_path_factory.mktemp("packed") / "mixtral-d2moe"
    pack_checkpoint(tiny_mixtral, out, MWQConfig(bits=(2, 3, 4)), progress=False)
    return open_checkpoint(out)


def test_expert_store_on_a_real_packed_checkpoint(packed_mixtral):
    ckpt = packed_mixtral
    bits = ckpt.cfg.bits
    with ExpertStore(ckpt, io_threads=3) as store:
        for layer, expert in ckpt.experts:
            direct = {lv: store.submit(store.plan(layer, expert, None, lv)) for lv in bits}
            for lv, fut in direct.items():
                assert bytes(fut.result()) == ckpt.read_prefix(layer, expert, lv)
            for have, want in itertools.combinations(bits, 2):  # upgrade segments == the direct read's tail
                up = store.read(store.plan(layer, expert, have, want))
                assert bytes(direct[have].result()) + bytes(up) == bytes(direct[want].result())
            # the bytes decode: level 2 from a level-4 read is the level-2 read's tensors
            lo = ckpt.decode_expert(layer, expert, bits[0], direct[bits[0]].result())
            lo = {m: t.to_mwq() for m, t in lo.items()}  # packed views -> MWQ tensors
            hi = ckpt.decode_expert(layer, expert, bits[0], direct[bits[-1]].result())
            hi = {m: t.to_mwq() for m, t in hi.items()}  # packed views -> MWQ tensors
            assert all(torch.equal(lo[m].planes, hi[m].planes) for m in lo)
        paths = {ckpt.byte_range(*k, None, bits[0])[0] for k in ckpt.experts}
        if all(_o_direct_supported(p) for p in paths):
            assert store.stats().direct_reads == store.reads


def test_buffer_pool_reuses_a_dropped_buffer_only_once_nothing_views_it(tmp_path):
    from d2moe.runtime.buffers import BufferPool

    path = tmp_path / "pool.bin"
    data = _write(path, 8 * ALIGN, seed=9)
    pool = BufferPool(limit=lambda: 2 * ALIGN)
    with ByteReader(pool=pool) as r:
        first = r.read_range(path, 0, 2 * ALIGN)
        buf = first.obj
        pool.recycle(first)
        viewer = torch.frombuffer(first, dtype=torch.uint8)  # a tensor still views it: not reusable
        del first
        second = r.read_range(path, 2 * ALIGN, 2 * ALIGN)
        assert second.obj is not buf and pool.reused == 0
        assert bytes(viewer[:16].numpy()) == data[:16]  # the viewed bytes were not overwritten
        del viewer
        assert pool.free_bytes == 2 * ALIGN
        third = r.read_range(path, 4 * ALIGN, 2 * ALIGN)  # same size, now unviewed: the same pages
        assert third.obj is buf and pool.reused == 1
        assert bytes(third) == data[4 * ALIGN: 6 * ALIGN] and bytes(second) == data[2 * ALIGN: 4 * ALIGN]
        assert pool.free_bytes == 0


@pytest.mark.parametrize("direct,bandwidth", [(True, None), (False, None), (False, 200e6)])
def test_streamed_reads_feed_their_chunks_in_order_while_reading(data_file, direct, bandwidth, monkeypatch):
    """read_range(progress=): the same bytes as a plain read; progress sees growing prefixes of the payload
    ending at the whole of it, each call after the one before, and its failure is the read's."""
    path, data = data_file
    monkeypatch.setattr(ByteReader, "STREAM_CHUNK", 2 * ALIGN)  # several chunks for a small file
    with ByteReader(direct=direct, bandwidth=bandwidth) as r:
        for offset, nbytes in [r_ for r_ in RANGES if r_[1] > 0]:
            seen = []

            def progress(view, landed, offset=offset, seen=seen):
                assert bytes(view[:landed]) == data[offset:offset + landed]  # landed bytes are final
                seen.append(landed)

            got = r.read_range(path, offset, nbytes, progress=progress)
            assert bytes(got) == data[offset:offset + nbytes]
            assert seen == sorted(seen) and seen[-1] == nbytes, (offset, nbytes, seen)
        assert r.stats().reads == len([x for x in RANGES if x[1] > 0])

        calls = []

        def failing(view, landed):
            calls.append(landed)
            if len(calls) == 2:
                raise FormatError("damaged")

        with pytest.raises(FormatError, match="damaged"):
            r.read_range(path, 0, 7 * ALIGN + 123, progress=failing)
        assert calls[:2] == sorted(calls[:2])


def test_streamed_read_of_a_truncated_file_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "short.bin"
    _write(path, 3 * ALIGN + 10)
    monkeypatch.setattr(ByteReader, "STREAM_CHUNK", ALIGN)
    with ByteReader() as r, pytest.raises(FormatError, match="short.bin is truncated"):
        r.read_range(path, ALIGN, 4 * ALIGN, progress=lambda view, landed: None)


def test_expert_store_streams_the_check_and_refuses_a_damaged_segment(packed_mixtral, tmp_path, monkeypatch):
    """submit(stream=): bytes equal the plain read's, the check is fed as chunks land, and a flipped bit
    in any segment fails the read with the checkpoint's crc error."""
    import shutil

    from d2moe.quantize import format as fmt

    ckpt = packed_mixtral
    monkeypatch.setattr(ByteReader, "STREAM_CHUNK", ALIGN)
    bits = ckpt.cfg.bits
    check = lambda r: ckpt.read_check(r.layer, r.expert, r.have, r.want)  # noqa: E731
    with ExpertStore(ckpt) as s:
        read = s.plan(0, 1, None, bits[-1])
        assert bytes(s.submit(read, stream=check).result()) == ckpt.read_prefix(0, 1, bits[-1])
    bad = tmp_path / "bad"
    shutil.copytree(ckpt.path, bad)
    damaged = fmt.open_checkpoint(bad)
    e = damaged.entry(0, 1)
    raw = bytearray((bad / e.file).read_bytes())
    raw[e.offset + damaged.level_nbytes(bits[0]) + 1] ^= 0x04  # inside the second segment
    (bad / e.file).write_bytes(bytes(raw))
    with ExpertStore(damaged) as s:
        read = s.plan(0, 1, None, bits[-1])
        fut = s.submit(read, stream=lambda r: damaged.read_check(r.layer, r.expert, r.have, r.want))
        with pytest.raises(FormatError, match=f"level-{bits[1]} segment fails its crc32"):
            fut.result()


def test_buffer_pool_resizes_a_free_buffer_to_the_size_asked_for(tmp_path):
    """Nested levels and upgrades read many sizes: a free buffer of another size is resized, not unmapped."""
    from d2moe.runtime.buffers import BufferPool

    path = tmp_path / "pool.bin"
    data = _write(path, 8 * ALIGN, seed=3)
    pool = BufferPool(limit=lambda: 8 * ALIGN)
    if not pool.enabled:
        pytest.skip("anonymous maps cannot be resized here")
    with ByteReader(pool=pool) as r:
        big, small = r.read_range(path, 0, 4 * ALIGN), r.read_range(path, 0, ALIGN)
        big_buf, small_buf = big.obj, small.obj
        pool.recycle(big)
        pool.recycle(small)
        del big, small
        mid = r.read_range(path, ALIGN, 2 * ALIGN)  # the smallest larger buffer, shrunk
        assert mid.obj is big_buf and len(big_buf) == 2 * ALIGN and bytes(mid) == data[ALIGN: 3 * ALIGN]
        grown = r.read_range(path, 0, 6 * ALIGN)  # only a smaller one is free: grown
        assert grown.obj is small_buf and len(small_buf) == 6 * ALIGN and bytes(grown) == data[: 6 * ALIGN]
        assert pool.reused == 2 and pool.free_bytes == 0


@pytest.mark.parametrize("direct", [True, False])
def test_an_aligned_read_lands_in_the_buffer_it_is_given(tmp_path, direct):
    """`into`: an aligned range is read straight into the given view (an entry's grown tail), streamed or not;
    an unaligned one ignores it and lands in a buffer of its own."""
    path = tmp_path / "d.bin"
    data = _write(path, 5 * ALIGN)
    target = anonymous_map(3 * ALIGN)
    seen = []
    with ByteReader(io_threads=1, direct=direct) as r:
        got = r.read_range(path, ALIGN, 2 * ALIGN, progress=lambda v, n: seen.append(n),
                           into=memoryview(target)[ALIGN:])
        assert got.obj is target and bytes(target[ALIGN:]) == data[ALIGN:3 * ALIGN] and seen[-1] == 2 * ALIGN
        got.release()
        other = r.read_range(path, 10, 2 * ALIGN, into=memoryview(target)[ALIGN:])
        assert other.obj is not target and bytes(other) == data[10:10 + 2 * ALIGN]
        assert bytes(target[ALIGN:]) == data[ALIGN:3 * ALIGN]
