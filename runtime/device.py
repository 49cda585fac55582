"""Experts on a CUDA device: the cache holds device buffers, reads land through pinned staging.

`--device cuda` keeps the same pipeline (HEBF order, nested upgrades, budget) and changes where
bytes live: a read (host bytes from the store's I/O threads) is copied into a free pinned staging
slot, then to a device buffer on a dedicated copy stream; an event recorded after that copy makes
the compute stream wait for it (`wait_event`: the host never blocks on the copy). The device
buffer is what the expert cache holds, counted at its size: level prefixes are multiples of 4096
bytes, so torch's allocator (512-byte blocks) adds nothing to what the budget counts; the run's
`cuda_peak_allocated_bytes` (torch.cuda.max_memory_allocated) is the cross-check.

A staging slot is reused only once the copy out of it has run (its event); with `io_threads + 1`
slots the host waits only if every slot is still being copied from, which `SlotRing` counts.

Kernel views of a device prefix come from the checkpoint's byte layout, which is the same for
every expert: the blob is decoded once per level from zeros on the host, and each view is rebased
onto the device buffer at the same byte offset (`device_views`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from d2moe.kernels.packed import PackedMatrix

DEVICES = ("cpu", "cuda")


def check_device(device: str) -> str:
    """'cpu' or 'cuda' (one clear line when CuPy or the GPU is missing); UsageError for others."""
    from d2moe.errors import UsageError

    if device not in DEVICES:
        raise UsageError(f"--device {device!r} is unknown: use cpu or cuda")
    if device == "cuda" and not emulated():
        from d2moe.kernels.cuda_build import require_cuda

        require_cuda()
    return device


def emulated() -> bool:
    """D2MOE_CUDA_EMULATE=1: the CUDA path's host code on CPU (tests), kernels emulated."""
    import os

    return os.environ.get("D2MOE_CUDA_EMULATE", "") == "1"


class SlotRing:
    """Which pinned staging slot a copy uses: round robin, reusing a slot only when `done(i)`; else
    waits on it (`wait(i)`), counted in `waits`."""

    def __init__(self, slots: int, done: Callable[[int], bool], wait: Callable[[int], None]) -> None:
        if slots < 1:
            raise ValueError("staging needs at least one slot")
        self.slots, self.done, self.wait = slots, done, wait
        self.next = 0
        self.waits = 0

    def acquire(self) -> int:
        for k in range(self.slots):
            i = (self.next + k) % self.slots
            if self.done(i):
                self.next = (i + 1) % self.slots
                return i
        i = self.next
        self.wait(i)
        self.waits += 1
        self.next = (i + 1) % self.slots
        return i


def staging_bytes(slots: int, expert_bytes: int) -> int:
    """Pinned host bytes for `slots` slots, each holding a full top-level prefix (the largest read)."""
    return slots * (-(-expert_bytes // 4096) * 4096)


def device_views(layout: dict[str, PackedMatrix], host_base: int, buf: torch.Tensor) -> dict[str, PackedMatrix]:
    """`layout`'s matrices (views into a host buffer starting at address `host_base`) as views into
    `buf` (any device) at the same byte offsets."""

    def move(t: torch.Tensor) -> torch.Tensor:
        off = t.data_ptr() - host_base
        n = t.numel() * t.element_size()
        return buf[off:off + n].view(t.dtype).view(t.shape)

    return {name: PackedMatrix(m.shape, m.cfg, m.level, move(m.scale), move(m.offset),
                               tuple(move(p) for p in m.planes), tuple(move(a) for a in m.alphas))
            for name, m in layout.items()}


class ExpertLayout:
    """Per level, the expert blob's views decoded once from zeros (host), rebased per device buffer."""

    def __init__(self, ckpt) -> None:
        self.ckpt = ckpt
        self._by_level: dict[int, tuple[torch.Tensor, dict[str, PackedMatrix]]] = {}

    def views(self, level: int, buf: torch.Tensor) -> dict[str, PackedMatrix]:
        if level not in self._by_level:
            from d2moe.quantize.format import decode_blob

            zeros = torch.zeros(self.ckpt.level_nbytes(level), dtype=torch.uint8)
            mats = decode_blob(memoryview(zeros.numpy()), self.ckpt.layout, self.ckpt.cfg, level,
                               self.ckpt.matrix_shapes)
            self._by_level[level] = (zeros, mats)
        zeros, mats = self._by_level[level]
        return device_views(mats, zeros.data_ptr(), buf)


class DeviceTransfer:
    """Host bytes -> device buffer through pinned slots and a copy stream (see the module docstring)."""

    def __init__(self, device: str | torch.device, slots: int, slot_bytes: int) -> None:
        self.device = torch.device(device)
        self.slot_bytes = -(-slot_bytes // 4096) * 4096
        self.pinned = [torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(slots)]
        self.events: list[torch.cuda.Event | None] = [None] * slots
        self.stream = torch.cuda.Stream(self.device)
        self.ring = SlotRing(slots, lambda i: self.events[i] is None or self.events[i].query(),
                             lambda i: self.events[i].synchronize())
        self.bytes_copied = 0

    @property
    def host_bytes(self) -> int:
        return len(self.pinned) * self.slot_bytes

    def to_device(self, data) -> torch.Tensor:
        """A device uint8 buffer with `data`'s bytes; the current (compute) stream waits for the copy."""
        src = torch.frombuffer(memoryview(data).cast("B"), dtype=torch.uint8)
        n = src.numel()
        compute = torch.cuda.current_stream(self.device)
        out = torch.empty(n, dtype=torch.uint8, device=self.device)  # allocated on the compute stream
        self.stream.wait_stream(compute)  # `out` may reuse memory the compute stream just freed
        for lo in range(0, n, self.slot_bytes):  # a read larger than a slot goes in pieces
            hi = min(n, lo + self.slot_bytes)
            i = self.ring.acquire()
            self.pinned[i][: hi - lo].copy_(src[lo:hi])
            with torch.cuda.stream(self.stream):
                out[lo:hi].copy_(self.pinned[i][: hi - lo], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.stream)
            self.events[i] = ev
        done = torch.cuda.Event()
        done.record(self.stream)
        compute.wait_event(done)
        self.bytes_copied += n
        return out


class EmulatedTransfer:
    """`DeviceTransfer`'s interface with the "device" being host memory (D2MOE_CUDA_EMULATE=1): the
    cache then holds torch buffers and the kernels read rebased views, exactly as on a GPU."""

    device = torch.device("cpu")
    host_bytes = 0

    def __init__(self) -> None:
        self.bytes_copied = 0

    def to_device(self, data) -> torch.Tensor:
        out = torch.frombuffer(bytearray(memoryview(data).cast("B")), dtype=torch.uint8)
        self.bytes_copied += out.numel()
        return out
