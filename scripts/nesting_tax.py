"""The nesting tax: what one bit-nested (Matryoshka) copy of the experts costs against a dedicated
quantizer at the same bits and group size, in expert SQNR and in model perplexity.

For each method (nested residual, nested sliced: `quantize_mwq` once with all levels; dedicated
RTN: `quantize_rtn` once per bit-width) and each bit-width, the expert weights of a Hugging Face
MoE checkpoint are replaced in memory by their dequantized copies (every other weight stays at
full precision) and two figures are taken:
- median over (layer, expert) of the expert's SQNR in dB (gate, up and down errors pooled);
- perplexity on the held-out text: each file tokenized alone, the streams concatenated and cut into
  non-overlapping chunks of --seq-len tokens (a leading <s> when the tokenizer has one, never a target).
Nesting tax = nested minus dedicated (perplexity: positive is worse; SQNR: negative is worse).

Experts are read from the transformers-5 fused layout: `mlp.experts.gate_up_proj` [E, 2I, H] and
`down_proj` [E, H, I]; each of gate [I, H], up [I, H], down [H, I] is quantized as a row-major
[O, I] matrix with groups along its input dimension.

    .venv/bin/python scripts/nesting_tax.py                           # markdown table on stdout
    .venv/bin/python scripts/nesting_tax.py --json                    # the same figures as JSON
    .venv/bin/python scripts/nesting_tax.py -o benchmarks/results/nesting_tax.md
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from d2moe.errors import D2MoEError, InputError, UnsupportedModelError, UsageError
from d2moe.quantize import MWQConfig, dequantize, quantize_mwq, quantize_rtn, sqnr_db

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "d2moe_cli" / "assets"
NESTED = ("residual", "sliced")
METHODS = (*NESTED, "rtn")
MATRICES = ("gate", "up", "down")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ASSETS / "tiny-mixtral", help="HF MoE checkpoint directory")
    p.add_argument("--text", type=Path, nargs="+", default=None,
                   help="held-out text files (default: the embedded d2moe_cli/assets/text/*.heldout.txt)")
    p.add_argument("--bits", default="2,3,4,8", help="bit-widths, ascending (one nested config holds them all)")
    p.add_argument("--group-size", type=int, default=64, help="quantization group size along the input dim")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per perplexity chunk")
    p.add_argument("--max-chunks", type=int, default=None, help="score only the first N chunks (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="chunks per forward pass")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of markdown")
    p.add_argument("-o", "--output", type=Path, default=None, help="also write the markdown report to this file")
    args = p.parse_args(argv)
    try:
        args.bits = tuple(int(b) for b in args.bits.split(","))
    except ValueError:
        raise UsageError(f"--bits {args.bits!r} must be comma-separated integers, e.g. 2,3,4,8") from None
    MWQConfig(args.bits, args.group_size)  # validates bits and group size with the project's messages
    return args


# ------------------------------------------------------------------------------------------ experts


def fused_experts(model) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, experts module) of every MoE layer, in layer order."""
    found = [m for m in model.modules()
             if isinstance(getattr(m, "gate_up_proj", None), torch.Tensor)
             and isinstance(getattr(m, "down_proj", None), torch.Tensor)]
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no fused experts (gate_up_proj/down_proj): use a transformers-5 MoE model")
    for m in found:
        if getattr(m, "is_transposed", False) or not getattr(m, "is_concatenated", True):
            raise UnsupportedModelError(
                f"{type(m).__name__} stores transposed or interleaved experts: only [E, 2I, H] gate_up is supported")
    return list(enumerate(found))


def expert_matrices(experts: torch.nn.Module, e: int) -> dict[str, torch.Tensor]:
    """gate [I, H], up [I, H], down [H, I] of expert e, float32 copies."""
    gate_up = experts.gate_up_proj[e].detach().float()  # [2I, H]
    inter = gate_up.shape[0] // 2
    return {"gate": gate_up[:inter].clone(), "up": gate_up[inter:].clone(),
            "down": experts.down_proj[e].detach().float().clone()}


@torch.no_grad()
def write_expert(experts: torch.nn.Module, e: int, mats: dict[str, torch.Tensor]) -> None:
    dtype = experts.gate_up_proj.dtype
    experts.gate_up_proj[e].copy_(torch.cat([mats["gate"], mats["up"]]).to(dtype))
    experts.down_proj[e].copy_(mats["down"].to(dtype))


def pooled_sqnr(ref: dict[str, torch.Tensor], approx: dict[str, torch.Tensor]) -> float:
    return sqnr_db(torch.cat([ref[k].flatten() for k in MATRICES]), torch.cat([approx[k].flatten() for k in MATRICES]))


# ------------------------------------------------------------------------------------------- text


def heldout_paths(text: list[Path] | None) -> list[Path]:
    paths = text or sorted((ASSETS / "text").glob("*.heldout.txt"))
    if not paths:
        raise InputError("no held-out text: pass --text FILE... (or run scripts/prepare_text.py)")
    for p in paths:
        if not p.is_file():
            raise InputError(f"held-out text {p} does not exist: pass existing files to --text")
    return paths


def perplexity_chunks(tokenizer, paths: list[Path], seq_len: int, max_chunks: int | None) -> torch.Tensor:
    """Non-overlapping [N, seq_len] chunks of the concatenated streams, each led by <s> if there is one."""
    ids: list[int] = []
    for p in paths:
        ids += tokenizer.backend_tokenizer.encode(p.read_text(encoding="utf-8"), add_special_tokens=False).ids
    bos = tokenizer.bos_token_id
    body = seq_len - (bos is not None)
    n = len(ids) // body if max_chunks is None else min(max_chunks, len(ids) // body)
    if n == 0:
        raise InputError(f"held-out text has {len(ids)} tokens, fewer than one chunk of {body}: pass more --text")
    chunks = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)  # [N, S-1] or [N, S]
    if bos is not None:
        chunks = torch.cat([torch.full((n, 1), bos, dtype=torch.long), chunks], dim=1)  # [N, S]
    return chunks


@torch.no_grad()
def perplexity(model, chunks: torch.Tensor, batch_size: int) -> float:
    nll, count = 0.0, 0
    for i in range(0, chunks.shape[0], batch_size):
        batch = chunks[i : i + batch_size]  # [B, S]
        logits = model(input_ids=batch).logits.float()  # [B, S, V]
        nll += float(torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"))
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


# --------------------------------------------------------------------------------------- measuring


def measure(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (args.model / "config.json").is_file():
        raise InputError(f"{args.model} is not a Hugging Face checkpoint (no config.json): pass --model DIR")
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    paths = heldout_paths(args.text)
    chunks = perplexity_chunks(tokenizer, paths, args.seq_len, args.max_chunks)
    layers = fused_experts(model)
    originals = {(li, e): expert_matrices(m, e) for li, m in layers for e in range(m.gate_up_proj.shape[0])}

    t0 = time.perf_counter()
    result = {"model": str(args.model), "bits": list(args.bits), "group_size": args.group_size,
              "seq_len": args.seq_len, "chunks": chunks.shape[0], "tokens_scored": chunks[:, 1:].numel(),
              "text": [str(p) for p in paths], "experts": len(originals),
              "fp_ppl": perplexity(model, chunks, args.batch_size), "methods": {}}
    for method in METHODS:
        nested = {}
        if method in NESTED:
            cfg = MWQConfig(args.bits, args.group_size, method)
            nested = {key: {k: quantize_mwq(w, cfg) for k, w in mats.items()} for key, mats in originals.items()}
        per_bits = {}
        for bits in args.bits:
            sqnrs = []
            for (li, e), mats in originals.items():
                if method in NESTED:
                    approx = {k: dequantize(t, bits) for k, t in nested[(li, e)].items()}
                else:
                    approx = {k: quantize_rtn(w, bits, args.group_size) for k, w in mats.items()}
                sqnrs.append(pooled_sqnr(mats, approx))
                write_expert(layers[li][1], e, approx)
            per_bits[bits] = {"ppl": perplexity(model, chunks, args.batch_size),
                              "sqnr_median_db": statistics.median(sqnrs), "sqnr_min_db": min(sqnrs)}
            print(f"{method:8s} {bits}-bit: ppl {per_bits[bits]['ppl']:.3f}  "
                  f"median SQNR {per_bits[bits]['sqnr_median_db']:.2f} dB", file=sys.stderr, flush=True)
        result["methods"][method] = per_bits
    for (li, e), mats in originals.items():  # leave the model as it came
        write_expert(layers[li][1], e, mats)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def markdown(r: dict) -> str:
    m = r["methods"]
    lines = [
        f"Full-precision perplexity: **{r['fp_ppl']:.3f}** ({r['tokens_scored']:,} held-out tokens, "
        f"{r['chunks']} chunks of {r['seq_len']}); group size {r['group_size']}; {r['experts']} experts; "
        f"nested = one `quantize_mwq` with bits {tuple(r['bits'])}, read at each level.",
        "",
        "| bits | ppl nested residual | ppl nested sliced | ppl dedicated RTN | tax residual | tax sliced "
        "| SQNR residual (dB) | SQNR sliced | SQNR RTN | tax residual (dB) | tax sliced (dB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in r["bits"]:
        res, sli, rtn = (m[k][b] for k in METHODS)
        lines.append(
            f"| {b} | {res['ppl']:.3f} | {sli['ppl']:.3f} | {rtn['ppl']:.3f} "
            f"| {res['ppl'] - rtn['ppl']:+.3f} | {sli['ppl'] - rtn['ppl']:+.3f} "
            f"| {res['sqnr_median_db']:.2f} | {sli['sqnr_median_db']:.2f} | {rtn['sqnr_median_db']:.2f} "
            f"| {res['sqnr_median_db'] - rtn['sqnr_median_db']:+.2f} "
            f"| {sli['sqnr_median_db'] - rtn['sqnr_median_db']:+.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_args(argv)
        result = measure(args)
    except D2MoEError as err:
        sys.exit(f"error: {err}")
    table = markdown(result)
    if args.output is not None:
        cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "scripts/nesting_tax.py", *sys.argv[1:]])
        args.output.write_text(
            "# Nesting tax on the embedded model\n\n"
            f"Command: `{cmd}` ({result['seconds']} s; machine: 2-core CPU shared with other jobs, 24 GB, "
            "no GPU, 1 thread; date 2026-11-23)\n\n" + table)
    if args.json:
        result["methods"] = {k: {str(b): v for b, v in per.items()} for k, per in result["methods"].items()}
        print(json.dumps(result, indent=2))
    else:
        print(table, end="")


if __name__ == "__main__":
    main()
