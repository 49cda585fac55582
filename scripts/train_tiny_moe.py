"""Train the small Mixtral-style MoE that d2moe embeds (the `make demo` model and quality fixture).

Two stages, both deterministic (fixed seeds, one CPU thread, a seeded data order):
1. a byte-level BPE tokenizer (tokenizers library) on the `*.train.txt` files of --text-dir,
   saved as a transformers `PreTrainedTokenizerFast` with <s>/</s>/<pad> and a simple chat template;
2. a `MixtralForCausalLM` (8 experts, top-2, router aux loss on, tied embeddings) trained with
   AdamW + linear warm-up + cosine decay on random windows of the training text, every window
   starting with <s>. The model is saved in float16 with `save_pretrained` (safetensors), with
   the tokenizer and a `training.json` (command, arguments, losses, held-out perplexity per file,
   wall time, samples).

Held-out perplexity: each `*.heldout.txt` is tokenized on its own and cut into non-overlapping
chunks of seq_len - 1 tokens, each scored after a leading <s> (the same framing as training).

Defaults reproduce the shipped model (d2moe_cli/assets/tiny-mixtral):

    .venv/bin/python scripts/train_tiny_moe.py            # ~30 min on one CPU thread shared with other jobs
    .venv/bin/python scripts/train_tiny_moe.py --steps 20 --out /tmp/smoke   # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # tokenizers' trainer: stay on one core
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "d2moe_cli" / "assets"
FIXTURE_REPORT = REPO / "benchmarks" / "results" / "fixture.md"
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SAMPLE_PROMPTS = ("First Citizen:\n", "Once upon a time there was a", "The history of the city")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--text-dir", type=Path, default=ASSETS / "text", help="folder with <name>.train.txt / <name>.heldout.txt")
    a("--out", type=Path, default=ASSETS / "tiny-mixtral", help="output model directory")
    a("--vocab-size", type=int, default=4096, help="BPE vocabulary size (special tokens included)")
    a("--hidden", type=int, default=192, help="hidden size (multiple of 64)")
    a("--intermediate", type=int, default=256, help="expert intermediate size (multiple of 64)")
    a("--layers", type=int, default=4, help="decoder layers (all MoE)")
    a("--heads", type=int, default=6, help="attention heads")
    a("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
    a("--experts", type=int, default=8, help="experts per MoE layer")
    a("--top-k", type=int, default=2, help="experts per token")
    a("--aux-loss-coef", type=float, default=0.01, help="router load-balancing loss weight")
    a("--max-positions", type=int, default=1024, help="max_position_embeddings")
    a("--seq-len", type=int, default=256, help="tokens per training window (incl. the leading <s>)")
    a("--batch-size", type=int, default=16, help="windows per step")
    a("--steps", type=int, default=800, help="optimizer steps")
    a("--lr", type=float, default=3e-3, help="peak learning rate")
    a("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of the peak (cosine)")
    a("--warmup", type=int, default=100, help="linear warm-up steps")
    a("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    a("--grad-clip", type=float, default=1.0, help="global gradient-norm clip")
    a("--eval-every", type=int, default=200, help="steps between held-out evaluations (on a fixed subset)")
    a("--eval-chunks", type=int, default=8, help="held-out chunks per file in the periodic evaluation")
    a("--seed", type=int, default=0, help="seed for init, data order and sampling")
    a("--threads", type=int, default=1, help="torch CPU threads")
    a("--report", type=Path, help="markdown report to write (default: benchmarks/results/fixture.md for the shipped "
      "model's --out, else OUT/report.md: training another model leaves the fixture's report alone)")
    a("--report-only", action="store_true", help="only rewrite --report from <out>/training.json (no training)")
    a("--experts-impl", default="grouped_mm", help="transformers experts implementation for training (eager|grouped_mm|batched_mm)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- data


def text_files(text_dir: Path, split: str) -> dict[str, Path]:
    files = {p.name.removesuffix(f".{split}.txt"): p for p in sorted(text_dir.glob(f"*.{split}.txt"))}
    if not files:
        sys.exit(f"error: no *.{split}.txt in {text_dir}: run scripts/prepare_text.py first")
    return files


def train_tokenizer(train_paths: list[Path], vocab_size: int):
    """Byte-level BPE on the training text, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(p) for p in train_paths], trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def encode_file(tokenizer, path: Path) -> torch.Tensor:
    """Token ids of a whole file, no special tokens."""
    ids = tokenizer.backend_tokenizer.encode(path.read_text(encoding="utf-8"), add_special_tokens=False).ids
    return torch.tensor(ids, dtype=torch.long)


def heldout_chunks(ids: torch.Tensor, seq_len: int, bos_id: int) -> torch.Tensor:
    """Non-overlapping windows [<s>, t_i .. t_{i+seq_len-2}] covering the stream (last partial dropped)."""
    body = seq_len - 1
    n = ids.numel() // body
    chunks = ids[: n * body].view(n, body)  # [N, S-1]
    return torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), chunks], dim=1)  # [N, S]


class WindowSampler:
    """Seeded random training windows: pick a file (weighted by its tokens), then an offset."""

    def __init__(self, streams: list[torch.Tensor], seq_len: int, bos_id: int, seed: int):
        self.streams, self.seq_len, self.bos_id = streams, seq_len, bos_id
        sizes = torch.tensor([s.numel() - seq_len for s in streams], dtype=torch.float64)
        self.weights = sizes / sizes.sum()
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, batch_size: int) -> torch.Tensor:
        files = torch.multinomial(self.weights, batch_size, replacement=True, generator=self.gen)
        rows = []
        for f in files.tolist():
            stream = self.streams[f]
            start = int(torch.randint(0, stream.numel() - self.seq_len + 1, (1,), generator=self.gen))
            rows.append(torch.cat([torch.tensor([self.bos_id]), stream[start : start + self.seq_len - 1]]))
        return torch.stack(rows)  # [B, S]


# --------------------------------------------------------------------------------------------- model


def build_model(args: argparse.Namespace, tokenizer):
    from transformers import MixtralConfig, MixtralForCausalLM

    for name in ("hidden", "intermediate"):
        if getattr(args, name) % 64:
            sys.exit(f"error: --{name} {getattr(args, name)} must be a multiple of 64 (group size 64)")
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=args.max_positions,
        tie_word_embeddings=True,
        output_router_logits=True,
        router_aux_loss_coef=args.aux_loss_coef,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_theta=10000.0,
    )
    config._experts_implementation = args.experts_impl
    return MixtralForCausalLM(config)


def make_optimizer(model, args: argparse.Namespace) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


@torch.no_grad()
def perplexity(model, chunks: torch.Tensor, batch_size: int = 16) -> float:
    """exp(mean next-token NLL) over all chunks, the leading <s> never a target."""
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, chunks.shape[0], batch_size):
        batch = chunks[i : i + batch_size]
        logits = model(input_ids=batch).logits.float()  # [B, S, V]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        nll += float(loss)
        count += batch[:, 1:].numel()
    model.train()
    return math.exp(nll / count)


@torch.no_grad()
def samples(model, tokenizer, seed: int, max_new_tokens: int = 60) -> list[dict]:
    model.eval()
    out = []
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        greedy = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.1)
        torch.manual_seed(seed)
        sampled = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_k=50)
        out.append({
            "prompt": prompt,
            "greedy": tokenizer.decode(greedy[0, ids.shape[1] :], skip_special_tokens=True),
            "sampled": tokenizer.decode(sampled[0, ids.shape[1] :], skip_special_tokens=True),
        })
    return out


# -------------------------------------------------------------------------------------------- report


def write_report(record: dict, out: Path, report: Path) -> None:
    files = sorted(p for p in out.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in files)
    a = record["args"]
    lines = [
        "# The embedded model: tiny-mixtral",
        "",
        "`d2moe_cli/assets/tiny-mixtral`: a `MixtralForCausalLM` trained from scratch on the embedded text",
        "(`d2moe_cli/assets/text/*.train.txt`), the default model of `make demo` and the quality benchmarks.",
        "",
        f"- command: `{record['command']}` (machine: 2-core CPU shared with other jobs, 24 GB, no GPU, "
        f"torch {record['torch']}, 1 thread; date 2026-11-23)",
        f"- architecture: hidden {a['hidden']}, expert intermediate {a['intermediate']}, {a['layers']} layers, "
        f"{a['heads']} heads / {a['kv_heads']} kv heads, {a['experts']} experts top-{a['top_k']}, tied embeddings, "
        f"byte-level BPE vocab {a['vocab_size']}",
        f"- parameters: {record['parameters']:,} ({record['expert_parameters']:,} in experts)",
        f"- size on disk: {size / 1e6:.2f} MB (float16 safetensors + tokenizer; cap 15 MB)",
        f"- training: {a['steps']} steps x {a['batch_size']} windows x {a['seq_len']} tokens "
        f"({a['steps'] * a['batch_size'] * a['seq_len']:,} tokens; train set "
        f"{sum(record['train_tokens'].values()):,} tokens), AdamW lr {a['lr']} warm-up {a['warmup']} + cosine, "
        f"router aux loss {a['aux_loss_coef']}; {record['train_seconds'] / 60:.1f} min training, "
        f"{record['total_seconds'] / 60:.1f} min in all",
        "",
        "## Held-out perplexity (float16 weights, non-overlapping chunks of "
        f"{a['seq_len']} tokens led by `<s>`)",
        "",
        "| file | held-out tokens | perplexity |",
        "|---|---:|---:|",
    ]
    lines += [f"| {n} | {record['heldout_tokens'][n]:,} | {p:.2f} |" for n, p in record["heldout_ppl"].items()]
    lines += ["", "## Training curve (held-out ppl on the first "
              f"{a['eval_chunks']} chunks of each file)", "", "| step | train loss | "
              + " | ".join(record["heldout_ppl"]) + " | elapsed (s) |", "|---:|---:|" + "---:|" * len(record["heldout_ppl"]) + "---:|"]
    for h in record["history"]:
        lines.append(f"| {h['step']} | {h['lm_loss']:.3f} | "
                     + " | ".join(f"{h['heldout_subset_ppl'][n]:.1f}" for n in record["heldout_ppl"])
                     + f" | {h['elapsed_s']:.0f} |")
    lines += ["", "## Samples (60 new tokens; greedy with repetition penalty 1.1, and sampled at T=0.8, top-k 50)", ""]
    for s in record["samples"]:
        lines += [f"Prompt `{s['prompt']!r}`", "", "greedy:", "```", s["prompt"] + s["greedy"], "```",
                  "sampled:", "```", s["prompt"] + s["sampled"], "```", ""]
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report is None:
        args.report = FIXTURE_REPORT if args.out.resolve() == (ASSETS / "tiny-mixtral").resolve() else args.out / "report.md"
    if args.report_only:
        write_report(json.loads((args.out / "training.json").read_text()), args.out, args.report)
        return
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    train_paths = text_files(args.text_dir, "train")
    heldout_paths = text_files(args.text_dir, "heldout")
    tokenizer = train_tokenizer(list(train_paths.values()), args.vocab_size)
    streams = [encode_file(tokenizer, p) for p in train_paths.values()]
    heldout = {name: heldout_chunks(encode_file(tokenizer, p), args.seq_len, tokenizer.bos_token_id)
               for name, p in heldout_paths.items()}
    print(f"tokenizer: {len(tokenizer)} tokens; train tokens "
          + ", ".join(f"{n}={s.numel():,}" for n, s in zip(train_paths, streams, strict=True)), flush=True)

    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    print(f"model: {n_params:,} parameters ({n_expert:,} in experts)", flush=True)

    sampler = WindowSampler(streams, args.seq_len, tokenizer.bos_token_id, args.seed)
    eval_subset = {n: c[: args.eval_chunks] for n, c in heldout.items()}
    optimizer = make_optimizer(model, args)
    model.train()
    history = []
    t_train = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        batch = sampler.batch(args.batch_size)
        out = model(input_ids=batch, labels=batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        aux = float(out.aux_loss.detach())
        lm_loss = float(out.loss.detach()) - args.aux_loss_coef * aux
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  lm_loss {lm_loss:.4f}  aux {aux:.3f}  "
                  f"lr {lr_at(step, args):.2e}  {time.perf_counter() - t_train:7.1f}s", flush=True)
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            ppl = {n: round(perplexity(model, c), 2) for n, c in eval_subset.items()}
            history.append({"step": step + 1, "lm_loss": round(lm_loss, 4), "heldout_subset_ppl": ppl,
                            "elapsed_s": round(time.perf_counter() - t_train, 1)})
            print(f"eval step {step + 1}: held-out subset ppl {ppl}", flush=True)
    train_s = time.perf_counter() - t_train

    model.config._experts_implementation = "eager"  # the portable default for whoever loads it
    model.config.output_router_logits = False
    model = model.to(torch.float16)
    final_ppl = {n: round(perplexity(model, c), 2) for n, c in heldout.items()}
    print(f"final held-out ppl (float16): {final_ppl}", flush=True)
    gen = samples(model, tokenizer, args.seed)
    for s in gen:
        print(f"--- {s['prompt']!r}\n[greedy] {s['greedy']}\n[sampled] {s['sampled']}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    for p in args.out.iterdir():
        p.chmod(0o644)  # safetensors writes 0600; the shipped files must be readable by everyone
    record = {
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "scripts/train_tiny_moe.py", *sys.argv[1:]]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "parameters": n_params,
        "expert_parameters": n_expert,
        "train_tokens": {n: s.numel() for n, s in zip(train_paths, streams, strict=True)},
        "heldout_tokens": {n: c[:, 1:].numel() for n, c in heldout.items()},
        "heldout_ppl": final_ppl,
        "history": history,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "samples": gen,
        "torch": torch.__version__,
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    write_report(record, args.out, args.report)
    size = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    print(f"saved {args.out} ({size / 1e6:.2f} MB on disk); training {train_s / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
