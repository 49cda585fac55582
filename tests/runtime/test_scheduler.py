"""HEBF / Johnson scheduling: makespan model, lower bound, optimality on small instances, ordering rules."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.errors import UsageError
from d2moe.runtime.scheduler import (
    CostModel,
    Job,
    expert_flops_per_token,
    hebf_order,
    johnson_order,
    lower_bound,
    make_job,
    plan_step,
    simulate,
    timeline,
)

times = st.floats(0.0, 10.0, allow_nan=False).map(lambda x: round(x, 3))


@st.composite
def job_lists(draw, min_size=0, max_size=8):
    n = draw(st.integers(min_size, max_size))
    jobs = []
    for i in range(n):
        resident = draw(st.booleans())
        jobs.append(Job(key=(0, i), level=draw(st.sampled_from([2, 3, 4])), tokens=draw(st.integers(1, 32)),
                        load_s=0.0 if resident else draw(times), compute_s=draw(times), resident=resident))
    return jobs


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_every_order_is_at_least_the_lower_bound(data):
    jobs = data.draw(job_lists())
    order = data.draw(st.permutations(jobs))
    assert simulate(order) >= lower_bound(jobs) - 1e-9
    assert simulate(order) >= max(sum(j.io_s for j in jobs), sum(j.compute_s for j in jobs)) - 1e-9


@settings(max_examples=60, deadline=None)
@given(job_lists(min_size=1, max_size=6))
def test_johnson_is_optimal_against_brute_force(jobs):
    best = min(simulate(p) for p in itertools.permutations(jobs))
    assert simulate(johnson_order(jobs)) <= best + 1e-9


@settings(max_examples=100, deadline=None)
@given(job_lists())
def test_orders_are_permutations_and_hebf_follows_its_rules(jobs):
    for order in (johnson_order(jobs), hebf_order(jobs)):
        assert sorted(map(id, order)) == sorted(map(id, jobs))
    order = hebf_order(jobs)
    n_res = sum(j.resident for j in jobs)
    assert all(j.resident for j in order[:n_res])  # resident work first
    missing = order[n_res:]
    for a, b in zip(missing, missing[1:], strict=False):  # then hottest first, lowest level first
        assert (a.tokens, -a.level) >= (b.tokens, -b.level)


def test_simulate_matches_a_hand_schedule():
    a = Job("a", 4, 8, load_s=1.0, compute_s=3.0)
    b = Job("b", 2, 1, load_s=2.0, compute_s=1.0)
    # a then b: load a 0-1, compute a 1-4, load b 1-3, compute b 4-5
    assert simulate([a, b]) == 5.0
    # b then a: load b 0-2, compute b 2-3, load a 2-3, compute a 3-6
    assert simulate([b, a]) == 6.0
    assert johnson_order([b, a]) == [a, b]
    slots = timeline([a, b])
    assert [(s.load_start, s.load_end, s.compute_start, s.compute_end) for s in slots] == [
        (0.0, 1.0, 1.0, 4.0), (1.0, 3.0, 4.0, 5.0)]


def test_resident_jobs_compute_while_the_first_load_runs():
    r = Job("r", 2, 4, load_s=0.0, compute_s=2.0, resident=True)
    m = Job("m", 2, 4, load_s=2.0, compute_s=1.0)
    assert simulate(hebf_order([m, r])) == 3.0 == lower_bound([m, r])
    assert simulate([m, r]) == 5.0  # computes run in order: the resident job waits behind the load
    assert simulate([r]) == 2.0 and simulate([]) == 0.0


def test_hebf_loads_hot_then_low_level_first():
    jobs = [Job(("l", i), lv, tok, 1.0, 1.0) for i, (lv, tok) in enumerate([(4, 3), (2, 9), (3, 9), (2, 1)])]
    jobs.append(Job(("l", 9), 4, 1, 0.0, 1.0, resident=True))
    assert [(j.level, j.tokens) for j in hebf_order(jobs)] == [(4, 1), (2, 9), (3, 9), (4, 3), (2, 1)]


def test_plan_step_reports_makespan_and_bound():
    jobs = [Job(i, 2, 1, load_s=float(i % 3), compute_s=float((i * 7) % 4)) for i in range(6)]
    j, h, g = (plan_step(jobs, p) for p in ("johnson", "hebf", "given"))
    assert j.makespan <= min(h.makespan, g.makespan)
    assert j.lower_bound == h.lower_bound == lower_bound(jobs)
    assert 0 < j.efficiency <= 1.0
    with pytest.raises(UsageError, match="schedule policy"):
        plan_step(jobs, "random")


def test_cost_model_follows_measurements():
    m = CostModel(bandwidth=1e9, flops_rate=1e9, ema=0.5)
    assert m.load_seconds(2_000_000) == pytest.approx(2e-3)
    for _ in range(30):
        m.observe_load(4_000_000, 1e-3)  # a 4 GB/s disk
        m.observe_compute(2e9, 0.1)  # a 20 GFLOP/s compute
    assert m.bandwidth == pytest.approx(4e9, rel=1e-3)
    assert m.flops_rate == pytest.approx(2e10, rel=1e-3)
    flops = expert_flops_per_token({"gate": (128, 64), "up": (128, 64), "down": (64, 128)})
    assert flops == 2 * 3 * 128 * 64
    job = make_job((0, 1), 3, 5, nbytes=4_000_000, flops_per_token=flops, resident=False, model=m)
    assert job.load_s == pytest.approx(1e-3, rel=1e-3)
    assert job.compute_s == pytest.approx(5 * flops / 2e10, rel=1e-3)
    assert make_job((0, 1), 3, 5, 4_000_000, flops, True, m).load_s == 0.0
    m.observe_load(0, 1.0)  # nothing measured: no change
    assert m.bandwidth == pytest.approx(4e9, rel=1e-3)
