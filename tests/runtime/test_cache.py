"""ExpertCache: byte accounting, pins, reservations, upgrades, decay vs LRU."""

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
    st.tuples(st.just("reserve"), st.sampled_from(KEYS), st.just(0), st.integers(0, 500)),
    st.tuples(st.just("release"), st.sampled_from(KEYS), st.just(0), st.just(0)),
    st.tuples(st.just("use"), st.sampled_from(KEYS), st.just(0), st.integers(1, 5)),
    st.tuples(st.just("step"), st.sampled_from(KEYS), st.just(0), st.just(0)),
    st.tuples(st.just("decoded"), st.sampled_from(KEYS), st.just(0), st.integers(0, 300)),
    st.tuples(st.just("discard"), st.sampled_from(KEYS), st.just(0), st.just(0)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(op, max_size=80), st.sampled_from(["decay", "lru"]), st.integers(0, 1200))
def test_random_operations_keep_byte_and_pin_invariants(ops, policy, capacity):
    cache = ExpertCache(capacity, policy=policy)
    pins: dict = {}
    reservations = []
    decoded_sizes: dict = {}  # declared bytes of each entry's decoded object
    for name, key, a, n in ops:
        pinned_before = {k: cache.peek(k) for k in pins if pins[k] and k in cache}
        if name == "put":
            before = cache.peek(key)
            ok = cache.put(key, a, bytes(n))
            if ok and before is not None and before > a:  # never downgrades
                assert cache.peek(key) == before
            elif ok:
                decoded_sizes[key] = 0
                assert cache.get(key) == (a, bytes(n))
        elif name == "extend" and key in cache:
            level, data = cache.get(key)
            ok = cache.extend(key, level + a, b"x" * n)
            if ok:
                decoded_sizes[key] = 0
                assert cache.get(key) == (level + a, bytes(data) + b"x" * n)
        elif name == "lookup":
            cache.lookup(key, a)
        elif name == "pin":
            cache.pin(key)
            pins[key] = pins.get(key, 0) + 1
        elif name == "unpin" and pins.get(key):
            cache.unpin(key)
            pins[key] -= 1
        elif name == "reserve":
            r = cache.reserve(n)
            if r is not None:
                reservations.append(r)
        elif name == "release" and reservations:
            reservations.pop().release()
        elif name == "use":
            cache.record_use(key, n)
        elif name == "step":
            cache.step()
        elif name == "decoded" and key in cache:
            packed_before = {k: cache.peek(k) for k in cache.keys()}
            obj = object()
            if cache.set_decoded(key, obj, n):
                decoded_sizes[key] = n
                assert cache.get_decoded(key) is obj
            assert {k: cache.peek(k) for k in cache.keys()} == packed_before  # second tier: no packed eviction
        elif name == "discard":
            cache.discard(key)
            pinned_before.pop(key, None)
        for k in cache.keys():  # decoded objects may have been dropped to make room
            if cache.get_decoded(k) is None:
                decoded_sizes[k] = 0
        # invariants after every operation
        assert 0 <= cache.used_bytes <= cache.capacity_bytes
        assert cache.reserved_bytes == sum(r.nbytes for r in reservations if r)
        held = sum(len(cache.get(k)[1]) + decoded_sizes[k] for k in cache.keys())
        assert cache.held_bytes == held
        assert cache.decoded_bytes == sum(decoded_sizes[k] for k in cache.keys())
        # the meter's memoised measurement is never stale: a "measure" that fingerprints the held objects
        fingerprint = lambda objs: hash(tuple(sorted(id(o) for o in objs)))  # noqa: E731  (recency order aside)
        assert cache.measured_bytes(fingerprint) == fingerprint(cache.held_objects())
        for k, level in pinned_before.items():  # pinned entries are never evicted (nor downgraded)
            assert k in cache and cache.peek(k) >= level
    for r in reservations:
        r.release()
    assert cache.reserved_bytes == 0


def test_pinned_entries_block_admission_and_put_reports_it():
    cache = ExpertCache(300)
    for e in range(3):
        assert cache.put((0, e), 2, bytes(100))
        cache.pin((0, e))
    assert not cache.put((0, 9), 2, bytes(100))  # everything pinned: compute-and-drop
    assert cache.reserve(1) is None
    assert sorted(cache.keys()) == [(0, 0), (0, 1), (0, 2)]
    assert cache.stats()[0].rejected == 1
    cache.unpin((0, 1))
    assert cache.put((0, 9), 2, bytes(100))
    assert (0, 1) not in cache and cache.stats()[0].evictions == 1
    with pytest.raises(UsageError, match="unpin"):
        cache.unpin((0, 1))


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
    r = cache.reserve(60, key=key)
    assert r and cache.used_bytes == 160
    assert cache.extend(key, 4, b"b" * 60, reservation=r)
    assert cache.get(key) == (4, b"a" * 100 + b"b" * 60)
    assert cache.used_bytes == cache.held_bytes == 160 and cache.reserved_bytes == 0
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
    assert cache.reserve(60, key=(0, 0)) is None  # only (0, 0) could be evicted, and it is the one upgraded
    assert cache.extend((0, 0), 3, bytes(50))  # 150 fits exactly
    assert cache.peek((0, 0)) == 3 and cache.used_bytes == 150


def test_reservation_counts_until_released_and_evicts_cold_entries():
    cache = ExpertCache(300, policy="decay")
    for e, uses in ((0, 5), (1, 1), (2, 3)):
        cache.put((0, e), 2, bytes(100))
        cache.record_use((0, e), uses)
    r = cache.reserve(100)
    assert r and (0, 1) not in cache  # the coldest went
    assert cache.used_bytes == 300 and cache.free_bytes == 0
    assert cache.reserve(400) is None
    r.release()
    r.release()  # idempotent
    assert cache.used_bytes == 200


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


def test_decoded_slot_is_accounted_and_replaced_on_upgrade():
    cache = ExpertCache(1000)
    cache.put((0, 0), 2, bytes(100), decoded="w2", decoded_nbytes=300)
    assert cache.used_bytes == 400 and cache.get_decoded((0, 0)) == "w2"
    assert not cache.set_decoded((0, 0), "huge", 5000)
    assert cache.set_decoded((0, 0), "w2b", 200) and cache.used_bytes == 300
    cache.extend((0, 0), 4, bytes(50))
    assert cache.get_decoded((0, 0)) is None and cache.used_bytes == 150


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_tensor_entries_are_accounted_and_extended_on_their_device(device):
    torch = pytest.importorskip("torch")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cache = ExpertCache(1000)
    base = torch.arange(100, dtype=torch.uint8, device=device)
    assert cache.put((0, 0), 2, base) and cache.used_bytes == 100
    assert cache.extend((0, 0), 3, bytes(range(100, 150)))  # landed bytes from the store
    level, data = cache.get((0, 0))
    assert level == 3 and data.device.type == device and cache.used_bytes == 150
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
    cache.put((0, 1), 2, bytes(500), decoded=bytearray(2000), decoded_nbytes=2000)
    meter = MemoryMeter()
    meter.register("expert_cache", "cache", cache)
    assert meter.sample().by_category["expert_cache"] == 3500 == cache.used_bytes


def test_concurrent_puts_from_io_threads_keep_accounting():
    cache = ExpertCache(5000)

    def worker(layer):
        for e in range(200):
            cache.record_use((layer, e % 17))
            cache.put((layer, e % 17), 2, bytes(100 + e % 7))
            assert cache.used_bytes <= 5000

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


def test_decoded_copies_never_evict_packed_entries_and_go_first_under_pressure():
    cache = ExpertCache(1000, policy="lru")
    for e in range(3):
        assert cache.put((0, e), 2, bytes(200))  # 600 packed, 400 free
    assert not cache.set_decoded((0, 0), "w0", 500)  # would need a packed eviction: refused
    assert sorted(cache.keys()) == [(0, 0), (0, 1), (0, 2)] and cache.used_bytes == 600
    assert cache.set_decoded((0, 0), "w0", 250) and cache.set_decoded((0, 1), "w1", 150)  # full: 1000
    assert cache.free_bytes == 0 and cache.decoded_bytes == 400
    # (0, 2) was used before (0, 0)'s and (0, 1)'s decoded copies landed: it is colder, it may not take theirs
    cache.get((0, 0))
    cache.get((0, 1))
    assert not cache.set_decoded((0, 2), "w2", 100)
    # a new packed entry needs 300: decoded copies go (least recent first), no packed entry is evicted
    assert cache.put((0, 3), 2, bytes(300))
    assert sorted(cache.keys()) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert cache.get_decoded((0, 0)) is None and cache.get_decoded((0, 1)) is None
    assert cache.totals().evictions == 0 and cache.totals().decoded_drops == 2
    assert cache.used_bytes == cache.held_bytes == 900 and cache.decoded_bytes == 0


def test_pinned_decoded_copies_drop_last_and_a_hotter_copy_replaces_a_colder_one():
    cache = ExpertCache(1000)  # decay policy
    for e in range(3):
        cache.put((0, e), 2, bytes(100))
        cache.record_use((0, e), e + 1)  # (0, 2) hottest
    assert cache.set_decoded((0, 0), "w0", 300) and cache.set_decoded((0, 1), "w1", 300)
    cache.pin((0, 0))
    r = cache.reserve(200)  # 100 free: one decoded copy goes, the unpinned one although (0, 0) is colder
    assert r and cache.get_decoded((0, 1)) is None and cache.get_decoded((0, 0)) == "w0"
    r.release()
    cache.unpin((0, 0))
    assert cache.set_decoded((0, 2), "w2", 600)  # hotter: takes (0, 0)'s room
    assert cache.get_decoded((0, 0)) is None and cache.get_decoded((0, 2)) == "w2"
    assert not cache.set_decoded((0, 0), "w0", 300)  # colder than (0, 2): refused
    assert sorted(cache.keys()) == [(0, 0), (0, 1), (0, 2)] and cache.totals().evictions == 0
    # a put too big for the spare room after dropping every decoded copy evicts packed entries next
    assert cache.put((1, 0), 2, bytes(900))
    assert cache.get_decoded((0, 2)) is None and cache.totals().evictions == 2 and cache.used_bytes == 1000


def test_decoded_hits_are_counted_per_layer():
    cache = ExpertCache(1000)
    cache.put((3, 1), 2, bytes(10))
    cache.record_decoded_hit((3, 1))
    assert cache.stats()[3].decoded_hits == 1 and cache.totals().decoded_hits == 1
