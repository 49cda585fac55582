"""`d2moe train-router`: train the capacity-limited bit-width gate of dual routing (server side)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from d2moe.errors import UsageError
from d2moe.options import parse_bits
from d2moe.quantize.types import DEFAULT_SCHEME, default_group_size


def parse_capacity(text: str, n_levels: int) -> tuple[float, ...]:
    """One fraction per level summing to 1, or "none" (no limit: the gate alone decides)."""
    if text.strip().lower() in ("none", "off"):
        return (1.0,) * n_levels
    try:
        cap = tuple(float(c) for c in text.split(",") if c.strip())
    except ValueError:
        raise UsageError(f"--capacity {text!r} is not a list of fractions: write e.g. --capacity 0.3,0.4,0.3") from None
    if len(cap) != n_levels:
        raise UsageError(
            f"--capacity {text!r} has {len(cap)} fractions for {n_levels} levels: give one fraction per level of --bits"
        )
    if any(not math.isfinite(c) or c < 0 or c > 1 for c in cap) or abs(sum(cap) - 1) > 1e-3:
        raise UsageError(f"--capacity {text!r}: fractions must lie in [0, 1] and sum to 1 (they sum to {sum(cap):.4g})")
    return cap


def register(app: typer.Typer) -> None:
    @app.command("train-router")
    def train_router_cmd(
        src: Annotated[Path, typer.Argument(help="Hugging Face MoE checkpoint directory (config.json + safetensors)")],
        data: Annotated[list[str], typer.Option("--data", help="calibration text: .txt/.jsonl/.parquet file or hub dataset (repeatable)")],
        output: Annotated[Path, typer.Option("-o", "--output", help="gate file to write")] = Path("gate.safetensors"),
        bits: Annotated[str, typer.Option(help="levels (bit-widths) the gate chooses from")] = "2,3,4",
        capacity: Annotated[str, typer.Option(help="max fraction of (token, expert) pairs per level, summing to 1; 'none' = no limit")] = "0.3,0.4,0.3",
        capacity_scope: Annotated[str, typer.Option(help="model: --capacity is a budget over all layers' pairs (per-layer caps calibrated after training); layer: every layer applies it")] = "model",
        recalibrate_every: Annotated[int, typer.Option(help="scope model: steps between per-layer cap updates while training (0: no caps while training, the --bit-cost price alone; measured best)")] = 0,
        calibration_blocks: Annotated[int, typer.Option(help="calibration blocks the per-layer caps are computed on")] = 16,
        init: Annotated[str, typer.Option(help="gate start: router (the router-weight rule: heavier expert, more bits; measured best) | zero (small random start)")] = "router",
        group_size: Annotated[int | None, typer.Option(help="MWQ group size, as pack will use (default: pack's for the scheme)")] = None,
        scheme: Annotated[str, typer.Option(help="MWQ scheme, as pack will use: subblock | sliced | residual")] = DEFAULT_SCHEME,
        seq_len: Annotated[int, typer.Option(help="tokens per calibration block")] = 256,
        batch_size: Annotated[int, typer.Option(help="blocks per step (global)")] = 4,
        max_steps: Annotated[int, typer.Option(help="optimizer steps")] = 200,
        lr: Annotated[float, typer.Option(help="AdamW learning rate of the gate")] = 3e-3,
        seed: Annotated[int, typer.Option(min=0, max=2**63 - 1, help="seed of data order, init and noise")] = 0,
        bit_cost: Annotated[float, typer.Option(help="α: weight of the expected-bits term of the loss (pick it so the uncapped gate's average bits ≈ the --capacity average)")] = 0.005,
        target: Annotated[str, typer.Option(help="distill (full-precision model's distribution) | labels")] = "distill",
        estimator: Annotated[str, typer.Option(help="gradient through the hard choice: ste | gumbel")] = "ste",
        proj_dim: Annotated[int, typer.Option(help="gate head width (0 = linear head)")] = 32,
        eval_blocks: Annotated[int, typer.Option(help="calibration blocks held out for the before/after report")] = 8,
        max_blocks: Annotated[int | None, typer.Option(help="use at most this many calibration blocks")] = None,
        save_every: Annotated[int, typer.Option(help="steps between resumable checkpoints")] = 50,
        state_dir: Annotated[Path | None, typer.Option(help="where resumable state goes (default: OUTPUT.state)")] = None,
        resume: Annotated[bool, typer.Option("--resume", help="continue from the state in --state-dir")] = False,
        force: Annotated[bool, typer.Option("--force", help="replace an existing gate file")] = False,
        report: Annotated[Path | None, typer.Option(help="write the JSON report here")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="print the JSON report on stdout (progress lines stay on stderr)")] = False,
    ) -> None:
        """Train the bit-width gate (dual routing) on calibration text; writes gate.safetensors + a report."""
        from d2moe.router_train.train import TrainConfig, train_router

        levels = parse_bits(bits)
        cfg = TrainConfig(
            src=str(src), data=tuple(data), output=str(output), bits=levels, capacity=parse_capacity(capacity, len(levels)),
            capacity_scope=capacity_scope, recalibrate_every=recalibrate_every, calibration_blocks=calibration_blocks,
            init=init,
            group_size=default_group_size(scheme) if group_size is None else group_size, scheme=scheme, seq_len=seq_len, batch_size=batch_size, max_steps=max_steps, lr=lr,
            seed=seed, bit_cost=bit_cost, target=target, estimator=estimator, proj_dim=proj_dim, eval_blocks=eval_blocks,
            max_blocks=max_blocks, save_every=save_every, state_dir=None if state_dir is None else str(state_dir),
            resume=resume, force=force,
        )
        if report is not None:  # before the training, not after it
            from d2moe.user_files import check_writable

            check_writable(report, "--report")
        # in a multi-process launch (torchrun / accelerate launch sets RANK) the first process alone draws a bar
        show = not as_json and sys.stderr.isatty() and os.environ.get("RANK", "0") == "0"
        result = _run_with_progress(cfg, train_router) if show else _run_with_log_lines(cfg, train_router)
        if not result.main:  # the first process prints the report and writes the files
            return
        text = json.dumps(result.report, indent=2)
        if report is not None:
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(text + "\n")
        if as_json:
            typer.echo(text)
        else:
            _print_summary(result.report, output)


def _run_with_log_lines(cfg, train_router):
    """Not on a terminal (CI, a log file, --json): plain phase and step lines on stderr (d2moe.progress)."""
    from d2moe.progress import LogLines

    log = LogLines("train-router", cfg.max_steps, every_s=LOG_EVERY_S)

    def on_step(s) -> None:
        log.step(s.step, loss=float(s.loss), bits=float(s.avg_bits))

    result = train_router(cfg, on_step=on_step, on_phase=log.phase)
    if result.main:
        log.phase(f"done: gate written to {cfg.output}")
    return result


LOG_EVERY_S = 30.0  # at most one step line per 30 s in logs (and always the last step)


def _run_with_progress(cfg, train_router):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}  bits {task.fields[bits]}"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("train-router", total=cfg.max_steps, loss="-", bits="-")

        def on_step(log) -> None:
            progress.update(task, completed=log.step, loss=f"{log.loss:.4g}", bits=f"{log.avg_bits:.2f}")

        def on_phase(msg: str) -> None:
            progress.update(task, description=msg)

        return train_router(cfg, on_step=on_step, on_phase=on_phase)


def _print_summary(report: dict, output: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    ev = report["eval"]
    from rich.markup import escape

    table = Table(title=f"gate → {escape(str(output))}  ({report['gate_parameters']:,} parameters; one expert has {report['expert_parameters']:,})")
    for col in ("assignment", "avg bits", "KL to full", "ppl"):
        table.add_column(col, justify="right" if col != "assignment" else "left")
    rows = [("gate, before", ev["before"]), ("gate, after", ev["after"])] if ev["before"] else [("gate", ev["after"])]
    rows += [(f"uniform {b}-bit", v) for b, v in ev["uniform"].items()] + [("full precision", ev["full"])]
    for name, v in rows:
        bits = f"{v['avg_bits']:.3f}" if "avg_bits" in v else "-"
        table.add_row(name, bits, f"{v['kl']:.4g}", f"{v['ppl']:.3f}")
    Console().print(table)
