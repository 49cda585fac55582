"""MWQ quality and speed figures for benchmarks/results/quantize.md.

    .venv/bin/python benchmarks/bench_quantize.py            # prints a markdown report
Runs on one torch thread; times are CPU seconds of this process (robust on a shared machine),
with wall seconds in brackets.
"""

from __future__ import annotations

import time

import torch

from d2moe.quantize import MWQConfig, dequantize, quantize_mwq, quantize_rtn, sqnr_db
from d2moe.quantize.naive import quantize_naive_residual

LEVELS = tuple(range(2, 9))


def sqnr_table(levels: tuple[int, ...], with_naive: bool) -> str:
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0))
    rows = {"naive residual (greedy, alpha = mean abs r)": quantize_naive_residual(w, levels, 64)} if with_naive else {}
    for scheme in ("sliced", "residual"):
        rows[f"MWQ {scheme}"] = quantize_mwq(w, MWQConfig(bits=levels, group_size=64, scheme=scheme))
    table = {name: [sqnr_db(w, dequantize(t, b)) for b in levels] for name, t in rows.items()}
    rtn = table["dedicated RTN (clip search) per level"] = [sqnr_db(w, quantize_rtn(w, b, 64)) for b in levels]
    table["nesting tax: RTN - sliced"] = [r - s for r, s in zip(rtn, table["MWQ sliced"], strict=True)]
    lines = ["| quantizer | " + " | ".join(f"{b} bit" for b in levels) + " |", "|---|" + "---:|" * len(levels)]
    lines += [f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + " |" for name, vals in table.items()]
    return "\n".join(lines)


def timings() -> str:
    w = (torch.randn(4096, 14336, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    lines = ["| scheme | bits | quantize CPU s (wall) | " + " | ".join(f"dequant L{b} CPU s" for b in LEVELS) + " |",
             "|---|---|---:|" + "---:|" * len(LEVELS)]
    for scheme in ("sliced", "residual"):
        for bits in ((2, 3, 4), LEVELS):
            cfg = MWQConfig(bits=bits, group_size=64, scheme=scheme)
            t0, c0 = time.perf_counter(), time.process_time()
            t = quantize_mwq(w, cfg)
            q_s, q_cpu = time.perf_counter() - t0, time.process_time() - c0
            deq = []
            for b in LEVELS:
                if b not in bits:
                    deq.append("")
                    continue
                c0 = time.process_time()
                dequantize(t, b)
                deq.append(f"{time.process_time() - c0:.2f}")
            lines.append(f"| {scheme} | {','.join(map(str, bits))} | {q_cpu:.1f} ({q_s:.1f}) | " + " | ".join(deq) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print("## SQNR (dB), Gaussian 512x1024, group 64, levels 2..8\n")
    print(sqnr_table(LEVELS, with_naive=True))
    print("\n## SQNR (dB), same Gaussian, default levels 2,3,4\n")
    print(sqnr_table((2, 3, 4), with_naive=False))
    print("\n## Time, one 4096x14336 bf16 matrix, group 64, 1 torch thread\n")
    print(timings())
