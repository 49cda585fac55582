"""The compute half of a layer step: a work item's expert run from the bytes the cache holds.

`ExpertCompute` runs each work item (d2moe.runtime.experts.Work) at every level its pairs need, from one
held prefix (nesting: level b is the first bytes of the blob), through d2moe.kernels.dispatch.ExpertKernels:
the expert's matrices are views into the held bytes, described once per cache entry (the description
rides on the entry as its attachment and goes with it), never an fp32 copy of a whole matrix. Results go
into the step's `results` dict under `result_key`, so the step sums them in a fixed order.

It owns no I/O and no cache policy: the pipeline (d2moe.runtime.experts) decides what is read and when.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import torch

from d2moe.kernels import cpu
from d2moe.quantize.format import PackedCheckpoint
from d2moe.runtime.scheduler import CostModel


def relayout(slot, tensor) -> None:
    """One checked blob tensor to the CPU kernels' ready layout, in place (planes and per-group parameters)."""
    if slot.name == "planes":
        cpu.block_planes(tensor)
    else:
        cpu.block_params(tensor)


def result_key(w, level: int) -> tuple[int, int, int]:
    """Summation key: expert, level, then the expert a substitute stands in for (-1: itself)."""
    return (w.expert, level, -1 if w.origin is None else w.origin)


class ExpertCompute:
    """Runs work items from held bytes and teaches the cost model each one's time."""

    def __init__(self, ckpt, cache, kernels, act_fn: Callable[[torch.Tensor], torch.Tensor], cost: CostModel,
                 exact: bool = False, layout=None) -> None:
        self.ckpt = ckpt
        self.cache = cache
        self.kernels = kernels
        self.act_fn = act_fn
        self.cost = cost
        self.exact = exact  # lossless tier: compute as transformers does (rows in its order, no float32 cast)
        self.layout = layout  # --device cuda: d2moe.runtime.device.ExpertLayout (None: host bytes)
        self.weight_elems = sum(o * i for o, i in ckpt.matrix_shapes.values())
        # CPU kernels that read planes faster in their blocked layout get every landed byte re-laid out in
        # place (crc checked first); the cache then holds only blocked planes
        self.blocked = (layout is None and getattr(kernels, "lib", None) is not None
                        and isinstance(ckpt, PackedCheckpoint)
                        and cpu.blocks_planes(ckpt.cfg.group_size, tuple(c for _, c in ckpt.matrix_shapes.values())))

    @property
    def groups(self) -> bool:
        """Whether several resident works go to the kernels in one call (forward_group)."""
        return getattr(self.kernels, "grouped", False) and not self.exact

    def kernel_work(self, w) -> float:
        """Relative kernel cost of a work item: every weight once per plane read (+ a fixed share),
        per 8 tokens, at each level it runs (a shape of the cost, not a count: the cost model learns the rate)."""
        return float(sum(self.weight_elems * (level + 4) * -(-len(rows) // 8) for level, (rows, _) in w.pairs.items()))

    def one(self, layer: int, w, data, hidden, top_k_weights, results) -> float:
        """Run the expert at each level its pairs need, from the held prefix `data`. Bytes were crc-checked
        when they were read. Returns the seconds it took."""
        t0 = time.perf_counter()
        prepared = self._prepared(layer, w, data)
        for level, (rows, slots) in sorted(w.pairs.items()):
            if self.exact:  # transformers' order: by top-k slot, then token; its dtypes
                order = torch.argsort(slots * (int(rows.max()) + 1) + rows)
                rows, slots = rows[order], slots[order]
            x = hidden[rows] if self.exact else hidden[rows].to(torch.float32)  # [N, H]
            y = self.kernels.forward(prepared(level), x, self.act_fn)  # [N, H]
            weight = top_k_weights[rows, slots, None]
            results[result_key(w, level)] = (rows, y * (weight if self.exact else weight.to(torch.float32)))
        self.kernels.release()
        seconds = time.perf_counter() - t0
        self.cost.observe_compute(self.kernel_work(w), seconds)
        return seconds

    def group(self, layer: int, works: list, hidden, top_k_weights, results) -> float:
        """Resident works at all their levels in one grouped kernel call (kernels.forward_group)."""
        t0 = time.perf_counter()
        calls, where = [], []
        # one token (decode of one sequence): every pair reads row 0, so x is converted once and each pair's
        # router weight is a scalar (the same float32 product as the [N, 1] weight column)
        one = hidden.to(torch.float32) if hidden.shape[0] == 1 else None
        weights = top_k_weights[0].tolist() if one is not None else None
        for w in works:
            prepared = self._prepared(layer, w, self.cache.get(w.key)[1])
            for level, (rows, slots) in sorted(w.pairs.items()):
                calls.append((prepared(level), one if one is not None else hidden[rows].to(torch.float32)))
                where.append((w, level, rows, slots))
        ys = self.kernels.forward_group(calls, self.act_fn)
        for (w, level, rows, slots), y in zip(where, ys, strict=True):
            weight = weights[int(slots)] if one is not None else top_k_weights[rows, slots, None].to(torch.float32)
            results[result_key(w, level)] = (rows, y * weight)
        self.kernels.release()
        seconds = time.perf_counter() - t0
        for w in works:  # the cost model learns a rate per unit of work: share the launch's time
            self.cost.observe_compute(self.kernel_work(w), seconds / len(works))
        return seconds

    def _prepared(self, layer: int, w, data) -> Callable:
        """level -> the kernels' description of the expert at that level, kept on the cache entry
        while it holds these very bytes (described once, not every step)."""
        held = self.cache.peek(w.key)
        entry_data = self.cache.get(w.key)[1] if held is not None and held >= w.want else None
        cached = self.cache.attachment(w.key) if entry_data is data else None
        if cached is not None:
            by_level = cached
        else:
            level = held if entry_data is data else w.want  # describe everything the bytes hold
            if self.layout is not None:  # a device buffer: the blob's views rebased onto it
                by_level = {"mats": self.layout.views(level, data)}
            else:
                prefix = memoryview(data)[: self.ckpt.level_nbytes(level)]
                mats = self.ckpt.decode_expert(layer, w.expert, level, prefix, verify=False)
                by_level = {"mats": {k: replace(m, blocked=True) for k, m in mats.items()} if self.blocked else mats}
            if entry_data is data:
                self.cache.attach(w.key, by_level)

        def get(level: int):
            p = by_level.get(level)
            if p is None:
                p = by_level[level] = self.kernels.prepare(by_level["mats"], level)
            return p

        return get
