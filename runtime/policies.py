"""Run policies: D²MoE and the paper's baselines as settings of the same runtime.

A policy is two things: a `PolicySpec` (how experts are held, reused, ordered and preloaded) and a
level selector (which bit-width each (token, selected expert) pair runs at: the second half of
dual routing; the model's own router picks the experts).

Level selectors share one call, `select(layer, hidden [T, H], top_k_index [T, K], top_k_weights
[T, K]) -> levels [T, K]` (bit values, int64):
- `UniformLevels`: one level for everything (MoQE-DynaIO, hold-int8/int4).
- `RouterWeightLevels`: the token's top-1 expert (largest router weight) runs at the high level,
  the others at the low one (D²MoE without a trained gate).
- `GateLevels`: the trained bit-width gate with its capacities (`d2moe train-router`).
- `StaticExpertLevels`: EdgeMoE-like, one level per expert fixed from activation frequency counted
  over the first `calibration_tokens` tokens (hot experts get more bits); until then the middle level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from d2moe.errors import UsageError
from d2moe.runtime.gate_fast import SMALL, FrozenGate

ORDERS = ("hebf", "johnson", "id")


@dataclass(frozen=True)
class PolicySpec:
    """How a policy holds, reuses, orders and preloads experts."""

    name: str
    levels: str  # "uniform" | "router" | "gate" | "static": which level selector
    nested_reuse: bool = True  # a held lower level is upgraded with the extra segments (MWQ); False: per-level copies
    preload_next: bool = False  # predict the next layer's experts with its router and load them ahead
    order: str = "hebf"  # order of the loads of a layer step: "hebf" | "johnson" | "id" (expert id)
    fetch_ahead: bool = False  # reuse-aware: read missing experts up to the top level while the cache has free room
    hold_if_fits: bool = False  # reuse-aware: when every expert fits at the top level, read them all up front
    summary: str = ""


POLICIES: dict[str, PolicySpec] = {
    p.name: p
    for p in (
        PolicySpec("d2moe", "gate", order="hebf", fetch_ahead=True, hold_if_fits=True,
                   summary="gate levels (or router-weight levels), bit-aware cache with decay, HEBF, upgrades, "
                           "reuse-aware reads (top level into free room; everything up front when it all fits)"),
        PolicySpec("hold-int8", "uniform", order="id",
                   summary="all experts resident at 8 bits, loaded up front"),
        PolicySpec("hold-int4", "uniform", order="id",
                   summary="all experts resident at 4 bits, loaded up front"),
        PolicySpec("hold", "uniform", order="id",
                   summary="all experts resident at --level bits, loaded up front (any packed level)"),
        PolicySpec("matryoshka-free", "gate", nested_reuse=False, order="id",
                   summary="the same mixed levels from separate per-level copies: no upgrade reuse"),
        PolicySpec("moqe-dynaio", "uniform", order="id", summary="one uniform level, experts loaded on demand"),
        PolicySpec("edgemoe", "static", preload_next=True, order="id",
                   summary="static per-expert level from activation frequency + predictive preload"),
    )
}
HOLD_LEVELS = {"hold-int8": 8, "hold-int4": 4}


def hold_level(name: str, level: int | None) -> int | None:
    """The level a hold policy keeps every expert at (None: not a hold policy)."""
    if name == "hold":
        if level is None:
            raise UsageError("--policy hold keeps every expert resident at --level N: give --level (e.g. --level 2)")
        return level
    return HOLD_LEVELS.get(name)


def get_policy(name: str, order: str | None = None) -> PolicySpec:
    """The named policy, optionally with another load order; UsageError naming the choices."""
    if name not in POLICIES:
        raise UsageError(f"--policy {name!r} is unknown: use one of {', '.join(POLICIES)}")
    spec = POLICIES[name]
    if order is not None:
        if order not in ORDERS:
            raise UsageError(f"--schedule {order!r} is unknown: use one of {', '.join(ORDERS)}")
        from dataclasses import replace

        spec = replace(spec, order=order)
    return spec


def check_level(level: int, bits: Sequence[int], policy: str, option: str = "--level") -> int:
    """`level` must be one of the packed levels; the error says how to re-pack."""
    if level not in bits:
        if not 1 <= level <= 8:  # no pack holds it: name the levels there are
            raise UsageError(f"{option} {level} is not a bit-width: use one of the packed levels "
                             f"{', '.join(map(str, bits))}")
        wanted = ",".join(str(b) for b in sorted(set(bits) | {level}))
        raise UsageError(
            f"{policy} needs level {level} but the checkpoint holds levels {list(bits)} ({option}): "
            f"use one of those or re-pack with `d2moe pack SRC OUT --bits {wanted}`"
        )
    return level


class LevelSelector(Protocol):
    """What every policy's level rule gives the pipeline: a level per (token, top-k slot) pair."""

    def select(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
               top_k_weights: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> str: ...

    @property
    def top(self) -> int: ...  # the highest level it can give: reads above it are never computed


class UniformLevels:
    """Every pair at one level."""

    def __init__(self, level: int) -> None:
        self.level = int(level)

    def select(self, layer: int, hidden, top_k_index: torch.Tensor, top_k_weights) -> torch.Tensor:
        return torch.full(top_k_index.shape, self.level, dtype=torch.long)

    def describe(self) -> str:
        return f"uniform {self.level}-bit"

    @property
    def top(self) -> int:
        return self.level


class RouterWeightLevels:
    """The token's most weighted expert at `high` bits, its other experts at `low` bits."""

    def __init__(self, high: int, low: int) -> None:
        if low > high:
            raise UsageError(f"--router-levels {high},{low}: the low level {low} is above the high level {high}; write HIGH,LOW, e.g. {low},{high}")
        self.high, self.low = int(high), int(low)

    def select(self, layer: int, hidden, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        levels = torch.full(top_k_index.shape, self.low, dtype=torch.long)  # [T, K]
        top1 = top_k_weights.float().argmax(dim=-1, keepdim=True)  # [T, 1]
        return levels.scatter_(1, top1, self.high)

    def describe(self) -> str:
        return f"router weight (top-1 {self.high}-bit, others {self.low}-bit)"

    @property
    def top(self) -> int:
        return self.high


class GateLevels:
    """The trained bit-width gate (with its capacity rule)."""

    def __init__(self, gate) -> None:
        self.gate = gate
        # decode steps (a few pairs) run the frozen numpy copy on the CPU: the same levels for ~1/3 the time.
        # On a GPU too: the step copies the routing to the host anyway, and the torch gate there is ~30 tiny
        # launches and a sync (~1.2 ms a layer step on an H100, BENCHMARKS.md §8) against ~40 µs of numpy.
        float32 = all(p.dtype == torch.float32 for p in gate.parameters())
        self.frozen = FrozenGate(gate) if float32 else None

    def select(self, layer: int, hidden: torch.Tensor, top_k_index, top_k_weights) -> torch.Tensor:
        if self.frozen is not None and top_k_index.numel() <= SMALL:
            return self.frozen.select_levels(layer, hidden.detach().cpu(), top_k_index.cpu(),
                                             top_k_weights.detach().cpu())
        return self.gate.select_levels(layer, hidden.float(), top_k_index, top_k_weights.float()).long().cpu()

    def describe(self) -> str:
        cap = ",".join(f"{c:g}" for c in self.gate.capacity)
        return f"trained gate (levels {list(self.gate.levels)}, capacity {cap})"

    @property
    def top(self) -> int:
        return max(self.gate.levels)


class StaticExpertLevels:
    """EdgeMoE-like: one fixed level per (layer, expert), from activation counts of the first tokens.

    During calibration (a layer has seen fewer than `calibration_tokens` tokens) every pair runs at
    the middle level. Then the experts of a layer are ranked by count and split into equal groups,
    the most activated group getting the highest level.
    """

    def __init__(self, bits: Sequence[int], num_experts: int, calibration_tokens: int = 16) -> None:
        self.bits = tuple(int(b) for b in bits)
        self.num_experts = int(num_experts)
        self.calibration_tokens = int(calibration_tokens)
        self.counts: dict[int, torch.Tensor] = {}  # layer -> [E] activations
        self.seen: dict[int, int] = {}  # layer -> tokens counted
        self.table: dict[int, torch.Tensor] = {}  # layer -> [E] fixed level per expert

    def select(self, layer: int, hidden, top_k_index: torch.Tensor, top_k_weights) -> torch.Tensor:
        if layer in self.table:
            return self.table[layer][top_k_index.cpu()]
        counts = self.counts.setdefault(layer, torch.zeros(self.num_experts, dtype=torch.long))
        counts += torch.bincount(top_k_index.reshape(-1).cpu(), minlength=self.num_experts)[: self.num_experts]
        self.seen[layer] = self.seen.get(layer, 0) + top_k_index.shape[0]
        if self.seen[layer] >= self.calibration_tokens:
            self.table[layer] = self.levels_from_counts(counts)
        middle = self.bits[len(self.bits) // 2]
        return torch.full(top_k_index.shape, middle, dtype=torch.long)

    def levels_from_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """[E] level per expert: rank by count (ties: lower id), equal groups, hottest = highest level."""
        order = torch.argsort(-counts, stable=True)  # hottest first
        table = torch.empty(self.num_experts, dtype=torch.long)
        groups = len(self.bits)
        for rank, expert in enumerate(order.tolist()):
            table[expert] = self.bits[groups - 1 - rank * groups // self.num_experts]
        return table

    def expert_level(self, layer: int, expert: int) -> int | None:
        """The fixed level of an expert once calibrated (for preloading), else None."""
        table = self.table.get(layer)
        return None if table is None else int(table[expert])

    def describe(self) -> str:
        return f"static per-expert levels {list(self.bits)} after {self.calibration_tokens} calibration tokens"

    @property
    def top(self) -> int:
        return max(self.bits)


def make_level_selector(
    spec: PolicySpec,
    bits: Sequence[int],
    num_experts: int,
    level: int | None = None,
    router_levels: tuple[int, int] | None = None,
    gate=None,
    calibration_tokens: int = 16,
):
    """The level selector a policy uses, given the packed levels and options.

    level: a uniform level (moqe-dynaio's; for d2moe / matryoshka-free it replaces the gate).
    router_levels: (high, low) of router-weight levels (default: highest and lowest packed level).
    gate: a loaded `BitWidthGate`; d2moe / matryoshka-free use it unless `level` or `router_levels`
    is given, and fall back to router-weight levels without one.
    """
    bits = tuple(int(b) for b in bits)
    if spec.name in HOLD_LEVELS:
        if level is not None and level != HOLD_LEVELS[spec.name]:
            raise UsageError(f"--policy {spec.name} runs at {HOLD_LEVELS[spec.name]} bits; drop --level {level}")
        return UniformLevels(check_level(HOLD_LEVELS[spec.name], bits, spec.name, option="--policy"))
    if spec.levels == "static":
        return StaticExpertLevels(bits, num_experts, calibration_tokens)
    if spec.levels == "uniform" or level is not None:
        return UniformLevels(check_level(bits[-1] if level is None else level, bits, spec.name))
    if gate is not None and router_levels is None:
        return GateLevels(gate)
    high, low = router_levels if router_levels is not None else (bits[-1], bits[0])
    check_level(high, bits, spec.name, option="--router-levels")
    check_level(low, bits, spec.name, option="--router-levels")
    return RouterWeightLevels(high, low)
