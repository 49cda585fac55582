"""How much of each token's output its top-1 expert carries: quantiles of the top-1 router weight in decode.

    .venv/bin/python scripts/router_weights.py PACK [--budget 3GiB] [--new-tokens 64] [--text FILE] [--bar 0.65]

Generates from the first 400 characters of `--text` and records, at every MoE layer step, each token's largest
router weight (the model's own router, normalised as the model does). `--on-miss reuse` never runs a pair above
1 - `--miss-threshold` (the `--bar`) below its level, so the share above the bar is the share of top-1 pairs it
keeps exact (BENCHMARKS.md §10.9).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from d2moe.runtime.generate import SamplingOptions
from d2moe.runtime.session import RunOptions, Session
from d2moe.runtime.units import parse_size

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pack")
    ap.add_argument("--budget", default="3GiB")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--text", type=Path, default=REPO / "d2moe_cli/assets/text/grimm_tales.heldout.txt")
    ap.add_argument("--bar", type=float, default=0.65)
    args = ap.parse_args()
    top1: list[torch.Tensor] = []
    with Session(args.pack, RunOptions(memory_budget=parse_size(args.budget), router_levels=(4, 2), threads=1)) as s:
        step = s.pipeline.step

        def recording_step(layer, hidden, top_k_index, top_k_weights):
            top1.append(top_k_weights.float().max(dim=-1).values.flatten())
            return step(layer, hidden, top_k_index, top_k_weights)

        s.pipeline.step = recording_step
        s.generate([args.text.read_text()[:400]], SamplingOptions(max_new_tokens=args.new_tokens), chat_template=False)
    w = torch.cat(top1)
    q = torch.quantile(w, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])).tolist()
    print(json.dumps({"pack": args.pack, "pairs": len(w), "quantiles_10_25_50_75_90": [round(x, 3) for x in q],
                      "share_above_bar": round(float((w > args.bar).float().mean()), 3), "bar": args.bar}))


if __name__ == "__main__":
    main()
