"""--on-miss: load stays exact across budgets; lowbit / substitute / skip read less and say what they did."""

from __future__ import annotations

import pytest
import torch
from packed import packed_tiny

from d2moe.errors import UsageError
from d2moe.runtime.generate import SamplingOptions
from d2moe.runtime.miss import MissHandler, MissOptions
from d2moe.runtime.session import RunOptions, Session

BIG = 256 * 2**20
PROMPT = ["the quick brown fox jumps over the lazy dog"]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    torch.set_num_threads(1)
    return packed_tiny(tmp_path_factory, "mixtral", bits=(2, 3, 4), num_local_experts=8)[1]


def _budget(packed, experts: int) -> int:
    """A budget whose expert cache holds about `experts` experts at 4 bits."""
    from d2moe.runtime.session import plan_run

    ckpt, *_, plan = plan_run(packed, RunOptions(memory_budget=BIG, max_tokens=64))
    return plan.budget - plan.expert_cache + experts * ckpt.level_nbytes(4)


def _run(packed, budget: int, **kw):
    kw = kw if "level" in kw else {"router_levels": (4, 2), **kw}
    with Session(packed, RunOptions(memory_budget=budget, max_tokens=64, **kw)) as s:
        report = s.generate(PROMPT, SamplingOptions(max_new_tokens=12), chat_template=False)
    return report.token_ids[0], report.stats


def test_load_never_changes_the_output_with_the_budget(packed):
    big, stats_big = _run(packed, BIG, on_miss="load")
    small, stats_small = _run(packed, _budget(packed, 6), on_miss="load")
    assert small == big
    assert stats_small["misses"]["on_miss"] == "load" and stats_small["misses"]["bytes_saved"] == 0
    assert stats_small["misses"]["pairs"] == {} and stats_small["cache"]["misses"] > stats_big["cache"]["misses"]


@pytest.mark.parametrize("mode", ["lowbit", "substitute", "skip"])
def test_lossy_modes_handle_misses_and_read_less(packed, mode):
    budget = _budget(packed, 6)
    _, load = _run(packed, budget, on_miss="load", level=4)
    tokens, stats = _run(packed, budget, on_miss=mode, miss_threshold=0.5, level=4)
    handled = stats["misses"]["pairs"]
    assert handled.get(mode, 0) + handled.get("lowbit", 0) > 0, handled
    assert stats["misses"]["bytes_saved"] > 0
    assert stats["bytes_read"] < load["bytes_read"]
    assert len(tokens) == 12


def test_threshold_zero_handles_nothing(packed):
    _, stats = _run(packed, _budget(packed, 6), on_miss="skip", miss_threshold=0.0)
    assert stats["misses"]["pairs"] == {} and stats["misses"]["bytes_saved"] == 0


def test_options_are_checked():
    for bad in (dict(mode="drop"), dict(importance="loud"), dict(threshold=1.5)):
        with pytest.raises(UsageError):
            MissOptions(**bad)


def test_top1_pair_is_never_unimportant():
    h = MissHandler(MissOptions("skip", threshold=1.0), (2, 3, 4))
    w = torch.tensor([[0.6, 0.4], [0.1, 0.9], [0.5, 0.5]])
    low = h.unimportant(w, torch.full((3, 2), 2))
    assert low.tolist() == [[False, True], [True, False], [False, True]]
    g = MissHandler(MissOptions("skip", threshold=0.5, importance="gate"), (2, 3, 4))
    levels = torch.tensor([[2, 4], [3, 2], [2, 2]])
    assert g.unimportant(w, levels).tolist() == [[False, False], [False, False], [False, True]]


def test_weight_importance_is_the_pairs_share_of_its_tokens_routed_weight():
    """DeepSeek-V3 scales its top-k weights by routed_scaling_factor (2.5), OLMoE leaves them summing below 1: the
    threshold reads each pair's share, so the same pairs are handled whatever the scale."""
    h = MissHandler(MissOptions("reuse", threshold=0.35), (2, 3, 4))
    shares = torch.tensor([[0.8, 0.2], [0.5, 0.5], [0.3, 0.7]])
    levels = torch.full((3, 2), 2)
    for scale in (1.0, 2.5, 0.4):
        assert h.unimportant(shares * scale, levels).tolist() == [[False, True], [False, False], [True, False]]
        assert h.critical(shares * scale, levels).tolist() == [[True, False], [False, False], [False, True]]


def test_skip_renormalises_each_touched_token():
    class W:
        pairs = {2: (torch.tensor([0, 2]), torch.tensor([1, 0]))}

    w = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.5]])
    out = MissHandler._renormalise(w, [W()])
    assert out[0].tolist() == pytest.approx([1.0, 0.0]) and out[1].tolist() == pytest.approx([0.6, 0.4])
    assert out[2].tolist() == pytest.approx([0.0, 0.7])


def test_substitute_uses_the_nearest_resident_neighbour(packed):
    from d2moe.quantize.format import open_checkpoint

    ckpt = open_checkpoint(packed)
    sim = ckpt.manifest["similarity"]
    assert set(sim["neighbors"]) == {str(layer) for layer in ckpt.moe_layers}
    row = sim["neighbors"][str(ckpt.moe_layers[0])][0]
    scores = [s for _, s in row]
    assert scores == sorted(scores, reverse=True) and all(e != 0 for e, _ in row)
    _, stats = _run(packed, _budget(packed, 6), on_miss="substitute", miss_threshold=0.5)
    assert stats["misses"]["pairs"].get("substitute", 0) > 0


def test_run_cli_reports_misses(packed):
    import json

    from typer.testing import CliRunner

    from d2moe.cli import app

    budget = _budget(packed, 6)
    res = CliRunner().invoke(app, ["run", str(packed), "-p", PROMPT[0], "--memory-budget", str(budget),
                                   "--max-new-tokens", "6", "--on-miss", "skip", "--miss-threshold", "0.5",
                                   "--no-chat-template", "--json"])
    assert res.exit_code == 0, res.output
    misses = json.loads(res.stdout)["stats"]["misses"]
    assert misses["on_miss"] == "skip" and set(misses) >= {"pairs", "works", "bytes_saved", "fallback_loads"}
    bad = CliRunner().invoke(app, ["run", str(packed), "-p", "x", "--on-miss", "maybe"])
    assert bad.exit_code != 0 and "--on-miss" in str(bad.exception)


def test_bench_sweeps_the_miss_axis_with_quality(packed, tmp_path):
    from d2moe.apps.benchmark import RESULT_KEYS, run_bench
    from d2moe.apps.miss_bench import MODE_COLORS, plot_pareto
    from d2moe.runtime.miss import MISS_MODES

    assert set(MODE_COLORS) == set(MISS_MODES)  # every mode has its colour in the legend

    report = run_bench(packed, "30%", "moqe-dynaio@4,d2moe", prompt="the quick brown fox", max_new_tokens=4, repeats=1,
                       on_miss="load,skip", miss_threshold=0.5, quality_ids=list(range(5, 30)), quality_seq_len=16)
    doc = report.to_dict()
    assert [(r["policy"], r["on_miss"]) for r in doc["results"]] == [
        ("moqe-dynaio@4", "load"), ("moqe-dynaio@4", "skip"), ("d2moe", "load"), ("d2moe", "skip")]
    for r in doc["results"]:
        assert tuple(r) == RESULT_KEYS and r["perplexity"] > 1 and r["ratio_to_best_baseline_any_miss"] > 0
    assert doc["results"][0]["ppl_vs_load"] == 1.0 and doc["on_miss"] == ["load", "skip"]
    plot_pareto(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_bench_runs_one_mode_at_two_thresholds_in_one_sweep(packed):
    """`--on-miss skip,skip:0`: the same mode with its own threshold beside the sweep's; threshold 0 handles no pair."""
    from d2moe.apps.benchmark import run_bench
    from d2moe.apps.miss_bench import miss_modes, split_mode

    assert split_mode("reuse:0", 0.35) == ("reuse", 0.0) and split_mode("reuse", 0.35) == ("reuse", 0.35)
    for bad in ("reuse:2", "reuse:x", "maybe:0", "", " , "):
        with pytest.raises(UsageError, match="--on-miss"):
            miss_modes(bad)
    report = run_bench(packed, "30%", "d2moe", prompt="the quick brown fox", max_new_tokens=4, repeats=1,
                       on_miss="skip,skip:0", miss_threshold=0.9, quality_ids=list(range(5, 30)), quality_seq_len=16)
    by = {r["on_miss"]: r for r in report.to_dict()["results"]}
    assert set(by) == {"skip", "skip:0"}
    assert by["skip"]["misses"]["pairs"].get("skip", 0) > 0  # a high bar: pairs are skipped
    assert by["skip:0"]["misses"]["pairs"] == {}  # threshold 0: no pair is unimportant


def test_eval_scores_lossy_modes_in_decode_mode(packed, tmp_path):
    import json

    from typer.testing import CliRunner

    from d2moe.cli import app

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 6)
    res = CliRunner().invoke(app, ["eval", str(packed), "--text", str(text), "--seq-len", "16", "--max-tokens", "40",
                                   "--policy", "moqe-dynaio@4", "--on-miss", "skip", "--miss-threshold", "0.5",
                                   "--memory-budget", str(_budget(packed, 6)), "--json"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)["results"][0]
    assert row["scoring"] == "decode" and row["misses"]["on_miss"] == "skip" and row["perplexity"]["tokens"] == 39
    unbounded = CliRunner().invoke(app, ["eval", str(packed), "--text", str(text), "--on-miss", "skip"])
    assert isinstance(unbounded.exception, UsageError) and "without --memory-budget" in str(unbounded.exception)


def test_reuse_keeps_every_expert_at_a_lower_level_instead_of_reading_it_again(packed):
    """A budget that holds every expert at 2 bits but not at 4: `reuse` cuts experts to 2 bits rather than
    evict them, runs pairs at the level held, and so reads less than `load`; at an unlimited budget it is
    `load` (nothing misses), token for token."""
    budget = _budget(packed, 9)  # 16 experts: 8 at 2 bits, 16 at 4
    _, load = _run(packed, budget, on_miss="load")
    tokens, stats = _run(packed, budget, on_miss="reuse")
    assert stats["cache"]["demotions"] > 0 and stats["cache"]["evictions"] == 0 < load["cache"]["evictions"]
    assert stats["misses"]["pairs"].get("reuse", 0) > 0 and stats["bytes_read"] < load["bytes_read"]
    assert stats["memory"]["peak_bytes"] <= budget and len(tokens) == 12
    assert _run(packed, BIG, on_miss="reuse")[0] == _run(packed, BIG, on_miss="load")[0]


def test_slow_use_decays_per_step_of_its_own_layer():
    from d2moe.runtime.miss import SlowUse

    use = SlowUse(half_life=2)
    use.step(0, [((0, 1), 4)])
    use.step(0, [])
    use.step(0, [])
    use.step(1, [((1, 5), 1)])
    assert use.get((0, 1)) == pytest.approx(2.0) and use.get((1, 5)) == 1 and use.get((0, 2)) == 0


def test_reuse_upgrades_only_an_expert_used_twice_as_much_as_those_it_cuts():
    """An upgrade pays when cutting experts used less than half as much frees its room; equal use never trades."""
    from types import SimpleNamespace

    from d2moe.runtime.cache import ExpertCache

    hot = SimpleNamespace(key=(0, 1))
    for cold_use, pays in ((5.1, False), (4.9, True)):
        cache = ExpertCache(140, policy="lru")
        handler = MissHandler(MissOptions("reuse"), bits=(2, 4))
        cache.demote_first(2, lambda key, level: {2: 40, 4: 100}[level], order=handler.use.get)
        cache.put((0, 0), 4, bytes(100))
        cache.put((0, 1), 2, bytes(40))
        handler.use.step(0, [((0, 1), 10), ((0, 0), cold_use)])
        assert handler._upgrade_pays(cache, hot, 60, [hot]) is pays
    assert not handler._upgrade_pays(cache, hot, 60, [hot, SimpleNamespace(key=(0, 0))])  # this step's own


def test_reuse_never_runs_a_critical_pair_below_its_level(packed):
    """A pair of importance > 1 - threshold gets its level under `reuse`: with gate importance and levels 4:2,
    every top-1 pair is critical at threshold 0.5, so as many pairs run at 4 bits as under `load`, while the
    budget still makes `reuse` cut experts and run other pairs at the level held."""
    h = MissHandler(MissOptions("reuse", threshold=0.3), (2, 3, 4))
    w = torch.tensor([[0.75, 0.25], [0.6, 0.4]])
    assert h.critical(w, torch.full((2, 2), 2)).tolist() == [[True, False], [False, False]]
    budget = _budget(packed, 9)
    kw = dict(miss_importance="gate", miss_threshold=0.5)
    _, load = _run(packed, budget, on_miss="load", **kw)
    _, held = _run(packed, budget, on_miss="reuse", **kw)
    assert held["tokens_per_level"]["4"] == load["tokens_per_level"]["4"]
    assert held["cache"]["demotions"] > 0 and held["bytes_read"] < load["bytes_read"]
    _, free = _run(packed, budget, on_miss="reuse", miss_importance="gate", miss_threshold=0.0)
    assert free["tokens_per_level"]["4"] < load["tokens_per_level"]["4"]  # threshold 0: no pair is critical


@pytest.mark.parametrize("policy", ["d2moe", "edgemoe", "moqe-dynaio"])
def test_a_substitute_may_compute_with_an_expert_whose_upgrade_is_in_flight(packed, policy):
    """In one step a work may upgrade expert e while a substitute computes with e at the level held: the
    description the substitute attaches is of that level, so the upgraded entry must not keep it."""
    budget = _budget(packed, 4)
    for mode in ("substitute", "reuse"):
        with Session(packed, RunOptions(memory_budget=budget, max_tokens=64, policy=policy, on_miss=mode,
                                        miss_threshold=0.5)) as s:
            report = s.generate([PROMPT[0] + " " + PROMPT[0]], SamplingOptions(max_new_tokens=24), chat_template=False)
        assert len(report.token_ids[0]) == 24


def test_substitute_without_similarity_says_so_in_one_note_line(capsys):
    """A checkpoint packed --no-similarity: substitute falls back to loading, and says how to get substitutes."""
    MissHandler(MissOptions("substitute"), (2, 3, 4), None)
    err = capsys.readouterr().err
    assert err.startswith("note: --on-miss substitute") and err.count("\n") == 1 and "--no-similarity" in err
    MissHandler(MissOptions("substitute"), (2, 3, 4), {0: [[1], [0]]})
    assert capsys.readouterr().err == ""
