"""Prefill tiles with the GEMM's token columns padded to a multiple of 16 or to the next width of the ladder
(kernels/dispatch.gemm_width), alternating call by call in one process: what the ladder's wider padding costs.

    python ladder_ab.py [--shape 14336x4096] [--threads 2] [--levels 4] [--tokens 129,136,200,257,383] [--repeats 9]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "scripts"))

from bench_kernels import _packed, ab_parser, emit, interleaved_ms  # noqa: E402

from d2moe.kernels import cpu, dispatch  # noqa: E402


def main() -> int:
    ap = ab_parser(__doc__, threads=2, levels="4", tokens="129,136,200,257,383", repeats=9, groups=None)
    a = ap.parse_args()
    lib = cpu.load()
    rows, cols = (int(v) for v in a.shape.split("x"))
    splitter = cpu.RowSplitter(a.threads)
    torch.set_num_threads(a.threads)
    levels = tuple(int(v) for v in a.levels.split(","))
    m = cpu.blocked(_packed(rows, cols, levels, 32, "subblock"))
    ladder = dispatch.gemm_width

    def sixteens(tokens, dtype):
        return -(-tokens // 16) * 16

    def run(width, d, x):
        dispatch.gemm_width = width
        return dispatch.tiled_matmul(lib, d, x, splitter)

    for n in (int(v) for v in a.tokens.split(",")):
        x = torch.randn(n, cols)
        for b in levels:
            d = cpu.MatrixDesc(m, b)
            # the same numbers up to the bf16 output's rounding (each GEMM shape sums in its own order)
            assert torch.allclose(run(sixteens, d, x), run(ladder, d, x), rtol=2 ** -7, atol=1e-3)
            med, _ = interleaved_ms({"16": lambda: run(sixteens, d, x), "ladder": lambda: run(ladder, d, x)}, a.repeats)
            emit({"shape": a.shape, "threads": a.threads, "tokens": n, "level": b, "tile_dtype": str(dispatch.TILE_DTYPE),
                  "width": ladder(n, dispatch.TILE_DTYPE), "multiple_of_16_ms": round(med["16"], 2),
                  "ladder_ms": round(med["ladder"], 2), "ladder_over_16": round(med["ladder"] / med["16"], 3)}, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
