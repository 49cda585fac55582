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


def test_a_uniform_level_is_held_and_read_ahead_no_higher_than_itself(packed):
    """`--level 3` of a 2,3,4 pack never computes 4 bits: with every 3-bit expert in budget, all are held up front
    at level 3 and nothing is read or evicted later (fetch-ahead and hold used to aim at the pack's top level, 4)."""
    ckpt, *_, plan = plan_run(packed, RunOptions(memory_budget=BIG, max_tokens=64, level=3))
    n = len(ckpt.moe_layers) * ckpt.num_experts
    budget = plan.budget - plan.expert_cache + n * ckpt.level_nbytes(3)
    assert budget < plan.budget - plan.expert_cache + n * ckpt.level_nbytes(4)
    with Session(packed, RunOptions(memory_budget=budget, max_tokens=64, level=3)) as s:
        r = s.generate(["the quick brown fox"], SamplingOptions(max_new_tokens=10), chat_template=False)
        setup = s.setup_bytes_read
    assert setup == n * ckpt.level_nbytes(3)
    assert r.stats["bytes_read"] == 0 and r.stats["cache"]["evictions"] == 0 and r.stats["fetch_ahead_reads"] == 0
    assert set(r.stats["tokens_per_level"]) == {"3"}


@pytest.fixture(scope="module")
def packed_wide(tmp_path_factory):
    """Experts large enough (256 x 1024) for the cache's pool maps, where upgrades land in place."""
    return packed_tiny(tmp_path_factory, "mixtral", bits=(2, 3, 4), num_local_experts=8, hidden_size=256,
                       intermediate_size=1024)[1]


@pytest.mark.parametrize("reuse_aware", [True, False])
def test_the_expert_cache_measured_never_passes_its_capacity_through_in_place_upgrades(packed_wide, reuse_aware):
    """An upgrade landing in its entry's grown map is counted once: in the entry (the meter measures the map), not
    also as bytes landing (it was counted twice, and the cache's measured peak passed its capacity)."""
    packed = packed_wide
    ckpt, *_, plan = plan_run(packed, RunOptions(memory_budget=BIG, max_tokens=64))
    n = len(ckpt.moe_layers) * ckpt.num_experts
    upgrades = 0
    for held in (n // 4, n // 2, n - 4):
        budget = plan.budget - plan.expert_cache + held * ckpt.level_nbytes(4)
        _, stats, _ = _run(packed, budget, reuse_aware=reuse_aware)
        assert stats["memory"]["peak_by_category"]["expert_cache"] <= stats["cache"]["capacity_bytes"], held
        upgrades += stats["upgrade_reads"]
    assert upgrades > 0
