"""The offloaded experts pipeline: nested reads, upgrades, order- and residency-independent output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from packed import packed_tiny

from d2moe.quantize import dequantize
from d2moe.runtime.policies import UniformLevels
from d2moe.runtime.session import RunOptions, Session

BIG = 256 * 2**20


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    torch.set_num_threads(1)
    return packed_tiny(tmp_path_factory, "mixtral", bits=(2, 4, 8))[1]


def _inputs(tokens=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, 64, generator=g)
    index = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(tokens)])  # [T, 2]
    weights = torch.softmax(torch.randn(tokens, 2, generator=g), -1)
    return hidden, index, weights


def _expert_out(ckpt, layer, expert, level, x):
    mats = ckpt.decode_expert(layer, expert, 8, ckpt.read_prefix(layer, expert, 8))
    mats = {m: t.to_mwq() for m, t in mats.items()}  # packed views -> MWQ tensors
    w = {m: dequantize(t, level) for m, t in mats.items()}
    return F.linear(F.silu(F.linear(x, w["gate"])) * F.linear(x, w["up"]), w["down"])


def test_expert_at_two_levels_is_read_once_and_computed_at_both(packed):
    with Session(packed, RunOptions(memory_budget=BIG, router_levels=(8, 2), reuse_aware=False, activations="int16")) as s:
        hidden, _, _ = _inputs(2)
        index = torch.tensor([[0, 1], [1, 0]])  # expert 0: top-1 of token 0 (8 bits), second of token 1 (2 bits)
        weights = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
        out = s.pipeline.step(0, hidden, index, weights)
        assert s.store.reads == 2  # experts 0 and 1, one prefix read each
        assert s.store.bytes_read == 2 * s.ckpt.level_nbytes(8)
        expected = torch.zeros_like(hidden)
        for t in range(2):
            for k in range(2):
                level = 8 if k == 0 else 2
                expected[t] += weights[t, k] * _expert_out(s.ckpt, 0, int(index[t, k]), level, hidden[t : t + 1])[0]
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        assert dict(s.pipeline.stats.pairs_per_level) == {2: 2, 8: 2}


@pytest.mark.parametrize("nested", [True, False])
def test_upgrade_reads_only_the_extra_segments_unless_copies_are_separate(packed, nested):
    policy = "d2moe" if nested else "matryoshka-free"
    with Session(packed, RunOptions(memory_budget=BIG, policy=policy, router_levels=(8, 2), reuse_aware=False)) as s:
        hidden, index, weights = _inputs(4)
        experts = torch.unique(index).numel()
        s.pipeline.selector = UniformLevels(2)
        s.pipeline.step(0, hidden, index, weights)
        low = s.store.bytes_read
        assert low == experts * s.ckpt.level_nbytes(2)
        s.pipeline.selector = UniformLevels(8)
        s.pipeline.step(0, hidden, index, weights)
        extra = s.store.bytes_read - low
        if nested:
            assert extra == experts * (s.ckpt.level_nbytes(8) - s.ckpt.level_nbytes(2))
            assert s.cache.totals().upgrades == experts
            assert s.pipeline.stats.upgrade_loads == experts
        else:
            assert extra == experts * s.ckpt.level_nbytes(8)
            assert s.pipeline.stats.upgrade_loads == 0
        s.pipeline.step(0, hidden, index, weights)  # now resident at 8: no read
        assert s.store.bytes_read == low + extra


def test_output_independent_of_schedule_and_residency(packed):
    hidden, index, weights = _inputs(8, seed=3)
    outs = []
    with Session(packed, RunOptions(memory_budget=BIG, router_levels=(8, 2))) as s:
        minimum = s.plan.minimum
    for schedule in ("hebf", "johnson", "id"):
        for budget in (BIG, minimum):
            with Session(packed, RunOptions(memory_budget=budget, router_levels=(8, 2), schedule=schedule)) as s:
                for _ in range(3):  # warm and cold steps, with evictions under the small budget
                    outs.append(s.pipeline.step(0, hidden, index, weights))
                    outs.append(s.pipeline.step(1, hidden, index, weights))
                if budget == minimum:
                    assert s.cache.totals().evictions > 0
    layer0 = outs[0::2]
    layer1 = outs[1::2]
    assert all(torch.equal(o, layer0[0]) for o in layer0)
    assert all(torch.equal(o, layer1[0]) for o in layer1)


def test_reads_land_in_room_the_cache_reserved(packed):
    with Session(packed, RunOptions(memory_budget=BIG, router_levels=(8, 2), reuse_aware=False, io_threads=2)) as s:
        hidden, index, weights = _inputs(16, seed=1)
        s.pipeline.step(0, hidden, index, weights)
        peak = s.meter.report()["peak_by_category"]
        assert s.pipeline.stats.loads > 0 and s.pipeline.stats.staged_loads == 0
        assert peak["staging"] == 0 and 0 < peak["expert_cache"] <= s.plan.expert_cache
        assert 0 < peak["workspace"] <= s.plan.workspace
        assert s.pipeline.staging_bytes == s.pipeline.landing_bytes == s.cache.reserved_bytes == 0
        assert s.kernels.workspace_bytes == 0


def test_reads_the_cache_cannot_hold_go_through_staging_within_the_plan(packed):
    """At the smallest budget a 16-token step pins more experts than the cache holds: the reads it cannot
    reserve room for are staged (computed and dropped), never more than the plan's staging at once."""
    hidden, index, weights = _inputs(16, seed=1)
    with Session(packed, RunOptions(memory_budget=BIG, router_levels=(8, 2), reuse_aware=False)) as s:
        want = s.pipeline.step(0, hidden, index, weights)
        minimum = s.plan.minimum
    with Session(packed, RunOptions(memory_budget=minimum, router_levels=(8, 2), reuse_aware=False,
                                    io_threads=4)) as s:
        for _ in range(2):
            assert torch.equal(s.pipeline.step(0, hidden, index, weights), want)
        report = s.meter.report()
        assert s.pipeline.stats.staged_loads > 0 and s.pipeline.stats.dropped > 0
        assert report["peak_by_category"]["staging"] <= s.plan.staging
        assert report["peak_by_category"]["expert_cache"] <= s.plan.expert_cache
        assert report["peak_bytes"] <= s.plan.budget
        assert s.pipeline.staging_bytes == s.pipeline.landing_bytes == s.cache.reserved_bytes == 0


def _generate(packed, budget, kernels, **kw):
    from d2moe.runtime.generate import SamplingOptions

    opts = RunOptions(memory_budget=budget, kernels=kernels, max_tokens=64, activations="int16", **kw)
    with Session(packed, opts) as s:
        report = s.generate(token_ids=[[5, 17, 33, 2, 40, 41]], sampling=SamplingOptions(max_new_tokens=12))
        return report.token_ids, report.stats


@pytest.mark.parametrize("kw", [{"router_levels": (8, 2)}, {"policy": "matryoshka-free", "router_levels": (8, 2)}])
def test_native_kernels_give_the_reference_tokens_within_any_budget(packed, kw):
    with Session(packed, RunOptions(memory_budget=BIG, max_tokens=64, **kw)) as s:
        minimum = s.plan.minimum
    tokens = {}
    for budget in (BIG, minimum):
        for kernels in ("native", "reference"):
            tokens[budget, kernels], stats = _generate(packed, budget, kernels, **kw)
            assert stats["memory"]["peak_bytes"] <= budget
    assert len(set(map(str, tokens.values()))) == 1


def test_kernel_views_ride_on_the_cache_entry_and_go_with_an_upgrade(packed):
    with Session(packed, RunOptions(memory_budget=BIG, router_levels=(8, 2), reuse_aware=False)) as s:
        hidden, index, weights = _inputs(4)
        s.pipeline.selector = UniformLevels(2)
        first = s.pipeline.step(0, hidden, index, weights)
        expert = int(index[0, 0])
        views = s.cache.attachment((0, expert))
        assert views is not None and 2 in views and views["mats"]["gate"].level == 2
        assert s.cache.held_bytes == torch.unique(index).numel() * s.ckpt.level_nbytes(2)  # views hold nothing
        assert torch.equal(s.pipeline.step(0, hidden, index, weights), first)  # same bytes, same views, same output
        assert s.cache.attachment((0, expert)) is views
        s.pipeline.selector = UniformLevels(8)
        s.pipeline.step(0, hidden, index, weights)  # upgrade: the level-2 views no longer describe the bytes
        upgraded = s.cache.attachment((0, expert))
        assert upgraded is not views and upgraded["mats"]["gate"].level == 8


def test_corrupted_expert_bytes_are_caught_when_read(packed, tmp_path):
    """A flipped bit in a blob is reported (FormatError naming the expert) by every policy that reads it."""
    import shutil

    from d2moe.errors import FormatError
    from d2moe.quantize import format as fmt

    bad = tmp_path / "bad"
    shutil.copytree(packed, bad)
    ckpt = fmt.open_checkpoint(bad)
    for entry in ckpt.experts.values():  # damage the level-4 segment of every expert
        path = bad / entry.file
        raw = bytearray(path.read_bytes())
        raw[entry.offset + ckpt.level_nbytes(2) + 3] ^= 0x40
        path.write_bytes(bytes(raw))
    for policy, level in (("moqe-dynaio", 4), ("hold-int4", None)):
        with pytest.raises(FormatError, match="layer .* expert .*: level-4 segment fails its crc32"):
            opts = RunOptions(memory_budget=1 << 30, policy=policy, level=level)
            with Session(bad, opts) as session:
                session.generate(token_ids=[[1, 2, 3]], sampling=None)


def test_blocked_planes_in_the_cache_give_the_reference_tokens(tmp_path_factory):
    """Experts wide enough for the kernels' blocked plane layout (256-column blocks, and a tail that stays
    as on disk): where the CPU kernels block landed planes, the tokens still equal the torch reference's,
    at every budget (reads of whole prefixes and of upgrade segments alike)."""
    from d2moe.kernels import cpu

    wide = packed_tiny(tmp_path_factory, "mixtral", bits=(2, 4, 8), hidden_size=256, intermediate_size=320,
                       num_attention_heads=4, num_key_value_heads=2)[1]
    with Session(wide, RunOptions(memory_budget=BIG, max_tokens=64, router_levels=(8, 2))) as s:
        minimum = s.plan.minimum
        assert s.pipeline.compute.blocked == cpu.blocks_planes(64)
    tokens = {(budget, kernels): _generate(wide, budget, kernels, router_levels=(8, 2))[0]
              for budget in (BIG, minimum) for kernels in ("native", "reference")}
    assert len(set(map(str, tokens.values()))) == 1


@pytest.mark.parametrize("dense", ["int8", "int4"])
def test_dense_weights_converted_while_read_give_their_saving_to_the_expert_cache(tmp_path_factory, dense):
    from d2moe.kernels import cpu
    from d2moe.runtime.memory import nbytes_of

    if cpu.load() is None:
        pytest.skip("no C compiler: dense weights stay in their dtype")
    packed = packed_tiny(tmp_path_factory, "mixtral", bits=(2, 4, 8), hidden_size=256)[1]  # attention large enough to convert
    with Session(packed, RunOptions(memory_budget=BIG, router_levels=(8, 2))) as s:
        source = s.plan
    with Session(packed, RunOptions(memory_budget=BIG, router_levels=(8, 2), dense_weights=dense)) as s:
        held = nbytes_of(s.model, set())  # what the meter counts as dense
        # planned: the converted layers plus one conversion in flight while loading, which the plan keeps
        assert held < s.plan.dense < source.dense
        assert s.cache.capacity_bytes == s.plan.expert_cache == source.expert_cache + (source.dense - s.plan.dense)
        p = s.plan
        assert p.dense + p.kv + p.staging + p.workspace + p.expert_cache == p.budget == BIG


def test_resident_experts_compute_while_the_missing_ones_are_read(packed):
    """A step's reads are issued before its resident experts compute, so the two overlap."""
    with Session(packed, RunOptions(memory_budget=BIG, level=4, reuse_aware=False)) as s:
        hidden = _inputs(1)[0]
        weights = torch.tensor([[0.6, 0.4]])
        s.pipeline.step(0, hidden, torch.tensor([[0, 1]]), weights)  # experts 0 and 1 resident now
        events = []
        submit, compute = s.pipeline.store.submit, s.pipeline.compute.one
        s.pipeline.store.submit = lambda read, *a, **k: events.append(("read", read.expert)) or submit(read, *a, **k)
        s.pipeline.compute.one = lambda layer, w, *a: events.append(("compute", w.expert)) or compute(layer, w, *a)
        s.pipeline.step(0, hidden, torch.tensor([[0, 2]]), weights)  # 0 resident, 2 missing
        assert events == [("read", 2), ("compute", 0), ("compute", 2)]
