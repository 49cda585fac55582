"""Quality of d2moe's nested levels beside llama.cpp's K-quants on the same trained MoE, in one run.

Experts only are quantized on both sides (everything else stays 16-bit); each perplexity is reported as
a ratio to the same tool's own 16-bit run on the same held-out text (the tools tokenize and window
differently, so absolute perplexities are not comparable; ratios are). Held-out text is never used
for calibration: --calib gets the training split.

d2moe: `pack --bits 2,3,4` and `--bits 2,3,4,8`, each plain and with `--calib TRAIN`, then
`eval --level all --reference SRC`. llama.cpp: convert to F16 GGUF, `llama-imatrix` on TRAIN, then
`llama-quantize --tensor-type ffn_(gate|up|down)_exps=Q2_K|Q3_K|Q4_K` with and without `--imatrix`,
and `llama-perplexity` on the held-out text. Needs expert matrices whose input width is a multiple
of 256 (K-quant super-blocks), e.g. a model from `scripts/train_tiny_moe.py --hidden 256 --intermediate 512`.

    .venv/bin/python scripts/quality_vs_kquants.py MODEL --train TRAIN.txt --heldout HELDOUT.txt \
        --llama $LLAMA_CPP --out benchmarks/results/quality_kquants
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KQUANTS = {2: ("Q2_K", 2.625), 3: ("Q3_K", 3.4375), 4: ("Q4_K", 4.5)}


def run(cmd: list[str], what: str) -> str:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{what} failed:\n{p.stderr[-2000:]}")
    return p.stdout + p.stderr


def d2moe_rows(args, work: Path) -> list[dict]:
    rows = []
    for bits in ("2,3,4", "2,3,4,8"):
        for calib in (False, True):
            out = work / f"d2-{bits.replace(',', '')}-{'calib' if calib else 'plain'}"
            cmd = [sys.executable, "-m", "d2moe", "pack", args.model, out, "--bits", bits, "--json", "--quiet", "--force",
                   "--weighting", args.weighting]
            if calib:
                cmd += ["--calib", args.train, "--calib-tokens", str(args.calib_tokens)]
            pack = json.loads(run(cmd, f"pack {bits} calib={calib}").strip().splitlines()[-1])
            ev = json.loads(run([sys.executable, "-m", "d2moe", "eval", out, "--text", args.heldout, "--level", "all",
                                 "--reference", args.model, "--seq-len", str(args.ctx), "--json"], "eval"))
            ref = next(r for r in ev["results"] if r.get("level") is None or "16" in str(r.get("target")))
            base = ref["perplexity"]["ppl"]
            weights = sum(r * c for r, c in pack_shapes(out))
            for r in ev["results"]:
                if r is ref:
                    continue
                if rows:
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                lvl = r["level"]
                rows.append({"tool": "d2moe", "pack_bits": bits, "calibrated": calib, "weighting": args.weighting, "level": lvl,
                             "bpw": round(8 * pack["bytes_per_level"][str(lvl)] / (weights * pack_experts(pack)), 3),
                             "ppl": round(r["perplexity"]["ppl"], 4), "ppl_16bit": round(base, 4),
                             "ratio": round(r["perplexity"]["ppl"] / base, 4)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def pack_shapes(out: Path) -> list[tuple[int, int]]:
    manifest = json.loads((out / "d2moe.json").read_text())
    return [tuple(s) for s in manifest["matrix_shapes"].values()]


def pack_experts(pack: dict) -> int:
    return pack["moe_layers"] * pack["experts_per_layer"]


def ppl_of(text: str) -> float:
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", text)
    if not m:
        raise SystemExit(f"no perplexity in llama-perplexity output:\n{text[-1500:]}")
    return float(m.group(1))


def llama_rows(args, work: Path) -> list[dict]:
    bin_ = args.llama / "build" / "bin"
    f16 = work / "model-F16.gguf"
    run([sys.executable, ROOT / "scripts" / "llama_convert.py", args.llama, args.model, "--outtype", "f16",
         "--outfile", f16], "convert")
    perplexity = [bin_ / "llama-perplexity", "-f", args.heldout, "-c", str(args.ctx), "-t", "2", "-b", str(args.ctx)]
    base = ppl_of(run([*perplexity, "-m", f16], "perplexity F16"))
    imatrix = work / "imatrix.gguf"
    run([bin_ / "llama-imatrix", "-m", f16, "-f", args.train, "-c", str(args.ctx), "-t", "2", "-o", imatrix,
         "--chunks", str(max(1, args.calib_tokens // args.ctx))], "imatrix")
    rows = []
    for bits, (qtype, bpw) in KQUANTS.items():
        for use_imatrix in (False, True):
            out = work / f"model-{qtype}{'-imat' if use_imatrix else ''}.gguf"
            # a base type of F16 skips the overrides, so: base Q8_0, every non-expert matrix forced back to f16
            cmd = [bin_ / "llama-quantize", "--token-embedding-type", "f16", "--output-tensor-type", "f16"]
            if use_imatrix:
                cmd += ["--imatrix", imatrix]
            for t in ("attn_q", "attn_k", "attn_v", "attn_output"):
                cmd += ["--tensor-type", f"{t}=f16"]
            for t in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
                cmd += ["--tensor-type", f"{t}={qtype.lower()}"]
            log = run([*cmd, f16, out, "Q8_0", "2"], f"quantize {qtype}")
            ktype = qtype.replace("_K", "_K").lower().replace("_k", "_K")  # llama prints "q2_K"
            if f"-> {ktype}" not in log or "converting to q8_0" in log:
                raise SystemExit(f"llama-quantize did not give experts {qtype} and the rest 16-bit:\n{log[-1500:]}")
            ppl = ppl_of(run([*perplexity, "-m", out], f"perplexity {qtype}"))
            rows.append({"tool": "llama.cpp", "type": qtype, "imatrix": use_imatrix, "level": bits, "bpw": bpw,
                         "ppl": ppl, "ppl_16bit": base, "ratio": round(ppl / base, 4)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| bits | d2moe 2,3,4 | d2moe 2,3,4 --calib | d2moe 2,3,4,8 | d2moe 2,3,4,8 --calib | llama.cpp K-quant | "
             "K-quant + imatrix | bpw d2moe / K-quant |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    def d2(level, bits, calib):
        return next(x for x in rows if x["tool"] == "d2moe" and x["pack_bits"] == bits and x["calibrated"] == calib
                    and x["level"] == level)

    def ll(level, imat):
        return next(x for x in rows if x["tool"] == "llama.cpp" and x["level"] == level and x["imatrix"] == imat)

    for level in (2, 3, 4):
        cells = [d2(level, "2,3,4", False), d2(level, "2,3,4", True), d2(level, "2,3,4,8", False),
                 d2(level, "2,3,4,8", True), ll(level, False), ll(level, True)]
        lines.append(f"| {level} | " + " | ".join(f"{c['ratio']:.4f}" for c in cells)
                     + f" | {cells[0]['bpw']:.2f} / {cells[4]['bpw']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--heldout", type=Path, required=True)
    ap.add_argument("--llama", type=Path, required=True, help="llama.cpp source tree with build/bin")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--calib-tokens", type=int, default=32768)
    ap.add_argument("--weighting", default="abs", help="d2moe pack --weighting (its default: abs)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="d2moe-quality-") as tmp:
        work = Path(tmp)
        rows = llama_rows(args, work) + d2moe_rows(args, work)
    md = table(rows)
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(md + "\n")


if __name__ == "__main__":
    main()
