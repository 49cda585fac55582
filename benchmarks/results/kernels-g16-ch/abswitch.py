"""One build of the tree's CPU kernels with a run-time switch on one branch of ROWS16's rows16_term, timed
alternating call by call: the same library, memory and inputs on both sides, so the host's drift and code placement
cancel (two builds in one process did not, BENCHMARKS.md §0.16).

    python abswitch.py [--shape 14336x4096] [--threads 1] [--groups 32,16] [--levels 2,3,4] [--tokens 1,8]
                       [--repeats 41] [--file mwq_rows16.h] [--find LINE --replace LINE'] [--march ARCH]
                       [--json out.jsonl]

`--find LINE --replace LINE'` names the branch (LINE' = LINE with `&& !d2_ab_four` in its condition, or any
expression of `d2_ab_four`) in kernels/cpu/`--file`. `--march x86-64-v3` builds the AVX2 path on an AVX-512 CPU. In the output
"one" is the tree's path and "four" the path with that branch switched off (the names are from the first use: one
accumulator per group of 16 against four). The default gates group 16's branch, so group 32 is the control (its
ratio should be 1 within the noise); §0.16's group-32 trip count was measured with

    --find "else if (qpg == 8)" --replace "else if (qpg == 8 && !d2_ab_four)"
"""

from __future__ import annotations

import ctypes
import shutil
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "scripts"))

from bench_kernels import _packed, ab_parser, emit, interleaved_ms, library_from  # noqa: E402

from d2moe.kernels import cpu  # noqa: E402

SWITCH = ("    if (qpg == 4)\n", "    if (qpg == 4 && !d2_ab_four)\n")  # group 16's branch; or --find/--replace


def _switchable_lib(tmp: Path, switch: tuple[str, str] = SWITCH, file: str = "mwq_rows16.h", march: str | None = None):
    src = tmp / "cpu"
    shutil.copytree(REPO / "kernels" / "cpu", src)
    main = src / cpu.SOURCE.name
    main.write_text("int d2_ab_four = 0;\nvoid d2_ab_set_four(int v) { d2_ab_four = v; }\n" + main.read_text())
    h = src / file
    text = h.read_text()
    assert text.count(switch[0]) == 1, f"{switch[0]!r} is not in the tree's {file} once: pass --find/--replace"
    h.write_text(text.replace(switch[0], switch[1]))
    flags = list(cpu._FLAGS)
    if march:
        cpu._FLAGS[:] = [f if f != "-march=native" else f"-march={march}" for f in flags]
    try:
        return library_from(src)
    finally:
        cpu._FLAGS[:] = flags


def main() -> int:
    ap = ab_parser(__doc__, threads=1, levels="2,3,4", tokens="1,8", repeats=41, groups="32,16")
    ap.add_argument("--file", default="mwq_rows16.h", help="the kernels/cpu file holding the --find line")
    ap.add_argument("--find", default=SWITCH[0], help="a line of --file whose branch the switch gates")
    ap.add_argument("--replace", default=SWITCH[1], help="that line with `&& !d2_ab_four` (the old path)")
    ap.add_argument("--march", default=None, help="-march for the build (x86-64-v3: the AVX2 path)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lib = _switchable_lib(Path(tmp), (a.find, a.replace), a.file, a.march)
    print("simd level", lib.d2_simd_level(), file=sys.stderr)
    if a.march:  # the layouts (cpu.blocked) must be this build's, not the native library's
        cpu.load = lambda: lib
    setter = lib.d2_ab_set_four
    setter.argtypes = [ctypes.c_int]
    rows, cols = (int(v) for v in a.shape.split("x"))
    splitter = cpu.RowSplitter(a.threads)
    for n in (int(v) for v in a.tokens.split(",")):
        x = torch.randn(n, cols)
        for gs in (int(v) for v in a.groups.split(",")):
            levels = tuple(int(v) for v in a.levels.split(","))
            m = cpu.blocked(_packed(rows, cols, levels, gs, "subblock"))
            for b in levels:
                d = cpu.MatrixDesc(m, b)
                q = cpu.QuantizedX(lib, x, gs, 8)
                setting = {"four": 1, "one": 0}

                def run(k: str):
                    setter(setting[k])
                    return cpu.gemv(lib, d, q, splitter)

                ys = {k: run(k) for k in setting}
                med, low = interleaved_ms({k: (lambda k=k: run(k)) for k in setting}, a.repeats)
                r = {"shape": a.shape, "threads": a.threads, "tokens": n, "group": gs, "level": b,
                     "four_ms": round(med["four"], 3), "one_ms": round(med["one"], 3),
                     "ratio": round(med["one"] / med["four"], 3), "min_ratio": round(low["one"] / low["four"], 3),
                     "same_output": bool(torch.equal(ys["one"], ys["four"]))}
                emit(r, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
