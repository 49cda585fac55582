"""`d2moe bench`: throughput against memory budget for D²MoE and the paper's baselines, in one process."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from d2moe.errors import UsageError
from d2moe.options import given_as, parse_bandwidth, set_threads


def bench(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Argument(help="Packed checkpoint directory (from `d2moe pack`).")],
    budgets: Annotated[str, typer.Option(
        help="Memory budgets: percentages of the 4-bit expert set on top of dense + KV + staging "
             "(25%,50%,75%,100%) and/or sizes (64MiB,1GiB).")] = "25%,50%,75%,100%",
    policies: Annotated[str, typer.Option(
        help="'all' or a list: d2moe,hold-int8,hold-int4,matryoshka-free,moqe-dynaio,edgemoe "
             "(a level with @, e.g. moqe-dynaio@2).")] = "all",
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt every run prefills (-: read it from standard input).")] = (
        "Once upon a time there was a king who had three daughters."),
    max_new_tokens: Annotated[int, typer.Option(help="Tokens each run decodes (greedy).")] = 32,
    repeats: Annotated[int, typer.Option(help="Runs per configuration, interleaved; medians are reported.")] = 3,
    io_bandwidth: Annotated[str | None, typer.Option(
        help="Cap disk reads to emulate a device, e.g. 1GB/s (default: the real disk).")] = None,
    io_threads: Annotated[int, typer.Option(help="Expert reads in flight at once.")] = 4,
    chat_template: Annotated[bool, typer.Option("--chat-template/--no-chat-template",
                                                help="Wrap the prompt in the chat template.")] = False,
    threads: Annotated[int | None, typer.Option(
        envvar="D2MOE_THREADS", help="Compute threads (default: the kernels use every core, torch one thread).")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write throughput vs budget as a PNG (matplotlib).")] = None,
    on_miss: Annotated[str, typer.Option(
        "--on-miss", help="Miss handling modes to sweep with every policy: load,lowbit,substitute,skip,reuse (or all); "
                          "a mode may take its own threshold after a colon (reuse:0 beside reuse).")] = "load",
    miss_threshold: Annotated[float, typer.Option(
        help="Importance below which a missed pair is handled by the miss mode (router weight, or gate level in [0,1]); reuse keeps pairs above 1 - this at their level (0: every pair follows the cache).")] = 0.35,
    miss_importance: Annotated[str, typer.Option(help="Importance of a pair: weight (its share of the token's top-k router weight) | gate (its level).")] = "weight",
    quality_text: Annotated[list[Path] | None, typer.Option(
        help="Text scored per configuration (decode-mode perplexity at that budget): the quality axis.")] = None,
    quality_tokens: Annotated[int, typer.Option(help="Tokens of --quality-text scored per configuration.")] = 256,
    dense_weights: Annotated[str, typer.Option(
        help="Dense layers in every run: source (their dtype) | int8 | int4, as `run --dense-weights`; percentage "
             "budgets count them as converted.")] = "source",
    pareto_plot: Annotated[Path | None, typer.Option(
        help="Write perplexity vs decode tok/s per budget (policy x miss handling) as a PNG; needs --quality-text.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object (schema d2moe.bench/1).")] = False,
) -> None:
    """Sweep policies x memory budgets: prefill/decode tokens/s, peak memory, bytes read, hit rate."""
    from d2moe.apps.benchmark import plot_throughput, run_bench

    bandwidth = parse_bandwidth(io_bandwidth)
    from d2moe.kernels.dense import check_weights

    check_weights(dense_weights)  # before any plan counts the dense layers as converted

    set_threads(threads, given_as(ctx, "threads"))
    if max_new_tokens < 2:
        raise UsageError(f"--max-new-tokens {max_new_tokens}: bench times decode steps, which start at the second "
                         "new token (the first is the prefill's): use 2 or more")
    if plot is not None and plot.suffix.lower() != ".png":
        raise UsageError(f"--plot {plot}: give a .png file name")
    from d2moe.user_files import check_writable

    for path, option in ((plot, "--plot"), (pareto_plot, "--pareto-plot")):
        if path is not None:  # before the sweep, not after it
            check_writable(path, option)

    import torch

    from d2moe.user_files import read_prompt_text, stdin_once

    stdin_once(("--prompt", prompt), *(("--quality-text", path) for path in quality_text or []))
    prompt = read_prompt_text(prompt, "--prompt")
    quality_ids = None
    if quality_text:
        from d2moe.apps.evaluate import encode_text, load_text_files
        from d2moe.runtime.session import load_tokenizer

        if quality_tokens < 1:
            raise UsageError(f"--quality-tokens {quality_tokens} must be at least 1")
        quality_ids = encode_text(load_tokenizer(checkpoint), load_text_files(quality_text, "--quality-text"),
                                  quality_tokens + 1)
    elif pareto_plot is not None:
        raise UsageError("--pareto-plot plots perplexity: give --quality-text FILE")
    torch.manual_seed(0)
    show = not json_out and sys.stderr.isatty()
    with _Bar(show) as bar:
        report = run_bench(
            checkpoint, budgets, policies, prompt=prompt, max_new_tokens=max_new_tokens, repeats=repeats,
            io_bandwidth=bandwidth, io_threads=io_threads, chat_template=chat_template,
            on_run=bar.advance if show else None, on_plan=bar.start if show else None,
            on_miss=on_miss, miss_threshold=miss_threshold, miss_importance=miss_importance,
            quality_ids=quality_ids, quality_seq_len=quality_tokens + 1, dense_weights=dense_weights,
        )
    if plot is not None:
        plot_throughput(report, plot)
    if pareto_plot is not None:
        from d2moe.apps.miss_bench import plot_pareto

        plot_pareto(report, pareto_plot)
    if json_out:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report)
        if plot is not None:
            typer.echo(f"plot: {plot}")
    if not any(r.ok for r in report.results):  # a CI job must not pass a sweep that measured nothing
        from d2moe.errors import BudgetError

        reasons = sorted({r.reason for r in report.results if r.reason})
        raise BudgetError(f"no configuration ran ({'; '.join(reasons)[:300]}): give larger --budgets")


def print_report(report) -> None:
    """One table: a row per (budget, policy), ratio to the best baseline at that budget."""
    from rich.console import Console
    from rich.table import Table

    from d2moe.runtime.units import format_size

    bw = f", I/O capped at {report.io_bandwidth / 1e9:g} GB/s" if report.io_bandwidth else ""
    bw += f", {report.dense_weights} dense layers" if report.dense_weights != "source" else ""
    table = Table(title=(f"d2moe bench: {report.prompt_tokens}-token prompt, {report.max_new_tokens} new tokens, "
                         f"median of {report.repeats}{bw}"), title_justify="left")
    quality = report.quality_tokens is not None
    cols = ["budget", "policy", "prefill tok/s", "decode tok/s", "× best baseline", "TTFT ms", "peak memory",
            "read/token", "hit rate", "schedule eff.", "levels (pairs)"]
    if report.on_miss != ["load"]:
        cols += ["saved/token", "misses handled"]
    if quality:
        cols += ["ppl", "ppl / load"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("budget", "policy", "levels (pairs)", "misses handled") else "right")
    for budget in report.budgets:
        label = f"{budget.label} ({format_size(budget.bytes)})" if budget.label.endswith("%") else budget.label
        rows = [r for r in report.results if r.budget.label == budget.label]
        for i, r in enumerate(rows):
            first = label if i == 0 else ""
            name = f"[bold]{r.label}[/]" if r.policy == "d2moe" else r.label
            if not r.ok:
                needs = f"needs {format_size(r.needs_bytes)}" if r.needs_bytes else r.reason.split(":")[0]
                table.add_row(first, name, f"[dim]n/a ({needs})[/]", *[""] * (len(cols) - 3))
                continue
            levels = " ".join(f"{b}b:{n}" for b, n in sorted(r.runs[-1].levels.items()))
            ratio = "-" if r.ratio_to_best_baseline is None else f"{r.ratio_to_best_baseline:.2f}×"
            table.add_row(
                first, name, f"{r.median('prefill_tokens_per_s'):.1f}", f"{r.median('decode_tokens_per_s'):.1f}", ratio,
                f"{1000 * r.median('ttft_s'):.0f}", format_size(r.median("peak_memory_bytes")),
                format_size(r.median("bytes_read_per_token")), f"{r.median('hit_rate'):.0%}",
                f"{r.median('schedule_efficiency'):.0%}", levels, *_miss_cells(r, report.on_miss != ["load"], quality),
            )
        table.add_section()
    Console(highlight=False, width=None if sys.stdout.isatty() else 200).print(table)


def _miss_cells(r, misses: bool, quality: bool) -> list[str]:
    from d2moe.runtime.units import format_size

    cells = []
    if misses:
        handled = (r.misses or {}).get("pairs", {})
        cells += [format_size(r.median("bytes_saved_per_token")),
                  " ".join(f"{k}:{v}" for k, v in sorted(handled.items())) or "-"]
    if quality:
        cells += ["-" if r.perplexity is None else f"{r.perplexity:.2f}",
                  "-" if r.ppl_vs_load is None else f"{r.ppl_vs_load:.3f}"]
    return cells


class _Bar:
    """A rich progress bar over all runs (on stderr), or nothing."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.progress = None
        self.task = None

    def __enter__(self) -> _Bar:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self.progress.__enter__()
        return self

    def start(self, total: int) -> None:
        if self.progress is not None:
            self.task = self.progress.add_task("bench", total=total)

    def advance(self, policy: str, budget, repeat: int) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, advance=1, description=f"bench {policy} @ {budget.label} (#{repeat + 1})")

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)


def register(app: typer.Typer) -> None:
    app.command(name="bench")(bench)
