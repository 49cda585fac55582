"""Generation: sampling, left-padded batches, budget invariance, measured peak memory <= budget."""

from __future__ import annotations

import pytest
import torch
from packed import packed_tiny

from d2moe.errors import BudgetError, UsageError
from d2moe.runtime.generate import SamplingOptions, left_pad, sample_next
from d2moe.runtime.session import RunOptions, Session

BIG = 256 * 2**20
PROMPTS = ["the quick brown fox jumps over the lazy dog", "hello world"]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    torch.set_num_threads(1)
    return packed_tiny(tmp_path_factory, "mixtral", bits=(2, 4, 8))[1]


def test_greedy_and_nucleus_sampling():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9], [3.0, 0.0, 0.0, 0.0]])
    assert sample_next(logits, SamplingOptions(), None).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    opts = SamplingOptions(temperature=1.0, top_p=0.5)
    draws = torch.stack([sample_next(logits, opts, g) for _ in range(200)])
    assert set(draws[:, 0].tolist()) <= {1, 3}  # the nucleus of row 0 holds its two top tokens only
    assert set(draws[:, 1].tolist()) == {0}
    with pytest.raises(UsageError):
        SamplingOptions(top_p=0.0)
    for bad in (float("nan"), float("inf"), -1.0):  # nan reached torch.multinomial as a traceback
        with pytest.raises(UsageError, match="--temperature"):
            SamplingOptions(temperature=bad)


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [9]], pad_id=1)
    assert ids.tolist() == [[5, 6, 7], [1, 1, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batched_requests_match_single_runs(packed):
    opts = SamplingOptions(max_new_tokens=6)
    with Session(packed, RunOptions(memory_budget=BIG, level=8)) as s:
        batched = s.generate(PROMPTS, opts).token_ids
        single = [s.generate([p], opts).token_ids[0] for p in PROMPTS]
    assert batched == single


def test_sampling_is_reproducible_with_a_seed(packed):
    opts = SamplingOptions(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=7)
    with Session(packed, RunOptions(memory_budget=BIG, level=4)) as s:
        assert s.generate(PROMPTS[:1], opts).token_ids == s.generate(PROMPTS[:1], opts).token_ids


@pytest.mark.parametrize("levels", [dict(router_levels=(8, 2)), dict(level=4)])
def test_budget_changes_speed_never_output(packed, levels):
    opts = SamplingOptions(max_new_tokens=10)
    with Session(packed, RunOptions(memory_budget=BIG, **levels)) as s:
        unlimited = s.generate(PROMPTS, opts)
        minimum = s.plan.minimum
    with Session(packed, RunOptions(memory_budget=minimum, **levels)) as s:
        assert s.plan.cache_experts < s.ckpt.num_experts  # cannot hold one layer's experts
        tight = s.generate(PROMPTS, opts)
    assert tight.token_ids == unlimited.token_ids
    steps = tight.stats["generated_tokens"]
    assert tight.stats["cache"]["evictions"] >= steps  # evictions on every step
    assert tight.stats["bytes_read"] > unlimited.stats["bytes_read"]
    for report in (unlimited, tight):
        mem = report.stats["memory"]
        assert 0 < mem["peak_bytes"] <= mem["budget_bytes"]


def test_budget_below_minimum_fails_up_front_saying_the_minimum(packed):
    with Session(packed, RunOptions(memory_budget=BIG)) as s:
        minimum = s.plan.minimum
    with pytest.raises(BudgetError, match=r"minimum \d+ MiB"):
        Session(packed, RunOptions(memory_budget=minimum - 1))


def test_request_larger_than_the_planned_kv_is_refused(packed):
    with Session(packed, RunOptions(memory_budget=BIG, max_tokens=8)) as s:
        with pytest.raises(BudgetError, match="KV-cache tokens"):
            s.generate(PROMPTS, SamplingOptions(max_new_tokens=8))


def test_stats_report_the_run(packed):
    with Session(packed, RunOptions(memory_budget=BIG, router_levels=(8, 2), reuse_aware=False)) as s:
        stats = s.generate(PROMPTS[:1], SamplingOptions(max_new_tokens=6)).stats
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s", "bytes_read_per_token"):
        assert stats[key] > 0, key
    assert 0 <= stats["cache"]["hit_rate"] <= 1
    assert 0 < stats["schedule_efficiency"] <= 1.0 + 1e-6
    assert stats["bytes_read"] > 0 and stats["reads"] > 0


def test_start_up_warm_up_reads_and_holds_no_expert(packed):
    """The warm-up forward (library code mapped at start-up) runs the model with zero expert outputs:
    nothing is read, cached or counted, and the first request computes as without it."""
    with Session(packed, RunOptions(memory_budget=BIG, router_levels=(8, 2), reuse_aware=False)) as s:
        assert s.store.bytes_read == 0 and s.cache.held_bytes == 0 and s.pipeline.stats.steps == 0
        assert s.meter.rss_peak_delta >= 0
        warm = s.generate(["Once upon a time"], SamplingOptions(max_new_tokens=6))
    with Session(packed, RunOptions(memory_budget=BIG, router_levels=(8, 2), reuse_aware=False)) as s:
        s._warm_up()  # a second warm-up changes nothing either
        again = s.generate(["Once upon a time"], SamplingOptions(max_new_tokens=6))
    assert warm.texts == again.texts and warm.texts[0]


def test_chunked_prefill_generates_what_one_forward_does_in_a_smaller_plan(packed):
    opts = SamplingOptions(max_new_tokens=8)
    long_prompts = [" ".join(PROMPTS * 3), PROMPTS[1]]
    with Session(packed, RunOptions(memory_budget=BIG, level=4, max_tokens=256)) as s:
        whole = s.generate(long_prompts, opts)
        whole_plan = s.plan
    # 6 positions per row and forward: the longer prompt prefills in several chunks
    with Session(packed, RunOptions(memory_budget=BIG, level=4, max_tokens=256, forward_tokens=12)) as s:
        chunked = s.generate(long_prompts, opts)
        assert s.plan.workspace < whole_plan.workspace
        assert s.plan.expert_cache > whole_plan.expert_cache
        with pytest.raises(BudgetError, match="forward_tokens"):
            s.generate(PROMPTS * 7, SamplingOptions(max_new_tokens=1))  # 14 prompts: fewer than one position each
    assert chunked.token_ids == whole.token_ids
    assert chunked.stats["expert_layer_steps"] > whole.stats["expert_layer_steps"]  # prefill ran as several forwards
    assert chunked.stats["prompt_tokens"] == whole.stats["prompt_tokens"]
    assert 0 < chunked.stats["memory"]["peak_bytes"] <= chunked.stats["memory"]["budget_bytes"]


def test_generation_stops_where_the_models_context_ends():
    from d2moe.runtime.generate import context_length, within_context

    allowed, message = within_context(3, 5000, 1024)
    assert allowed == 1021 and "generating 1021" in message
    assert within_context(1000, 24, 1024) == (24, None)  # exactly full: as asked
    allowed, message = within_context(1500, 8, 1024)
    assert allowed == 1 and "past the model's context" in message
    assert within_context(10, 5000, None) == (5000, None)  # no max_position_embeddings: as asked
    assert context_length({"max_position_embeddings": 4096}) == 4096
    assert context_length({"text_config": {"max_position_embeddings": 2048}}) == 2048
    assert context_length({"max_position_embeddings": True}) is None
    # save_pretrained leaves out a field equal to its default: the model still has the default's context
    from transformers import MixtralConfig
    omitted = {"model_type": "mixtral", "hidden_size": 64, "num_hidden_layers": 1}
    assert context_length(omitted) == MixtralConfig().max_position_embeddings
