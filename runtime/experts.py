"""The offloaded experts module and the per-layer-step I/O-compute pipeline behind it.

`OffloadedExperts` replaces a MoE block's experts module with the same call,
`experts(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]`; the model's own
router stays. Each call is one layer step of the shared `ExpertPipeline`:

1. the level selector gives a level per (token, selected expert) pair (dual routing);
2. pairs group into work items: one per expert at the highest level it is needed at (an expert
   needed at 2 and 4 bits is read once at 4 and computed at both levels from the same nested
   bytes), or, without nested reuse (matryoshka-free), one per (expert, level) copy;
3. the cache says which items are resident; a lower level held is upgraded by reading only the
   extra segments (bit-aware), a missing one is read as one aligned prefix;
4. loads are issued in the policy's order (HEBF: hottest expert first, lowest level first;
   Johnson's rule; or expert id) through the store's I/O threads, at most `window` in flight;
   each read first reserves its room in the cache (evicting there and then), so bytes in flight
   are counted where they will land; only a read the cache cannot make room for (everything
   pinned) goes through staging, bounded by `staging_limit`; resident items compute while they
   load; each landed item is cached (or, when the cache is full of pinned work, computed and
   dropped) and computed;
5. outputs are summed in expert order, so results do not depend on what was resident.

Compute runs on the packed bytes where they sit (d2moe.runtime.expert_compute): never an fp32
copy of a whole matrix. The kernels' result depends only on the bytes and the tokens, so outputs
do not depend on the budget.

Shape letters: T = tokens, H = hidden, K = experts per token, N = pairs routed to one expert.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from d2moe.kernels.dispatch import ExpertKernels
from d2moe.quantize.format import PackedCheckpoint
from d2moe.runtime.cache import ExpertCache
from d2moe.runtime.expert_compute import ExpertCompute, relayout
from d2moe.runtime.held_bytes import concat
from d2moe.runtime.policies import LevelSelector, PolicySpec
from d2moe.runtime.scheduler import CostModel, Job, hebf_order, johnson_order
from d2moe.runtime.store import Read, ReadSource


@dataclass
class Work:
    """One expert's work in one layer step (one copy for matryoshka-free)."""

    key: tuple  # cache key: (layer, expert) nested, (layer, expert, level) per-level copies
    expert: int
    want: int  # level to hold (the highest level any of its pairs runs at)
    pairs: dict[int, tuple[torch.Tensor, torch.Tensor]]  # level -> (token rows [N], top-k slots [N])
    have: int | None = None  # level held in the cache at lookup
    tokens: int = 0
    origin: int | None = None  # the selected expert this work stands in for (--on-miss substitute)
    read_to: int | None = None  # read beyond `want` up to this level (fetch-ahead into free cache room)
    read: Read | None = None  # the planned read (ExpertPipeline.plan_read): one descriptor per work item

    @property
    def resident(self) -> bool:
        return self.have is not None and self.have >= self.want


@dataclass
class PipelineStats:
    """Counters over a run (reset with `ExpertPipeline.reset_stats`)."""

    steps: int = 0  # layer steps
    makespan_s: float = 0.0  # sum of measured wall time of layer steps (expert part)
    load_s: float = 0.0  # sum of I/O-busy seconds during layer steps
    compute_s: float = 0.0  # sum of measured expert compute seconds (kernels and their per-expert calls)
    load_wait_s: float = 0.0  # sum of seconds the compute thread waited for a read to land
    bound_s: float = 0.0  # sum over steps of max(load, compute): what perfect overlap would take
    loads: int = 0  # reads issued (prefix or upgrade)
    upgrade_loads: int = 0  # of which upgrades (only the extra segments read)
    dropped: int = 0  # loaded items that did not fit the cache (computed and dropped)
    staged_loads: int = 0  # reads the cache could not reserve room for (through staging)
    preloads: int = 0  # predictive reads issued ahead of their layer
    fetch_ahead: int = 0  # reads taken up to the top level into free cache room (reuse-aware)
    pairs_per_level: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # (token, expert) pairs

    @property
    def schedule_efficiency(self) -> float:
        """max(Σload, Σcompute) / makespan summed over steps; 1.0 = I/O and compute fully overlapped."""
        return self.bound_s / self.makespan_s if self.makespan_s > 0 else 1.0


class ExpertPipeline:
    """Everything the offloaded experts of one model share: store, cache, levels, order, stats."""

    def __init__(
        self,
        ckpt: PackedCheckpoint,
        store: ReadSource,
        cache: ExpertCache,
        selector: LevelSelector,
        spec: PolicySpec,
        act_fn: Callable[[torch.Tensor], torch.Tensor] = F.silu,
        window: int | None = None,
        routers: dict[int, torch.Tensor] | None = None,
        top_k: int = 2,
        on_memory: Callable[[], None] | None = None,
        kernels: ExpertKernels | None = None,
        transfer=None,
        exact: bool = False,
        miss=None,
        staging_limit: int | None = None,
    ) -> None:
        self.ckpt = ckpt
        self.store = store
        self.cache = cache
        self.selector = selector
        self.spec = spec
        self.window = max(1, window or 4)  # loads in flight at once
        # bytes of reads the cache could not reserve room for (the memory plan's staging; None: unbounded)
        self.staging_limit = staging_limit
        self.routers = routers or {}  # layer -> router weight [E, H] (predictive preload)
        self.top_k = top_k
        self.on_memory = on_memory  # called where held memory peaks (the session samples its meter)
        kernels = kernels or ExpertKernels()
        kernels.on_workspace = on_memory
        self.moe_layers = list(ckpt.moe_layers)
        self.cost = CostModel()
        self.stats = PipelineStats()
        self.miss = miss  # d2moe.runtime.miss.MissHandler: what a low-importance miss does (None: load)
        if miss is not None and miss.demotes and spec.nested_reuse and transfer is None \
                and isinstance(ckpt, PackedCheckpoint):
            # --on-miss reuse: keep experts at the lowest level rather than read them again (nesting: a prefix)
            cache.demote_first(ckpt.cfg.bits[0], lambda key, level: store.plan(key[0], key[1], None, level).nbytes,
                               order=miss.use.get)
        self._pending: dict[tuple, tuple[Future, Read, int]] = {}  # preload key -> (future, its read, reserved)
        self.staging_bytes = 0  # read outside the cache's reservations: in flight, or computing after a dropped put
        self.landing_bytes = 0  # reads in flight into room the cache reserved for them
        self.warming = False  # start-up warm-up (Session): steps return zeros and touch nothing
        # --device cuda: landed bytes go to device buffers (d2moe.runtime.device); None keeps host bytes
        self.transfer = transfer
        layout = None
        if transfer is not None:
            from d2moe.runtime.device import ExpertLayout

            layout = ExpertLayout(ckpt)
        # exact: the lossless tier computes as transformers does (rows in its order, no float32 cast)
        self.compute = ExpertCompute(ckpt, cache, kernels, act_fn, self.cost, exact=exact, layout=layout)

    @property
    def top_level(self) -> int:
        """The highest level a pair can want: the selector's (a uniform --level 4 of a 2,4,8 pack never computes
        8 bits), read ahead and held up front no higher."""
        return min(self.ckpt.cfg.bk, self.selector.top)

    # ---- keys and bytes ----------------------------------------------------------------
    def key(self, layer: int, expert: int, level: int) -> tuple:
        return (layer, expert) if self.spec.nested_reuse else (layer, expert, level)

    def read_span(self, work: Work) -> tuple[int | None, int]:
        """(have, want) of the read a work needs: only the extra segments when nested reuse allows it."""
        have = work.have if (self.spec.nested_reuse and work.have is not None) else None
        return have, max(work.want, work.read_to or 0)

    def plan_read(self, layer: int, w: Work) -> Read:
        """The work's read, planned once and re-planned only if its span changed (miss handling, fetch-ahead)."""
        have, want = self.read_span(w)
        if w.read is None or (w.read.have, w.read.want) != (have, want):
            w.read = self.store.plan(layer, w.expert, have, want)
        return w.read

    def reset_stats(self) -> None:
        self.stats = PipelineStats()

    # ---- the layer step ----------------------------------------------------------------
    def step(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], top_k_index [T, K], top_k_weights [T, K] -> expert output [T, H]."""
        if self.warming:  # the model's own code runs; no levels, reads, cache entries or stats
            return torch.zeros_like(hidden)
        start = time.perf_counter()
        io_before = self.store.stats().busy_seconds
        self._land_preloads(layer)
        levels = self.selector.select(layer, hidden, top_k_index, top_k_weights)  # [T, K]
        works = self._group(layer, top_k_index, levels)
        for w in works:
            w.have = self.cache.lookup(w.key, w.want)
            self.cache.record_use(w.key, w.tokens)
        if self.miss is not None:
            works, top_k_weights = self.miss.handle(self, layer, works, top_k_weights, levels)
        if self.spec.fetch_ahead:
            self._fetch_ahead(layer, works)
        results: dict[tuple, tuple] = {}  # (expert, level) -> (rows [N], weighted output [N, H])
        compute_s = 0.0
        with self.cache.pinned_keys([w.key for w in works]):
            order = self._order(layer, works)
            resident = [w for w in works if w.resident]
            compute_s += self._load_and_compute(layer, order, resident, hidden, top_k_weights, results)
        out = torch.zeros_like(hidden)
        one_token = hidden.shape[0] == 1  # decode of one sequence: every result is row 0, and += is index_add_'s sum
        for key in sorted(results):  # fixed summation order: output independent of residency
            rows, y = results[key]
            if one_token:
                out += y.to(out.dtype)
            else:
                out.index_add_(0, rows.to(out.device), y.to(out.dtype))
        self.cache.step()
        makespan = time.perf_counter() - start
        load_s = self.store.stats().busy_seconds - io_before
        s = self.stats
        s.steps += 1
        s.makespan_s += makespan
        s.load_s += load_s
        s.compute_s += compute_s
        s.bound_s += max(load_s, compute_s)
        for w in works:
            for level, (rows, _) in w.pairs.items():
                s.pairs_per_level[level] += len(rows)
        return out

    def _group(self, layer: int, top_k_index: torch.Tensor, levels: torch.Tensor) -> list[Work]:
        """Pairs -> work items, in expert id order (plain Python: a decode step has a handful of
        pairs, where per-expert tensor ops cost more than the kernels of a small expert)."""
        pairs: dict[tuple[int, int], tuple[list[int], list[int]]] = {}  # (expert, level) -> (rows, slots)
        for row, (experts, lvs) in enumerate(zip(top_k_index.tolist(), levels.tolist(), strict=True)):
            for slot, (expert, level) in enumerate(zip(experts, lvs, strict=True)):
                rows, slots = pairs.setdefault((expert, level), ([], []))
                rows.append(row)
                slots.append(slot)
        by_key: dict[tuple, Work] = {}
        for (expert, level), (rows, slots) in sorted(pairs.items()):
            key = self.key(layer, expert, level)
            w = by_key.get(key)
            if w is None:
                w = by_key[key] = Work(key, expert, level, {})
            w.pairs[level] = (_index(rows), _index(slots))
            w.want = max(w.want, level)
            w.tokens += len(rows)
        return list(by_key.values())

    def _order(self, layer: int, works: list[Work]) -> list[Work]:
        """The order in which missing works are read."""
        missing = [w for w in works if not w.resident]
        if self.spec.order == "id":
            return sorted(missing, key=lambda w: (w.expert, w.want))
        jobs = []
        for i, w in enumerate(missing):
            load = self.cost.load_seconds(self.plan_read(layer, w).nbytes)
            compute = self.cost.compute_seconds(0, 0.0, self.compute.kernel_work(w))
            jobs.append(Job(i, w.want, w.tokens, load, compute, False))
        ordered = hebf_order(jobs) if self.spec.order == "hebf" else johnson_order(jobs)
        return [missing[j.key] for j in ordered]

    def _fetch_ahead(self, layer: int, works: list[Work]) -> None:
        """Reuse-aware reads: while the cache has free room for every read of this step, missing experts
        (hottest first) are read up to top_level, so a later pair wanting more bits hits instead of paying another
        read. Computes at the levels the pairs want: the output does not change."""
        top = self.top_level
        missing = [w for w in works if not w.resident and self.spec.nested_reuse]
        room = self.cache.free_bytes - sum(self.plan_read(layer, w).nbytes for w in missing)
        for w in sorted(missing, key=lambda w: (-w.tokens, w.expert)):
            read = self.plan_read(layer, w)
            if read.want >= top:
                continue
            extra = self.store.plan(layer, w.expert, read.have, top).nbytes - read.nbytes
            if extra <= room:
                w.read_to, room = top, room - extra
                self.stats.fetch_ahead += 1

    def _load_and_compute(self, layer, order: list[Work], resident: list[Work], hidden, top_k_weights, results) -> float:
        """Issue the reads of `order` (at most `window` in flight), compute the resident works while they load,
        then each read as it lands."""
        compute_s = 0.0
        in_flight: list[tuple[Work, Read, int, int, int, object, float]] = []  # work, read, reserved, staged, landing, …
        queue = list(order)

        def issue() -> None:
            while queue and len(in_flight) < self.window:
                read = self.plan_read(layer, queue[0])
                # an upgrade that lands in its entry's grown map holds only its own bytes: no read buffer, no join
                tail = self._open_tail(queue[0], read)
                if tail is not None and not self.cache.reserve(read.nbytes):
                    self.cache.close_tail(queue[0].key)
                    tail = None
                if tail is not None:
                    reserved, staged = read.nbytes, 0
                else:
                    cost = self.room_needed(read)
                    reserved = cost if self.cache.reserve(cost) else 0
                    staged = 0 if reserved else cost
                if staged and self.staging_limit is not None and self.staging_bytes + staged > self.staging_limit \
                        and (in_flight or self.staging_bytes):
                    return  # staging is full: wait for a read to land or a dropped item to finish
                w = queue.pop(0)
                # a tail's bytes are already in its entry's grown map, which the meter counts: not landing as well
                landing = 0 if tail is not None else reserved
                in_flight.append((w, read, reserved, staged, landing, self._submit(read, tail), time.perf_counter()))
                self._add_landing(landing)
                self._add_staging(staged)
                self.stats.loads += 1
                self.stats.upgrade_loads += int(read.have is not None)
                self.stats.staged_loads += int(bool(staged))

        issue()
        if self.spec.preload_next:  # behind this step's reads, with its experts pinned
            self._preload_next(layer, hidden)
        if self.compute.groups and len(resident) > 1:  # one launch or library call
            compute_s += self.compute.group(layer, resident, hidden, top_k_weights, results)
        else:
            for w in resident:
                compute_s += self.compute.one(layer, w, self.cache.get(w.key)[1], hidden, top_k_weights, results)
        while in_flight:
            w, read, reserved, staged, landing, fut, issued = in_flight.pop(0)
            t_wait = time.perf_counter()
            data = fut.result()
            self.stats.load_wait_s += time.perf_counter() - t_wait
            self.cost.observe_load(read.nbytes, time.perf_counter() - issued)
            data = self._on_device(data)
            self._add_landing(-landing)
            full, kept = self._install(w, read, data, reserved)
            if reserved and not kept:  # its room went back to the cache; the dropped bytes live until computed
                staged = reserved
                self._add_staging(staged)
            issue()  # keep the I/O threads busy while this one computes
            compute_s += self.compute.one(layer, w, full, hidden, top_k_weights, results)
            self._add_staging(-staged)
            issue()  # the staging room this item held
        return compute_s

    def room_needed(self, read: Read) -> int:
        """Bytes a read holds from issue until it is in the cache: its own, and for an upgrade also the joined
        copy of held prefix + extra that replaces the entry."""
        if read.have is None:
            return read.nbytes
        return 2 * read.nbytes + self.cache.entry_bytes(self.key(read.layer, read.expert, read.have))

    def _open_tail(self, w: Work, read: Read) -> memoryview | None:
        """For an upgrade read on the CPU's pool maps: the held entry grown in place by the read's bytes, its new
        tail for the read to land in (ExpertCache.open_tail); None otherwise."""
        if read.have is None or self.transfer is not None or self.cache.alloc is None \
                or not isinstance(self.ckpt, PackedCheckpoint):
            return None
        return self.cache.open_tail(w.key, read.nbytes)

    def _install(self, w: Work, read: Read, data, reserved: int = 0) -> tuple[memoryview | bytes, bool]:
        """Put landed bytes in the cache (extend an upgrade), handing back their reservation; return the full
        prefix up to the level read and whether the cache kept it."""
        have, level = read.have, read.want
        if have is None:
            if not self.cache.put(w.key, level, data, reserved=reserved):
                self.stats.dropped += 1
                return data, False
            return data, True
        _, held = self.cache.get(w.key)
        if self.cache.extend(w.key, level, data, reserved=reserved):
            return self.cache.get(w.key)[1], True
        self.stats.dropped += 1
        held = held[: self.cache.entry_bytes(w.key)]  # without a tail opened for this read (that is `data`)
        return concat(held, data, self.cache.alloc), False

    def _submit(self, read: Read, into: memoryview | None = None):
        """The read on an I/O thread, checked as its chunks land where the checkpoint can check a stream (a
        packed one), each tensor re-laid out for the CPU kernels right after the checksum read it (cache-hot:
        one pass over memory), else checked once it has landed. The cache holds nothing else."""
        if isinstance(self.ckpt, PackedCheckpoint):
            visit = relayout if self.compute.blocked else None
            return self.store.submit(read, stream=lambda r: self.ckpt.read_check(r.layer, r.expert, r.have, r.want, visit),
                                     into=into)
        return self.store.submit(read, self._checked)

    def _checked(self, read: Read, data):
        """Bytes just read by a store that cannot stream its check (the lossless tier's), on the I/O thread
        that read them: crc-checked (only the segments read)."""
        self.ckpt.verify_read(read.layer, read.expert, data, read.have, read.want)
        return data

    def _on_device(self, data):
        """Landed host bytes as the device buffer the cache holds (--device cuda), else unchanged."""
        return data if self.transfer is None else self.transfer.to_device(data)

    # ---- whole-model residency and prediction ------------------------------------------
    def hold_all(self, level: int) -> None:
        """Read every expert at `level` into the cache and pin it (Hold-in-Memory baselines)."""
        for layer in self.moe_layers:
            futures = [(e, self._submit(self.store.plan(layer, e, None, level)))
                       for e in range(self.ckpt.num_experts)]
            for e, fut in futures:
                key = self.key(layer, e, level)
                data = fut.result()
                if not self.cache.put(key, level, self._on_device(data)):
                    raise RuntimeError(f"expert cache cannot hold layer {layer} expert {e}: budget plan is wrong")
                self.cache.pin(key)

    def _preload_next(self, layer: int, hidden: torch.Tensor) -> None:
        """Predict the next MoE layer's experts with its router on this hidden state; read them ahead."""
        pos = self.moe_layers.index(layer)
        if pos + 1 >= len(self.moe_layers):
            return
        nxt = self.moe_layers[pos + 1]
        router = self.routers.get(nxt)
        if router is None:
            return
        logits = F.linear(hidden.to(router.dtype), router)  # [T, E]
        predicted = torch.unique(logits.topk(self.top_k, dim=-1).indices).tolist()
        expert_level = getattr(self.selector, "expert_level", None)
        for e in predicted:
            level = expert_level(nxt, e) if expert_level else None
            if level is None:
                continue  # level not known yet (still calibrating): nothing sensible to preload
            key = self.key(nxt, e, level)
            held = self.cache.peek(key)
            if key in self._pending or (held is not None and held >= level):
                continue
            read = self.store.plan(nxt, e, held if self.spec.nested_reuse else None, level)
            reserved = self.room_needed(read)
            if not self.cache.reserve(reserved):
                continue  # a guess is not worth staging room: the step reads it if it is needed
            self._pending[key] = (self._submit(read), read, reserved)
            self._add_landing(reserved)
            self.stats.preloads += 1

    def _land_preloads(self, layer: int) -> None:
        """Put this layer's finished (or finishing) preloads into the cache before looking up."""
        for key in [k for k, (_, read, _) in self._pending.items() if read.layer == layer]:
            fut, read, reserved = self._pending.pop(key)
            data = self._on_device(fut.result())
            self._add_landing(-reserved)
            if read.have is None:
                self.cache.put(key, read.want, data, reserved=reserved)
            elif self.cache.peek(key) == read.have:
                self.cache.extend(key, read.want, data, reserved=reserved)
            else:  # the prefix it extends was evicted meanwhile: drop it
                self.cache.unreserve(reserved)

    def drain(self) -> None:
        """Wait for outstanding preloads (end of a request)."""
        for fut, _, reserved in self._pending.values():
            fut.result()
            self._add_landing(-reserved)
            self.cache.unreserve(reserved)
        self._pending.clear()

    def _add_landing(self, nbytes: int) -> None:
        """Bytes in flight into room the cache reserved, for the memory meter."""
        self.landing_bytes += nbytes
        if self.on_memory and nbytes > 0:
            self.on_memory()

    def _add_staging(self, nbytes: int) -> None:
        """Bytes read but not yet in the cache (in flight or being installed), for the memory meter."""
        self.staging_bytes += nbytes
        if self.on_memory and nbytes > 0:
            self.on_memory()


_ONE_INDEX: dict[int, torch.Tensor] = {}


def _index(values: list[int]) -> torch.Tensor:
    """An index tensor of rows or slots; one-element ones (every pair of a one-token decode step) are built once
    and shared: indices are only read, never written."""
    if len(values) != 1:
        return torch.tensor(values)
    t = _ONE_INDEX.get(values[0])
    if t is None:
        t = _ONE_INDEX[values[0]] = torch.tensor(values)
    return t


class OffloadedExperts(nn.Module):
    """Drop-in for a MoE block's experts module; the weights live in the pipeline's store/cache."""

    def __init__(self, layer: int, pipeline: ExpertPipeline | None = None) -> None:
        """`pipeline` may come later (`bind`): the model is assembled before the pipeline that needs its routers."""
        super().__init__()
        self.layer = layer
        self.pipeline = pipeline

    def bind(self, pipeline: ExpertPipeline) -> None:
        self.pipeline = pipeline

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return self.pipeline.step(self.layer, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, policy={self.pipeline.spec.name}"
