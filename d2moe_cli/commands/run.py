"""`d2moe run`: generate text from a packed checkpoint under a memory budget."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated

import typer

from d2moe.errors import BudgetError, InputError, UsageError, min_mib
from d2moe.options import given_as, parse_bandwidth, set_threads


def read_prompts(prompt: str | None, prompts_file: Path | None) -> list[str]:
    """The prompts of --prompt and/or --prompts-file (JSONL: one {"prompt": "..."} object a line)."""
    from d2moe.user_files import PROMPT_BYTES, read_prompt_text, read_user_text, stdin_once

    stdin_once(("--prompt", prompt), ("--prompts-file", prompts_file))
    if prompt is not None:  # "-": a prompt through a pipe, `cat question.txt | d2moe run CKPT -p -`
        prompt = read_prompt_text(prompt, "--prompt")
    prompts = [prompt] if prompt is not None else []
    if prompts_file is not None:
        lines = read_user_text(prompts_file, PROMPT_BYTES, "--prompts-file").splitlines()  # a pipe too
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{prompts_file} line {number} is not JSON ({exc.msg}): "
                                 'write one {"prompt": "..."} object per line') from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise InputError(f'{prompts_file} line {number} has no "prompt" string: '
                                 'write one {"prompt": "..."} object per line')
            if not obj["prompt"]:
                raise InputError(f'{prompts_file} line {number} has an empty prompt: give it text, or drop the line')
            prompts.append(obj["prompt"])
        if not prompts:
            raise InputError(f'{prompts_file} holds no prompts: write one {{"prompt": "..."}} object per line')
    if not prompts:
        raise UsageError("nothing to generate: give --prompt TEXT or --prompts-file FILE.jsonl")
    return prompts


def parse_levels_pair(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        high, low = (int(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"--router-levels {text!r}: write HIGH,LOW bits, e.g. 4,2") from None
    return high, low


def run(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Argument(help="Packed checkpoint directory (from `d2moe pack`).")],
    memory_budget: Annotated[str, typer.Option("--memory-budget", "-m", envvar="D2MOE_MEMORY_BUDGET",
                                               help="Everything the run may hold, e.g. 512MiB, 6GiB, 6GB, or 50%: what this "
                                                    "run holds besides experts plus half of the 4-bit expert set (the "
                                                    "top level's where 4 is not packed), as bench's --budgets reads "
                                                    "it for bench's own runs.")] = "6GiB",
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Prompt text (-: read it from standard input).")] = None,
    prompts_file: Annotated[Path | None, typer.Option(
        "--prompts-file", help='JSONL file, one {"prompt": "..."} a line; run as one left-padded batch.')] = None,
    policy: Annotated[str, typer.Option(
        help="d2moe | hold-int8 | hold-int4 | hold (every expert at --level) | matryoshka-free | moqe-dynaio | edgemoe")] = "d2moe",
    level: Annotated[int | None, typer.Option(help="Uniform bit-width for every expert (instead of the gate).")] = None,
    router_levels: Annotated[str | None, typer.Option(
        help="HIGH,LOW: top-1 expert at HIGH bits, others at LOW (default without a gate: highest,lowest).")] = None,
    schedule: Annotated[str | None, typer.Option(help="Load order: hebf | johnson | id (default: the policy's).")] = None,
    cache_policy: Annotated[str, typer.Option(help="Expert cache eviction: decay | lru.")] = "decay",
    io_threads: Annotated[int, typer.Option(help="Expert reads in flight at once.")] = 4,
    io_bandwidth: Annotated[str | None, typer.Option(
        help="Emulate a device disk of this speed, e.g. 2GB/s: reads are paced to it and may come from the "
             "page cache (default: the real disk, past the page cache).")] = None,
    direct_io: Annotated[bool, typer.Option("--direct-io/--no-direct-io", help="O_DIRECT reads where allowed.")] = True,
    max_new_tokens: Annotated[int, typer.Option(help="New tokens per prompt.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int, typer.Option(min=0, max=2**63 - 1, help="Sampling seed.")] = 0,
    chat_template: Annotated[bool | None, typer.Option(
        "--chat-template/--no-chat-template",
        help="Wrap prompts in the tokenizer's chat template (default: only for a chat model, e.g. *-Instruct).")] = None,
    threads: Annotated[int | None, typer.Option(
        envvar="D2MOE_THREADS", help="Compute threads (default: the kernels use every core, torch one thread).")] = None,
    kernels: Annotated[str, typer.Option(
        help="Expert compute: auto (native CPU kernels where they build) | native | reference (torch).")] = "auto",
    activations: Annotated[str, typer.Option(
        help="Expert-kernel activations: auto (int8 for levels <= 4, int16 above) | int8 (fast, as llama.cpp's Q8) "
             "| int16 (within ~1e-4 of float).")] = "auto",
    dense_weights: Annotated[str, typer.Option(
        help="Dense layers: source (packed dtype) | int8 (per-row weight-only: half the bytes) | int4 (4-bit MWQ, "
             "group 64, on the expert kernels: a quarter); both cost some perplexity (BENCHMARKS.md).")] = "source",
    device: Annotated[str, typer.Option(
        help="cpu | cuda (experts cached on the GPU, CUDA kernels; needs pip install -e '.\\[cuda]').")] = "cpu",
    on_miss: Annotated[str, typer.Option(
        "--on-miss", help="A low-importance expert that misses the cache: load (exact) | lowbit (lowest level) | "
                          "substitute (most similar resident expert) | skip (drop, renormalise) | reuse (substitute, and "
                          "every non-critical pair runs at the level the cache holds unless its expert is used enough to earn an upgrade; "
                          "the cache cuts experts to their lowest level before evicting them).")] = "load",
    miss_threshold: Annotated[float, typer.Option(
        help="Importance below which a missed pair is handled by --on-miss (the token's top-1 pair never is); "
             "reuse keeps pairs above 1 - this at their level (0: every pair follows the cache).")] = 0.35,
    miss_importance: Annotated[str, typer.Option(help="Importance of a pair: weight (its share of the token's top-k router weight) | gate (its level).")] = "weight",
    reuse_aware: Annotated[bool, typer.Option(
        "--reuse-aware/--no-reuse-aware", help="d2moe: read missing experts up to the top level into free cache room, "
                                              "and every expert up front when all fit (same output).")] = True,
    lossless: Annotated[bool, typer.Option(
        "--lossless", help="Serve the exact source experts from the lossless tier (`pack --lossless`): decoded on CPU "
                           "threads while the next ones are read; logits as transformers' in the source dtype.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print texts and statistics as one JSON object.")] = False,
) -> None:
    """Generate text with a packed MoE checkpoint, experts loaded from disk within --memory-budget."""
    from d2moe.runtime.units import parse_percent, parse_size

    budget_flag = given_as(ctx, "memory_budget")
    percent = parse_percent(memory_budget, budget_flag) if memory_budget.strip().endswith("%") else None
    budget = 0 if percent is not None else parse_size(memory_budget, budget_flag)  # a percentage: sized below
    bandwidth = parse_bandwidth(io_bandwidth)
    prompts = read_prompts(prompt, prompts_file)
    from d2moe.runtime.device import check_device

    check_device(device)  # before loading anything: one line when CuPy or the GPU is missing

    import torch

    from d2moe.runtime.generate import SamplingOptions, forward_tokens
    from d2moe.runtime.session import RunOptions, Session, encode_prompts, load_tokenizer

    sampling = SamplingOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    tokenizer = load_tokenizer(checkpoint)
    from d2moe.runtime.chat import use_chat_template

    chat_template, note = use_chat_template(chat_template, tokenizer, checkpoint)
    batch = encode_prompts(tokenizer, prompts, chat_template)
    from d2moe.quantize.format import open_checkpoint
    from d2moe.runtime.generate import context_length, kv_tokens

    max_tokens = kv_tokens([len(t) for t in batch], max_new_tokens, context_length(open_checkpoint(checkpoint).config))
    torch.manual_seed(seed)
    set_threads(threads, given_as(ctx, "threads"))
    options = RunOptions(
        memory_budget=budget, policy=policy, level=level, router_levels=parse_levels_pair(router_levels),
        schedule=schedule, cache_policy=cache_policy, io_threads=io_threads, io_bandwidth=bandwidth,
        direct_io=direct_io, max_tokens=max_tokens, kernels=kernels,
        # a long prompt prefills in chunks: the plan's workspace holds one chunk, not the whole prompt
        forward_tokens=forward_tokens([len(t) for t in batch]), dense_weights=dense_weights,
        activations=activations, device=device, on_miss=on_miss, miss_threshold=miss_threshold,
        miss_importance=miss_importance, lossless=lossless, reuse_aware=reuse_aware,
    )
    basis = None  # for a percentage: (what the run holds besides experts, the expert set), as bench reads one
    if percent is not None:
        from dataclasses import replace

        from d2moe.apps.benchmark import percent_budget, run_basis

        basis = run_basis(checkpoint, options)
        options = replace(options, memory_budget=percent_budget(*basis, percent))
    try:
        session = Session(checkpoint, options, tokenizer=tokenizer)
    except BudgetError as exc:
        raise budget_remedy(exc, budget_flag, memory_budget, options.memory_budget, basis) from None
    # one prompt streams to a terminal, pipe or file alike: an interrupted run keeps what it wrote
    stream = not json_out and len(prompts) == 1
    with session:
        if note:  # after the checks: an error stays one line
            print(f"note: {note}", file=sys.stderr)
        on_text = (lambda row, delta: (sys.stdout.write(delta), sys.stdout.flush())) if stream else None
        report = session.generate(token_ids=batch, sampling=sampling, on_text=on_text)
    if json_out:
        outputs = [{"prompt": p, "text": t, "tokens": len(ids)}
                   for p, t, ids in zip(prompts, report.texts, report.token_ids, strict=True)]
        typer.echo(json.dumps({"outputs": outputs, "stats": report.stats}, indent=2))
        return
    if stream:
        typer.echo("")
    else:
        for i, text in enumerate(report.texts):
            if len(prompts) > 1:
                typer.echo(f"### {i + 1}: {prompts[i]}")
            typer.echo(text)
            if len(prompts) > 1:
                typer.echo("")
    print_summary(report.stats)


def budget_remedy(exc: BudgetError, flag: str, given: str, budget: int, basis: tuple[int, int] | None) -> BudgetError:
    """`exc` with its remedy in the form the budget was given: `D2MOE_MEMORY_BUDGET=N MiB`, or, for a percentage
    (`basis`: what the run holds besides experts, the expert set), the smallest percentage that runs."""
    if exc.minimum is None:
        return exc
    from d2moe.runtime.units import format_size

    mib = min_mib(exc.minimum)
    setting = (lambda value: f"{flag}={value}") if flag.isupper() else (lambda value: f"{flag} {value}")
    exc.remedy = f"use {setting(f'{mib}MiB')} or more"
    if basis is not None:
        fixed, expert_set = basis
        exc.problem = f"{setting(given.strip())} is {format_size(budget)} here: {exc.problem}"
        pct = math.ceil(100 * (exc.minimum - fixed) / expert_set) if expert_set else 101
        if pct <= 100:
            exc.remedy = f"use {setting(f'{max(pct, 1)}%')} or more ({mib}MiB)"
    return exc


def print_summary(stats: dict) -> None:
    """One dim line of the run's figures on stderr (rich on a terminal, plain otherwise)."""
    from d2moe.runtime.units import format_size

    mem = stats["memory"]
    decode = stats["decode_tokens_per_s"]
    line = (f"{stats['policy']} · prefill {stats['prefill_tokens_per_s']:.1f} tok/s · decode "
            f"{'n/a' if decode is None else f'{decode:.1f} tok/s'} · TTFT {stats['time_to_first_token_s'] * 1000:.0f} ms · "
            f"cache hit {stats['cache']['hit_rate']:.0%} · read {format_size(stats['bytes_read'])} · "
            f"peak {format_size(mem['peak_bytes'])} / {format_size(mem['budget_bytes'])} · "
            f"schedule efficiency {stats['schedule_efficiency']:.0%}")
    if sys.stderr.isatty():
        from rich.console import Console

        Console(stderr=True, highlight=False).print(f"[dim]{line}[/]")
    else:
        print(line, file=sys.stderr)


def register(app: typer.Typer) -> None:
    app.command(name="run")(run)
