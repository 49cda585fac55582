"""ExpertCache: byte accounting, pins, upgrades, attachments, decay vs LRU."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.errors import UsageError
from d2moe.runtime.cache import ExpertCache
from d2moe.runtime.memory import MemoryMeter

KEYS = [(layer, e) for layer in range(2) for e in range(4)]

op = st.one_of(
    st.tuples(st.just("put"), st.sampled_from(KEYS), st.integers(2, 4), st.integers(0, 400)),
    st.tuples(st.just("extend"), st.sampled_from(KEYS), st.integers(1, 2), st.integers(0, 200)),
    st.tuples(st.just("lookup"), st.sampled_from(KEYS), st.integers(2, 4), st.just(0)),
    st.tuples(st.just("pin"), st.sampled_from(KEYS), st.just(0), st.just(0)),
    st.tuples(st.just("unpin"), st.sampled_from(KEYS), st.just(0), st.just(0)),
    st.tuples(st.just("use"), st.sampled_from(KEYS), st.just(0), st.integers(1, 5)),
    st.tuples(st.just("step"), st.sampled_from(KEYS), st.just(0), st.just(0)),
    st.tuples(st.just("attach"), st.sampled_from(KEYS), st.just(0), st.just(0)),
    st.tuples(st.just("discard"), st.sampled_from(KEYS), st.just(0), st.just(0)),
    st.tuples(st.just("reserve"), st.sampled_from(KEYS), st.just(0), st.integers(0, 400)),
    st.tuples(st.just("land"), st.sampled_from(KEYS), st.integers(2, 4), st.just(0)),
    st.tuples(st.just("cancel"), st.sampled_from(KEYS), st.just(0), st.just(0)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(op, max_size=80), st.sampled_from(["decay", "lru"]), st.integers(0, 1200), st.booleans())
def test_random_operations_keep_byte_and_pin_invariants(ops, policy, capacity, demote):
    cache = ExpertCache(capacity, policy=policy)
    if demote:  # --on-miss reuse: room by cutting entries above level 2 to half their bytes first
        cache.demote_first(2, lambda key, level: cache.entry_bytes(key) // 2)
    pins: dict = {}
    attached: dict = {}  # what each entry carries, as the test attached it
    reservations: list[int] = []  # room promised to reads in flight
    for name, key, a, n in ops:
        pinned_before = {k: cache.peek(k) for k in pins if pins[k] and k in cache}
        levels_before = {k: cache.peek(k) for k in attached}
        if name == "put":
            before = cache.peek(key)
            ok = cache.put(key, a, bytes(n))
            if ok and before is not None and before > a:  # never downgrades
                assert cache.peek(key) == before
            elif ok:
                attached.pop(key, None)
                assert cache.get(key) == (a, bytes(n))
        elif name == "extend" and key in cache:
            level, data = cache.get(key)
            ok = cache.extend(key, level + a, b"x" * n)
            if ok:
                attached.pop(key, None)
                assert cache.get(key) == (level + a, bytes(data) + b"x" * n)
        elif name == "lookup":
            cache.lookup(key, a)
        elif name == "pin":
            cache.pin(key)
            pins[key] = pins.get(key, 0) + 1
        elif name == "unpin" and pins.get(key):
            cache.unpin(key)
            pins[key] -= 1
        elif name == "use":
            cache.record_use(key, n)
        elif name == "step":
            cache.step()
        elif name == "attach" and key in cache:
            before = cache.held_bytes
            attached[key] = object()
            cache.attach(key, attached[key])
            assert cache.held_bytes == before  # an attachment holds no bytes of its own
        elif name == "discard":
            cache.discard(key)
            pinned_before.pop(key, None)
        elif name == "reserve":
            free_before = cache.free_bytes
            if cache.reserve(n):
                reservations.append(n)
            else:  # all or nothing: only unpinned entries could not make the room
                assert cache.free_bytes == free_before
        elif name == "land" and reservations:  # a read lands in the room it reserved
            n = reservations.pop()
            before = cache.peek(key)
            if cache.put(key, a, bytes(n), reserved=n) and (before is None or before <= a):
                attached.pop(key, None)
                assert cache.get(key) == (a, bytes(n))
        elif name == "cancel" and reservations:
            cache.unreserve(reservations.pop())
        for k in [k for k in attached if k not in cache or cache.peek(k) < levels_before.get(k, 0)]:
            del attached[k]  # evicted, discarded or cut to the floor: the attachment went with it
        # invariants after every operation
        assert 0 <= cache.held_bytes <= cache.held_bytes + cache.reserved_bytes <= cache.capacity_bytes
        assert cache.reserved_bytes == sum(reservations)
        assert cache.held_bytes == sum(len(cache.get(k)[1]) for k in cache.keys())
        for k in cache.keys():  # an entry carries what was attached to these very bytes, or nothing
            assert cache.attachment(k) is attached.get(k)
        # the meter's memoised measurement is never stale: a "measure" that fingerprints the held objects
        fingerprint = lambda objs: hash(tuple(sorted(id(o) for o in objs)))  # noqa: E731  (recency order aside)
        assert cache.measured_bytes(fingerprint) == fingerprint(cache.held_objects())
        for k, level in pinned_before.items():  # pinned entries are never evicted (nor downgraded)
            assert k in cache and cache.peek(k) >= level


def test_pinned_entries_block_admission_and_put_reports_it():
    cache = ExpertCache(300)
    for e in range(3):
        assert cache.put((0, e), 2, bytes(100))
        cache.pin((0, e))
    assert not cache.put((0, 9), 2, bytes(100))  # everything pinned: compute-and-drop
    assert sorted(cache.keys()) == [(0, 0), (0, 1), (0, 2)]
    assert cache.stats()[0].rejected == 1
    cache.unpin((0, 1))
    assert cache.put((0, 9), 2, bytes(100))
    assert (0, 1) not in cache and cache.stats()[0].evictions == 1
    with pytest.raises(UsageError, match="unpin"):
        cache.unpin((0, 1))


def test_reserved_room_is_taken_from_unpinned_entries_and_handed_back_by_put():
    cache = ExpertCache(300)
    for e in range(3):
        assert cache.put((0, e), 2, bytes(100))
    cache.pin((0, 2))
    assert cache.reserve(150)  # evicts the two coldest unpinned entries, all at once
    assert sorted(cache.keys()) == [(0, 2)] and cache.free_bytes == 50 and cache.reserved_bytes == 150
    assert not cache.reserve(100)  # only the pinned entry is left: nothing changes
    assert cache.free_bytes == 50 and cache.stats()[0].evictions == 2
    assert cache.put((0, 5), 2, bytes(150), reserved=150)  # lands where it was promised: no eviction
    assert cache.reserved_bytes == 0 and cache.held_bytes == 250 and (0, 2) in cache
    cache.pin((0, 5))
    assert cache.reserve(40) and not cache.put((0, 6), 2, bytes(200), reserved=40)  # too big even so
    assert cache.reserved_bytes == 0  # handed back whatever the outcome
    with pytest.raises(UsageError, match="unreserve"):
        cache.unreserve(1)


def test_pinned_keys_context_protects_then_releases():
    cache = ExpertCache(200, policy="lru")
    cache.put((1, 0), 2, bytes(100))
    cache.put((1, 1), 2, bytes(100))
    with cache.pinned_keys([(1, 0)]):
        cache.put((1, 2), 2, bytes(100))
        assert (1, 0) in cache and (1, 1) not in cache
    assert not cache.pinned((1, 0))


def test_upgrade_is_counted_as_upgrade_not_miss_and_extend_concatenates():
    cache = ExpertCache(10_000)
    key = (3, 5)
    assert cache.lookup(key, 2) is None
    assert cache.put(key, 2, b"a" * 100)
    assert cache.lookup(key, 4) == 2  # held at 2, wanted at 4: an upgrade
    assert cache.extend(key, 4, b"b" * 60)
    assert cache.get(key) == (4, b"a" * 100 + b"b" * 60)
    assert cache.held_bytes == 160
    assert cache.lookup(key, 4) == 4 and cache.lookup(key, 3) == 4  # a higher prefix serves lower levels
    s = cache.stats()[3]
    assert (s.misses, s.upgrades, s.hits) == (1, 1, 2)
    assert s.bytes_inserted == 160  # the upgrade only brought in the extra segment
    with pytest.raises(UsageError):
        cache.extend(key, 4, b"c")
    with pytest.raises(KeyError):
        cache.extend((9, 9), 4, b"c")


def test_put_never_downgrades_a_held_entry():
    cache = ExpertCache(1000)
    cache.put((0, 0), 4, b"4" * 300)
    assert cache.put((0, 0), 2, b"2" * 100)  # a late level-2 read: the level-4 prefix already serves it
    assert cache.get((0, 0)) == (4, b"4" * 300)
    assert cache.put((0, 0), 4, b"x" * 300) and cache.get((0, 0))[1] == b"x" * 300


def test_upgrade_never_evicts_the_entry_being_upgraded():
    cache = ExpertCache(150)
    cache.put((0, 0), 2, bytes(100))
    assert not cache.extend((0, 0), 3, bytes(60))  # only (0, 0) could make room, and it is the one upgraded
    assert cache.peek((0, 0)) == 2 and cache.held_bytes == 100
    assert cache.extend((0, 0), 3, bytes(50))  # 150 fits exactly
    assert cache.peek((0, 0)) == 3 and cache.held_bytes == 150


def test_admission_evicts_the_coldest_entry():
    cache = ExpertCache(300, policy="decay")
    for e, uses in ((0, 5), (1, 1), (2, 3)):
        cache.put((0, e), 2, bytes(100))
        cache.record_use((0, e), uses)
    assert cache.put((0, 3), 2, bytes(100))
    assert (0, 1) not in cache and cache.held_bytes == 300 and cache.free_bytes == 0
    assert not cache.put((0, 4), 2, bytes(400))  # larger than the whole cache: refused, nothing evicted
    assert len(cache) == 3


def _hot_key_hits(policy: str) -> tuple[int, int]:
    """A hot expert every 4th step among never-repeating cold ones; cache of 3 entries."""
    cache = ExpertCache(300, policy=policy, decay=0.9)
    hot, hits, uses = (0, 0), 0, 0
    for t in range(400):
        key = hot if t % 4 == 0 else (0, 1000 + t)
        cache.record_use(key)
        if cache.lookup(key, 2) is None:
            cache.put(key, 2, bytes(100))
        elif key == hot and t >= 200:
            hits += 1
        if key == hot and t >= 200:
            uses += 1
        cache.step()
    return hits, uses


def test_decay_keeps_the_hot_expert_where_lru_evicts_it():
    decay_hits, uses = _hot_key_hits("decay")
    lru_hits, _ = _hot_key_hits("lru")
    assert decay_hits == uses == 50
    assert lru_hits == 0


def test_scores_decay_per_step_and_survive_renormalisation():
    cache = ExpertCache(100, decay=0.5)
    cache.record_use("a", 8.0)
    cache.step()
    cache.step()
    assert cache.score("a") == pytest.approx(2.0)
    for _ in range(600):  # far past the rescaling threshold
        cache.step()
    cache.record_use("b", 1.0)
    assert cache.score("b") == pytest.approx(1.0) and cache.score("a") < 1e-100


def test_attachment_goes_with_a_replaced_or_upgraded_entry():
    cache = ExpertCache(1000)
    cache.put((0, 0), 2, bytes(100))
    cache.attach((0, 0), "views of level 2")
    assert cache.attachment((0, 0)) == "views of level 2" and cache.held_bytes == 100
    cache.extend((0, 0), 4, bytes(50))
    assert cache.attachment((0, 0)) is None and cache.held_bytes == 150
    cache.attach((0, 0), "views of level 4")
    cache.put((0, 0), 4, bytes(150))  # new bytes: the old views no longer describe them
    assert cache.attachment((0, 0)) is None and cache.attachment((9, 9)) is None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_tensor_entries_are_accounted_and_extended_on_their_device(device):
    torch = pytest.importorskip("torch")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cache = ExpertCache(1000)
    base = torch.arange(100, dtype=torch.uint8, device=device)
    assert cache.put((0, 0), 2, base) and cache.held_bytes == 100
    assert cache.extend((0, 0), 3, bytes(range(100, 150)))  # landed bytes from the store
    level, data = cache.get((0, 0))
    assert level == 3 and data.device.type == device and cache.held_bytes == 150
    assert data.cpu().tolist() == list(range(150))
    meter = MemoryMeter()
    meter.register("expert_cache", "c", cache)
    assert meter.sample().total == 150


def test_per_layer_stats_and_totals():
    cache = ExpertCache(1000)
    for layer in (0, 1, 10):
        cache.lookup((layer, 0), 2)
        cache.put((layer, 0), 2, bytes(10))
        cache.lookup((layer, 0), 2)
    assert list(cache.stats()) == [0, 1, 10]
    t = cache.totals()
    assert (t.misses, t.hits, t.bytes_inserted) == (3, 3, 30) and t.hit_rate == 0.5
    cache.reset_stats()
    assert cache.totals().hits == 0


def test_meter_measures_what_the_cache_holds():
    cache = ExpertCache(10_000)
    cache.put((0, 0), 2, memoryview(bytearray(1000)))
    cache.put((0, 1), 2, bytes(500))
    cache.attach((0, 1), {"views": "into the 500 bytes"})
    meter = MemoryMeter()
    meter.register("expert_cache", "cache", cache)
    assert meter.sample().by_category["expert_cache"] == 1500 == cache.held_bytes


def test_concurrent_puts_from_io_threads_keep_accounting():
    cache = ExpertCache(5000)

    def worker(layer):
        for e in range(200):
            cache.record_use((layer, e % 17))
            cache.put((layer, e % 17), 2, bytes(100 + e % 7))
            assert cache.held_bytes <= 5000

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.held_bytes == sum(len(cache.get(k)[1]) for k in cache.keys()) <= 5000


def test_bad_arguments_raise_usage_errors():
    with pytest.raises(UsageError, match="policy"):
        ExpertCache(10, policy="fifo")
    with pytest.raises(UsageError, match="decay"):
        ExpertCache(10, decay=0)
    with pytest.raises(UsageError):
        ExpertCache(-1)


def test_dropped_entries_are_handed_to_on_drop():
    """Evicted, replaced and discarded entries' bytes go to `on_drop` (the read-buffer pool), each once."""
    cache = ExpertCache(300, policy="lru")
    dropped = []
    cache.on_drop = dropped.append
    a, b, c, a4 = bytes(100), bytes(150), bytes(120), bytes(140)
    assert cache.put("a", 2, a) and cache.put("b", 2, b)
    assert cache.put("c", 2, c)  # evicts a (least recent)
    assert dropped == [a]
    assert cache.put("b", 4, a4)  # replaces b's prefix: 120 + 140 held
    assert dropped[-1] is b and cache.peek("b") == 4
    cache.discard("c")
    assert dropped[-1] is c and len(dropped) == len({id(d) for d in dropped})
    extra = bytes(10)
    assert cache.extend("b", 8, extra)  # the held prefix and the segment copied after it both go
    assert dropped[-2:] == [a4, extra] and dropped[-1] is extra


def _prefix_sizes(sizes: dict[int, int]):
    """prefix_bytes for demote_first where every key's level-b prefix is sizes[b] bytes."""
    return lambda key, level: sizes[level]


def test_demote_first_cuts_victims_to_the_floor_prefix_before_evicting():
    """Room comes from cutting entries to their floor-level prefix (bit for bit the first bytes), coldest
    first; no entry is evicted while cutting is enough, and the byte accounting follows."""
    sizes = {2: 40, 4: 100}
    cache = ExpertCache(300, policy="lru")
    cache.demote_first(2, _prefix_sizes(sizes))
    blobs = {k: bytes(range(i, i + 100)) for i, k in enumerate("abc")}
    for k, blob in blobs.items():
        assert cache.put(k, 4, blob)
    cache.attach("a", object())
    assert cache.reserve(60)  # a (least recent) is cut 100 -> 40
    assert cache.peek("a") == 2 and bytes(cache.get("a")[1]) == blobs["a"][:40]
    assert cache.attachment("a") is None and cache.held_bytes == 240 and cache.reserved_bytes == 60
    cache.unreserve(60)
    assert cache.reserve(180)  # 60 free, b then c cut: 60 + 60
    assert [cache.peek(k) for k in "abc"] == [2, 2, 2] and len(cache) == 3
    assert cache.totals().demotions == 3 and cache.totals().evictions == 0
    assert all(bytes(cache.get(k)[1]) == blobs[k][:40] for k in "abc")
    cache.unreserve(180)
    assert cache.reserve(250)  # cutting cannot free more: whole entries go
    assert cache.totals().evictions >= 1 and cache.held_bytes + cache.reserved_bytes <= 300
    cache.unreserve(250)
    assert not cache.reserve(301) and cache.reserved_bytes == 0  # all or nothing


def test_demotion_cuts_a_pool_buffer_in_place():
    """A pool map that nothing else views is cut where it is (its tail unmapped), not copied."""
    from d2moe.runtime.buffers import anonymous_map

    cache = ExpertCache(3 * 4096 + 10, policy="lru")
    cache.demote_first(2, _prefix_sizes({2: 4096, 4: 3 * 4096}))
    m = anonymous_map(3 * 4096)
    m[:] = bytes(range(256)) * 48
    assert cache.put("a", 4, memoryview(m))
    assert cache.reserve(2 * 4096)
    level, data = cache.get("a")
    assert level == 2 and data.obj is m and len(m) == 4096 and bytes(data) == (bytes(range(256)) * 16)


HEAD, TAIL = bytes(range(256)) * 16, bytes(range(255, -1, -1)) * 32


def _pool_entry():
    """A cache holding "a" at level 2 in a pool-style map (HEAD), with an attachment; (cache, dropped, map)."""
    from d2moe.runtime.buffers import anonymous_map

    cache = ExpertCache(1 << 20, policy="lru")
    dropped = []
    cache.on_drop = dropped.append
    m = anonymous_map(len(HEAD))
    m[:] = HEAD
    assert cache.put("a", 2, memoryview(m))
    cache.attach("a", object())
    return cache, dropped, m


def test_upgrade_grows_a_pool_buffer_in_place_and_copies_when_it_is_viewed():
    """extend appends the segment to the held map itself (mremap: only the segment is copied) and drops the
    entry's attachment; a map something else still views is joined into a copy instead, the old one dropped."""
    head, tail = HEAD, TAIL
    for viewed in (False, True):
        cache, dropped, m = _pool_entry()
        outside = memoryview(m) if viewed else None
        assert cache.extend("a", 4, tail)
        level, data = cache.get("a")
        assert level == 4 and bytes(data) == head + tail and cache.held_bytes == len(head + tail)
        assert cache.attachment("a") is None and cache.stats()["a"].bytes_inserted == len(head + tail)
        assert (data.obj is m) is (not viewed) and len(dropped) == (2 if viewed else 1) and dropped[-1] is tail
        if outside is not None:
            assert bytes(outside) == head  # the outside view still reads the old bytes
            outside.release()


def test_an_upgrade_read_lands_in_the_grown_tail_of_its_entry():
    """open_tail grows the held map and hands out its tail; extend with that tail takes the bytes where they
    landed (no copy, nothing dropped); a map something views gives no tail."""
    head, tail = HEAD, TAIL
    cache, dropped, m = _pool_entry()
    view = cache.open_tail("a", len(tail))
    assert view is not None and view.nbytes == len(tail) and cache.attachment("a") is None
    assert cache.peek("a") == 2 and cache.entry_bytes("a") == len(head) == cache.held_bytes
    view[:] = tail
    cache.attach("a", object())  # computed at level 2 while the read was in flight (a substitute)
    assert cache.extend("a", 4, view)
    assert cache.attachment("a") is None  # that description is of level 2
    level, data = cache.get("a")
    assert level == 4 and data.obj is m and bytes(data) == head + tail and dropped == []
    assert cache.held_bytes == len(head + tail)
    back = cache.open_tail("a", 4096)  # a tail no read fills goes back
    assert back is not None and len(m) == len(head + tail) + 4096
    back.release()
    cache.close_tail("a")
    assert len(m) == len(head + tail) and bytes(cache.get("a")[1]) == head + tail and cache.held_bytes == len(m)
    outside = memoryview(m)
    assert cache.open_tail("a", 4096) is None and bytes(cache.get("a")[1]) == head + tail  # viewed: not grown
    outside.release()
    assert cache.open_tail("b", 4096) is None  # not held
    assert cache.open_tail("a", 4096) is not None  # a tail whose read lands elsewhere holds none of the entry's bytes
    assert cache.extend("a", 8, b"x" * 4096)
    assert bytes(cache.get("a")[1]) == head + tail + b"x" * 4096 and cache.held_bytes == len(head + tail) + 4096


def test_demotable_bytes_counts_only_chosen_unpinned_entries_above_the_floor():
    cache = ExpertCache(1000)
    assert cache.demotable_bytes(lambda k: True) == 0  # no floor: nothing to cut
    cache.demote_first(2, _prefix_sizes({2: 40, 4: 100}))
    for k in "abc":
        cache.put(k, 4, bytes(100))
    cache.put("d", 2, bytes(40))
    cache.pin("c")
    assert cache.demotable_bytes(lambda k: True) == 120  # a and b; c pinned, d at the floor
    assert cache.demotable_bytes(lambda k: k != "a") == 60
    assert cache.demotable_bytes(lambda k: True, exclude=["a", "b"]) == 0


def test_cuts_follow_the_given_order():
    """demote_first(order=): the entry with the smallest order value is cut first, whatever the eviction order."""
    cache = ExpertCache(300, policy="lru")
    use = {"a": 5.0, "b": 1.0, "c": 3.0}
    cache.demote_first(2, _prefix_sizes({2: 40, 4: 100}), order=use.get)
    for k in "abc":
        cache.put(k, 4, bytes(100))
    assert cache.reserve(60)
    assert [cache.peek(k) for k in "abc"] == [4, 2, 4]
