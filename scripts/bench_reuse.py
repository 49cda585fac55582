"""Reuse-aware reads on and off, beside the baselines, interleaved in one run (BENCHMARKS.md §10.3).

    .venv/bin/python scripts/bench_reuse.py PACK --budgets 75%,100% --repeats 5 --io-bandwidth 20MB/s [--json out]

Each configuration is a fresh session (cold cache) decoding `--new-tokens` greedily after a fixed
prompt; medians of decode tok/s, bytes read per token, reads, upgrade reads and fetch-ahead reads.
Budgets as `d2moe bench`: the fixed part + p% of the 4-bit expert set.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

CONFIGS = {
    "d2moe (reuse-aware)": dict(policy="d2moe"),
    "d2moe --no-reuse-aware": dict(policy="d2moe", reuse_aware=False),
    "hold-int4": dict(policy="hold-int4"),
    "edgemoe": dict(policy="edgemoe"),
    "moqe-dynaio": dict(policy="moqe-dynaio", level=4),
    "matryoshka-free": dict(policy="matryoshka-free"),
}


def main() -> None:
    from d2moe.apps.benchmark import budget_basis, parse_budgets
    from d2moe.errors import BudgetError
    from d2moe.options import parse_bandwidth, set_threads
    from d2moe.runtime.generate import SamplingOptions
    from d2moe.runtime.session import RunOptions, Session

    ap = argparse.ArgumentParser()
    ap.add_argument("pack", type=Path)
    ap.add_argument("--budgets", default="75%,100%")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--io-bandwidth", default="20MB/s")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    set_threads(args.threads)
    prompt = [1, 500, 600, 700, 800, 900, 1000, 1100, 1200, 1300, 1400, 1500, 1600, 1700, 1800, 1900]
    max_tokens = len(prompt) + args.new_tokens
    fixed, expert_set, _ = budget_basis(args.pack, max_tokens)
    budgets = parse_budgets(args.budgets, fixed, expert_set)
    bw = parse_bandwidth(args.io_bandwidth)
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.repeats):
        for b in budgets:
            for name, kw in CONFIGS.items():
                opts = RunOptions(memory_budget=b.bytes, io_bandwidth=bw, max_tokens=max_tokens, threads=args.threads, **kw)
                try:
                    with Session(args.pack, opts) as s:
                        r = s.generate(token_ids=[prompt], sampling=SamplingOptions(max_new_tokens=args.new_tokens))
                except BudgetError:
                    runs[(b.label, name)] = []
                    continue
                st = r.stats
                runs.setdefault((b.label, name), []).append({
                    "decode_tokens_per_s": st["decode_tokens_per_s"], "bytes_read_per_token": st["bytes_read_per_token"],
                    "reads": st["reads"], "upgrade_reads": st["upgrade_reads"],
                    "fetch_ahead_reads": st["fetch_ahead_reads"], "hit_rate": st["cache"]["hit_rate"]})
    print("| budget | configuration | decode tok/s (median) | × best baseline | read/token KiB | reads | upgrades | "
          "fetch-ahead | hit rate |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    out = []
    for b in budgets:
        med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
               for (label, name), rs in runs.items() if label == b.label and rs}
        best = max(v["decode_tokens_per_s"] for n, v in med.items() if not n.startswith("d2moe"))
        for name in CONFIGS:
            if name not in med:
                print(f"| {b.label} | {name} | n/a | | | | | | |")
                continue
            m = med[name]
            print(f"| {b.label} | {name} | {m['decode_tokens_per_s']:.1f} | {m['decode_tokens_per_s'] / best:.2f}× | "
                  f"{m['bytes_read_per_token'] / 1024:.0f} | {m['reads']:.0f} | {m['upgrade_reads']:.0f} | "
                  f"{m['fetch_ahead_reads']:.0f} | {m['hit_rate']:.0%} |")
            out.append({"budget": b.label, "config": name, **m, "ratio_to_best_baseline": m["decode_tokens_per_s"] / best})
    if args.json:
        args.json.write_text(json.dumps({"runs": {f"{k[0]} {k[1]}": v for k, v in runs.items()}, "medians": out}, indent=1))


if __name__ == "__main__":
    main()
