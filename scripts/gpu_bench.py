"""GPU tables for scripts/gpu_check.sh (needs a GPU): kernel tolerance per kernel x scheme x level x
shape, and GEMV time / effective bandwidth per level at batch 1/4/8 beside torch's bf16 matmul.

    python scripts/gpu_bench.py OUT_DIR [--quick]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOFLINE_GBS = 4800.0  # H200 HBM3e
SHAPES = ((4096, 14336), (14336, 4096), (1024, 2048), (2048, 1024))  # Mixtral down / gate-up; OLMoE-sized expert
BATCHES = (1, 4, 8)
LEVELS = (2, 3, 4, 8)


def _time(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def tolerance_table(experts) -> list[dict]:
    from d2moe.kernels import selfcheck

    return selfcheck.as_dicts(selfcheck.run_selfcheck(experts))


def gemv_table(experts, scheme: str = "sliced") -> list[dict]:
    from d2moe.kernels.cuda import relocate
    from d2moe.kernels.selfcheck import random_matrix

    gen = torch.Generator().manual_seed(0)
    rows = []
    for o, i in SHAPES:
        m = relocate(random_matrix(o, i, 64, scheme, gen), "cuda")
        w = torch.randn(o, i, device="cuda", dtype=torch.bfloat16)
        for n in BATCHES:
            x = torch.randn(n, i, device="cuda")
            xb = x.bfloat16()
            t_bf16 = _time(lambda: xb @ w.t())  # noqa: B023
            for level in LEVELS:
                d = experts.describe(m, level)
                t = _time(lambda: experts.gemv([(d, x)]))  # noqa: B023
                nbytes = level * o * i // 8 + 4 * o * (i // 64) + 4 * n * (i + o)
                if scheme == "residual":
                    nbytes += 2 * o * (i // 64) * (level - 2)
                gbs = nbytes / t / 1e9
                rows.append({"shape": f"{o}x{i}", "batch": n, "level": level, "us": t * 1e6, "GB_s": gbs,
                             "roofline_pct": 100 * gbs / ROOFLINE_GBS, "bf16_matmul_us": t_bf16 * 1e6,
                             "bf16_GB_s": 2 * o * i / t_bf16 / 1e9, "speedup_vs_bf16": t_bf16 / t})
    return rows


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "(none)\n"
    cols = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
                      *("| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows)]) + "\n"


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_results")
    out.mkdir(parents=True, exist_ok=True)
    from d2moe.kernels.cuda import CudaExperts, CupyLauncher

    experts = CudaExperts(CupyLauncher())
    tables = {"kernel_tolerance": tolerance_table(experts), "gemv_sliced": gemv_table(experts, "sliced")}
    if "--quick" not in sys.argv:
        tables["gemv_residual"] = gemv_table(experts, "residual")
    for name, rows in tables.items():
        (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
        (out / f"{name}.md").write_text(markdown(rows))
        print(f"## {name}\n{markdown(rows)}")
    return 0 if all(r["ok"] for r in tables["kernel_tolerance"]) else 1


if __name__ == "__main__":
    sys.exit(main())
