"""What a layer step does with an expert that misses the cache (`--on-miss`).

A policy axis shared by every policy. After the cache lookup, a work item (one expert's pairs in a
layer step, d2moe.runtime.experts.Work) that is not resident at the level it wants is *handled* when
every one of its (token, expert) pairs is unimportant; otherwise it is loaded as always. A pair is
unimportant when it is not its token's top-1 pair (that one is always served) and its importance is
below `threshold`:
- importance "weight": the pair's share of its token's routed weight (top_k_weights over their sum): the same as
  the router's weight where the top-k weights sum to 1, and on the same [0, 1] scale where they do not
  (DeepSeek-V3 scales them by routed_scaling_factor, 2.5: no raw weight was below any threshold; OLMoE and
  Qwen2-MoE leave them unnormalised, summing below 1);
- importance "gate": the level the selector gave the pair, scaled to [0, 1] (lowest packed level 0,
  highest 1): what the bit-width gate (or the router-weight rule) thought the pair deserves.

Modes:
- `load`: read it (the default; the memory budget never changes the output).
- `lowbit` (HOBBIT-style): compute at a lower level instead: the level already held when the expert
  is resident below what it wants (no read at all), else read the lowest packed level.
- `substitute` (importance-driven scheduling, seed 002): compute the pairs with the most similar
  expert of the same layer that is resident, at the level it is held at (no read). Similarity comes
  from the checkpoint (`d2moe pack` stores each expert's nearest neighbours, d2moe.quantize.similarity).
  When no neighbour is resident (or the checkpoint has no similarity), the expert is loaded.
- `skip`: drop the pairs and renormalise: the token's other pairs are scaled so its router weights
  keep their sum.
- `reuse`: levels follow the cache (issue 12's reuse-aware level choice; nesting makes it cheap). A work
  whose expert is held below the level it wants runs at the held level, unless one of its pairs is
  critical (importance > 1 - threshold: it carries most of its token's output and gets its bits), when
  reading the upgrade would need room the cache does not have free, unless the expert has earned its
  top levels: the upgrade goes ahead when cutting experts used less than half as much (`SlowUse`, a use
  count over many steps) frees the room. Room is made by cutting experts down to the lowest level before
  any is evicted (`ExpertCache.demote_first`), so a budget that holds every expert at the lowest level
  stops reading: the level mix, not the expert set, gives way. Absent experts of low importance are
  substituted as in `substitute`; important ones are loaded.
In every lossy mode an expert held below the wanted level is computed at the held level (no read)
rather than substituted or skipped when all its pairs are of low importance. The lossy modes change the output, and the output then depends
on what the budget lets the cache hold.

`MissStats` counts pairs and works handled each way and the bytes the handled works did not read
(the read `load` would have issued at that point, minus what was read instead).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from d2moe.errors import UsageError

MISS_MODES = ("load", "lowbit", "substitute", "skip", "reuse")
IMPORTANCE = ("weight", "gate")
DEFAULT_THRESHOLD = 0.35
UPGRADE_HYSTERESIS = 2.0  # reuse: an upgrade cuts only experts with less than 1/this of its slow use count
USE_HALF_LIFE = 64  # reuse: steps of its layer over which an expert's use count halves


class SlowUse:
    """Per-expert use decayed over many steps of its layer: the slow signal that decides which experts are
    held at their top levels (the cache's own score decays fast: it picks victims of the moment)."""

    def __init__(self, half_life: float = USE_HALF_LIFE) -> None:
        self.decay = 0.5 ** (1.0 / half_life)
        self._steps: dict = defaultdict(int)  # layer -> its steps so far
        self._use: dict = {}  # key -> (count, the layer step it was last brought up to)

    def step(self, layer: int, uses: list) -> None:
        """One step of `layer`: each (key, tokens) in `uses` was used by that many tokens."""
        self._steps[layer] += 1
        for key, tokens in uses:
            self._use[key] = (self.get(key) + tokens, self._steps[layer])

    def get(self, key) -> float:
        count, at = self._use.get(key, (0.0, 0))
        layer = key[0] if isinstance(key, tuple) else key
        return count * self.decay ** (self._steps[layer] - at)


@dataclass(frozen=True)
class MissOptions:
    """`--on-miss MODE --miss-threshold T --miss-importance weight|gate`."""

    mode: str = "load"
    threshold: float = DEFAULT_THRESHOLD
    importance: str = "weight"

    def __post_init__(self) -> None:
        if self.mode not in MISS_MODES:
            raise UsageError(f"--on-miss {self.mode!r} is unknown: use one of {', '.join(MISS_MODES)}")
        if self.importance not in IMPORTANCE:
            raise UsageError(f"--miss-importance {self.importance!r} is unknown: use one of {', '.join(IMPORTANCE)}")
        if not 0.0 <= self.threshold <= 1.0:
            raise UsageError(f"--miss-threshold {self.threshold} must be in [0, 1]")


@dataclass
class MissStats:
    """Misses of low-importance works and what was done with them."""

    pairs: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # mode -> (token, expert) pairs
    works: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # mode -> work items
    bytes_saved: int = 0
    fallback_loads: int = 0  # substitute found no resident neighbour: loaded

    def to_dict(self) -> dict:
        return {"pairs": dict(sorted(self.pairs.items())), "works": dict(sorted(self.works.items())),
                "bytes_saved": self.bytes_saved, "fallback_loads": self.fallback_loads}


def parse_similarity(neighbors) -> dict[int, list[list[int]]]:
    """The manifest's similarity section -> {layer: [[neighbour ids, most similar first] per expert]}."""
    if not neighbors:
        return {}
    return {int(layer): [[int(n) for n, _ in row] for row in rows] for layer, rows in neighbors["neighbors"].items()}


class MissHandler:
    """Applies `MissOptions` to a layer step's works (called by ExpertPipeline.step after lookups)."""

    def __init__(self, options: MissOptions, bits, neighbors: dict[int, list[list[int]]] | None = None) -> None:
        self.options = options
        self.bits = tuple(int(b) for b in bits)
        self.neighbors = neighbors or {}
        self.stats = MissStats()
        self.use = SlowUse()  # reuse: which experts earn their top levels
        if options.mode == "substitute" and not self.neighbors:  # a note, not a Python warning with its source line
            from d2moe.progress import note

            note("--on-miss substitute: this checkpoint has no expert similarity (packed with --no-similarity "
                 "or by an older d2moe; re-pack without --no-similarity): every miss is loaded")

    @property
    def demotes(self) -> bool:
        """Whether the cache should cut experts down to the lowest level before evicting them (`reuse`)."""
        return self.options.mode == "reuse"

    def reset_stats(self) -> None:
        self.stats = MissStats()

    # ---- importance ------------------------------------------------------------------------
    def importance(self, top_k_weights: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """[T, K] float in [0, 1]: the pair's share of its token's routed weight, or the selector's level scaled to
        [0, 1]."""
        if self.options.importance == "weight":
            w = top_k_weights.float().cpu()
            return w / w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        lo, hi = self.bits[0], self.bits[-1]
        return (levels.float().cpu() - lo) / max(1, hi - lo)

    def unimportant(self, top_k_weights: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """[T, K] bool: pairs a miss may be handled for (never a token's top-1 pair)."""
        low = self.importance(top_k_weights, levels) < self.options.threshold
        top1 = top_k_weights.float().cpu().argmax(dim=-1, keepdim=True)
        return low.scatter(1, top1, False)

    def critical(self, top_k_weights: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """[T, K] bool: pairs `reuse` never runs below the level they want, importance > 1 - threshold (the
        mirror of unimportant's bar: a pair that carries most of its token's output gets its bits; threshold 0
        makes none critical, as it makes none unimportant)."""
        return self.importance(top_k_weights, levels) > 1.0 - self.options.threshold

    # ---- the step ----------------------------------------------------------------------------
    def handle(self, pipeline, layer: int, works: list, top_k_weights: torch.Tensor, levels: torch.Tensor):
        """(works to run, top_k_weights to use): handled works changed in place, skipped ones removed."""
        if self.options.mode == "load":
            return works, top_k_weights
        low = self.unimportant(top_k_weights, levels)
        critical = None
        if self.options.mode == "reuse":
            self.use.step(layer, [(w.key, w.tokens) for w in works])
            critical = self.critical(top_k_weights, levels)
        keep, skipped = [], []
        for w in works:
            if w.resident:
                keep.append(w)
                continue
            important = not _all(low, w)
            if important and not (critical is not None and not _any(critical, w)
                                  and self._run_held(pipeline, layer, w, works)):
                keep.append(w)
                continue
            would_read = pipeline.plan_read(layer, w).nbytes
            held = self._held_below(pipeline, layer, w)
            if held is not None:
                self._retarget(pipeline, layer, w, w.expert, held)
                self._count("reuse" if self.options.mode == "reuse" else "lowbit", w, would_read)
            elif self.options.mode == "lowbit":
                self._retarget(pipeline, layer, w, w.expert, self.bits[0])
                self._count("lowbit", w, would_read - pipeline.plan_read(layer, w).nbytes)
            elif self.options.mode in ("substitute", "reuse"):
                sub = self._substitute(pipeline, layer, w.expert)
                if sub is None:
                    self.stats.fallback_loads += 1
                    self._count("load", w, 0)
                else:
                    self._retarget(pipeline, layer, w, *sub)
                    self._count("substitute", w, would_read)
            else:  # skip
                skipped.append(w)
                self._count("skip", w, would_read)
                continue
            keep.append(w)
        if skipped:
            top_k_weights = self._renormalise(top_k_weights, skipped)
        return keep, top_k_weights

    def _count(self, mode: str, w, saved: int) -> None:
        self.stats.pairs[mode] += sum(len(rows) for rows, _ in w.pairs.values())
        self.stats.works[mode] += 1
        self.stats.bytes_saved += max(0, int(saved))

    def _run_held(self, pipeline, layer: int, w, works: list) -> bool:
        """`reuse` for an important work: whether it runs at the level held (then the caller handles it) rather
        than read an upgrade that needs room the cache does not have free and that the expert has not earned."""
        if self._held_below(pipeline, layer, w) is None:
            return False
        room = pipeline.room_needed(pipeline.plan_read(layer, w)) - pipeline.cache.free_bytes
        return room > 0 and not self._upgrade_pays(pipeline.cache, w, room, works)

    def _upgrade_pays(self, cache, w, room: int, works: list) -> bool:
        """Whether cutting experts clearly less used than `w`'s (UPGRADE_HYSTERESIS times, by the slow use
        count) frees the `room` its upgrade lacks: a hot expert earns its top levels from cold ones, and experts
        of about equal use (uniform routing) do not trade the same bytes back and forth."""
        bar = self.use.get(w.key) / UPGRADE_HYSTERESIS
        return cache.demotable_bytes(lambda key: self.use.get(key) < bar, exclude=[x.key for x in works]) >= room

    def _held_below(self, pipeline, layer: int, w) -> int | None:
        """The highest level of this expert held in the cache below what the work wants, if any."""
        if pipeline.spec.nested_reuse:
            return w.have
        for level in sorted((b for b in self.bits if b < w.want), reverse=True):
            if pipeline.cache.peek(pipeline.key(layer, w.expert, level)) is not None:
                return level
        return None

    def _substitute(self, pipeline, layer: int, expert: int) -> tuple[int, int] | None:
        """(expert, level) of the most similar resident expert of the layer, or None."""
        rows = self.neighbors.get(layer)
        if not rows or expert >= len(rows):
            return None
        for other in rows[expert]:
            level = self._resident_level(pipeline, layer, other)
            if level is not None:
                return other, level
        return None

    def _resident_level(self, pipeline, layer: int, expert: int) -> int | None:
        if pipeline.spec.nested_reuse:
            return pipeline.cache.peek(pipeline.key(layer, expert, self.bits[-1]))
        for level in sorted(self.bits, reverse=True):
            if pipeline.cache.peek(pipeline.key(layer, expert, level)) is not None:
                return level
        return None

    @staticmethod
    def _retarget(pipeline, layer: int, w, expert: int, level: int) -> None:
        """Make `w` compute all its pairs with `expert` at `level` (a substitute keeps its origin for the sum)."""
        rows = torch.cat([r for r, _ in w.pairs.values()])
        slots = torch.cat([s for _, s in w.pairs.values()])
        if expert != w.expert:
            w.origin = w.expert
        w.expert, w.want, w.key = expert, level, pipeline.key(layer, expert, level)
        w.pairs = {level: (rows, slots)}
        held = pipeline.cache.peek(w.key)
        w.have = held if held is not None and (pipeline.spec.nested_reuse or held == level) else None

    @staticmethod
    def _renormalise(top_k_weights: torch.Tensor, skipped: list) -> torch.Tensor:
        """Zero the skipped pairs' weights; scale each touched token's others to keep its weight sum."""
        w = top_k_weights.clone()
        touched = set()
        for work in skipped:
            for rows, slots in work.pairs.values():
                w[rows, slots] = 0
                touched.update(rows.tolist())
        for row in touched:
            kept = w[row].sum()
            if kept > 0:
                w[row] = w[row] * (top_k_weights[row].sum() / kept)
        return w


def _all(mask: torch.Tensor, w) -> bool:
    """Whether `mask` [T, K] holds for every (token, slot) pair of work `w`."""
    return all(bool(mask[rows, slots].all()) for rows, slots in w.pairs.values())


def _any(mask: torch.Tensor, w) -> bool:
    """Whether `mask` [T, K] holds for some (token, slot) pair of work `w`."""
    return any(bool(mask[rows, slots].any()) for rows, slots in w.pairs.values())


def handler(ckpt, options: MissOptions) -> MissHandler | None:
    """The MissHandler for `options` (None for `load`), with the checkpoint's similarity."""
    if options.mode == "load":
        return None
    return MissHandler(options, ckpt.cfg.bits, parse_similarity(ckpt.manifest.get("similarity")))


def report(pipeline, options: MissOptions) -> dict:
    """The `misses` block of a run's --json stats."""
    stats = pipeline.miss.stats if pipeline.miss is not None else MissStats()
    return {"on_miss": options.mode, "threshold": options.threshold, "importance": options.importance,
            **stats.to_dict()}
