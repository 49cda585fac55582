"""`d2moe run` of the embedded model under a 79 MiB budget with prompts of several lengths: the run's own RSS growth
(`rss_peak_delta_bytes`) against the budget. Run it under at_rev.py for another commit's tree.

    python long_prompt_rss.py CHECKPOINT TEXT [--budget 79MiB] [--chars 2000,6000,12000]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json

from d2moe.cli import main as cli


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("text")
    ap.add_argument("--budget", default="79MiB")
    ap.add_argument("--chars", default="2000,6000,12000")
    a = ap.parse_args()
    text = open(a.text, encoding="utf-8").read()
    for n in (int(c) for c in a.chars.split(",")):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            cli(["run", a.checkpoint, "-m", a.budget, "-p", text[:n], "--max-new-tokens", "8", "--json"])
        stats = json.loads(out.getvalue())["stats"]
        mem = stats["memory"]
        print(json.dumps({"chars": n, "prompt_tokens": stats["prompt_tokens"],
                          "budget_mib": round(mem["budget_bytes"] / 2**20, 1),
                          "rss_growth_mib": round(mem["rss_peak_delta_bytes"] / 2**20, 1),
                          "metered_peak_mib": round(mem["peak_bytes"] / 2**20, 1),
                          "prefill_tokens_per_s": round(stats["prefill_tokens_per_s"], 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
