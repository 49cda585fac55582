"""Quality of d2moe's nested levels beside llama.cpp's K-quants on the same trained MoE, in one run.

Experts only are quantized on both sides (everything else stays 16-bit), and both are scored in one
harness: d2moe's perplexity recipe (`d2moe eval`: windows of --ctx tokens of the held-out text, our
tokenizer), each as a ratio to the unquantized model. Held-out text is never used for calibration:
--calib and llama-imatrix get the training split.

d2moe: `pack --bits 2,3,4` and `--bits 2,3,4,8` for each of --schemes, plain and with `--calib TRAIN`, then
`eval --level all --reference SRC`. llama.cpp: convert to F16 GGUF, `llama-imatrix` on TRAIN, then
`llama-quantize --tensor-type ffn_(gate|up|down)_exps=Q2_K|Q3_K|Q4_K` with and without `--imatrix`;
its quantized experts are read back with its own gguf-py (dequantized exactly as it stores them), put
into the transformers model in place of the originals and scored by the same recipe. (Scoring with
`llama-perplexity` instead compares two tokenizers and two context framings; an earlier run did that.)
Needs expert matrices whose input width is a multiple of 256 (K-quant super-blocks), e.g. a model from
`scripts/train_tiny_moe.py --hidden 256 --intermediate 512`.

    .venv/bin/python scripts/quality_vs_kquants.py MODEL --train TRAIN.txt --heldout HELDOUT.txt \
        --llama $LLAMA_CPP --out benchmarks/results/quality_kquants
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
KQUANTS = {2: ("Q2_K", 2.625), 3: ("Q3_K", 3.4375), 4: ("Q4_K", 4.5)}


def run(cmd: list[str], what: str) -> str:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{what} failed:\n{p.stderr[-2000:]}")
    return p.stdout + p.stderr


def d2moe_rows(args, work: Path) -> list[dict]:
    rows = []
    for scheme in args.schemes.split(","):
        for bits in ("2,3,4", "2,3,4,8"):
            for calib in (False, True):
                out = work / f"d2-{scheme}-{bits.replace(',', '')}-{'calib' if calib else 'plain'}"
                cmd = [sys.executable, "-m", "d2moe", "pack", args.model, out, "--bits", bits, "--scheme", scheme, "--json",
                       "--quiet", "--force", "--weighting", args.weighting]
                if calib:
                    cmd += ["--calib", args.train, "--calib-tokens", str(args.calib_tokens)]
                run(cmd, f"pack {scheme} {bits} calib={calib}")
                ev = json.loads(run([sys.executable, "-m", "d2moe", "eval", out, "--text", args.heldout, "--level", "all",
                                     "--reference", args.model, "--seq-len", str(args.ctx), "--json"], "eval"))
                ref = next(r for r in ev["results"] if r.get("level") is None or "16" in str(r.get("target")))
                base = ref["perplexity"]["ppl"]
                weights = sum(r * c for r, c in pack_shapes(out))
                for r in ev["results"]:
                    if r is ref:
                        continue
                    lvl = r["level"]
                    rows.append({"tool": "d2moe", "scheme": scheme, "pack_bits": bits, "calibrated": calib,
                                 "weighting": args.weighting, "level": lvl,
                                 "bpw": round(expert_bits(out, lvl) / weights, 4),
                                 "ppl": round(r["perplexity"]["ppl"], 4), "ppl_16bit": round(base, 4),
                                 "ratio": round(r["perplexity"]["ppl"] / base, 5)})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def expert_bits(out: Path, level: int) -> float:
    """Bits one expert of the pack at `out` holds at `level`, without the blob's alignment padding."""
    from d2moe.quantize import format as fmt

    ckpt = fmt.open_checkpoint(out)
    upto = ckpt.cfg.level_index(level)
    return 8 * sum(slot.nbytes for seg in ckpt.layout.segments[: upto + 1] for slot in seg)


def pack_shapes(out: Path) -> list[tuple[int, int]]:
    manifest = json.loads((out / "d2moe.json").read_text())
    return [tuple(s) for s in manifest["matrix_shapes"].values()]


def gguf_experts(llama: Path, path: Path, n_layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """llama.cpp's expert matrices from a GGUF, dequantized by its gguf-py: per layer (gate_up [E, 2I, H],
    down [E, H, I]), as transformers' Mixtral experts hold them."""
    sys.path.insert(0, str(llama / "gguf-py"))
    import gguf

    by_name = {t.name: t for t in gguf.GGUFReader(path).tensors}

    def load(name: str) -> torch.Tensor:
        t = by_name[name]
        return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()

    out = []
    for i in range(n_layers):
        gate, up, down = (load(f"blk.{i}.ffn_{k}_exps.weight") for k in ("gate", "up", "down"))
        out.append((torch.cat([gate, up], dim=1), down))
    return out


class Harness:
    """The source model in float32 and the held-out ids: perplexity with any experts swapped in."""

    def __init__(self, model: Path, heldout: Path, ctx: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from d2moe.apps.evaluate import encode_text, load_text_files

        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.ids = encode_text(AutoTokenizer.from_pretrained(model), load_text_files([heldout]))
        self.ctx = ctx
        self.experts = [layer.mlp.experts for layer in self.model.model.layers]
        self.original = [(e.gate_up_proj.data, e.down_proj.data) for e in self.experts]

    def ppl(self, experts: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> float:
        from d2moe.apps.evaluate import model_logits_fn, perplexity

        for e, (gate_up, down), (og, od) in zip(self.experts, experts or self.original, self.original, strict=True):
            e.gate_up_proj.data, e.down_proj.data = gate_up.view_as(og).to(og.dtype), down.view_as(od).to(od.dtype)
        try:
            return perplexity(model_logits_fn(self.model), self.ids, seq_len=self.ctx).ppl
        finally:
            for e, (og, od) in zip(self.experts, self.original, strict=True):
                e.gate_up_proj.data, e.down_proj.data = og, od


def llama_f16(llama: Path, model: Path, work: Path) -> Path:
    """The model as an F16 GGUF (llama.cpp's converter, our tokenizer read as gpt-2)."""
    f16 = work / "model-F16.gguf"
    run([sys.executable, ROOT / "scripts" / "llama_convert.py", llama, model, "--outtype", "f16", "--outfile", f16],
        "convert")
    return f16


def llama_imatrix(llama: Path, f16: Path, train: Path, ctx: int, tokens: int, work: Path) -> Path:
    imatrix = work / "imatrix.gguf"
    run([llama / "build" / "bin" / "llama-imatrix", "-m", f16, "-f", train, "-c", str(ctx), "-t", "2", "-o", imatrix,
         "--chunks", str(max(1, tokens // ctx))], "imatrix")
    return imatrix


def kquant_experts(llama: Path, f16: Path, qtype: str, imatrix: Path | None, work: Path, n_layers: int):
    """llama-quantize with the experts at `qtype` and every other matrix forced back to f16; the experts read back."""
    out = work / f"model-{qtype}{'-imat' if imatrix else ''}.gguf"
    # a base type of F16 skips the overrides, so: base Q8_0, every non-expert matrix forced back to f16
    cmd = [llama / "build" / "bin" / "llama-quantize", "--token-embedding-type", "f16", "--output-tensor-type", "f16"]
    if imatrix:
        cmd += ["--imatrix", imatrix]
    for t in ("attn_q", "attn_k", "attn_v", "attn_output"):
        cmd += ["--tensor-type", f"{t}=f16"]
    for t in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
        cmd += ["--tensor-type", f"{t}={qtype.lower()}"]
    log = run([*cmd, f16, out, "Q8_0", "2"], f"quantize {qtype}")
    ktype = qtype.lower().replace("_k", "_K")  # llama prints "q2_K"
    if f"-> {ktype}" not in log or "converting to q8_0" in log:
        raise SystemExit(f"llama-quantize did not give experts {qtype} and the rest 16-bit:\n{log[-1500:]}")
    return gguf_experts(llama, out, n_layers)


def llama_rows(args, work: Path) -> list[dict]:
    f16 = llama_f16(args.llama, args.model, work)
    harness = Harness(args.model, args.heldout, args.ctx)
    base = harness.ppl()
    imatrix = llama_imatrix(args.llama, f16, args.train, args.ctx, args.calib_tokens, work)
    rows = []
    for bits, (qtype, bpw) in KQUANTS.items():
        for use_imatrix in (False, True):
            experts = kquant_experts(args.llama, f16, qtype, imatrix if use_imatrix else None, work,
                                     len(harness.experts))
            ppl = harness.ppl(experts)
            rows.append({"tool": "llama.cpp", "type": qtype, "imatrix": use_imatrix, "level": bits, "bpw": bpw,
                         "ppl": ppl, "ppl_16bit": base, "ratio": round(ppl / base, 5)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    d2 = [(x["scheme"], x["pack_bits"], x["calibrated"]) for x in rows if x["tool"] == "d2moe"]
    columns = list(dict.fromkeys(d2))
    head = [f"d2moe {s} {b}{' --calib' if c else ''}" for s, b, c in columns] + ["llama.cpp K-quant", "K-quant + imatrix"]
    lines = ["| level | " + " | ".join(head) + " | bits per weight: d2moe " + " / ".join(dict.fromkeys(s for s, _, _ in columns))
             + " / K-quant |", "|---:|" + "---:|" * (len(head) + 1)]
    for level in (2, 3, 4):
        cells = [next(x for x in rows if x["tool"] == "d2moe" and (x["scheme"], x["pack_bits"], x["calibrated"]) == col
                      and x["level"] == level) for col in columns]
        cells += [next(x for x in rows if x["tool"] == "llama.cpp" and x["level"] == level and x["imatrix"] == imat)
                  for imat in (False, True)]
        bpw = [next(c["bpw"] for c in cells if c.get("scheme") == s) for s in dict.fromkeys(s for s, _, _ in columns)]
        lines.append(f"| {level} | " + " | ".join(f"{c['ratio']:.5f}" for c in cells)
                     + " | " + " / ".join(f"{b:.3f}" for b in bpw) + f" / {cells[-1]['bpw']:.3f} |")
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
    ap.add_argument("--schemes", default="subblock,sliced", help="d2moe pack --scheme values to measure")
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
