"""Decode speed of the UNQUANTIZED source through transformers (the 16-bit row of Table 1), with the
same decode loop and prompt that `d2moe bench` uses, median of repeats.

    .venv/bin/python scripts/bench_reference.py [SRC] [--max-new-tokens 64] [--repeats 3] [--threads 1]
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from d2moe.runtime.generate import SamplingOptions, decode

ASSET = Path(__file__).resolve().parents[1] / "d2moe_cli" / "assets" / "tiny-mixtral"
PROMPT = "Once upon a time there was a king who had three daughters,"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", nargs="?", type=Path, default=ASSET)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.src)
    model = AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.float32).eval()
    ids = tok(PROMPT)["input_ids"]
    opts = SamplingOptions(max_new_tokens=args.max_new_tokens)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rates = []
    for i in range(args.repeats + 1):  # the first run warms up
        steps: list[float] = []
        stamp = steps.append
        with torch.no_grad():
            decode(model, [ids], opts, eos_ids=[], pad_id=pad, on_step=lambda _, stamp=stamp: stamp(time.perf_counter()))
        if i:
            decode_s = steps[-1] - steps[0]  # after the prefill step
            rates.append((len(steps) - 1) / decode_s)
    print(f"decode tok/s (fp32 transformers, median of {args.repeats}): {statistics.median(rates):.1f}")


if __name__ == "__main__":
    main()
