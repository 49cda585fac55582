"""`d2moe eval`: perplexity (sliding window) and zero-shot accuracy (lm-eval-harness) of a packed checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from d2moe.errors import BudgetError, UsageError
from d2moe.options import given_as, set_threads


def eval_command(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Argument(help="Packed checkpoint directory (from `d2moe pack`).")],
    text: Annotated[list[Path] | None, typer.Option(
        "--text", help="Evaluation text file (repeatable); files are joined by blank lines.")] = None,
    dataset: Annotated[str | None, typer.Option(
        help="datasets name NAME[:config[:split]], e.g. wikitext:wikitext-2-raw-v1:test, or json:FILE.jsonl:train.")] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per perplexity window.")] = 256,
    stride: Annotated[int | None, typer.Option(
        help="Tokens between window starts (default: --seq-len, disjoint windows).")] = None,
    level: Annotated[str | None, typer.Option(
        help="Uniform bit-width: a packed level, a list (2,4) or 'all' (one row per level).")] = None,
    policy: Annotated[str | None, typer.Option(
        help="Policy (or list), e.g. d2moe, matryoshka-free, moqe-dynaio@4, hold-int8 (default: d2moe).")] = None,
    reference: Annotated[Path | None, typer.Option(
        help="Also score the unquantized source checkpoint through transformers, in its own dtype (the 16-bit row).")] = None,
    memory_budget: Annotated[str | None, typer.Option(
        "--memory-budget", "-m", help="Memory budget of the runs (default: unlimited). With --on-miss load, the default, the budget never "
                                   "changes scores; the lossy --on-miss modes depend on what it holds.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Score only the first N tokens of the text.")] = None,
    tasks: Annotated[str | None, typer.Option(
        help="Zero-shot lm-eval tasks, comma separated (e.g. piqa,arc_easy); needs `pip install lm-eval`.")] = None,
    tasks_dir: Annotated[Path | None, typer.Option(help="Directory of local lm-eval task YAMLs.")] = None,
    limit: Annotated[int | None, typer.Option(help="At most N items per zero-shot task.")] = None,
    threads: Annotated[int | None, typer.Option(
        envvar="D2MOE_THREADS", help="Compute threads (default: the kernels use every core, torch one thread).")] = None,
    on_miss: Annotated[str, typer.Option(
        "--on-miss", help="Miss handling of the runs: load | lowbit | substitute | skip | reuse (lossy modes need "
                          "--memory-budget to matter and score in decode mode).")] = "load",
    miss_threshold: Annotated[float, typer.Option(help="Importance below which a missed pair is handled; reuse keeps pairs above 1 - this at their level.")] = 0.35,
    miss_importance: Annotated[str, typer.Option(help="Importance of a pair: weight | gate.")] = "weight",
    scoring: Annotated[str, typer.Option(
        help="auto (decode when --on-miss is lossy, else window) | window (one forward per window) | decode "
             "(one token per forward through the KV cache, as generation runs).")] = "auto",
    lossless: Annotated[bool, typer.Option("--lossless", help="Score the exact experts of the lossless tier (pack --lossless).")] = False,
    dense_weights: Annotated[str, typer.Option(
        help="Dense layers as `run` computes them: source | int8 | int4 (what each costs in perplexity).")] = "source",
    json_out: Annotated[bool, typer.Option("--json", help="Print the results as one JSON object.")] = False,
) -> None:
    """Score a packed checkpoint: perplexity per level or policy, zero-shot accuracy through lm-eval."""
    from d2moe.runtime.units import parse_size

    if memory_budget and memory_budget.strip().endswith("%"):  # a share of which run's holdings? eval has several
        raise UsageError(f"--memory-budget {memory_budget!r}: eval takes a size (e.g. 512MiB); percentages are run's "
                         "and bench's, whose runs are one configuration each")
    budget = parse_size(memory_budget, "--memory-budget") if memory_budget else None

    set_threads(threads, given_as(ctx, "threads"))
    from d2moe.runtime.miss import MissOptions

    MissOptions(on_miss, miss_threshold, miss_importance)  # option errors before any work
    if scoring not in ("auto", "window", "decode"):
        raise UsageError(f"--scoring {scoring!r} is unknown: use auto, window or decode")
    if on_miss != "load" and budget is None:  # every expert fits the unlimited default: no miss to handle
        raise UsageError(f"--on-miss {on_miss} handles experts that miss the cache, and without --memory-budget "
                         "every expert is held: give -m SIZE (or drop --on-miss)")
    scoring = ("decode" if on_miss != "load" else "window") if scoring == "auto" else scoring
    from d2moe.kernels.dense import check_weights

    check_weights(dense_weights)
    run_options = {"on_miss": on_miss, "miss_threshold": miss_threshold, "miss_importance": miss_importance,
                   "lossless": lossless, "dense_weights": dense_weights}
    task_list = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    if not text and dataset is None and not task_list:
        raise UsageError("nothing to evaluate: give --text FILE, --dataset NAME or --tasks TASKS")
    if tasks_dir is not None and not task_list:
        raise UsageError("--tasks-dir needs --tasks naming the tasks to run")
    if limit is not None and not task_list:
        raise UsageError("--limit caps the items of each --tasks task: give --tasks (perplexity takes --max-tokens)")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit {limit}: give at least 1 item per task, or leave it out for all")

    from d2moe.apps import evaluate as ev
    from d2moe.quantize.format import open_checkpoint
    from d2moe.runtime.session import load_tokenizer

    if task_list and not ev.lm_eval_available():
        ev.require_lm_eval()  # DependencyError with the pip hint, before any work
    ckpt = open_checkpoint(checkpoint)
    targets = ev.eval_targets(ckpt.cfg.bits, level, policy)
    if reference is not None:
        targets.append(ev.EvalTarget("reference", None))
    ids = None
    if text or dataset is not None:
        raw = ev.load_text_files(text or []) if text else ""
        if dataset is not None:
            raw = "\n\n".join(t for t in (raw, ev.load_dataset_text(dataset)) if t)
        ids = ev.encode_text(load_tokenizer(checkpoint), raw, max_tokens)
        ev.sliding_windows(len(ids), seq_len, stride)  # option errors before any model is built
        from d2moe.runtime.generate import context_length

        context = context_length(ckpt.config)
        if context and min(seq_len, len(ids)) > context:
            from d2moe.progress import note

            note(f"--seq-len {seq_len}: windows reach past the model's context of {context} tokens "
                 f"(max_position_embeddings): use --seq-len {context} or less to score it where it was trained")

    import torch

    torch.manual_seed(0)
    rows = []
    with _progress(enabled=not json_out and sys.stderr.isatty()) as progress:
        for target in targets:
            task_id = progress.add_task(f"eval {target.label}", total=None) if progress else None

            def on_window(done: int, total: int, task_id=task_id) -> None:
                if progress:
                    progress.update(task_id, completed=done, total=total)

            try:
                row = ev.evaluate_target(
                    checkpoint, target, ids, seq_len=seq_len, stride=stride, memory_budget=budget, reference=reference,
                    tasks=task_list, tasks_dir=tasks_dir, limit=limit, on_window=on_window,
                    run_options=run_options, scoring=scoring,
                )
            except BudgetError as exc:  # one of several targets does not fit --memory-budget: n/a, as bench does
                if len(targets) == 1:
                    raise
                row = ev.unavailable_row(target, str(exc), scoring)
            rows.append({"status": "ok", "reason": None, **row})
    if all(r["status"] != "ok" for r in rows):  # nothing fits: the first reason, as one target's error
        raise BudgetError(rows[0]["reason"])
    for row in rows:
        row["mean_bits"] = ev.mean_bits(row["tokens_per_level"])
    if json_out:
        typer.echo(json.dumps({"checkpoint": str(checkpoint), "tokens": len(ids) if ids else 0, "seq_len": seq_len,
                               "stride": stride or seq_len, "results": rows}, indent=2))
        return
    print_table(rows, task_list)


def print_table(rows: list[dict], tasks: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    from d2moe.runtime.units import format_size

    table = Table(title="d2moe eval", title_justify="left")
    for col in ("target", "levels", "mean bits", "expert memory", "perplexity", "tokens", "seconds"):
        table.add_column(col, justify="left" if col in ("target", "levels") else "right")
    metrics = []
    for task in tasks:
        for metric in ("acc", "acc_norm"):
            if any(metric in r["zero_shot"].get(task, {}) for r in rows):
                metrics.append((task, metric))
                table.add_column(f"{task} {metric}", justify="right")
    for r in rows:
        ppl = r["perplexity"]
        cells = [
            r["target"], r["levels"], "-" if r["mean_bits"] is None else f"{r['mean_bits']:.2f}",
            "-" if r["expert_bytes"] is None else format_size(r["expert_bytes"]),
            "-" if ppl is None else f"{ppl['ppl']:.3f}", "-" if ppl is None else str(ppl["tokens"]),
            f"{r['seconds']:.1f}",
        ]
        for task, metric in metrics:
            value = r["zero_shot"].get(task, {}).get(metric)
            cells.append("-" if value is None else f"{100 * value:.2f}")
        table.add_row(*cells)
    from rich.markup import escape

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    console.print(table)
    for r in rows:
        if r["status"] != "ok":
            console.print(escape(f"{r['target']}: n/a ({r['reason']})"), soft_wrap=True)


class _progress:
    """A rich progress bar on stderr when enabled, else nothing (yields None)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=Console(stderr=True), transient=True)
        return self.bar.__enter__()

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


def register(app: typer.Typer) -> None:
    app.command(name="eval")(eval_command)
