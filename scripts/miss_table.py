"""A markdown table from `d2moe bench --json` with miss modes: decode tok/s, ratios, perplexity, misses.

    .venv/bin/python scripts/miss_table.py bench.json [--ppl-tolerance 0.01]

Rows per budget: every policy x miss mode (decode tok/s, × best baseline with `load`, × best baseline
with any mode within the tolerance of its own `load` perplexity, perplexity / load, read and saved per
token). The summary line per budget: d2moe's best mode within the tolerance against both references.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("report")
    ap.add_argument("--ppl-tolerance", type=float, default=0.01)
    args = ap.parse_args()
    doc = json.load(open(args.report))
    tol = 1 + args.ppl_tolerance
    print("| budget | policy | on-miss | decode tok/s | × best baseline (load) | × best baseline (any mode within tol.) "
          "| ppl | ppl / load | read/token KiB | saved/token KiB | misses handled (pairs) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for b in doc["budgets"]:
        rows = [r for r in doc["results"] if r["budget_label"] == b["label"] and r["status"] == "ok"]
        ok = [r for r in rows if (r["ppl_vs_load"] or 1.0) <= tol]
        base_load = max((r["decode_tokens_per_s"] for r in rows if r["policy"] != "d2moe" and r["on_miss"] == "load"),
                        default=None)
        base_any = max((r["decode_tokens_per_s"] for r in ok if r["policy"] != "d2moe"), default=None)
        for r in rows:
            d = r["decode_tokens_per_s"]
            pairs = " ".join(f"{k}:{v}" for k, v in sorted((r["misses"] or {}).get("pairs", {}).items())) or "-"
            name = f"**{r['policy']}**" if r["policy"] == "d2moe" else r["policy"]
            print(f"| {b['label']} | {name} | {r['on_miss']} | {d:.1f} | {d / base_load:.2f}× | {d / base_any:.2f}× | "
                  f"{r['perplexity'] or float('nan'):.2f} | {r['ppl_vs_load'] or float('nan'):.3f} | "
                  f"{r['bytes_read_per_token'] / 1024:.0f} | {r['bytes_saved_per_token'] / 1024:.0f} | {pairs} |")
        ours = [r for r in ok if r["policy"] == "d2moe"]
        if ours and base_load:
            best = max(ours, key=lambda r: r["decode_tokens_per_s"])
            print(f"| {b['label']} | **d2moe best within {args.ppl_tolerance:.0%}** | {best['on_miss']} | "
                  f"{best['decode_tokens_per_s']:.1f} | **{best['decode_tokens_per_s'] / base_load:.2f}×** | "
                  f"**{best['decode_tokens_per_s'] / base_any:.2f}×** | {best['perplexity'] or float('nan'):.2f} | "
                  f"{best['ppl_vs_load'] or float('nan'):.3f} | | | |")


if __name__ == "__main__":
    main()
