"""The integer kernel against dequantized tiles + GEMM (the two prefill paths of kernels/dispatch.py) at several token
counts, alternating call by call in one process: where GEMV_MAX_TOKENS_INT8_FP32 should sit after §0.16.

    python crossover.py [--shape 14336x4096] [--threads 2] [--levels 2,4] [--tokens 32,64,128,256] [--repeats 9]
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
    ap = ab_parser(__doc__, threads=2, levels="2,4", tokens="32,64,128,256", repeats=9, groups=None)
    a = ap.parse_args()
    lib = cpu.load()
    rows, cols = (int(v) for v in a.shape.split("x"))
    levels = tuple(int(v) for v in a.levels.split(","))
    splitter = cpu.RowSplitter(a.threads)
    torch.set_num_threads(a.threads)
    m = cpu.blocked(_packed(rows, cols, levels, 32, "subblock"))
    for n in (int(v) for v in a.tokens.split(",")):
        x = torch.randn(n, cols)
        for b in levels:
            d = cpu.MatrixDesc(m, b)
            fns = {"int8 kernel": lambda: cpu.gemv(lib, d, cpu.QuantizedX(lib, x, 32, 8), splitter),
                   "tiles": lambda: dispatch.tiled_matmul(lib, d, x, splitter)}
            med, _ = interleaved_ms(fns, a.repeats)
            r = {"shape": a.shape, "threads": a.threads, "tokens": n, "level": b, "tile_dtype": str(dispatch.TILE_DTYPE),
                 "int8_ms": round(med["int8 kernel"], 2), "tiles_ms": round(med["tiles"], 2),
                 "int8_over_tiles": round(med["int8 kernel"] / med["tiles"], 3)}
            emit(r, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
