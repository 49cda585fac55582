"""Reuse-aware reads (d2moe): fetch-ahead into free cache room, everything up front when it all fits; same output."""

from __future__ import annotations

import pytest
import torch
from packed import packed_tiny

from d2moe.runtime.generate import SamplingOptions
from d2moe.runtime.session import RunOptions, Session, plan_run

BIG = 256 * 2**20


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    torch.set_num_threads(1)
    return packed_tiny(tmp_path_factory, "mixtral", bits=(2, 3, 4), num_local_experts=8)[1]


def _run(packed, budget, **kw):
    with Session(packed, RunOptions(memory_budget=budget, max_tokens=64, router_levels=(4, 2), **kw)) as s:
        r = s.generate(["the quick brown fox"], SamplingOptions(max_new_tokens=10), chat_template=False)
        return r.token_ids[0], r.stats, s.setup_bytes_read


def test_everything_up_front_when_it_all_fits(packed):
    ckpt, *_ = plan_run(packed, RunOptions(memory_budget=BIG))
    tokens, stats, setup = _run(packed, BIG)
    plain, plain_stats, plain_setup = _run(packed, BIG, reuse_aware=False)
    assert tokens == plain
    assert setup == len(ckpt.moe_layers) * ckpt.num_experts * ckpt.level_nbytes(4) and plain_setup == 0
    assert stats["bytes_read"] == 0 < plain_stats["bytes_read"]


def test_fetch_ahead_reads_top_levels_into_free_room(packed):
    ckpt, *_, plan = plan_run(packed, RunOptions(memory_budget=BIG, max_tokens=64))
    budget = plan.budget - plan.expert_cache + (len(ckpt.moe_layers) * ckpt.num_experts - 4) * ckpt.level_nbytes(4)
    tokens, stats, setup = _run(packed, budget)
    plain, plain_stats, _ = _run(packed, budget, reuse_aware=False)
    assert tokens == plain and setup == 0
    assert stats["fetch_ahead_reads"] > 0 and plain_stats["fetch_ahead_reads"] == 0
    assert stats["upgrade_reads"] <= plain_stats["upgrade_reads"] and stats["reads"] <= plain_stats["reads"]
    assert stats["memory"]["peak_bytes"] <= budget


def _capped_run(packed, budget, cap, monkeypatch):
    """A run with the resident cap pinned (None: every level read is kept)."""
    from d2moe.runtime.experts import ExpertPipeline

    monkeypatch.setattr(ExpertPipeline, "_resident_cap", lambda self: cap)
    with Session(packed, RunOptions(memory_budget=budget, max_tokens=64, router_levels=(4, 2))) as s:
        r = s.generate(["the quick brown fox jumps"], SamplingOptions(max_new_tokens=12), chat_template=False)
        kept = [s.cache.peek(k) for k in s.cache.keys()]
    return r.token_ids[0], r.stats, kept


def test_resident_cap_keeps_the_low_level_and_never_changes_the_output(packed, monkeypatch):
    ckpt, *_, plan = plan_run(packed, RunOptions(memory_budget=BIG, max_tokens=64))
    budget = plan.budget - plan.expert_cache + 6 * ckpt.level_nbytes(4)  # 6 of the experts at 4 bits
    tokens, stats, _ = _capped_run(packed, budget, None, monkeypatch)
    capped, capped_stats, kept = _capped_run(packed, budget, 2, monkeypatch)
    assert capped == tokens  # the kernels read the same bytes, split or joined
    assert capped_stats["above_cap_reads"] > 0 and stats["above_cap_reads"] == 0
    assert all(level is None or level <= 2 for level in kept)
    for s in (stats, capped_stats):
        assert 0 < s["memory"]["peak_bytes"] <= budget


def test_resident_cap_is_chosen_where_it_reads_fewer_bytes(packed):
    """Uniform popularity, half the pairs at 4 bits and half at 2, a cache of half the experts at 4 bits:
    keeping 2 bits fits nearly all of them and reads less; with room for all at 4 bits there is no cap."""
    from collections import Counter

    with Session(packed, RunOptions(memory_budget=BIG, max_tokens=64, router_levels=(4, 2))) as s:
        p, ckpt = s.pipeline, s.ckpt
        n = len(ckpt.moe_layers) * ckpt.num_experts
        p.stats.pairs_per_level.update({4: 100, 2: 100})
        p._uses = Counter({(layer, e): 10 for layer in ckpt.moe_layers for e in range(ckpt.num_experts)})
        assert p._resident_cap() is None  # everything fits at the top level
        p.cache.capacity_bytes = n // 2 * ckpt.level_nbytes(4)
        assert p.cache.capacity_bytes // ckpt.level_nbytes(2) >= n  # (this model: 8/12/16 KiB per level)
        assert p._resident_cap() == 2
        p.stats.pairs_per_level.clear()
        p.stats.pairs_per_level.update({4: 100})  # every pair at the top level: nothing to gain
        assert p._resident_cap() is None
