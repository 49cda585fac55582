"""GPU tables for scripts/gpu_check.sh (needs a GPU): kernel tolerance per kernel x scheme x level x
shape, GEMV time / effective bandwidth per level at batch 1/4/8 beside torch's bf16 matmul, and the
dequantization to bf16 that prefill tiles use; the fast and the general kernel path side by side.

    python scripts/gpu_bench.py OUT_DIR [--quick]

Timing (CUDA events, median of 5 blocks after warm-up; the stream is held by a sleep kernel while a
block is queued, so host launch cost stays out): every matrix is read from HBM, not from the L2
(50-60 MB on H100/H200, which holds a whole level-4 Mixtral matrix): `kernel_us` is one grouped
d2_gemv launch over K distinct copies (K x bytes >= 256 MiB, as a layer step groups its experts)
divided by K; `general_us` the same launch of the kernel built with D2_GENERIC_ONLY (the per-column
path every layout took before the word-aligned fast path); the bf16 matmul rotates over copies likewise. `call_us` is one `CudaExperts.gemv`
call on one matrix as the runtime makes it (records built and uploaded per call), host wall clock.
The roofline is this card's measured device-to-device copy (bytes read + written), not a datasheet.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

SHAPES = ((4096, 14336), (14336, 4096), (1024, 2048), (2048, 1024))  # Mixtral down / gate-up; OLMoE-sized expert
BATCHES = (1, 4, 8)
LEVELS = (2, 3, 4, 8)
ROTATE_BYTES = 256 << 20  # > 4x the largest L2 of the cards we run on
DEV = "cuda"


def _time(fns, blocks: int = 5) -> float:
    """Median device seconds per call over `blocks` blocks, each calling every one of `fns` (one per
    weight copy) at least 20 times in turn, queued behind a sleep kernel."""
    per_block = max(20, len(fns))
    for f in fns[:4]:
        f()
    times = []
    for _ in range(blocks):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(per_block * 100_000)  # ~50 us of host launch time per call stays hidden
        start.record()
        for i in range(per_block):
            fns[i % len(fns)]()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / per_block / 1e3)
    return statistics.median(times)


def _wall(fn, calls: int = 50) -> float:
    """Median host seconds of one synchronised call (what a decode step waits for)."""
    import time

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read and written."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=DEV).random_(0, 255)
    b = torch.empty_like(a)
    t = _time([lambda: b.copy_(a)])
    return 2 * a.numel() / t / 1e9


def tolerance_table(experts) -> list[dict]:
    from d2moe.kernels import selfcheck

    return selfcheck.as_dicts(selfcheck.run_selfcheck(experts))


def _level_bytes(o: int, i: int, n: int, level: int, scheme: str) -> int:
    groups = i // 64
    nbytes = level * o * i // 8 + 4 * o * groups + 4 * n * (i + o)
    if scheme == "residual":
        nbytes += 2 * o * groups * (level - 2)
    return nbytes


def gemv_table(experts, general, roofline_gbs: float, scheme: str = "sliced") -> list[dict]:
    from d2moe.kernels import cuda_abi as abi
    from d2moe.kernels.cuda import relocate
    from d2moe.kernels.selfcheck import random_matrix

    gen = torch.Generator().manual_seed(0)
    launcher, ptr = experts.launcher, experts.launcher.ptr
    rows = []
    for o, i in SHAPES:
        host = random_matrix(o, i, 64, scheme, gen)
        copies = [relocate(host, DEV) for _ in range(min(512, -(-ROTATE_BYTES // _level_bytes(o, i, 0, 2, scheme))))]
        ws = [torch.randn(o, i, device=DEV, dtype=torch.bfloat16) for _ in range(max(2, -(-ROTATE_BYTES // (2 * o * i))))]
        for n in BATCHES:
            x = torch.randn(n, i, device=DEV)
            xb = x.bfloat16()
            t_bf16 = _time([lambda w=w, xb=xb: xb @ w.t() for w in ws])
            for level in LEVELS:
                descs = [experts.describe(m, level) for m in copies]
                ys = torch.empty(len(descs), n, o, device=DEV)
                recs = launcher.upload(abi.problem_records([(d.record, ptr(x), ptr(y), n) for d, y in zip(descs, ys, strict=True)]))
                grid, block = abi.gemv_geometry([o] * len(descs))
                t_kernel = _time([lambda: launcher.launch("d2_gemv", grid, block, (ptr(recs),))]) / len(descs)  # noqa: B023
                t_general = _time([lambda: general.launch("d2_gemv", grid, block, (ptr(recs),))]) / len(descs)  # noqa: B023
                launcher.launch("d2_gemv", grid, block, (ptr(recs),))
                ys_fast = ys.clone()
                general.launch("d2_gemv", grid, block, (ptr(recs),))
                agree = float((ys - ys_fast).abs().max() / ys_fast.abs().max().clamp_min(1e-30))
                t_call = _wall(lambda: experts.gemv([(descs[0], x)]))  # noqa: B023
                gbs = _level_bytes(o, i, n, level, scheme) / t_kernel / 1e9
                rows.append({"shape": f"{o}x{i}", "batch": n, "level": level, "copies": len(descs), "kernel_us": t_kernel * 1e6,
                             "general_us": t_general * 1e6, "fast_vs_general": t_general / t_kernel, "max_rel_diff": agree,
                             "call_us": t_call * 1e6, "GB_s": gbs, "roofline_pct": 100 * gbs / roofline_gbs,
                             "bf16_matmul_us": t_bf16 * 1e6, "bf16_GB_s": 2 * o * i / t_bf16 / 1e9,
                             "speedup_vs_bf16": t_bf16 / t_kernel})
        del copies, ws
        torch.cuda.empty_cache()
    return rows


def dequant_table(experts, general, roofline_gbs: float, scheme: str = "sliced") -> list[dict]:
    """d2_dequant to bf16 (the prefill path's tiles) on the Mixtral shapes: fast vs general path, GB/s
    of bytes read + written."""
    from d2moe.kernels import cuda_abi as abi
    from d2moe.kernels.cuda import relocate
    from d2moe.kernels.selfcheck import random_matrix

    gen = torch.Generator().manual_seed(1)
    rows = []
    for o, i in SHAPES[:2]:
        copies = [relocate(random_matrix(o, i, 64, scheme, gen), DEV) for _ in range(3)]
        out = torch.empty(o, i, dtype=torch.bfloat16, device=DEV)
        grid, block = abi.dequant_geometry(o, i)
        for level in LEVELS:
            descs = [experts.describe(m, level) for m in copies]
            times = {}
            for name, launcher in (("fast", experts.launcher), ("general", general)):
                times[name] = _time([lambda d=d, la=launcher, g=grid, b=block, out=out: la.launch(
                    "d2_dequant", g, b, (la.ptr(d.struct), la.ptr(out), abi.OUT_KINDS[torch.bfloat16]))
                    for d in descs])
            nbytes = _level_bytes(o, i, 0, level, scheme) + 2 * o * i
            rows.append({"shape": f"{o}x{i}", "level": level, "fast_us": times["fast"] * 1e6,
                         "general_us": times["general"] * 1e6, "fast_vs_general": times["general"] / times["fast"],
                         "GB_s": nbytes / times["fast"] / 1e9, "roofline_pct": 100 * nbytes / times["fast"] / 1e9 / roofline_gbs})
        del copies
        torch.cuda.empty_cache()
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
    general = CupyLauncher(defines=("D2_GENERIC_ONLY",))
    roofline = copy_bandwidth()
    card = {"device": torch.cuda.get_device_name(), "copy_GB_s": roofline}
    print(f"## card\n{card}")
    tables = {"card": [card], "kernel_tolerance": tolerance_table(experts)}
    tables["gemv_sliced"] = gemv_table(experts, general, roofline, "sliced")
    tables["dequant_sliced"] = dequant_table(experts, general, roofline, "sliced")
    if "--quick" not in sys.argv:
        tables["gemv_residual"] = gemv_table(experts, general, roofline, "residual")
    for name, rows in tables.items():
        (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
        (out / f"{name}.md").write_text(markdown(rows))
        if name != "kernel_tolerance":
            print(f"## {name}\n{markdown(rows)}")
    bad = [r for r in tables["kernel_tolerance"] if not r["ok"]]
    print(f"## kernel_tolerance: {len(tables['kernel_tolerance'])} cases, {len(bad)} out of tolerance")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
