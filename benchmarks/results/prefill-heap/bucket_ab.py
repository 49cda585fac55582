"""Prefill tiles with the GEMM's token count exact or padded to TOKEN_BUCKET (kernels/dispatch.py), alternating
call by call in one process at token counts that are not multiples of 16: what the padding costs.

    python bucket_ab.py [--shape 14336x4096] [--threads 2] [--levels 4] [--tokens 129,136,200,257,383] [--repeats 9]
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
    padded = dict(dispatch.TOKEN_BUCKET)

    def run(bucket, d, x):
        dispatch.TOKEN_BUCKET = bucket
        return dispatch.tiled_matmul(lib, d, x, splitter)

    for n in (int(v) for v in a.tokens.split(",")):
        x = torch.randn(n, cols)
        for b in levels:
            d = cpu.MatrixDesc(m, b)
            assert torch.equal(run({}, d, x), run(padded, d, x))  # the same numbers either way
            med, _ = interleaved_ms({"exact": lambda: run({}, d, x), "padded": lambda: run(padded, d, x)}, a.repeats)
            emit({"shape": a.shape, "threads": a.threads, "tokens": n, "level": b, "tile_dtype": str(dispatch.TILE_DTYPE),
                  "exact_ms": round(med["exact"], 2), "padded_ms": round(med["padded"], 2),
                  "padded_over_exact": round(med["padded"] / med["exact"], 3)}, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
