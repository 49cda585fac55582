"""The bit-aware expert cache: packed expert prefixes held within a byte budget.

An entry is keyed `(layer, expert)` and holds that expert's packed blob prefix up to one level
(a bytes-like the cache never interprets), counted at its real size. Because a blob is level
ordered, the prefix held at level b also serves every lower level: the caller slices it. An entry
may carry an attachment (`attach`): an object derived from its bytes, such as the kernels' views
into them, that holds no memory of its own; replacing, upgrading or evicting the entry drops it.

Policy is kept apart from copy mechanics (mixtral-offloading): the cache only decides what
stays. Eviction victims are unpinned entries, chosen by
- "decay": lowest decayed activation frequency (`record_use(key, weight)` adds weight,
  `step()` multiplies every score by `decay`), ties broken by least recent use;
- "lru": least recently used.
With `demote_first(floor, prefix_bytes)` (`--on-miss reuse`), room is made by cutting the victims down
to their `floor` level prefix (nesting: it is that level's blob) before any entry is evicted whole, so
an expert stays usable at a lower level instead of being read again.

Byte accounting: `held_bytes + reserved_bytes <= capacity_bytes`, always. A read about to be issued
reserves the room its bytes will take (`reserve`, evicting as `put` would), so bytes in flight are
counted in the cache they land in, not in a staging area of their own; `put`/`extend` hand the
reservation back as the entry takes its place. When even evicting every unpinned entry cannot make
room, `reserve` and `put` return False: the caller computes with the bytes it loaded and drops them
(compute-and-drop), the cache is unchanged.

Public API
----------
ExpertCache(capacity_bytes, policy="decay", decay=0.9)
    lookup(key, want=None) -> level | None       # records hit / upgrade (held < want) / miss
    peek(key) -> level | None                    # no stats
    get(key) -> (level, data)                    # KeyError if absent; counts as a use for LRU
    attach(key, obj) / attachment(key) -> obj | None   # derived views, dropped when the entry changes
    reserve(nbytes) -> bool; unreserve(nbytes)   # room for bytes in flight (evicts like put)
    put(key, level, data, reserved=0) -> bool    # never downgrades; `reserved`: the read's reservation, handed back
    extend(key, level, extra, reserved=0) -> bool   # upgrade: held prefix + extra segment bytes
                                                 # (bytes-likes, or uint8 tensors on any device)
    entry_bytes(key) -> int                      # bytes held for key (0 when absent)
    discard(key); clear()
    demote_first(floor, prefix_bytes, order=None)   # make room by cutting entries to `floor` before evicting
    demotable_bytes(which, exclude=())           # what cutting the entries `which` picks would free
    pin(key) / unpin(key) / pinned(key); `with cache.pinned_keys(keys): ...`
    record_use(key, weight=1.0); step(); score(key)
    held_objects() -> list (for MemoryMeter); measured_bytes(measure); held_bytes, reserved_bytes, free_bytes,
    capacity_bytes, keys(), len(), `key in cache`
    stats() -> dict[layer, LayerStats]; totals() -> LayerStats; reset_stats()
Thread-safe (one re-entrant lock): I/O threads may `put` while the compute thread looks up.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

from d2moe.errors import UsageError
from d2moe.runtime.held_bytes import (
    cut_to_prefix,
    grow,
    is_tail,
    release,
    resize_in_place,
    size_of,
    whole_map,
)

POLICIES = ("decay", "lru")
_RENORM_AT = 1e150  # rescale inflated scores before they overflow a float


def _layer(key: Hashable) -> Any:
    return key[0] if isinstance(key, tuple) and key else key


@dataclass
class LayerStats:
    """Counters of one MoE layer (or, from `totals()`, of all of them)."""

    hits: int = 0  # lookups that found the level wanted (or higher)
    misses: int = 0  # lookups of experts not held at all
    upgrades: int = 0  # lookups of experts held at a lower level than wanted
    evictions: int = 0  # entries removed to make room
    demotions: int = 0  # entries cut down to the floor level to make room (demote_first)
    rejected: int = 0  # puts that could not fit (compute-and-drop)
    bytes_inserted: int = 0  # bytes newly brought into the cache (upgrades count only the extra)

    def __iadd__(self, other: LayerStats) -> LayerStats:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses + self.upgrades
        return self.hits / n if n else 0.0


@dataclass
class _Entry:
    level: int
    data: Any
    nbytes: int
    attachment: Any = None


class ExpertCache:
    """Packed expert prefixes keyed (layer, expert), within `capacity_bytes`."""

    def __init__(self, capacity_bytes: int, policy: str = "decay", decay: float = 0.9) -> None:
        if capacity_bytes < 0:
            raise UsageError(f"expert cache capacity {capacity_bytes} must be >= 0 bytes")
        if policy not in POLICIES:
            raise UsageError(f"cache policy {policy!r} is unknown: use one of {', '.join(POLICIES)}")
        if not 0.0 < decay <= 1.0:
            raise UsageError(f"cache decay {decay} must be in (0, 1]")
        self.capacity_bytes = int(capacity_bytes)
        self.policy = policy
        self.decay = float(decay)
        self.on_drop: Callable[[Any], None] | None = None  # called with the bytes of an evicted or replaced entry
        self.alloc: Callable[[int], Any] | None = None  # buffers for upgrades' joined bytes (None: a bytearray)
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()  # order = recency, oldest first
        self._pins: Counter = Counter()
        self._scores: dict[Hashable, float] = {}  # inflated: true score = stored / self._inflate
        self._inflate = 1.0
        self._held_bytes = 0
        self._reserved = 0  # room promised to reads in flight (reserve), not yet held
        self.version = 0  # bumped whenever what the entries hold changes (see _held)
        self._measured: tuple[int, int] | None = None  # (version, bytes) of the last measured_bytes()
        self._stats: dict[Any, LayerStats] = {}
        self._floor: tuple | None = None  # demote_first's (floor, prefix_bytes, order of cuts or None)
        self._lock = threading.RLock()

    def demote_first(self, floor: int, prefix_bytes: Callable[[Hashable, int], int],
                     order: Callable[[Hashable], float] | None = None) -> None:
        """Make room by cutting entries held above `floor` down to it (`prefix_bytes(key, level)`: the bytes of
        key's prefix up to level) before evicting any entry whole; cuts go by `order(key)`, smallest first (the
        caller's idea of which experts deserve their top levels), else in the eviction order."""
        self._floor = (int(floor), prefix_bytes, order)

    @property
    def _held(self) -> int:
        return self._held_bytes

    @_held.setter
    def _held(self, value: int) -> None:
        # every change of what entries hold goes through here (put, extend, eviction, clear)
        self._held_bytes = value
        self.version += 1

    # ---- queries -----------------------------------------------------------------------
    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._entries)

    @property
    def held_bytes(self) -> int:
        return self._held

    @property
    def reserved_bytes(self) -> int:
        return self._reserved

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self._held - self._reserved

    def entry_bytes(self, key: Hashable) -> int:
        e = self._entries.get(key)
        return 0 if e is None else e.nbytes

    def held_objects(self) -> list[Any]:
        """The data of every entry (for MemoryMeter's live count)."""
        with self._lock:
            return [e.data for e in self._entries.values()]

    def measured_bytes(self, measure: Callable[[list[Any]], int]) -> int:
        """`measure(held_objects())`, re-run only after the held objects changed (the meter samples often)."""
        with self._lock:
            if self._measured is None or self._measured[0] != self.version:
                self._measured = (self.version, measure(self.held_objects()))
            return self._measured[1]

    def peek(self, key: Hashable) -> int | None:
        e = self._entries.get(key)
        return None if e is None else e.level

    def lookup(self, key: Hashable, want: int | None = None) -> int | None:
        """Level held for `key` or None, recording a hit (>= want), an upgrade (< want) or a miss."""
        with self._lock:
            e = self._entries.get(key)
            s = self._layer_stats(key)
            if e is None:
                s.misses += 1
                return None
            if want is not None and e.level < want:
                s.upgrades += 1
            else:
                s.hits += 1
            self._entries.move_to_end(key)
            return e.level

    def get(self, key: Hashable) -> tuple[int, Any]:
        with self._lock:
            e = self._entries[key]
            self._entries.move_to_end(key)
            return e.level, e.data

    def attachment(self, key: Hashable) -> Any:
        e = self._entries.get(key)
        return None if e is None else e.attachment

    def attach(self, key: Hashable, obj: Any) -> None:
        """Keep `obj`, derived from `key`'s bytes and holding none of its own, until the entry changes."""
        with self._lock:
            self._entries[key].attachment = obj

    # ---- insertion ---------------------------------------------------------------------
    def reserve(self, nbytes: int) -> bool:
        """Promise `nbytes` of room to a read about to be issued, evicting unpinned entries as `put` would
        (all or nothing). The read's `put`/`extend` hands it back; a read that will not land calls `unreserve`."""
        with self._lock:
            if nbytes < 0 or not self._make_room(nbytes):
                return False
            self._reserved += nbytes
            return True

    def unreserve(self, nbytes: int) -> None:
        with self._lock:
            if not 0 <= nbytes <= self._reserved:
                raise UsageError(f"unreserve({nbytes}) exceeds the {self._reserved} bytes reserved")
            self._reserved -= nbytes

    def put(self, key: Hashable, level: int, data: Any, reserved: int = 0) -> bool:
        """Hold `data` (the prefix up to `level`) for `key`, replacing what was held; `reserved`
        (the read's `reserve`) is handed back first, whatever the outcome.

        Never downgrades: when a higher level is already held, that entry stays (it serves
        `level` too) and the call returns True. Returns False, leaving the cache as it was, when
        the entry cannot fit even after evicting every unpinned entry.
        """
        with self._lock:
            if reserved:
                self.unreserve(reserved)
            old = self._entries.get(key)
            if old is not None and old.level > level:
                self._entries.move_to_end(key)
                return True
            new = _Entry(level, data, size_of(data))
            old_bytes = old.nbytes if old else 0
            if not self._make_room(new.nbytes - old_bytes, exclude=key):
                self._layer_stats(key).rejected += 1
                return False
            self._held += new.nbytes - old_bytes
            if old is not None and self.on_drop is not None:
                self.on_drop(old.data)
            self._entries[key] = new
            self._entries.move_to_end(key)
            self._layer_stats(key).bytes_inserted += max(0, new.nbytes - old_bytes)
            return True

    def extend(self, key: Hashable, level: int, extra: Any, reserved: int = 0) -> bool:
        """Upgrade `key` to `level` by appending the segment bytes `extra` to the held prefix
        (`reserved`: as for `put`). `extra` may be the tail `open_tail` gave (the read landed in place)."""
        with self._lock:
            if reserved:
                self.unreserve(reserved)
            old = self._entries.get(key)
            if old is None:
                raise KeyError(f"cannot extend {key}: it is not in the cache")
            if level <= old.level:
                raise UsageError(f"cannot extend {key} from level {old.level} to level {level}")
            n_extra = size_of(extra)
            if not self._make_room(n_extra, exclude=key):
                self._layer_stats(key).rejected += 1
                return False
            in_place = isinstance(extra, memoryview) and is_tail(old.data, old.nbytes, extra)
            # the kernels' description is of the old level (a substitute may have computed at it while the read was
            # in flight), and its views into the bytes would keep the buffer from growing in place
            old.attachment = None
            if not in_place:
                self.close_tail(key)  # a tail opened for a read that landed elsewhere holds no bytes of the entry
                old.data = grow(old.data, extra, self.alloc, self.on_drop)
            old.level, old.nbytes = level, old.nbytes + n_extra
            self._held += n_extra
            self._entries.move_to_end(key)
            self._layer_stats(key).bytes_inserted += n_extra
            if in_place:
                release(extra)
            elif self.on_drop is not None:  # `extra` was copied into the entry
                self.on_drop(extra)
            return True

    def close_tail(self, key: Hashable) -> None:
        """Give back a tail `open_tail` grew that no read will fill: the map is cut back to the entry's bytes."""
        with self._lock:
            e = self._entries.get(key)
            if e is not None and isinstance(e.data, memoryview) and size_of(e.data) > e.nbytes:
                e.data = cut_to_prefix(e.data, e.nbytes, self.alloc, self.on_drop)

    def open_tail(self, key: Hashable, nbytes: int) -> memoryview | None:
        """Grow `key`'s held map in place by `nbytes` and return a view of the new tail for a read to land in
        (then `extend(key, level, tail)` takes it without a copy); None where the map cannot grow in place
        (not a pool map, or something views it). The entry keeps its level and size until then."""
        with self._lock:
            e = self._entries.get(key)
            if e is None or not whole_map(e.data) or e.data.nbytes != e.nbytes:
                return None
            e.attachment = None  # its views into the bytes would keep the map from growing
            e.data, grown = resize_in_place(e.data, e.nbytes + nbytes)
            return e.data[e.nbytes:] if grown else None

    def discard(self, key: Hashable) -> None:
        with self._lock:
            e = self._entries.pop(key, None)
            if e is not None:
                self._held -= e.nbytes
                if self.on_drop is not None:
                    self.on_drop(e.data)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._held = 0
            self._reserved = 0

    # ---- eviction ----------------------------------------------------------------------
    def _make_room(self, nbytes: int, exclude: Hashable | None = None) -> bool:
        """Free room for `nbytes` more by evicting unpinned entries (never `exclude`), all or nothing."""
        need = nbytes - self.free_bytes
        if need <= 0:
            return True
        victims = self._victims(exclude)
        if self._floor is not None:
            if sum(self._entries[k].nbytes for k in victims) < need:
                return False  # all or nothing: not even evicting every victim would do
            floor, prefix_bytes, order = self._floor
            for k in sorted(victims, key=order) if order else victims:
                if need <= 0:
                    return True
                e = self._entries[k]
                if e.level > floor:
                    need -= self._cut(k, e, floor, prefix_bytes(k, floor))
            if need <= 0:
                return True
        freed, chosen = 0, []
        for k in victims:
            if freed >= need:
                break
            chosen.append(k)
            freed += self._entries[k].nbytes
        if freed < need:
            return False
        for k in chosen:
            e = self._entries.pop(k)
            self._held -= e.nbytes
            if self.on_drop is not None:
                self.on_drop(e.data)
            self._layer_stats(k).evictions += 1
        return True

    def demotable_bytes(self, which: Callable[[Hashable], bool], exclude: Iterable[Hashable] = ()) -> int:
        """Bytes `demote_first` could free from the unpinned entries (not in `exclude`) for which `which(key)`."""
        if self._floor is None:
            return 0
        floor, prefix_bytes, _ = self._floor
        skip = set(exclude)
        with self._lock:
            return sum(e.nbytes - prefix_bytes(k, floor) for k, e in self._entries.items()
                       if k not in skip and not self._pins.get(k) and e.level > floor and which(k))

    def _cut(self, key: Hashable, e: _Entry, level: int, nbytes: int) -> int:
        """Hold only `key`'s prefix up to `level` (`nbytes` of it); returns the bytes freed."""
        if nbytes >= e.nbytes:
            return 0
        e.attachment = None  # its views into the bytes would keep the buffer from being cut in place
        e.data = cut_to_prefix(e.data, nbytes, self.alloc, self.on_drop)
        freed = e.nbytes - nbytes
        e.level, e.nbytes = level, nbytes
        self._held -= freed
        self._layer_stats(key).demotions += 1
        return freed

    def _victims(self, exclude: Hashable | None) -> list[Hashable]:
        """Evictable keys, first victim first."""
        keys = [k for k in self._entries if k != exclude and not self._pins.get(k)]
        if self.policy == "lru":
            return keys  # OrderedDict order is least recent first
        recency = {k: i for i, k in enumerate(self._entries)}
        return sorted(keys, key=lambda k: (self._scores.get(k, 0.0), recency[k]))

    # ---- pins --------------------------------------------------------------------------
    def pin(self, key: Hashable) -> None:
        """Protect `key` from eviction (counted: pin twice, unpin twice). Works before it is held."""
        with self._lock:
            self._pins[key] += 1

    def unpin(self, key: Hashable) -> None:
        with self._lock:
            if self._pins.get(key, 0) <= 0:
                raise UsageError(f"unpin({key}) without a matching pin")
            self._pins[key] -= 1
            if not self._pins[key]:
                del self._pins[key]

    def pinned(self, key: Hashable) -> bool:
        return bool(self._pins.get(key))

    @contextmanager
    def pinned_keys(self, keys: Iterable[Hashable]) -> Iterator[None]:
        keys = list(keys)
        for k in keys:
            self.pin(k)
        try:
            yield
        finally:
            for k in keys:
                self.unpin(k)

    # ---- activation frequency ----------------------------------------------------------
    def record_use(self, key: Hashable, weight: float = 1.0) -> None:
        """Add `weight` (e.g. tokens routed to the expert this step) to the key's decayed frequency."""
        with self._lock:
            self._scores[key] = self._scores.get(key, 0.0) + weight * self._inflate

    def step(self) -> None:
        """Age every score by `decay` (call once per decoding step / token)."""
        with self._lock:
            # Instead of multiplying every score, inflate future increments; rescale rarely.
            self._inflate /= self.decay
            if self._inflate > _RENORM_AT:
                for k in self._scores:
                    self._scores[k] /= self._inflate
                self._inflate = 1.0

    def score(self, key: Hashable) -> float:
        return self._scores.get(key, 0.0) / self._inflate

    # ---- stats -------------------------------------------------------------------------
    def _layer_stats(self, key: Hashable) -> LayerStats:
        layer = _layer(key)
        s = self._stats.get(layer)
        if s is None:
            s = self._stats[layer] = LayerStats()
        return s

    def stats(self) -> dict[Any, LayerStats]:
        with self._lock:
            order = sorted(self._stats, key=lambda k: (not isinstance(k, int), k if isinstance(k, int) else str(k)))
            return {k: LayerStats(**vars(self._stats[k])) for k in order}

    def totals(self) -> LayerStats:
        total = LayerStats()
        for s in self.stats().values():
            total += s
        return total

    def reset_stats(self) -> None:
        with self._lock:
            self._stats.clear()
