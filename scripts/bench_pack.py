"""Benchmark `d2moe pack`: throughput (MB/s of source weights) and peak RSS on a Mixtral-shaped checkpoint.

Generates a random Mixtral-shaped checkpoint (bf16, std 0.02, one shard per layer plus one for the
embeddings, legacy per-expert keys as `save_pretrained` writes them) of >= 500 MB, then packs it in
a child process so the child's peak RSS is the packer's alone (resource.getrusage(RUSAGE_CHILDREN));
the child also samples its anonymous RSS (/proc/self/status RssAnon: heap, without mapped file pages).

    .venv/bin/python scripts/bench_pack.py [--layers 2 --hidden 1024 --intermediate 3584 --experts 8 --vocab 40000]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path


def make_source(path: Path, layers: int, hidden: int, inter: int, experts: int, vocab: int, seed: int = 0) -> int:
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    heads, kv_heads, head_dim = hidden // 128, max(1, hidden // 512), 128
    config = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "num_local_experts": experts, "num_experts_per_tok": 2,
        "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
        "tie_word_embeddings": False, "dtype": "bfloat16", "hidden_act": "silu",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    n_shards = layers + 1
    weight_map, total = {}, 0

    def write(i: int, tensors: dict) -> None:
        nonlocal total
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()

    write(0, {"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden),
              "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)})
    for layer in range(layers):
        p = f"model.layers.{layer}"
        t = {f"{p}.self_attn.q_proj.weight": rand(heads * head_dim, hidden),
             f"{p}.self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
             f"{p}.self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
             f"{p}.self_attn.o_proj.weight": rand(hidden, heads * head_dim),
             f"{p}.input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
             f"{p}.post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
             f"{p}.block_sparse_moe.gate.weight": rand(experts, hidden)}
        for e in range(experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            t.update({f"{q}.w1.weight": rand(inter, hidden), f"{q}.w3.weight": rand(inter, hidden),
                      f"{q}.w2.weight": rand(hidden, inter)})
        write(layer + 1, t)
        del t
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def pack_child(src: str, out: str, bits: str, scheme: str, workers: int) -> None:
    from d2moe.quantize import MWQConfig
    from d2moe.quantize.convert.pack import pack_checkpoint

    peak_anon = [0]
    done = threading.Event()

    def sample() -> None:  # anonymous (heap) memory, apart from the file pages safetensors maps
        while not done.wait(0.05):
            peak_anon[0] = max(peak_anon[0], _rss_anon())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    report = pack_checkpoint(Path(src), Path(out), MWQConfig(bits=tuple(int(b) for b in bits.split(",")), scheme=scheme),
                             progress=False, force=True, workers=workers)
    done.set()
    sampler.join()
    report["peak_rss_anon"] = peak_anon[0]
    print(json.dumps(report))


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/d2moe-bench-pack"))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3584)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=40000)
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--scheme", default="residual")
    ap.add_argument("--workers", type=int, default=2, help="experts quantized at once (pack's --workers)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return pack_child(args.child[0], args.child[1], args.bits, args.scheme, args.workers)

    src, out = args.work / "src", args.work / "packed"
    shutil.rmtree(args.work, ignore_errors=True)
    t0 = time.perf_counter()
    weights = make_source(src, args.layers, args.hidden, args.intermediate, args.experts, args.vocab)
    on_disk = sum(p.stat().st_size for p in src.iterdir())
    print(f"generated {on_disk / 1e6:.0f} MB source in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", str(src), str(out), "--bits", args.bits,
                           "--scheme", args.scheme, "--workers", str(args.workers)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(proc.stderr)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
    expert_bytes = args.layers * args.experts * 3 * args.hidden * args.intermediate * 2
    result = {
        "source_mb": round(on_disk / 1e6, 1), "weights_mb": round(weights / 1e6, 1), "expert_mb": round(expert_bytes / 1e6, 1),
        "largest_tensor_mb": round(max(args.vocab * args.hidden, args.hidden * args.intermediate) * 2 / 1e6, 1),
        "pack_seconds": round(report["seconds"], 1), "wall_seconds_with_startup": round(wall, 1),
        "throughput_mb_s": round(weights / 1e6 / report["seconds"], 2),
        "expert_throughput_mb_s": round(expert_bytes / 1e6 / report["seconds"], 2),
        "peak_rss_mb": round(peak_rss / 1e6, 1), "peak_rss_anon_mb": round(report["peak_rss_anon"] / 1e6, 1), "packed_mb": round(report["packed_bytes"] / 1e6, 1),
        "bytes_per_level": report["bytes_per_level"], "sqnr_db": report["sqnr_db"],
        "workers": args.workers, "scheme": args.scheme, "bits": args.bits,
    }
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
