"""The default thread setting against every explicit one, with and without a competing CPU load.

    python scripts/bench_threads.py PACKED --budget 3GiB [--run-args "--policy hold --level 4"]
                                    [--threads 1,2] [--new-tokens 24] [--repeats 3] [--json out.json]

Each cell is a fresh `d2moe run --json` (decode tok/s from its stats, medians over repeats; settings
interleaved inside each repeat). "load" starts one process spinning on the CPU (a pure-Python busy
loop, i.e. another program holding one core) for the duration of the runs. The claim checked:
under either load, the default is never more than 1.5x slower than the best explicit setting.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

SPIN = "import time\nwhile True:\n    pass\n"


def run_once(packed: str, budget: str, extra: list[str], threads: str, new_tokens: int) -> float:
    cmd = [sys.executable, "-m", "d2moe", "run", packed, "--memory-budget", budget, "--json", "--no-chat-template",
           "--prompt", "Once upon a time there was a king", "--max-new-tokens", str(new_tokens), *extra]
    if threads != "default":
        cmd += ["--threads", threads]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return float(json.loads(proc.stdout)["stats"]["decode_tokens_per_s"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("packed")
    p.add_argument("--budget", required=True, help="--memory-budget of every run")
    p.add_argument("--run-args", default="", help="more `d2moe run` options, one string")
    p.add_argument("--threads", default="1,2", help="explicit settings compared with the default")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    settings = ["default", *a.threads.split(",")]
    extra = shlex.split(a.run_args)
    table: dict[str, dict[str, float]] = {}
    for load in ("none", "one core busy"):
        spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if load != "none" else None
        try:
            time.sleep(0.5 if spinner else 0)
            samples: dict[str, list[float]] = {s: [] for s in settings}
            for _ in range(a.repeats):
                for s in settings:
                    samples[s].append(run_once(a.packed, a.budget, extra, s, a.new_tokens))
            table[load] = {s: statistics.median(v) for s, v in samples.items()}
        finally:
            if spinner:
                spinner.kill()
                spinner.wait()
    print(f"decode tok/s, {Path(a.packed).name}, --memory-budget {a.budget} {a.run_args}, median of {a.repeats}")
    print("| load | " + " | ".join(f"threads={s}" for s in settings) + " | default / best |")
    print("|---|" + "---:|" * (len(settings) + 1))
    worst = 1.0
    for load, row in table.items():
        ratio = row["default"] / max(row.values())
        worst = min(worst, ratio)
        print(f"| {load} | " + " | ".join(f"{row[s]:.2f}" for s in settings) + f" | {ratio:.2f} |")
    print(f"default is at worst {1 / worst:.2f}x slower than the best explicit setting (claim: <= 1.5x)")
    if a.json:
        Path(a.json).write_text(json.dumps({"packed": a.packed, "budget": a.budget, "run_args": a.run_args,
                                            "repeats": a.repeats, "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
