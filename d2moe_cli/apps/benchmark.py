"""Throughput against memory budget: every policy x budget in one process, interleaved, medians.

A sweep runs `repeats` rounds; each round runs every (policy, budget) configuration once, in
order, so slow drift of the machine (thermal, page cache, other load) spreads over all
configurations instead of landing on one. A configuration that cannot run under its budget
(below the policy's minimum, or a hold-* policy whose resident set does not fit) is reported as
not applicable with what it needs, and is not retried.

Each run is a fresh session (cold expert cache) that prefills the prompt and decodes
`max_new_tokens` greedily; the numbers of a configuration are medians over its repeats.

JSON schema (`BenchReport.to_dict()`, key `schema` = "d2moe.bench/1"):

    schema, checkpoint, prompt_tokens, max_new_tokens, repeats, io_bandwidth (bytes/s | null),
    expert_set_bytes (all experts at the reference level), reference_level,
    budgets: [{label, bytes}], policies: [str],
    results: [{
        policy, budget_label, budget_bytes,
        status: "ok" | "n/a", reason (str | null), needs_bytes (int | null),
        prefill_tokens_per_s, decode_tokens_per_s, ttft_s, peak_memory_bytes,
        bytes_read_per_token, hit_rate, schedule_efficiency, generated_tokens,
        levels: {bits: pairs}, ratio_to_best_baseline (float | null),
        runs: [{the same measures for each repeat}]
    }]

Measures of an n/a result are null. `ratio_to_best_baseline` is the decode throughput divided by
the best decode throughput among the baselines (every policy but d2moe) at the same budget.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from d2moe.errors import BudgetError, UsageError, min_mib
from d2moe.runtime.units import parse_percent, parse_size

SCHEMA = "d2moe.bench/1"
OURS = "d2moe"

MEASURES = (
    "prefill_tokens_per_s", "decode_tokens_per_s", "ttft_s", "peak_memory_bytes",
    "bytes_read_per_token", "hit_rate", "schedule_efficiency", "generated_tokens", "bytes_saved_per_token",
)
RESULT_KEYS = (
    "policy", "on_miss", "budget_label", "budget_bytes", "status", "reason", "needs_bytes", *MEASURES,
    "levels", "ratio_to_best_baseline", "ratio_to_best_baseline_any_miss", "perplexity", "ppl_vs_load", "misses",
    "runs",
)
REPORT_KEYS = (
    "schema", "checkpoint", "prompt_tokens", "max_new_tokens", "repeats", "io_bandwidth",
    "expert_set_bytes", "reference_level", "budgets", "policies", "on_miss", "miss_threshold", "quality_tokens",
    "dense_weights", "results",
)


@dataclass(frozen=True)
class Budget:
    """One memory budget of the sweep: its label as given and the bytes it means."""

    label: str
    bytes: int


@dataclass(frozen=True)
class RunMeasure:
    """What one run measured."""

    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    ttft_s: float
    peak_memory_bytes: int
    bytes_read_per_token: float  # expert bytes read from disk (prefill + decode) per generated token
    hit_rate: float  # expert-cache hits / lookups
    schedule_efficiency: float  # lower bound max(sum load, sum compute) / measured makespan, <= 1
    generated_tokens: int
    levels: dict[int, int] = field(default_factory=dict)  # bits -> (token, expert) pairs run at that level
    bytes_saved_per_token: float = 0.0  # reads the miss handling avoided, per generated token
    misses: dict = field(default_factory=dict)  # the run's `misses` stats (d2moe.runtime.miss.report)


@dataclass
class ConfigResult:
    """All runs of one (policy, on-miss, budget) configuration."""

    policy: str
    budget: Budget
    runs: list[RunMeasure] = field(default_factory=list)
    reason: str | None = None  # set when the configuration cannot run (n/a)
    needs_bytes: int | None = None
    ratio_to_best_baseline: float | None = None  # vs the best baseline with the same on-miss mode
    on_miss: str = "load"
    ratio_to_best_baseline_any_miss: float | None = None  # vs the best baseline with any on-miss mode
    perplexity: float | None = None  # decode-mode perplexity at this budget (--quality-text)
    ppl_vs_load: float | None = None  # perplexity / the same policy's with on-miss load
    misses: dict | None = None  # of the quality run (or of the last timed run without one)

    @property
    def label(self) -> str:
        from d2moe.apps.miss_bench import label

        return label(self.policy, self.on_miss)

    @property
    def ok(self) -> bool:
        return self.reason is None and bool(self.runs)

    def median(self, measure: str) -> float | None:
        if not self.ok:
            return None
        return statistics.median(getattr(r, measure) for r in self.runs)

    def to_dict(self) -> dict:
        levels: dict[str, int] = {}
        if self.ok:
            last = self.runs[-1].levels
            levels = {str(b): int(n) for b, n in sorted(last.items())}
        out = {
            "policy": self.policy, "on_miss": self.on_miss, "budget_label": self.budget.label,
            "budget_bytes": self.budget.bytes,
            "status": "ok" if self.ok else "n/a", "reason": self.reason, "needs_bytes": self.needs_bytes,
            **{m: self.median(m) for m in MEASURES},
            "levels": levels, "ratio_to_best_baseline": self.ratio_to_best_baseline,
            "ratio_to_best_baseline_any_miss": self.ratio_to_best_baseline_any_miss,
            "perplexity": self.perplexity, "ppl_vs_load": self.ppl_vs_load,
            "misses": self.misses if self.misses is not None else (self.runs[-1].misses if self.ok else None),
            "runs": [{**{m: getattr(r, m) for m in MEASURES},
                      "levels": {str(b): int(n) for b, n in sorted(r.levels.items())}} for r in self.runs],
        }
        if out["generated_tokens"] is not None:
            out["generated_tokens"] = int(out["generated_tokens"])
        if out["peak_memory_bytes"] is not None:
            out["peak_memory_bytes"] = int(out["peak_memory_bytes"])
        return out


@dataclass
class BenchReport:
    """A whole sweep: settings and one ConfigResult per (policy, budget)."""

    checkpoint: str
    prompt_tokens: int
    max_new_tokens: int
    repeats: int
    io_bandwidth: int | None
    expert_set_bytes: int
    reference_level: int
    budgets: list[Budget]
    policies: list[str]
    results: list[ConfigResult]
    on_miss: list[str] = field(default_factory=lambda: ["load"])
    miss_threshold: float | None = None
    quality_tokens: int | None = None
    dense_weights: str = "source"  # every run's --dense-weights

    def result(self, policy: str, budget_label: str, on_miss: str = "load") -> ConfigResult:
        for r in self.results:
            if r.policy == policy and r.budget.label == budget_label and r.on_miss == on_miss:
                return r
        raise KeyError((policy, budget_label, on_miss))

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA, "checkpoint": self.checkpoint, "prompt_tokens": self.prompt_tokens,
            "max_new_tokens": self.max_new_tokens, "repeats": self.repeats, "io_bandwidth": self.io_bandwidth,
            "expert_set_bytes": self.expert_set_bytes, "reference_level": self.reference_level,
            "budgets": [asdict(b) for b in self.budgets], "policies": list(self.policies),
            "on_miss": list(self.on_miss), "miss_threshold": self.miss_threshold, "quality_tokens": self.quality_tokens,
            "dense_weights": self.dense_weights, "results": [r.to_dict() for r in self.results],
        }


# --------------------------------------------------------------------------- budgets


def parse_budgets(text: str, fixed_bytes: int, expert_set_bytes: int) -> list[Budget]:
    """'25%,50%,1GiB' -> budgets. A percentage p means fixed + p x the expert set (at the reference level).

    fixed_bytes: what the run holds besides the expert cache (dense + KV + staging + workspace).
    """
    budgets = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        if item.endswith("%"):
            pct = parse_percent(item, what="--budgets item")
            budgets.append(Budget(item, percent_budget(fixed_bytes, expert_set_bytes, pct)))
        elif item.isdigit():  # 50 meant 50% or 50 MiB, never 50 bytes
            raise UsageError(f"--budgets item {item!r} has no unit: write {item}% (of the expert set) or {item}MiB")
        else:
            budgets.append(Budget(item, parse_size(item, what="--budgets item")))
    if not budgets:
        raise UsageError("--budgets is empty: give e.g. 25%,50%,75%,100% or sizes like 64MiB,128MiB")
    if len({b.label for b in budgets}) != len(budgets):
        raise UsageError(f"--budgets {text!r} repeats a budget")
    return budgets


# --------------------------------------------------------------------------- the sweep


RunFn = Callable[[str, Budget], RunMeasure]  # (policy[+mode], budget) -> one measured run; BudgetError = n/a


def sweep(
    policies: Sequence[str],
    budgets: Sequence[Budget],
    run: RunFn,
    repeats: int = 3,
    warmup: bool = True,
    on_run: Callable[[str, Budget, int], None] | None = None,
    unavailable: dict[str, str] | None = None,
    quality: Callable[[str, Budget], dict] | None = None,
) -> list[ConfigResult]:
    """Run every (policy, budget) `repeats` times, round-robin; one ConfigResult per configuration.

    A BudgetError from `run` marks the configuration n/a (with the bytes it says are
    needed) and it is not run again. unavailable: policy -> why it cannot run on this checkpoint at
    all (n/a at every budget). on_run(policy, budget, repeat) is called after each (progress).
    A discarded warm-up run of the first runnable configuration goes first (imports, allocator).
    `policies` may carry a miss mode (`d2moe+skip`, d2moe.apps.miss_bench); quality(label, budget) ->
    {"perplexity", "misses"} scores each runnable configuration once after the timed rounds.
    """
    from d2moe.apps.miss_bench import split_label

    if repeats < 1:
        raise UsageError(f"--repeats {repeats} must be at least 1")
    results = []
    for p in policies:
        name, mode = split_label(p)
        results += [ConfigResult(name, b, on_miss=mode, reason=(unavailable or {}).get(name)) for b in budgets]
    warmed = not warmup
    for rep in range(repeats):
        for res in results:
            if res.reason is not None:
                if on_run:
                    on_run(res.label, res.budget, rep)
                continue
            try:
                if not warmed:
                    run(res.label, res.budget)
                    warmed = True
                res.runs.append(run(res.label, res.budget))
            except BudgetError as exc:
                if exc.minimum is not None:  # bench's budgets are its --budgets
                    exc.remedy = f"give --budgets {min_mib(exc.minimum)}MiB or more"
                res.reason, res.needs_bytes = str(exc), exc.minimum
                res.runs.clear()
            if on_run:
                on_run(res.label, res.budget, rep)
    for res in results:
        if quality is not None and res.ok:
            q = quality(res.label, res.budget)
            res.perplexity, res.misses = q["perplexity"], q["misses"]
    _fill_ratios(results)
    return results


def _fill_ratios(results: list[ConfigResult]) -> None:
    """Decode throughput over the best baseline's at the same budget (same miss mode, and any); ppl vs load."""
    from d2moe.apps.evaluate import parse_policy

    by_budget: dict[str, list[ConfigResult]] = {}
    for r in results:
        by_budget.setdefault(r.budget.label, []).append(r)
    for group in by_budget.values():
        base = {r.on_miss: [] for r in group}
        for r in group:
            if r.ok and parse_policy(r.policy)[0] != OURS:  # d2moe@4 is ours too, not a baseline
                base[r.on_miss].append(r.median("decode_tokens_per_s"))
        best_any = max((x for v in base.values() for x in v), default=None)
        loads = {r.policy: r.perplexity for r in group if r.on_miss == "load" and r.perplexity}
        for r in group:
            best = max(base[r.on_miss], default=None)
            if r.ok and best:
                r.ratio_to_best_baseline = r.median("decode_tokens_per_s") / best
            if r.ok and best_any:
                r.ratio_to_best_baseline_any_miss = r.median("decode_tokens_per_s") / best_any
            if r.perplexity and loads.get(r.policy):
                r.ppl_vs_load = r.perplexity / loads[r.policy]


# --------------------------------------------------------------------------- the figure


def plot_throughput(report: BenchReport, path, metric: str = "decode_tokens_per_s") -> None:
    """Throughput vs memory budget, one line per policy (the paper's budget figure); PNG via Agg."""
    try:
        import matplotlib
    except ImportError as exc:
        from d2moe.errors import DependencyError

        raise DependencyError("--plot needs matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = 1024**2
    names = list(dict.fromkeys(r.label for r in report.results))
    ncol = 1 if len(names) <= 14 else 2
    rows = -(-len(names) // ncol)  # the legend sits beside the axes: the figure grows with it
    fig, ax = plt.subplots(figsize=(6.4 + 1.8 * ncol, max(4.0, 0.75 + 0.19 * rows)), dpi=120)
    markers = "osD^v<>ph"  # 9 against matplotlib's 10 colours: no two of 90 lines share both
    for i, name in enumerate(names):
        pts = [(r.budget.bytes / mib, r.median(metric)) for r in report.results if r.label == name and r.ok]
        if not pts:
            continue
        xs, ys = zip(*sorted(pts), strict=True)
        style = dict(linewidth=2.4, color="black") if name == OURS else dict(linewidth=1.4)
        ax.plot(xs, ys, marker=markers[i % len(markers)], label=name, **style)
    ax.set_xlabel("memory budget (MiB)")
    ax.set_ylabel("decode tokens/s" if metric == "decode_tokens_per_s" else metric)
    ax.set_title("Throughput with different memory budgets")
    labels = {b.bytes / mib: b.label for b in report.budgets}
    ax.set_xticks(sorted(labels))
    ax.set_xticklabels([f"{labels[x]}\n{x:.3g}" if labels[x].endswith("%") else labels[x] for x in sorted(labels)])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=ncol)  # beside the lines, never over
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- runs on a packed checkpoint


BASELINE_ORDER = ("hold-int8", "hold-int4", "matryoshka-free", "moqe-dynaio", "edgemoe", OURS)


def policy_list(text: str) -> list[str]:
    """'all' -> every policy (baselines first, d2moe last); else the comma list ('moqe-dynaio@2' sets a level)."""
    from d2moe.apps.evaluate import parse_policy
    from d2moe.runtime.policies import POLICIES

    if text.strip() == "all":
        rest = [p for p in POLICIES if p not in BASELINE_ORDER and p != "hold"]  # hold: hold-int8/int4 at any level
        return [p for p in BASELINE_ORDER if p in POLICIES] + rest
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise UsageError("--policies is empty: give 'all' or a list such as d2moe,moqe-dynaio")
    for n in names:
        name, _ = parse_policy(n)
        if name not in POLICIES:
            raise UsageError(f"--policies: {name!r} is unknown: use 'all' or some of {', '.join(POLICIES)}")
    if len(set(names)) != len(names):
        raise UsageError(f"--policies {text!r} repeats a policy")
    return names


def reference_level(bits: Sequence[int]) -> int:
    """The level a percentage budget refers to: 4 bits (the paper's expert set) when packed, else the highest."""
    return 4 if 4 in bits else max(bits)


def budget_basis(checkpoint, max_tokens: int, io_threads: int = 4,
                 forward_tokens: int | None = None, dense_weights: str = "source") -> tuple[int, int, int]:
    """(fixed bytes, expert-set bytes, reference level) for percentage budgets.

    fixed = what a uniform run at the reference level holds besides its expert cache (dense, KV for
    max_tokens, staging, workspace for one forward of `forward_tokens`, default max_tokens; dense layers as
    `dense_weights` loads them), from the session's own memory plan.
    """
    from d2moe.apps.evaluate import UNLIMITED_BUDGET
    from d2moe.quantize.format import open_checkpoint
    from d2moe.runtime.session import RunOptions

    level = reference_level(open_checkpoint(checkpoint).cfg.bits)
    options = RunOptions(memory_budget=UNLIMITED_BUDGET, policy="moqe-dynaio", level=level,
                         max_tokens=max_tokens, io_threads=io_threads, forward_tokens=forward_tokens,
                         dense_weights=dense_weights)
    return (*run_basis(checkpoint, options), level)


def percent_budget(fixed_bytes: int, expert_set_bytes: int, pct: float) -> int:
    """The bytes `pct`% means, in bench's --budgets and `run -m 50%` alike: what the run holds besides its expert
    cache (`fixed_bytes`, run_basis), plus pct% of the expert set."""
    return int(fixed_bytes + pct / 100 * expert_set_bytes)


def run_basis(checkpoint, options) -> tuple[int, int]:
    """(what a run with `options` holds besides its expert cache, every expert at the reference level; the exact
    experts with --lossless), from the memory plan of that run with no budget."""
    from dataclasses import replace

    from d2moe.apps.evaluate import UNLIMITED_BUDGET
    from d2moe.runtime.session import plan_run

    ckpt, *_, plan = plan_run(checkpoint, replace(options, memory_budget=UNLIMITED_BUDGET))
    expert_set = len(ckpt.moe_layers) * ckpt.num_experts * ckpt.level_nbytes(reference_level(ckpt.cfg.bits))
    return plan.budget - plan.expert_cache, expert_set


def measure_from_stats(stats: dict) -> RunMeasure:
    """A RunMeasure from `Session.generate`'s report.stats."""
    return RunMeasure(
        prefill_tokens_per_s=float(stats["prefill_tokens_per_s"]),
        decode_tokens_per_s=float(stats["decode_tokens_per_s"]),
        ttft_s=float(stats["time_to_first_token_s"]),
        peak_memory_bytes=int(stats["memory"]["peak_bytes"]),
        bytes_read_per_token=float(stats["bytes_read_per_token"]),
        hit_rate=float(stats["cache"]["hit_rate"]),
        schedule_efficiency=float(stats["schedule_efficiency"]),
        generated_tokens=int(stats["generated_tokens"]),
        levels={int(b): int(n) for b, n in stats["tokens_per_level"].items()},
        bytes_saved_per_token=(stats["misses"]["bytes_saved"] / stats["generated_tokens"]
                               if "misses" in stats and stats["generated_tokens"] else 0.0),
        misses=stats.get("misses", {}),
    )


def unavailable_policies(checkpoint, policies: Sequence[str]) -> dict[str, str]:
    """Policies this checkpoint cannot run at any budget (a hold-* level it does not pack), with why.

    A level given with @ that is not packed is the user's mistake, not n/a: UsageError. (Names only:
    no miss mode.)
    """
    from d2moe.apps.evaluate import parse_policy
    from d2moe.quantize.format import open_checkpoint
    from d2moe.runtime.policies import HOLD_LEVELS

    bits = open_checkpoint(checkpoint).cfg.bits
    out = {}
    for policy in policies:
        name, level = parse_policy(policy)
        if level is not None and level not in bits:
            raise UsageError(f"--policies {policy}: level {level} is not packed (levels {', '.join(map(str, bits))})")
        if name in HOLD_LEVELS and HOLD_LEVELS[name] not in bits:
            out[policy] = f"needs level {HOLD_LEVELS[name]} packed"
    return out


def session_runner(
    checkpoint, prompt_ids: Sequence[int], max_new_tokens: int, io_bandwidth: float | None = None,
    io_threads: int = 4, tokenizer=None, miss_threshold: float = 0.35, miss_importance: str = "weight",
    max_tokens: int | None = None, dense_weights: str = "source",
) -> RunFn:
    """A RunFn: a fresh Session (cold cache) per run, greedy decode of the prompt, its statistics."""
    from d2moe.apps.evaluate import parse_policy
    from d2moe.apps.miss_bench import split_label, split_mode
    from d2moe.runtime.generate import SamplingOptions
    from d2moe.runtime.session import RunOptions, Session

    sampling = SamplingOptions(max_new_tokens=max_new_tokens)

    def run(config: str, budget: Budget) -> RunMeasure:
        policy, mode = split_label(config)
        mode, threshold = split_mode(mode, miss_threshold)
        name, level = parse_policy(policy)
        options = RunOptions(memory_budget=budget.bytes, policy=name, level=level, io_bandwidth=io_bandwidth,
                             io_threads=io_threads, max_tokens=max_tokens or len(prompt_ids) + max_new_tokens, on_miss=mode,
                             miss_threshold=threshold, miss_importance=miss_importance, dense_weights=dense_weights)
        with Session(checkpoint, options, tokenizer=tokenizer) as session:
            report = session.generate(token_ids=[list(prompt_ids)], sampling=sampling)
        return measure_from_stats(report.stats)

    return run


def run_bench(
    checkpoint,
    budgets: str,
    policies: str = "all",
    prompt: str = "Once upon a time",
    max_new_tokens: int = 32,
    repeats: int = 3,
    io_bandwidth: float | None = None,
    io_threads: int = 4,
    chat_template: bool = False,
    on_run: Callable[[str, Budget, int], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
    on_miss: str | None = None,
    miss_threshold: float = 0.35,
    miss_importance: str = "weight",
    quality_ids: Sequence[int] | None = None,
    quality_seq_len: int = 256,
    dense_weights: str = "source",
) -> BenchReport:
    """The whole sweep on a packed checkpoint; on_plan(total runs) is called once the configurations are known.

    on_miss: miss modes ('load,skip'; every policy runs with each); quality_ids: token ids scored in
    decode mode per configuration (d2moe.apps.miss_bench).
    """
    from d2moe.apps import miss_bench
    from d2moe.runtime.session import encode_prompts, load_tokenizer

    names = policy_list(policies)
    modes = miss_bench.miss_modes(on_miss)
    tokenizer = load_tokenizer(checkpoint)
    (prompt_ids,) = encode_prompts(tokenizer, [prompt], chat_template)
    max_tokens = max(len(prompt_ids) + max_new_tokens, quality_seq_len if quality_ids is not None else 0)
    fixed, expert_set, level = budget_basis(checkpoint, max_tokens, io_threads, dense_weights=dense_weights)
    budget_list = parse_budgets(budgets, fixed, expert_set)
    configs = [miss_bench.label(p, m) for p in names for m in modes]
    if on_plan:
        on_plan(len(configs) * len(budget_list) * repeats)
    run = session_runner(checkpoint, prompt_ids, max_new_tokens, io_bandwidth, io_threads, tokenizer,
                         miss_threshold, miss_importance, max_tokens, dense_weights)
    quality = None if quality_ids is None else miss_bench.quality_runner(
        checkpoint, quality_ids, quality_seq_len, io_bandwidth, io_threads, miss_threshold, miss_importance, tokenizer,
        max_tokens, dense_weights)
    results = sweep(configs, budget_list, run, repeats=repeats, on_run=on_run,
                    unavailable=unavailable_policies(checkpoint, names), quality=quality)
    return BenchReport(
        checkpoint=str(checkpoint), prompt_tokens=len(prompt_ids), max_new_tokens=max_new_tokens, repeats=repeats,
        io_bandwidth=int(io_bandwidth) if io_bandwidth else None, expert_set_bytes=expert_set,
        reference_level=level, budgets=budget_list, policies=names, results=results, on_miss=modes,
        miss_threshold=miss_threshold, quality_tokens=len(quality_ids) if quality_ids is not None else None,
        dense_weights=dense_weights,
    )
