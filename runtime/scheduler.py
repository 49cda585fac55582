"""Ordering one MoE layer's expert work: load (I/O channel) then compute (compute channel).

Each step of each MoE layer gives a set of jobs, one per (expert, level) the gate chose:
a job must be loaded (zero time when resident in the cache) before it computes. With one I/O
channel and one compute channel that is a two-machine flow shop, F2||Cmax, and Johnson's rule
minimises its makespan: jobs whose load is shorter than their compute go first in ascending
load, the rest follow in descending compute. HEBF (hottest expert, bit-width first, D²MoE)
is the paper's heuristic: resident jobs first, then loads hottest expert (most tokens) first and
lowest level first. Both are measured against the lower bound below.

Timing model of `simulate`: loads run back to back on the I/O channel in the given order
(resident jobs take no I/O and are ready at time 0); a job computes once its load is done and
the previous compute is finished. The makespan is the last compute's end.

Public API (pure: no I/O, no torch)
----------
Job(key, level, tokens, load_s, compute_s, resident=False)
johnson_order(jobs) -> list[Job];  hebf_order(jobs) -> list[Job]
timeline(order) -> list[Slot];  simulate(order) -> makespan seconds
lower_bound(jobs) -> seconds (max of sum-load + min-compute, sum-compute + first-load wait, ...)
plan_step(jobs, policy="johnson"|"hebf"|"given") -> StepPlan(order, makespan, lower_bound)
CostModel(bandwidth=2e9, flops_rate=5e10, ...): load_seconds(nbytes), compute_seconds(tokens,
    flops_per_token, fixed_flops=0), observe_load(nbytes, s), observe_compute(flops, s)  (EMA)
make_job(key, level, tokens, nbytes, flops_per_token, resident, model, fixed_flops=0) -> Job
expert_flops_per_token(matrix_shapes) -> float   # 2 * sum O*I over gate/up/down
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from d2moe.errors import UsageError

POLICIES = ("johnson", "hebf", "given")


@dataclass(frozen=True)
class Job:
    """One expert's work in one layer step."""

    key: Hashable  # (layer, expert)
    level: int  # bit-width it computes at
    tokens: int  # tokens routed to it this step (its "heat")
    load_s: float  # seconds of I/O still needed (0 when resident at >= level)
    compute_s: float  # seconds of dequantize + matmul
    resident: bool = False  # held in the cache at a sufficient level: no I/O

    @property
    def io_s(self) -> float:
        return 0.0 if self.resident else self.load_s


@dataclass(frozen=True)
class Slot:
    """When one job loads and computes in a simulated schedule."""

    job: Job
    load_start: float
    load_end: float
    compute_start: float
    compute_end: float


@dataclass(frozen=True)
class StepPlan:
    order: list[Job]
    makespan: float  # predicted by `simulate`
    lower_bound: float  # no order can beat this

    @property
    def efficiency(self) -> float:
        """lower_bound / makespan, 1.0 = provably optimal."""
        return self.lower_bound / self.makespan if self.makespan > 0 else 1.0


def johnson_order(jobs: Iterable[Job]) -> list[Job]:
    """Johnson's rule for the two-machine flow shop (optimal makespan)."""
    jobs = list(jobs)
    first = sorted((j for j in jobs if j.io_s < j.compute_s), key=lambda j: j.io_s)
    last = sorted((j for j in jobs if j.io_s >= j.compute_s), key=lambda j: -j.compute_s)
    return first + last


def hebf_order(jobs: Iterable[Job]) -> list[Job]:
    """Resident jobs first (hottest first); then loads hottest expert first, lowest level first."""
    jobs = list(jobs)
    resident = sorted((j for j in jobs if j.resident), key=lambda j: -j.tokens)
    missing = sorted((j for j in jobs if not j.resident), key=lambda j: (-j.tokens, j.level))
    return resident + missing


def timeline(order: Sequence[Job]) -> list[Slot]:
    io_free = compute_free = 0.0
    slots = []
    for j in order:
        if j.resident:
            load_start = load_end = 0.0
        else:
            load_start, load_end = io_free, io_free + j.load_s
            io_free = load_end
        start = max(compute_free, load_end)
        compute_free = start + j.compute_s
        slots.append(Slot(j, load_start, load_end, start, compute_free))
    return slots


def simulate(order: Sequence[Job]) -> float:
    """Makespan of running `order` on one I/O channel and one compute channel."""
    slots = timeline(order)
    return max((s.compute_end for s in slots), default=0.0)


def lower_bound(jobs: Iterable[Job]) -> float:
    """A makespan no order can beat.

    - all loads, then at least the cheapest compute among loaded jobs;
    - all computes, after at least the shortest load when no job is resident;
    """
    jobs = list(jobs)
    if not jobs:
        return 0.0
    missing = [j for j in jobs if not j.resident]
    sum_load = sum(j.load_s for j in missing)
    sum_compute = sum(j.compute_s for j in jobs)
    tail = min((j.compute_s for j in missing), default=0.0)
    head = 0.0 if len(missing) < len(jobs) else min(j.load_s for j in missing)
    return max(sum_load + tail, sum_compute + head)


def plan_step(jobs: Iterable[Job], policy: str = "johnson") -> StepPlan:
    jobs = list(jobs)
    if policy == "johnson":
        order = johnson_order(jobs)
    elif policy == "hebf":
        order = hebf_order(jobs)
    elif policy == "given":
        order = jobs
    else:
        raise UsageError(f"schedule policy {policy!r} is unknown: use one of {', '.join(POLICIES)}")
    return StepPlan(order, simulate(order), lower_bound(jobs))


class CostModel:
    """Predicts load and compute seconds; estimates follow measured timings (EMA)."""

    def __init__(
        self,
        bandwidth: float = 2e9,  # bytes/s of the expert store
        flops_rate: float = 5e10,  # flop/s of expert compute (dequantize + matmul)
        load_latency_s: float = 0.0,  # fixed cost per read (syscall, queueing)
        compute_latency_s: float = 0.0,  # fixed cost per expert call (kernel launches)
        ema: float = 0.3,  # weight of a new measurement
    ) -> None:
        if bandwidth <= 0 or flops_rate <= 0:
            raise UsageError("cost model bandwidth and flops_rate must be positive")
        if not 0.0 < ema <= 1.0:
            raise UsageError(f"cost model ema {ema} must be in (0, 1]")
        self.bandwidth = float(bandwidth)
        self.flops_rate = float(flops_rate)
        self.load_latency_s = float(load_latency_s)
        self.compute_latency_s = float(compute_latency_s)
        self.ema = float(ema)

    def load_seconds(self, nbytes: int) -> float:
        return 0.0 if nbytes <= 0 else self.load_latency_s + nbytes / self.bandwidth

    def compute_seconds(self, tokens: int, flops_per_token: float, fixed_flops: float = 0.0) -> float:
        flops = tokens * flops_per_token + fixed_flops
        return self.compute_latency_s + flops / self.flops_rate

    def observe_load(self, nbytes: int, seconds: float) -> None:
        """Fold one measured read into the bandwidth estimate."""
        net = seconds - self.load_latency_s
        if nbytes > 0 and net > 0:
            self.bandwidth += self.ema * (nbytes / net - self.bandwidth)

    def observe_compute(self, flops: float, seconds: float) -> None:
        net = seconds - self.compute_latency_s
        if flops > 0 and net > 0:
            self.flops_rate += self.ema * (flops / net - self.flops_rate)


def expert_flops_per_token(matrix_shapes: Mapping[str, tuple[int, int]]) -> float:
    """Multiply-adds of one token through one expert's matrices (2 flops each)."""
    return float(sum(2 * o * i for o, i in matrix_shapes.values()))


def make_job(
    key: Hashable,
    level: int,
    tokens: int,
    nbytes: int,
    flops_per_token: float,
    resident: bool,
    model: CostModel,
    fixed_flops: float = 0.0,
) -> Job:
    """A job with times from the cost model; `nbytes` = bytes still to read (0 if resident)."""
    load = 0.0 if resident else model.load_seconds(nbytes)
    return Job(key, level, tokens, load, model.compute_seconds(tokens, flops_per_token, fixed_flops), resident)
