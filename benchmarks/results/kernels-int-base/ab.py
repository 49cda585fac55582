"""A/B of the CPU kernels at one git revision against the working tree's, both loaded in one process and timed
interleaved (order alternating per repeat): subblock matrices at real shapes, the runtime's int8 activations.

    python ab.py --against c1c11f2 [--shape 14336x4096] [--threads 1] [--groups 32,16] [--levels 2,3,4]
                 [--tokens 1,8] [--repeats 21] [--json out.jsonl]

Prints one JSON line per (tokens, group, level): median and min ms of each build, their ratios (new / old) and
the largest output difference relative to the largest output.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "scripts"))

from bench_kernels import _packed, ab_parser, emit, library_from  # noqa: E402

from d2moe.kernels import cpu  # noqa: E402


def main() -> int:
    ap = ab_parser(__doc__, threads=1, levels="2,3,4", tokens="1,8", repeats=21, groups="32,16")
    ap.add_argument("--against", required=True, help="git revision whose kernels/cpu is the baseline")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old_dir = Path(tmp)
        names = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", a.against, "kernels/cpu/"],
                               capture_output=True, text=True, check=True).stdout.split()
        for name in names:
            blob = subprocess.run(["git", "-C", str(REPO), "show", f"{a.against}:{name}"], capture_output=True, check=True)
            (old_dir / Path(name).name).write_bytes(blob.stdout)
        libs = {"old": library_from(old_dir), "new": library_from(None)}
    rows, cols = (int(v) for v in a.shape.split("x"))
    splitter = cpu.RowSplitter(a.threads)
    for n in (int(v) for v in a.tokens.split(",")):
        x = torch.randn(n, cols)
        for gs in (int(v) for v in a.groups.split(",")):
            levels = tuple(int(v) for v in a.levels.split(","))
            m = cpu.blocked(_packed(rows, cols, levels, gs, "subblock"))
            for b in levels:
                d = cpu.MatrixDesc(m, b)
                qs = {k: cpu.QuantizedX(lib, x, gs, 8) for k, lib in libs.items()}  # outside the timing
                fns = {k: (lambda lib=lib, k=k: cpu.gemv(lib, d, qs[k], splitter)) for k, lib in libs.items()}
                ya, yb = fns["old"](), fns["new"]()
                times: dict[str, list[float]] = {k: [] for k in fns}
                for i in range(a.repeats):
                    for k, f in (list(fns.items()) if i % 2 else list(fns.items())[::-1]):
                        t0 = time.perf_counter()
                        f()
                        times[k].append(time.perf_counter() - t0)
                med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                low = {k: min(v) * 1e3 for k, v in times.items()}
                r = {"shape": a.shape, "threads": a.threads, "tokens": n, "group": gs, "level": b,
                     "old_ms": round(med["old"], 3), "new_ms": round(med["new"], 3), "ratio": round(med["new"] / med["old"], 3),
                     "old_min_ms": round(low["old"], 3), "new_min_ms": round(low["new"], 3),
                     "min_ratio": round(low["new"] / low["old"], 3),
                     "rel_diff": float((ya - yb).abs().max() / ya.abs().max())}
                emit(r, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
