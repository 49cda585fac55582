"""Prefill tiles with two ways of padding the GEMM's token columns (kernels/dispatch.gemm_width), alternating call by
call in one process: what the padding costs. `--compare exact,16` (the default) is §0.18's: the exact token count
against multiples of 16; `--compare 16,ladder` is §0.19's: those against the ladder the runtime pads to now.

    python bucket_ab.py [--compare exact,16] [--shape 14336x4096] [--threads 2] [--levels 4]
                        [--tokens 129,136,200,257,383] [--repeats 9]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "scripts"))

from bench_kernels import _packed, ab_parser, emit, interleaved_ms  # noqa: E402

from d2moe.kernels import cpu, dispatch  # noqa: E402

WIDTHS = {  # GEMM columns for `tokens` tokens
    "exact": lambda tokens, dtype: tokens,
    "16": lambda tokens, dtype: -(-tokens // 16) * 16,
    "ladder": dispatch.gemm_width,
}


def main() -> int:
    ap = ab_parser(__doc__, threads=2, levels="4", tokens="129,136,200,257,383", repeats=9, groups=None)
    ap.add_argument("--compare", default="exact,16", help=f"two of {', '.join(WIDTHS)}")
    a = ap.parse_args()
    first, second = a.compare.split(",")
    lib = cpu.load()
    rows, cols = (int(v) for v in a.shape.split("x"))
    splitter = cpu.RowSplitter(a.threads)
    torch.set_num_threads(a.threads)
    levels = tuple(int(v) for v in a.levels.split(","))
    m = cpu.blocked(_packed(rows, cols, levels, 32, "subblock"))

    def run(name, d, x):
        dispatch.gemm_width = WIDTHS[name]
        return dispatch.tiled_matmul(lib, d, x, splitter)

    for n in (int(v) for v in a.tokens.split(",")):
        x = torch.randn(n, cols)
        for b in levels:
            d = cpu.MatrixDesc(m, b)
            one, two = run(first, d, x), run(second, d, x)
            if {first, second} == {"exact", "16"}:
                assert torch.equal(one, two)  # zero columns change no sum: the same numbers
            else:  # each GEMM width may sum in its own order: the same up to the bf16 output's rounding
                assert torch.allclose(one, two, rtol=2 ** -7, atol=1e-3)
            med, _ = interleaved_ms({k: (lambda k=k: run(k, d, x)) for k in (first, second)}, a.repeats)
            emit({"shape": a.shape, "threads": a.threads, "tokens": n, "level": b, "tile_dtype": str(dispatch.TILE_DTYPE),
                  "widths": {k: WIDTHS[k](n, dispatch.TILE_DTYPE) for k in (first, second)},
                  f"{first}_ms": round(med[first], 2), f"{second}_ms": round(med[second], 2),
                  f"{second}_over_{first}": round(med[second] / med[first], 3)}, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
