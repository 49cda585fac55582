"""Group 16 against group 32 at the same level, the two matrices' calls alternating (this tree's kernels, one
library, the runtime's int8 activations): the ratio of their medians is free of the host's drift between cells.

    python g16vs32.py [--shape 14336x4096] [--threads 2] [--levels 2,3,4] [--tokens 1,8] [--repeats 41] [--json F]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "scripts"))

from bench_kernels import _packed, ab_parser, emit, interleaved_ms  # noqa: E402

from d2moe.kernels import cpu  # noqa: E402


def main() -> int:
    ap = ab_parser(__doc__, threads=2, levels="2,3,4", tokens="1,8", repeats=41, groups=None)
    a = ap.parse_args()
    lib = cpu.load()
    rows, cols = (int(v) for v in a.shape.split("x"))
    levels = tuple(int(v) for v in a.levels.split(","))
    splitter = cpu.RowSplitter(a.threads)
    mats = {gs: cpu.blocked(_packed(rows, cols, levels, gs, "subblock")) for gs in (32, 16)}
    for n in (int(v) for v in a.tokens.split(",")):
        x = torch.randn(n, cols)
        qs = {gs: cpu.QuantizedX(lib, x, gs, 8) for gs in mats}
        for b in levels:
            descs = {gs: cpu.MatrixDesc(m, b) for gs, m in mats.items()}
            med, _ = interleaved_ms({gs: (lambda gs=gs: cpu.gemv(lib, descs[gs], qs[gs], splitter)) for gs in (32, 16)},
                                    a.repeats)
            r = {"shape": a.shape, "threads": a.threads, "tokens": n, "level": b, "g32_ms": round(med[32], 3),
                 "g16_ms": round(med[16], 3), "ratio": round(med[16] / med[32], 3)}
            emit(r, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
