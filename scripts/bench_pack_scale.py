"""`d2moe pack` beside llama.cpp's conversion on the same real-shape checkpoint, in one run.

For each checkpoint: llama.cpp's `convert_hf_to_gguf.py --outtype f16` then `llama-quantize Q4_K_M`
(what a llama.cpp user runs to get a 4-bit file), and `d2moe pack --bits 2,3,4` at 1 and 2 workers;
each a child process timed with its peak RSS (`/usr/bin/time -v`). Prints a markdown table with the
ratio of each pack to llama.cpp's convert + quantize, and writes JSON beside it.

With `--calib TEXT`, both tools calibrate on the same text: llama.cpp runs `llama-imatrix` over
`--calib-tokens` tokens (512-token chunks) between convert and `llama-quantize --imatrix`, and d2moe
runs `pack --calib TEXT --calib-tokens N`.

    .venv/bin/python scripts/bench_pack_scale.py /work/scale/mixtral /work/scale/olmoe \
        --llama-src $LLAMA/vendor/llama.cpp --out benchmarks/results/pack_scale
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str]) -> dict:
    """Wall seconds and peak RSS (bytes) of one child command; raises with its stderr tail on failure."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed: {p.stderr[-1500:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) * 1024
    return {"seconds": round(wall, 2), "peak_rss_bytes": rss}


def source_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def markdown(rows: list[dict], workers: list[int]) -> str:
    """One table row per checkpoint: each llama.cpp step, each pack (by worker count), ratios, peak RSS."""
    imat = any(r["llama_imatrix"] for r in rows)
    gib, w_names = 2**30, " / ".join(f"{w} w" for w in workers)
    head = (["checkpoint", "source", "llama convert f16"] + (["llama-imatrix"] if imat else []) + ["llama Q4_K_M", "llama total"]
            + [f"d2moe pack {w} worker{'s' if w > 1 else ''}" for w in workers]
            + [f"ratio to llama ({w_names})", "peak RSS llama (" + ("convert / imatrix / quantize" if imat else "convert / quantize") + ")",
               f"peak RSS d2moe ({w_names})"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        d, steps = r["d2moe"], [r["llama_convert"]] + ([r["llama_imatrix"]] if imat else []) + [r["llama_q4_k_m"]]
        cells = ([r["checkpoint"], f"{r['source_bytes'] / 1e9:.2f} GB"] + [f"{s['seconds']:.1f} s" for s in steps]
                 + [f"{r['llama_total_s']:.1f} s"]
                 + [f"{d[w]['seconds']:.1f} s ({d[w]['source_mb_per_s']:.0f} MB/s)" for w in workers]
                 + [" / ".join(str(d[w]["ratio_to_llama"]) for w in workers),
                    " / ".join(f"{s['peak_rss_bytes'] / gib:.2f}" for s in steps) + " GiB",
                    " / ".join(f"{d[w]['peak_rss_bytes'] / gib:.2f}" for w in workers) + " GiB"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", type=Path, nargs="+")
    ap.add_argument("--llama-src", type=Path, required=True, help="llama.cpp source tree (convert_hf_to_gguf.py, build/bin)")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--calib", type=Path, default=None, help="calibration text for both tools (imatrix / pack --calib)")
    ap.add_argument("--calib-tokens", type=int, default=32768)
    ap.add_argument("--scratch", type=Path, default=None, help="where outputs go (default: a temp dir, removed)")
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args()
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="d2moe-packbench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    llama_bin, workers = args.llama_src / "build" / "bin", [int(x) for x in args.workers.split(",")]
    rows = []
    try:
        for ckpt in args.checkpoints:
            name = ckpt.resolve().name
            size = source_bytes(ckpt)
            f16, q4 = scratch / f"{name}-F16.gguf", scratch / f"{name}-Q4_K_M.gguf"
            print(f"[{name}] llama.cpp convert", file=sys.stderr, flush=True)
            conv = timed([sys.executable, str(args.llama_src / "convert_hf_to_gguf.py"), str(ckpt), "--outtype", "f16",
                          "--outfile", str(f16)])
            imatrix, imat_args = None, []
            if args.calib:
                imat = scratch / f"{name}-imatrix.gguf"
                print(f"[{name}] llama-imatrix", file=sys.stderr, flush=True)
                imatrix = timed([str(llama_bin / "llama-imatrix"), "-m", str(f16), "-f", str(args.calib),
                                 "-c", "512", "--chunks", str(args.calib_tokens // 512), "-t", "2", "--no-ppl", "-o", str(imat)])
                imat_args = ["--imatrix", str(imat)]
            print(f"[{name}] llama-quantize Q4_K_M", file=sys.stderr, flush=True)
            quant = timed([str(llama_bin / "llama-quantize"), *imat_args, str(f16), str(q4), "Q4_K_M", "2"])
            for f in (f16, q4, *imat_args[1:]):
                Path(f).unlink(missing_ok=True)
            llama_s = conv["seconds"] + quant["seconds"] + (imatrix["seconds"] if imatrix else 0)
            row = {"checkpoint": name, "source_bytes": size, "llama_convert": conv, "llama_imatrix": imatrix,
                   "llama_q4_k_m": quant, "llama_total_s": round(llama_s, 2), "d2moe": {}}
            calib = ["--calib", str(args.calib), "--calib-tokens", str(args.calib_tokens)] if args.calib else []
            for w in workers:
                out = scratch / f"{name}-d2"
                print(f"[{name}] d2moe pack --workers {w}", file=sys.stderr, flush=True)
                r = timed([sys.executable, "-m", "d2moe", "pack", str(ckpt), str(out), "--bits", args.bits,
                           "--workers", str(w), *calib, "--json", "--quiet", "--force"])
                r["ratio_to_llama"] = round(r["seconds"] / llama_s, 3)
                r["source_mb_per_s"] = round(size / 1e6 / r["seconds"], 1)
                row["d2moe"][w] = r
                shutil.rmtree(out, ignore_errors=True)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    table = markdown(rows, workers)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
