"""The bench sweep: interleaving, medians, n/a budgets, ratios, budget parsing, the JSON schema on a real pack."""

from __future__ import annotations

import json

import pytest
import torch
from packed import packed_tiny

from d2moe.apps import benchmark as bm
from d2moe.apps.benchmark import Budget, RunMeasure
from d2moe.errors import BudgetError, UsageError


def _measure(decode: float) -> RunMeasure:
    return RunMeasure(prefill_tokens_per_s=2 * decode, decode_tokens_per_s=decode, ttft_s=0.1, peak_memory_bytes=100,
                      bytes_read_per_token=10.0, hit_rate=0.5, schedule_efficiency=0.9, generated_tokens=4,
                      levels={2: 3, 4: 1})


def test_sweep_interleaves_repeats_and_takes_medians():
    calls = []
    speed = {"d2moe": [3.0, 9.0, 5.0], "moqe-dynaio": [2.0, 2.0, 8.0]}

    seen: dict[tuple, int] = {}

    def run(policy, budget):
        calls.append((policy, budget.label))
        if len(calls) == 1:
            return _measure(1000.0)  # the warm-up: discarded
        k = seen[calls[-1]] = seen.get(calls[-1], 0) + 1
        return _measure(speed[policy][k - 1] * (2 if budget.label == "big" else 1))

    budgets = [Budget("small", 10), Budget("big", 20)]
    results = bm.sweep(["moqe-dynaio", "d2moe"], budgets, run, repeats=3)
    configs = [("moqe-dynaio", "small"), ("moqe-dynaio", "big"), ("d2moe", "small"), ("d2moe", "big")]
    assert calls == [configs[0]] + configs * 3  # warm-up, then round-robin: never one config's repeats back to back
    by = {(r.policy, r.budget.label): r for r in results}
    assert by[("d2moe", "small")].median("decode_tokens_per_s") == 5.0
    assert by[("moqe-dynaio", "big")].median("decode_tokens_per_s") == 4.0
    assert by[("d2moe", "small")].ratio_to_best_baseline == pytest.approx(5.0 / 2.0)
    assert by[("moqe-dynaio", "small")].ratio_to_best_baseline == pytest.approx(1.0)


def test_d2moe_at_a_level_is_not_a_baseline():
    results = bm.sweep(["moqe-dynaio", "d2moe@4"], [Budget("b", 10)],
                       lambda policy, budget: _measure(4.0 if policy == "d2moe@4" else 2.0), repeats=1, warmup=False)
    by = {r.policy: r for r in results}
    assert by["d2moe@4"].ratio_to_best_baseline == pytest.approx(2.0)  # over moqe-dynaio, not over itself


def test_budget_errors_become_na_with_what_is_needed_and_are_not_retried():
    calls = []

    def run(policy, budget):
        calls.append((policy, budget.label))
        if policy == "hold-int4" and budget.bytes < 50:
            raise BudgetError("--policy hold-int4 holds every expert at 4 bits (1.00 MiB): memory budget 10 B "
                              "is below the minimum 2 MiB", minimum=int(1.5 * 2**20))
        return _measure(1.0)

    results = bm.sweep(["hold-int4", "d2moe"], [Budget("tiny", 10), Budget("all", 100)], run, repeats=2,
                       warmup=False, unavailable={"d2moe": "needs level 8 packed"})
    by = {(r.policy, r.budget.label): r for r in results}
    na = by[("hold-int4", "tiny")]
    assert not na.ok and na.needs_bytes == int(1.5 * 2**20) and "minimum" in na.reason
    assert na.reason.endswith("; give --budgets 2MiB or more")  # bench has no --memory-budget
    assert calls.count(("hold-int4", "tiny")) == 1
    assert all(p != "d2moe" for p, _ in calls)
    assert by[("d2moe", "all")].to_dict()["status"] == "n/a"
    d = na.to_dict()
    assert d["status"] == "n/a" and d["decode_tokens_per_s"] is None and d["runs"] == []
    assert by[("hold-int4", "all")].ok and len(by[("hold-int4", "all")].runs) == 2


def test_parse_budgets():
    b = bm.parse_budgets("25%, 100%,1MiB", fixed_bytes=1000, expert_set_bytes=4000)
    assert [(x.label, x.bytes) for x in b] == [("25%", 2000), ("100%", 5000), ("1MiB", 2**20)]
    for bad in ("", "abc%", "0%", "25%,25%", "12XB", "50"):  # a bare 50 was 50 bytes
        with pytest.raises(UsageError):
            bm.parse_budgets(bad, 0, 100)
    error = BudgetError("memory budget 1 MiB is below the minimum 12 MiB for this model", minimum=12 * 2**20 - 5)
    assert str(error).endswith("for this model; use --memory-budget 12MiB or more")
    assert str(BudgetError("a batch too large")) == "a batch too large"


def test_policy_list():
    assert bm.policy_list("all")[-1] == "d2moe" and "hold-int8" in bm.policy_list("all")
    assert bm.policy_list("d2moe, moqe-dynaio@2") == ["d2moe", "moqe-dynaio@2"]
    for bad in ("", "nope", "d2moe,d2moe", "moqe-dynaio@x", "hold-int8@2"):  # hold-int8's level is its name's
        with pytest.raises(UsageError):
            bm.policy_list(bad)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    torch.set_num_threads(1)
    return packed_tiny(tmp_path_factory, "mixtral", bits=(2, 3, 4))[1]


def test_bench_json_schema_on_a_packed_model(packed, tmp_path):
    report = bm.run_bench(packed, "30%,100%", "hold-int8,hold-int4,d2moe", prompt="the quick brown fox",
                          max_new_tokens=3, repeats=1)
    doc = json.loads(json.dumps(report.to_dict()))  # JSON-serializable as is
    assert tuple(doc) == bm.REPORT_KEYS and doc["schema"] == "d2moe.bench/1"
    assert [b["label"] for b in doc["budgets"]] == ["30%", "100%"]
    assert doc["reference_level"] == 4 and doc["expert_set_bytes"] > 0
    assert len(doc["results"]) == 6
    for r in doc["results"]:
        assert tuple(r) == bm.RESULT_KEYS
    by = {(r["policy"], r["budget_label"]): r for r in doc["results"]}
    assert by[("hold-int8", "100%")]["status"] == "n/a" and "level 8" in by[("hold-int8", "100%")]["reason"]
    held = by[("hold-int4", "30%")]  # 30% of the 4-bit set cannot hold all 4-bit experts
    assert held["status"] == "n/a" and held["needs_bytes"] > held["budget_bytes"]
    full = by[("hold-int4", "100%")]
    assert full["status"] == "ok" and full["bytes_read_per_token"] == 0.0 and full["hit_rate"] == 1.0
    for budget in ("30%", "100%"):
        r = by[("d2moe", budget)]
        assert r["status"] == "ok" and r["peak_memory_bytes"] <= r["budget_bytes"]
        assert r["decode_tokens_per_s"] > 0 and 1 <= r["generated_tokens"] <= 3
        assert set(r["levels"]) <= {"2", "3", "4"} and len(r["runs"]) == 1
        assert tuple(r["runs"][0]) == (*bm.MEASURES, "levels")
    assert by[("d2moe", "100%")]["ratio_to_best_baseline"] == pytest.approx(
        by[("d2moe", "100%")]["decode_tokens_per_s"] / full["decode_tokens_per_s"])
    assert by[("d2moe", "30%")]["ratio_to_best_baseline"] is None  # no baseline ran at 30%
    png = tmp_path / "plot.png"
    bm.plot_throughput(report, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_runs_every_configuration_with_the_dense_layers_it_is_given(tmp_path_factory):
    """--dense-weights int8: percentage budgets count the dense layers as converted (a smaller fixed part), and
    every run converts them and stays within its budget."""
    from d2moe.kernels import cpu

    if cpu.load() is None:
        pytest.skip("no C compiler: dense weights stay in their dtype")
    wide = packed_tiny(tmp_path_factory, "mixtral", bits=(2, 3, 4), hidden_size=256)[1]  # attention large enough to convert
    source = bm.budget_basis(wide, 64)
    converted = bm.budget_basis(wide, 64, dense_weights="int8")
    assert converted[0] < source[0] and converted[1:] == source[1:]  # same expert set, smaller fixed part
    with pytest.raises(UsageError, match="--dense-weights 'int3' is unknown"):  # refused before any plan counts it
        bm.budget_basis(wide, 64, dense_weights="int3")
    report = bm.run_bench(wide, "50%", "moqe-dynaio,d2moe", prompt="the quick brown fox", max_new_tokens=3, repeats=1,
                          dense_weights="int8")
    doc = report.to_dict()
    assert doc["dense_weights"] == "int8" and doc["budgets"][0]["bytes"] < source[0] + source[1] // 2
    for r in doc["results"]:
        assert r["status"] == "ok" and r["peak_memory_bytes"] <= r["budget_bytes"]
