"""Policies: level selectors, and every baseline running in the same runtime."""

from __future__ import annotations

import pytest
import torch
from packed import packed_tiny

from d2moe.errors import BudgetError, UsageError
from d2moe.runtime.generate import SamplingOptions
from d2moe.runtime.policies import (
    POLICIES,
    RouterWeightLevels,
    StaticExpertLevels,
    UniformLevels,
    get_policy,
    make_level_selector,
)
from d2moe.runtime.session import RunOptions, Session

BIG = 256 * 2**20
PROMPT = ["the quick brown fox jumps over the lazy dog"]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    torch.set_num_threads(1)
    return packed_tiny(tmp_path_factory, "mixtral", bits=(2, 4, 8))[1]


def test_router_weight_levels_give_top1_the_high_level():
    weights = torch.tensor([[0.2, 0.8], [0.9, 0.1], [0.5, 0.5]])
    levels = RouterWeightLevels(8, 2).select(0, None, torch.zeros(3, 2, dtype=torch.long), weights)
    assert levels.tolist() == [[2, 8], [8, 2], [8, 2]]
    assert UniformLevels(4).select(0, None, torch.zeros(3, 2, dtype=torch.long), weights).unique().tolist() == [4]


def test_static_levels_rank_experts_by_activation_frequency():
    sel = StaticExpertLevels((2, 4, 8), num_experts=6, calibration_tokens=4)
    index = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 3]])  # counts: 4, 2, 1, 1, 0, 0
    first = sel.select(0, None, index, None)
    assert first.unique().tolist() == [4]  # calibrating: the middle level
    table = sel.table[0].tolist()
    assert table[0] == 8 and table[1] == 8 and table[4] == 2 and table[5] == 2
    assert sel.select(0, None, torch.tensor([[0, 5]]), None).tolist() == [[8, 2]]
    assert sel.expert_level(0, 0) == 8 and sel.expert_level(1, 0) is None


def test_level_options_are_checked_against_packed_levels():
    with pytest.raises(UsageError, match="--bits 2,3,4"):
        make_level_selector(get_policy("moqe-dynaio"), (2, 4), 4, level=3)
    with pytest.raises(UsageError, match="--bits 2,3,4,8"):
        make_level_selector(get_policy("hold-int8"), (2, 3, 4), 4)
    with pytest.raises(UsageError, match="unknown"):
        get_policy("fastest")
    assert isinstance(make_level_selector(get_policy("d2moe"), (2, 4), 4), RouterWeightLevels)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_generates(packed, policy):
    level = 2 if policy == "hold" else None  # hold: every expert resident at the level asked for
    with Session(packed, RunOptions(memory_budget=BIG, policy=policy, calibration_tokens=4, level=level)) as s:
        report = s.generate(PROMPT, SamplingOptions(max_new_tokens=6))
    assert len(report.token_ids[0]) >= 1
    stats = report.stats
    assert stats["policy"] == policy
    assert stats["generated_tokens"] == len(report.token_ids[0])
    assert sum(stats["tokens_per_level"].values()) > 0
    assert stats["memory"]["peak_bytes"] <= stats["memory"]["budget_bytes"]
    if policy == "hold":
        assert set(stats["tokens_per_level"]) == {"2"} and stats["bytes_read"] == 0  # all read up front


def test_hold_needs_a_level(packed):
    with pytest.raises(UsageError, match="--level"):
        Session(packed, RunOptions(memory_budget=BIG, policy="hold"))


def test_matryoshka_free_reads_more_than_d2moe_on_mixed_levels(packed):
    read = {}
    tokens = {}
    for policy in ("d2moe", "matryoshka-free"):
        with Session(packed, RunOptions(memory_budget=BIG, policy=policy, router_levels=(8, 2))) as s:
            report = s.generate(PROMPT, SamplingOptions(max_new_tokens=8))
            read[policy] = report.stats["bytes_read"]
            tokens[policy] = report.token_ids
            assert set(report.stats["tokens_per_level"]) == {"2", "8"}  # a mixed-level workload
    assert tokens["d2moe"] == tokens["matryoshka-free"]  # same levels, same output
    assert read["matryoshka-free"] > read["d2moe"]


@pytest.mark.parametrize("policy,level", [("hold-int8", 8), ("hold-int4", 4)])
def test_hold_policies_read_everything_up_front(packed, policy, level):
    with Session(packed, RunOptions(memory_budget=BIG, policy=policy)) as s:
        everything = len(s.ckpt.moe_layers) * s.ckpt.num_experts * s.ckpt.level_nbytes(level)
        assert s.setup_bytes_read == everything
        report = s.generate(PROMPT, SamplingOptions(max_new_tokens=4))
    assert report.stats["bytes_read"] == 0
    assert report.stats["cache"]["hit_rate"] == 1.0
    assert set(report.stats["tokens_per_level"]) == {str(level)}


def test_hold_policy_needs_room_for_every_expert(packed):
    with Session(packed, RunOptions(memory_budget=BIG, router_levels=(8, 2))) as s:
        minimum = s.plan.minimum
    with pytest.raises(BudgetError, match="hold-int8 holds every expert"):
        Session(packed, RunOptions(memory_budget=minimum, policy="hold-int8"))


def test_hold_int8_without_level_8_says_how_to_repack(tmp_path_factory):
    _, packed = packed_tiny(tmp_path_factory, "mixtral", bits=(2, 3, 4))
    with pytest.raises(UsageError, match=r"--bits 2,3,4,8"):
        Session(packed, RunOptions(memory_budget=BIG, policy="hold-int8"))


def test_edgemoe_preloads_next_layer_after_calibration(packed):
    with Session(packed, RunOptions(memory_budget=BIG, policy="edgemoe", calibration_tokens=4)) as s:
        report = s.generate(PROMPT, SamplingOptions(max_new_tokens=8))
    assert report.stats["preloads"] > 0
    assert len(report.stats["tokens_per_level"]) >= 2  # static levels differ across experts
