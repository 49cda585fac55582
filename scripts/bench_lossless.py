"""The lossless tier against uncompressed 16-bit offloading, same runtime, same budgets, one run.

    .venv/bin/python scripts/bench_lossless.py --coded PACK_ZSTD --raw PACK_NONE [--source SRC] \\
        --budgets 25%,50% --io-bandwidth 1GB/s,300MB/s --new-tokens 8 --repeats 2 [--json out.json]

PACK_ZSTD / PACK_NONE: `d2moe pack SRC OUT --lossless [--lossless-codec none]`. A budget p% = what a run
holds besides its expert cache + p% of every expert's raw (decoded) bytes. Each (bandwidth, budget,
pack) runs `repeats` times interleaved (`run --lossless`, greedy, a fixed prompt); medians. With
--source, a sample of experts is decoded and compared byte for byte with the source matrices, and the
two packs' generated tokens must be identical (both are exact).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

import torch


def fixed_and_set(pack: Path, max_tokens: int, io_threads: int) -> tuple[int, int]:
    from d2moe.runtime.session import RunOptions, plan_run

    ckpt, *_, plan = plan_run(pack, RunOptions(memory_budget=1 << 44, lossless=True, max_tokens=max_tokens,
                                               io_threads=io_threads))
    return plan.budget - plan.expert_cache, len(ckpt.moe_layers) * ckpt.num_experts * ckpt.raw_nbytes


def run_once(pack: Path, budget: int, bandwidth: float | None, prompt: list[int], new: int, io_threads: int) -> dict:
    from d2moe.runtime.generate import SamplingOptions
    from d2moe.runtime.session import RunOptions, Session

    options = RunOptions(memory_budget=budget, lossless=True, io_bandwidth=bandwidth, io_threads=io_threads,
                         max_tokens=len(prompt) + new)
    with Session(pack, options) as s:
        r = s.generate(token_ids=[prompt], sampling=SamplingOptions(max_new_tokens=new))
    st = r.stats
    return {"decode_tokens_per_s": st["decode_tokens_per_s"], "prefill_tokens_per_s": st["prefill_tokens_per_s"],
            "bytes_read_per_token": st["bytes_read_per_token"], "hit_rate": st["cache"]["hit_rate"],
            "decode_s_in_codec": st["lossless"]["decode_s"], "peak_bytes": st["memory"]["peak_bytes"],
            "tokens": r.token_ids[0]}


def check_identical(pack: Path, source: Path, samples: int = 6) -> int:
    """Decode `samples` random experts of the coded pack and compare with the source bytes; returns experts checked."""
    from d2moe.quantize import lossless as ll
    from d2moe.quantize.adapters import adapter_for
    from d2moe.quantize.convert.source import ExpertSource, SourceCheckpoint

    m = json.loads((pack / "d2moe.json").read_text())
    src = SourceCheckpoint(source)
    adapter = adapter_for(src.config)
    src.index_weights()
    experts = ExpertSource(src, adapter, m["moe_layers"], m["num_experts"], adapter.matrix_shapes(src.config))
    for item in random.Random(0).sample(m["lossless"]["experts"], samples):
        with open(pack / item["file"], "rb") as f:
            f.seek(item["offset"])
            blob = f.read(item["nbytes"])
        raw = b"".join(experts.matrix(item["layer"], item["expert"], mat).contiguous().view(torch.uint8).numpy().tobytes()
                       for mat in ("gate", "up", "down"))
        if bytes(ll.decode_bytes(blob)) != raw:
            raise SystemExit(f"layer {item['layer']} expert {item['expert']}: decoded bytes differ from the source")
    return samples


def main() -> None:
    from d2moe.options import parse_bandwidth

    ap = argparse.ArgumentParser()
    ap.add_argument("--coded", type=Path, required=True)
    ap.add_argument("--raw", type=Path, required=True)
    ap.add_argument("--source", type=Path)
    ap.add_argument("--budgets", default="25%,50%")
    ap.add_argument("--io-bandwidth", default="1GB/s")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--io-threads", type=int, default=4)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    prompt = [int(x) for x in torch.randint(3, 1000, (16,), generator=torch.Generator().manual_seed(0))]
    max_tokens = len(prompt) + args.new_tokens
    fixed, expert_set = fixed_and_set(args.coded, max_tokens, args.io_threads)
    coded_bytes = sum(e["nbytes"] for e in json.loads((args.coded / "d2moe.json").read_text())["lossless"]["experts"])
    checked = check_identical(args.coded, args.source) if args.source else 0
    rows = []
    for bw_text in args.io_bandwidth.split(","):
        bw = parse_bandwidth(bw_text) if bw_text != "none" else None
        for pct_text in args.budgets.split(","):
            budget = int(fixed + float(pct_text.rstrip("%")) / 100 * expert_set)
            runs = {"coded": [], "raw": []}
            for _ in range(args.repeats):
                for name, pack in (("coded", args.coded), ("raw", args.raw)):
                    runs[name].append(run_once(pack, budget, bw, prompt, args.new_tokens, args.io_threads))
            same = runs["coded"][0]["tokens"] == runs["raw"][0]["tokens"]
            med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "tokens"} for n, rs in runs.items()}
            rows.append({"io_bandwidth": bw_text, "budget": pct_text, "budget_bytes": budget, **med,
                         "speedup": med["coded"]["decode_tokens_per_s"] / med["raw"]["decode_tokens_per_s"],
                         "same_tokens": same})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nexpert set {expert_set / 2**20:.1f} MiB raw, {coded_bytes / 2**20:.1f} MiB coded "
          f"(ratio {expert_set / coded_bytes:.3f}); {checked} experts checked bit-identical to the source\n")
    print("| I/O | budget | coded tok/s | raw 16-bit tok/s | coded / raw | read/token coded | read/token raw | "
          "codec s (coded) | hit rate | same tokens |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        c, w = r["coded"], r["raw"]
        print(f"| {r['io_bandwidth']} | {r['budget']} | {c['decode_tokens_per_s']:.2f} | {w['decode_tokens_per_s']:.2f} | "
              f"**{r['speedup']:.2f}×** | {c['bytes_read_per_token'] / 2**20:.1f} MiB | "
              f"{w['bytes_read_per_token'] / 2**20:.1f} MiB | {c['decode_s_in_codec']:.2f} | {c['hit_rate']:.0%} | "
              f"{r['same_tokens']} |")
    if args.json:
        args.json.write_text(json.dumps({"expert_set_bytes": expert_set, "coded_bytes": coded_bytes,
                                         "checked_identical": checked, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
