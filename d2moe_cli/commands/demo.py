"""`d2moe demo` (what `make demo` runs): pack the embedded model once, run it under a budget that forces offloading.

1. The embedded tiny Mixtral (d2moe_cli/assets/tiny-mixtral) is packed into a cache directory
   (--out, else $D2MOE_CACHE/demo, else $XDG_CACHE_HOME/d2moe/demo, else ~/.cache/d2moe/demo);
   a packed copy already there is reused when it opens cleanly and was packed from the same
   source with the same levels.
2. The memory budget holds dense + KV + staging + workspace and only `--expert-fraction` (40%)
   of the experts at the highest level: the rest stream from disk.
3. The prompt's continuation streams to stdout, then a table of what the run did.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from d2moe.errors import InputError, UsageError
from d2moe.options import given_as, parse_bits, set_threads

DEFAULT_PROMPT = "Once upon a time there was a king who had three daughters,"
DEFAULT_BITS = "2,3,4"


def embedded_model_dir() -> Path:
    """The embedded model shipped inside the package (HF checkpoint + tokenizer)."""
    from importlib.resources import files

    path = Path(str(files("d2moe") / "assets" / "tiny-mixtral"))
    if not (path / "config.json").is_file():
        raise InputError(f"the embedded demo model is missing ({path} has no config.json): reinstall d2moe "
                         "(pip install -e .) or pass --model SRC")
    return path


def embedded_gate() -> Path | None:
    """The bit-width gate trained for the embedded model at levels 2,3,4 (`d2moe train-router`), if shipped."""
    path = embedded_model_dir().parent / "tiny-mixtral-gate.safetensors"
    return path if path.is_file() else None


def demo_cache_dir() -> Path:
    if os.environ.get("D2MOE_CACHE"):
        return Path(os.environ["D2MOE_CACHE"]) / "demo"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "d2moe" / "demo"


def packed_is_current(out: Path, src: Path, bits: tuple[int, ...], router: Path | None = None) -> bool:
    """True when `out` is a valid packed checkpoint of `src` (same fingerprint) at `bits`, with a gate iff `router`."""
    from d2moe.errors import D2MoEError
    from d2moe.quantize.convert.source import SourceCheckpoint
    from d2moe.quantize.format import open_checkpoint

    if not (out / "d2moe.json").is_file():
        return False
    try:
        ckpt = open_checkpoint(out)
    except D2MoEError:
        return False
    source = SourceCheckpoint(src)
    source.index_weights()  # the fingerprint covers the weight files' names and sizes
    same_source = ckpt.manifest["source"]["sha256"] == source.fingerprint()
    from d2moe.quantize.types import DEFAULT_SCHEME

    return (same_source and tuple(ckpt.cfg.bits) == tuple(bits) and ckpt.cfg.scheme == DEFAULT_SCHEME
            and (ckpt.gate_path is None) == (router is None))


def check_demo_out(out: Path, src: Path) -> None:
    """demo packs into a folder the user names only where that loses nothing: a new or empty folder, or a pack of
    the same model (at other levels, from an earlier demo). Its own cache folder it replaces freely."""
    from d2moe.errors import D2MoEError
    from d2moe.quantize.convert.source import SourceCheckpoint
    from d2moe.quantize.format import open_checkpoint

    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise UsageError(f"--out {out} is a file: name a folder for the demo's packed model")
    if not any(out.iterdir()):
        return
    try:
        packed_from = open_checkpoint(out).manifest["source"]["sha256"]
    except D2MoEError:
        packed_from = None
    if packed_from is None:
        raise UsageError(f"--out {out} exists and is not a packed checkpoint: name a new folder for the demo")
    source = SourceCheckpoint(src)
    source.index_weights()
    if packed_from != source.fingerprint():
        raise UsageError(f"--out {out} holds a packed checkpoint of another model, which the demo would replace: name "
                         "a new folder for the demo (or remove that one yourself)")


def ensure_packed(src: Path, out: Path, bits: tuple[int, ...], progress: bool,
                  router: Path | None = None, current: bool | None = None) -> tuple[bool, float]:
    """Pack `src` into `out` unless a current pack is there; returns (packed now, seconds)."""
    import time

    from d2moe.quantize import MWQConfig
    from d2moe.quantize.convert.pack import pack_checkpoint
    from d2moe.quantize.types import DEFAULT_SCHEME, default_group_size

    if current is None:
        current = packed_is_current(out, src, bits, router)
    if current:
        return False, 0.0
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = MWQConfig(bits=bits, group_size=demo_group_size(src, default_group_size(DEFAULT_SCHEME)), scheme=DEFAULT_SCHEME)
    pack_checkpoint(src, out, cfg, router=router, progress=progress, force=True)
    return True, time.perf_counter() - t0


def demo_group_size(src: Path, default: int) -> int:
    """The default group size, or the largest smaller one dividing every expert width of `src`: demo has no
    --group-size to follow pack's advice with. None fits: the default, for pack to name the problem."""
    from d2moe.quantize.adapters import adapter_for
    from d2moe.quantize.convert.source import SourceCheckpoint
    from d2moe.quantize.format.layout import usable_group_sizes
    from d2moe.quantize.types import DEFAULT_SCHEME

    config = SourceCheckpoint(src).config
    widths = [cols for _, cols in adapter_for(config).matrix_shapes(config).values()]
    usable = [g for g in usable_group_sizes(widths, DEFAULT_SCHEME) if g <= default] if min(widths) > 0 else []
    return usable[-1] if usable else default


def demo_budget(checkpoint: Path, max_tokens: int, expert_fraction: float, io_threads: int = 4,
                policy: str = "d2moe") -> tuple[int, int]:
    """(budget bytes, all-experts bytes at the highest level): the fixed part + a fraction of the experts; for a
    hold-* policy, which holds every expert at its level, the fixed part + all of them at that level."""
    from d2moe.apps.evaluate import UNLIMITED_BUDGET
    from d2moe.runtime.policies import HOLD_LEVELS
    from d2moe.runtime.session import RunOptions, plan_run

    options = RunOptions(memory_budget=UNLIMITED_BUDGET, policy=policy, max_tokens=max_tokens, io_threads=io_threads)
    ckpt, *_, plan = plan_run(checkpoint, options)
    per_level = len(ckpt.moe_layers) * ckpt.num_experts
    experts = per_level * ckpt.level_nbytes(ckpt.cfg.bk)
    fixed = plan.budget - plan.expert_cache
    if policy in HOLD_LEVELS:
        return max(plan.minimum, fixed + per_level * ckpt.level_nbytes(HOLD_LEVELS[policy])), experts
    return max(plan.minimum, fixed + int(expert_fraction * experts)), experts


def demo(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt to continue.")] = DEFAULT_PROMPT,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    out: Annotated[Path | None, typer.Option(
        help="Where the packed demo model lives (default: ~/.cache/d2moe/demo; reused when current).")] = None,
    model: Annotated[Path | None, typer.Option(
        help="Pack this HF checkpoint instead of the embedded one.")] = None,
    bits: Annotated[str, typer.Option(help="Levels to pack.")] = DEFAULT_BITS,
    expert_fraction: Annotated[float, typer.Option(
        help="Share of the expert set (highest level) the budget leaves room for; the rest streams from disk.")] = 0.4,
    policy: Annotated[str, typer.Option(help="Run policy (see `d2moe run --help`).")] = "d2moe",
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    threads: Annotated[int, typer.Option(
        envvar="D2MOE_THREADS", help="Compute threads (1: the tiny model gains nothing from more).")] = 1,
    json_out: Annotated[bool, typer.Option("--json", help="Print text and statistics as one JSON object.")] = False,
) -> None:
    """Pack the embedded tiny Mixtral (once), run it with most experts on disk, stream text, show the stats."""
    import torch

    from d2moe.runtime.generate import SamplingOptions
    from d2moe.runtime.session import RunOptions, Session, encode_prompts, load_tokenizer

    set_threads(threads, given_as(ctx, "threads"))
    if not 0 < expert_fraction <= 1:
        raise UsageError(f"--expert-fraction {expert_fraction} must be in (0, 1]")
    level_bits = parse_bits(bits)
    from d2moe.runtime.policies import HOLD_LEVELS

    if policy == "hold":  # hold takes run's --level, which the demo does not have; hold-int8 / hold-int4 name theirs
        raise UsageError("--policy hold needs run's --level: in the demo use --policy hold-int4 or hold-int8 "
                         "(every expert held at 4 or 8 bits), or `d2moe run CKPT --policy hold --level N`")
    hold = HOLD_LEVELS.get(policy)
    if hold is not None and hold not in level_bits:  # demo packs: its --bits, not pack's, is the fix
        raise UsageError(f"--policy {policy} runs every expert at {hold} bits: pack that level too, with "
                         f"--bits {','.join(map(str, sorted({*level_bits, hold})))}")
    src = Path(model) if model is not None else embedded_model_dir()
    named_out = out is not None
    out = Path(out) if named_out else demo_cache_dir()
    say = (lambda msg: None) if json_out else (lambda msg: typer.echo(msg, err=True))

    # the shipped gate was trained for the embedded model at the default levels: dual routing with a trained gate
    router = embedded_gate() if model is None and level_bits == parse_bits(DEFAULT_BITS) else None
    current = packed_is_current(out, src, level_bits, router)  # opens and fingerprints: once
    if named_out and not current:  # a folder the user named is packed into only where that loses nothing
        check_demo_out(out, src)
    say(f"using packed model in {out}" if current
        else f"packing {src.name} -> {out} (bits {bits}{', trained bit-width gate' if router else ''}) ...")
    packed_now, pack_s = ensure_packed(src, out, level_bits, progress=not json_out and sys.stderr.isatty(),
                                       router=router, current=current)

    torch.manual_seed(0)
    tokenizer = load_tokenizer(out)
    sampling = SamplingOptions(max_new_tokens=max_new_tokens, temperature=temperature)
    (ids,) = encode_prompts(tokenizer, [prompt], chat_template=False)
    from d2moe.quantize.format import open_checkpoint
    from d2moe.runtime.generate import context_length, kv_tokens

    max_tokens = kv_tokens([len(ids)], max_new_tokens, context_length(open_checkpoint(out).config))
    budget, experts = demo_budget(out, max_tokens, expert_fraction, policy=policy)
    options = RunOptions(memory_budget=budget, policy=policy, max_tokens=max_tokens)
    if not json_out:
        from d2moe.runtime.units import format_size

        say(f"memory budget {format_size(budget)}: " + (
            f"every expert held at {hold} bits ({policy}), none loads from disk\n" if hold is not None else
            f"room for {expert_fraction:.0%} of the experts ({format_size(experts)} at {level_bits[-1]} bits), "
            "the rest loads from disk\n"))

    def stream(row: int, delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    with Session(out, options, tokenizer=tokenizer) as session:
        if not json_out:
            typer.echo(prompt, nl=False)  # once the run has started: an option it refuses leaves no text behind
        report = session.generate(token_ids=[ids], sampling=sampling, on_text=None if json_out else stream)
    stats = report.stats
    if json_out:
        typer.echo(json.dumps({"prompt": prompt, "text": report.texts[0], "packed": str(out), "packed_now": packed_now,
                               "pack_seconds": pack_s, "expert_bytes": experts, "stats": stats}, indent=2))
        return
    typer.echo("\n")
    print_stats(stats)


def print_stats(stats: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from d2moe.runtime.units import format_size

    mem = stats["memory"]
    levels = stats["tokens_per_level"]
    pairs = sum(levels.values()) or 1
    table = Table(title="what the run did", title_justify="left", show_header=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    rows = [
        ("policy", f"{stats['policy']} ({stats['levels']})"),
        ("prompt / generated tokens", f"{stats['prompt_tokens']} / {stats['generated_tokens']}"),
        ("prefill", f"{stats['prefill_tokens_per_s']:.1f} tok/s"),
        ("decode", "n/a (one new token)" if stats["decode_tokens_per_s"] is None
         else f"{stats['decode_tokens_per_s']:.1f} tok/s"),
        ("time to first token", f"{1000 * stats['time_to_first_token_s']:.0f} ms"),
        ("expert cache hit rate", f"{stats['cache']['hit_rate']:.0%}"),
        ("expert bytes read", f"{format_size(stats['bytes_read'])} ({format_size(stats['bytes_read_per_token'])}/token, "
                              f"{stats['reads']} reads, {stats['upgrade_reads']} upgrades)"),
        ("levels used (token-expert pairs)", ", ".join(f"{b}-bit {100 * n / pairs:.0f}%" for b, n in levels.items())),
        ("schedule efficiency (I/O-compute overlap)", f"{stats['schedule_efficiency']:.0%}"),
        ("peak memory / budget", f"{format_size(mem['peak_bytes'])} / {format_size(mem['budget_bytes'])} "
                                 f"({mem['peak_bytes'] / mem['budget_bytes']:.0%})"),
        ("expert cache capacity", format_size(stats["cache"]["capacity_bytes"])),
    ]
    for k, v in rows:
        table.add_row(k, v)
    Console(highlight=False, width=None if sys.stdout.isatty() else 120).print(table)


def register(app: typer.Typer) -> None:
    app.command(name="demo")(demo)
