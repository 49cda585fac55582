"""Lossless codecs on real expert weights: compression ratio and decompression speed, side by side.

    .venv/bin/python scripts/bench_codecs.py SRC [SRC ...] [--experts 2] [--bf16] [--json out.json]

SRC: Hugging Face MoE checkpoints (the trained embedded model is fp32: --bf16 also measures it cast to
bf16). For each source, `--experts` experts of the first MoE layer (gate, up, down) are read and every
candidate compresses the matrices' bytes: whole-byte codecs (zstd, lz4, brotli) and the byte split
(exponent byte entropy-coded, sign+mantissa stored raw; d2moe.quantize.lossless) with zstd / brotli /
constriction's ANS on the exponent stream. Decompression MB/s is of the raw (decompressed) bytes, one
thread; `entropy` is the empirical entropy of the exponent byte in bits (the bound for its coder).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch


def exponent_entropy(exp: np.ndarray) -> float:
    counts = np.bincount(exp, minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _timed(fn, repeats: int = 3) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def candidates():
    import brotli
    import lz4.frame
    import zstandard

    from d2moe.quantize import lossless as ll

    out = {}
    for level in (1, 3, 9):
        c, d = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
        out[f"zstd-{level} (whole)"] = (lambda raw, c=c: c.compress(raw), lambda blob, n, d=d: d.decompress(blob))
    out["lz4 (whole)"] = (lambda raw: lz4.frame.compress(raw), lambda blob, n: lz4.frame.decompress(blob))
    out["brotli-5 (whole)"] = (lambda raw: brotli.compress(raw, quality=5), lambda blob, n: brotli.decompress(blob))
    for codec in ll.CODECS:
        if codec == "none":
            continue
        out[f"split + {codec}"] = (lambda raw, codec=codec: ll.encode_bytes(raw, WIDTH[0], codec),
                                   lambda blob, n: ll.decode_bytes(blob))
    out["split + ANS (constriction)"] = (lambda raw: _ans_encode(raw, WIDTH[0]), lambda blob, n: _ans_decode(blob))
    return out


WIDTH = [2]


def _ans_encode(raw: bytes, width: int) -> tuple:
    """Exponents through constriction's ANS coder with their own histogram (a model stored beside them)."""
    import constriction

    from d2moe.quantize import lossless as ll

    exp, rest = ll.split(np.frombuffer(raw, dtype=np.uint16 if width == 2 else np.uint32))
    counts = np.bincount(exp, minlength=256).astype(np.float64) + 1e-3
    model = constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(exp.astype(np.int32), model)
    return _Blob((coder.get_compressed(), counts, rest.tobytes(), width, len(exp)))


class _Blob(tuple):
    def __len__(self) -> int:  # compressed size: ANS words + a 256-entry u32 model + the raw rest
        return self[0].nbytes + 256 * 4 + len(self[2])


def _ans_decode(blob) -> bytes:
    import constriction

    from d2moe.quantize import lossless as ll

    words, counts, rest, width, n = blob
    model = constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)
    exp = constriction.stream.stack.AnsCoder(words).decode(model, n).astype(np.uint8)
    out = np.empty(n, dtype=np.uint16 if width == 2 else np.uint32)
    ll.join(exp, np.frombuffer(rest, dtype=np.uint8), out)
    return out.tobytes()


def measure(name: str, raw: bytes, width: int, repeats: int) -> list[dict]:
    WIDTH[0] = width
    arr = np.frombuffer(raw, dtype=np.uint16 if width == 2 else np.uint32)
    exp = ((arr >> 7) & 0xFF).astype(np.uint8) if width == 2 else ((arr >> 23) & 0xFF).astype(np.uint8)
    ent = exponent_entropy(exp)
    rows = []
    for cname, (enc, dec) in candidates().items():
        t0 = time.perf_counter()
        blob = enc(raw)
        enc_s = time.perf_counter() - t0
        back = dec(blob, len(raw))
        assert bytes(back) == raw, f"{cname} is not lossless"
        dec_s = _timed(lambda blob=blob, dec=dec: dec(blob, len(raw)), repeats)
        rows.append({"source": name, "dtype": {2: "16-bit", 4: "fp32"}[width], "codec": cname, "raw_bytes": len(raw),
                     "compressed_bytes": len(blob), "ratio": len(raw) / len(blob),
                     "bits_per_weight": 8 * len(blob) / (len(raw) / width),
                     "exponent_entropy_bits": ent, "encode_MBps": len(raw) / enc_s / 1e6,
                     "decode_MBps": len(raw) / dec_s / 1e6})
    return rows


def expert_bytes(src: Path, n_experts: int, dtype: torch.dtype | None) -> tuple[bytes, int]:
    from d2moe.quantize.adapters import adapter_for
    from d2moe.quantize.convert.source import ExpertSource, SourceCheckpoint

    source = SourceCheckpoint(src)
    adapter = adapter_for(source.config)
    source.index_weights()
    layers, ne = adapter.moe_layers(source.config), adapter.num_experts(source.config)
    experts = ExpertSource(source, adapter, layers, ne, adapter.matrix_shapes(source.config))
    parts, width = [], 2
    for e in range(min(n_experts, ne)):
        for m in ("gate", "up", "down"):
            w = experts.matrix(layers[0], e, m)
            w = w.to(dtype) if dtype is not None else w
            width = w.element_size()
            parts.append(w.contiguous().view(torch.uint8).numpy().tobytes())
    return b"".join(parts), width


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sources", nargs="+", type=Path)
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="also measure fp32 sources cast to bf16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for src in args.sources:
        raw, width = expert_bytes(src, args.experts, None)
        rows += measure(src.name, raw, width, args.repeats)
        if args.bf16 and "bf16" not in src.name:
            rows += measure(src.name + " (cast to bf16)", *expert_bytes(src, args.experts, torch.bfloat16), args.repeats)
    print("| source | dtype | codec | ratio | bits/weight | exponent entropy (bits) | encode MB/s | decode MB/s |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['source']} | {r['dtype']} | {r['codec']} | {r['ratio']:.3f} | {r['bits_per_weight']:.2f} | "
              f"{r['exponent_entropy_bits']:.2f} | {r['encode_MBps']:.0f} | {r['decode_MBps']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
