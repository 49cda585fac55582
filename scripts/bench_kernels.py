"""Kernel table: y = W_b x from packed MWQ planes per level and batch, beside torch's own kernels.

    python scripts/bench_kernels.py [--shape 14336x4096] [--levels 2,3,4,8] [--batches 1,4,8]
                                    [--formats sliced:64,subblock:32] [--threads 1] [--repeats 7] [--tiles]
                                    [--json out.json]

For each level b the native kernel (planes blocked where the runtime blocks them) (d2moe.kernels.cpu) runs on random planes of the shape (its
speed does not depend on the values), with the runtime's activation width (int8 up to level 4,
int16 above; `--activation-bits` forces one); "GB/s" is the packed bytes the level reads (b/8 byte per
weight + its parameters: f16 scale and offset per group, or subblock's code byte per group and 4 bytes
per super-block) over the median time. Beside it on the same shape and
batch: torch bf16 and fp32 matmul (weights resident), torch's int4 CPU kernel
(`_weight_int4pack_mm_for_cpu`, group 64) and int8 kernel (`_weight_int8pack_mm`). d2moe's levels
are interleaved within each repeat, then torch's kernels (torch's spinning intra-op threads would
slow whichever d2moe call followed them); medians reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from d2moe.kernels import cpu
from d2moe.kernels.dispatch import INT8_ACTIVATIONS_UP_TO
from d2moe.kernels.packed import PackedMatrix
from d2moe.quantize import MWQConfig
from d2moe.quantize.subblock import n_supers, round_param


def _packed(rows: int, cols: int, levels: tuple[int, ...], group_size: int, scheme: str = "sliced") -> PackedMatrix:
    g = torch.Generator().manual_seed(0)
    cfg = MWQConfig(bits=levels, group_size=group_size, scheme=scheme)
    planes = tuple(torch.randint(0, 256, (rows, cols // 8), generator=g, dtype=torch.uint8) for _ in range(levels[-1]))
    if scheme == "subblock":  # parameter codes and float16 (d, dmin) per super-block
        scale = torch.randint(0, 256, (rows, cols // group_size), generator=g, dtype=torch.uint8)
        offset = round_param(torch.rand(rows, n_supers(cols // group_size, group_size), 2, generator=g) * 0.01)
    else:
        scale = (torch.rand(rows, cols // group_size, generator=g) * 0.01 + 1e-3).half()
        offset = (torch.randn(rows, cols // group_size, generator=g) * 0.01).half()
    return PackedMatrix((rows, cols), cfg, levels[-1], scale, offset, planes, ())


def library_from(sources: Path | None = None):
    """The kernel library built from `sources` (a directory holding kernels/cpu's files: another revision's, or an
    edited copy) or, with None, from the tree: what the A/B harnesses in benchmarks/results load side by side."""
    saved = (cpu.SOURCE, cpu.DENSE_SOURCE, cpu.POOL_SOURCE, cpu.GATE_SOURCE)
    if sources is not None:
        cpu.SOURCE, cpu.DENSE_SOURCE, cpu.POOL_SOURCE, cpu.GATE_SOURCE = (Path(sources) / p.name for p in saved)
    cpu.load.cache_clear()
    try:
        return cpu.load()
    finally:
        cpu.SOURCE, cpu.DENSE_SOURCE, cpu.POOL_SOURCE, cpu.GATE_SOURCE = saved
        cpu.load.cache_clear()


def interleaved_ms(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
                   ) -> tuple[dict[str, float], dict[str, float]]:
    """Median and minimum ms of each of `fns` over `repeats` rounds, every round calling all of them with the order
    rotating per round (the host's drift lands on every side alike); the first `warmup` rounds are not counted."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(warmup + repeats):
        for k in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            fns[k]()
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    return ({k: statistics.median(v) * 1e3 for k, v in times.items()}, {k: min(v) * 1e3 for k, v in times.items()})


def ab_parser(doc: str, threads: int = 1, levels: str = "2,3,4", tokens: str = "1,8", repeats: int = 21,
              groups: str | None = "32,16") -> argparse.ArgumentParser:
    """The arguments the A/B harnesses in benchmarks/results share (--shape, --threads, --groups unless None,
    --levels, --tokens, --repeats, --json), with each harness's defaults; `doc`'s first line describes it."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--shape", default="14336x4096")
    ap.add_argument("--threads", type=int, default=threads)
    if groups is not None:
        ap.add_argument("--groups", default=groups)
    ap.add_argument("--levels", default=levels)
    ap.add_argument("--tokens", default=tokens)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--json", default=None, help="append each result line to this file")
    return ap


def emit(record: dict, json_path: str | None) -> None:
    """One result: a JSON line on stdout, appended to `json_path` where given."""
    line = json.dumps(record)
    print(line, flush=True)
    if json_path:
        with open(json_path, "a") as f:
            f.write(line + "\n")


def _param_bytes(rows: int, cols: int, group_size: int, scheme: str) -> int:
    groups = cols // group_size
    return rows * (groups + 4 * n_supers(groups, group_size)) if scheme == "subblock" else rows * groups * 4


def _torch_rows(rows: int, cols: int) -> dict:
    """name -> fn(x fp32 [N, I]) -> y for torch's kernels (weights prepared once)."""
    w = torch.randn(rows, cols) * 0.02
    wb = w.bfloat16()
    out = {"torch bf16": lambda x: x.bfloat16() @ wb.T, "torch fp32": lambda x: x @ w.T}
    try:
        q = torch.randint(0, 16, (rows, cols), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        sz = torch.rand(cols // 64, rows, 2).bfloat16()
        torch.ops.aten._weight_int4pack_mm_for_cpu(torch.randn(1, cols).bfloat16(), packed, 64, sz)
        out["torch int4 (g64)"] = lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, 64, sz)
    except (RuntimeError, AttributeError) as exc:  # not in every torch build
        print(f"torch int4 kernel unavailable: {exc}", file=sys.stderr)
    try:
        w8 = torch.randint(-127, 127, (rows, cols), dtype=torch.int8)
        s8 = torch.rand(rows).bfloat16()
        torch.ops.aten._weight_int8pack_mm(torch.randn(1, cols).bfloat16(), w8, s8)
        out["torch int8"] = lambda x: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), w8, s8)
    except (RuntimeError, AttributeError) as exc:
        print(f"torch int8 kernel unavailable: {exc}", file=sys.stderr)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="14336x4096", help="ROWSxCOLS of W (Mixtral's w1/w3; 4096x14336 is w2)")
    p.add_argument("--levels", default="2,3,4,8")
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--formats", default="sliced:64",
                   help="scheme:group_size of the packed matrix, comma-separated for an A/B (e.g. sliced:64,subblock:32)")
    p.add_argument("--threads", type=int, default=1, help="kernel row threads and torch intra-op threads")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--activation-bits", type=int, choices=(8, 16), default=None,
                   help="force int8/int16 activations (default: as the runtime, int8 up to level 4)")
    p.add_argument("--tiles", action="store_true",
                   help="also time each level's prefill path (dequantized tiles + GEMM) at every batch: the crossover")
    p.add_argument("--json", default=None, help="write the table here as JSON")
    a = p.parse_args(argv)
    rows, cols = (int(v) for v in a.shape.lower().split("x"))
    levels = tuple(int(v) for v in a.levels.split(","))
    batches = [int(v) for v in a.batches.split(",")]
    torch.set_num_threads(a.threads)
    lib = cpu.load()
    if lib is None:
        print("native kernels unavailable (no compiler): nothing to measure", file=sys.stderr)
        return 1
    formats = [(f.split(":")[0], int(f.split(":")[1])) for f in a.formats.split(",")]
    splitter = cpu.RowSplitter(a.threads)

    def act_bits(level: int) -> int:  # as the runtime's --activations auto (or the forced width)
        return a.activation_bits or (8 if level <= INT8_ACTIVATIONS_UP_TO else 16)

    systems, nbytes, blocked = {}, {}, []
    for scheme, gs in formats:
        m = _packed(rows, cols, levels, gs, scheme)
        if cpu.blocks_planes(gs, (cols,)):  # as the runtime's cache holds them on this CPU
            m = cpu.blocked(m)
        blocked.append(m.blocked)
        descs = {b: cpu.MatrixDesc(m, b) for b in levels}
        tag = "d2moe" if len(formats) == 1 else f"d2moe {scheme}/g{gs}"
        for b in levels:
            nbytes[f"{tag} level {b}"] = nbytes[f"{tag} level {b} tiles"] = rows * cols * b // 8 + _param_bytes(rows, cols, gs, scheme)
            systems[f"{tag} level {b}"] = (lambda x, d=descs[b], b=b, gs=gs:
                                           cpu.gemv(lib, d, cpu.QuantizedX(lib, x, gs, act_bits(b)), splitter))
            if a.tiles:
                from d2moe.kernels.dispatch import tiled_matmul

                systems[f"{tag} level {b} tiles"] = lambda x, d=descs[b]: tiled_matmul(lib, d, x, splitter)
    systems.update(_torch_rows(rows, cols))
    groups = rows * (cols // 64)
    nbytes.update({"torch bf16": 2 * rows * cols, "torch fp32": 4 * rows * cols, "torch int4 (g64)": rows * cols // 2 + 4 * groups,
                   "torch int8": rows * cols + 2 * rows})
    results = []
    for n in batches:
        x = torch.randn(n, cols)
        times: dict[str, list[float]] = {k: [] for k in systems}
        # d2moe's levels interleaved with each other, then torch's kernels interleaved with each other:
        # torch's intra-op threads spin after each op and would take the core from the next d2moe call
        for group in ([k for k in systems if k.startswith("d2moe")], [k for k in systems if not k.startswith("d2moe")]):
            for name in group:
                systems[name](x)  # warm-up
            for _ in range(a.repeats):
                for name in group:
                    t0 = time.perf_counter()
                    systems[name](x)
                    times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            med = statistics.median(ts)
            results.append({"system": name, "batch": n, "ms": med * 1e3, "GB/s": nbytes[name] / med / 1e9,
                            "bytes": nbytes[name]})
    splitter.close()
    acts = f"int{a.activation_bits}" if a.activation_bits else "auto (int8 <= 4 bits, int16 above)"
    print(f"shape {rows}x{cols}, formats {a.formats}, threads {a.threads}, kernels {cpu.simd_name()}"
          f"{' (planes blocked)' if all(blocked) else ''}, "
          f"activations {acts}, median of {a.repeats}")
    print("| system | batch | ms | GB/s of weights read | vs torch bf16 |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        bf16 = next(x["ms"] for x in results if x["system"] == "torch bf16" and x["batch"] == r["batch"])
        print(f"| {r['system']} | {r['batch']} | {r['ms']:.2f} | {r['GB/s']:.1f} | {bf16 / r['ms']:.2f}x |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"shape": [rows, cols], "formats": a.formats, "threads": a.threads,
                       "kernels": cpu.simd_name(), "blocked": blocked, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
