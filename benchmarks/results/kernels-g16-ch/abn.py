"""Variants of the working tree's CPU kernels, built with extra -D macros, timed interleaved in one process (the
order rotating per repeat): subblock matrices at real shapes, the runtime's int8 activations.

    python abn.py --variant base: --variant ch1:D2_R16_CH_SMALL=1 [--shape 14336x4096] [--threads 1]
                  [--groups 32,16] [--levels 2,3,4] [--tokens 1,8] [--repeats 21] [--json out.jsonl]

Prints one JSON line per (tokens, group, level): each variant's median and min ms, its median's ratio to the first
variant's, and its largest output difference from the first variant's relative to the largest output.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "scripts"))

from bench_kernels import _packed, ab_parser, emit, interleaved_ms, library_from  # noqa: E402

from d2moe.kernels import cpu  # noqa: E402


def _lib_with(defines: list[str], tmp: Path, name: str):
    """The kernel library built from kernels/cpu with `#define`s put before everything else in mwq_cpu.c."""
    src = tmp / name
    shutil.copytree(REPO / "kernels" / "cpu", src)
    main = src / cpu.SOURCE.name
    head = "".join(f"#define {d.replace('=', ' ', 1)}\n" for d in defines)
    main.write_text(head + main.read_text())
    return library_from(src)


def main() -> int:
    ap = ab_parser(__doc__, threads=1, levels="2,3,4", tokens="1,8", repeats=21, groups="32,16")
    ap.add_argument("--variant", action="append", required=True, help="NAME:MACRO=V,MACRO2=V (first = baseline)")
    a = ap.parse_args()
    libs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in a.variant:
            name, _, defs = v.partition(":")
            libs[name] = _lib_with([d for d in defs.split(",") if d], Path(tmp), name)
    names = list(libs)
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
                ys = {k: f() for k, f in fns.items()}
                med, low = interleaved_ms(fns, a.repeats, warmup=0)
                y0 = ys[names[0]]
                r = {"shape": a.shape, "threads": a.threads, "tokens": n, "group": gs, "level": b,
                     **{f"{k}_ms": round(med[k], 3) for k in names}, **{f"{k}_min_ms": round(low[k], 3) for k in names},
                     **{f"{k}_ratio": round(med[k] / med[names[0]], 3) for k in names[1:]},
                     **{f"{k}_rel_diff": float((ys[k] - y0).abs().max() / y0.abs().max()) for k in names[1:]}}
                emit(r, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
