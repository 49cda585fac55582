"""`d2moe inspect`: what is in a packed checkpoint, and whether it is intact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from d2moe.errors import D2MoEError


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect_cmd(
        path: Annotated[Path, typer.Argument(help="packed checkpoint directory (from `d2moe pack`)")],
        as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
        verify: Annotated[bool, typer.Option("--verify", help="also read every byte and check every crc32")] = False,
    ) -> None:
        """Architecture, layers x experts, bytes and bits/weight per level, SQNR per level, validation."""
        from d2moe.quantize.format import open_checkpoint

        try:
            summary = open_checkpoint(path, verify=verify).summary()
            summary["validation"] = _verify_tokenizer(path) if verify else "ok (structure; --verify checks crc32)"
        except D2MoEError as exc:
            if as_json:
                typer.echo(json.dumps({"path": str(path), "valid": False, "validation": str(exc)}))
            raise
        summary["valid"] = True
        if as_json:
            typer.echo(json.dumps(summary, sort_keys=True))
        else:
            _print_summary(summary)


def _verify_tokenizer(path: Path) -> str:
    """--verify's last check: the tokenizer files (outside the crc32s: copied from the source) load and encode, as
    run and eval will need them to; none at all is said, not failed (pack said so too)."""
    from d2moe.quantize.format import TOKENIZER_FILES
    from d2moe.runtime.prompts import encode_prompts, load_tokenizer

    if not any((path / name).exists() for name in TOKENIZER_FILES):
        return "ok (every crc32 checked; no tokenizer files: run and eval need the source model's)"
    encode_prompts(load_tokenizer(path), ["hello"], chat_template=False)
    return "ok (every crc32 checked; the tokenizer loads)"


def _print_summary(s: dict) -> None:
    from rich.console import Console
    from rich.markup import escape  # a folder named "m[/]q" is a path, not markup
    from rich.table import Table

    from d2moe.runtime.units import format_size

    console = Console()
    console.print(f"[bold]{escape(str(s['path']))}[/]: {s['arch']} ({escape(str(s['source']))}), format {s['format']} v{s['version']}, "
                  f"{s['moe_layers']} MoE layers x {s['num_experts']} experts, group {s['group_size']}, "
                  f"{s['scheme']}, dense {s['dtype']} {format_size(s['dense_bytes'])}, "
                  f"gate: {_gate(s['gate'])}")
    table = Table()
    for col in ("level", "bytes/expert", "all experts", "bits/weight", "SQNR min dB", "SQNR median dB"):
        table.add_column(col, justify="right")
    for lv in s["levels"]:
        q = lv["sqnr_db"]
        table.add_row(f"{lv['bits']}-bit", format_size(lv["bytes_per_expert"]), format_size(lv["bytes_all_experts"]),
                      f"{lv['bits_per_weight']:.3f}", f"{q['min']:.2f}" if q else "-", f"{q['median']:.2f}" if q else "-")
    console.print(table)
    if s.get("lossless"):
        ll = s["lossless"]
        console.print(f"lossless tier (run --lossless): {ll['codec']}, {format_size(ll['bytes'])} for "
                      f"{format_size(ll['raw_bytes'])} of {ll['dtype']} experts ({ll['raw_bytes'] / ll['bytes']:.2f}x)")
    if s.get("calibration"):
        console.print(_calibration_line(s["calibration"]), soft_wrap=True)
    console.print(f"validation: [green]{s['validation']}[/]")


def _gate(gate: dict | None) -> str:
    if gate is None:
        return "none"
    return "levels " + "/".join(map(str, gate["levels"])) + " at capacity " + "/".join(f"{c:g}" for c in gate["capacity"])


def _calibration_line(c: dict) -> str:
    """How `pack --calib` chose the codes, and why its weight SQNR reads lower than an uncalibrated pack's."""
    starved = c["experts_without_enough_tokens"]
    return (f"calibrated: {c['tokens']} tokens of {', '.join(c['texts'])}"
            + (f" ({starved} experts saw too few and were fitted unweighted)" if starved else "")
            + "; codes chosen by their outputs on those inputs, so the SQNR above (the weights') reads lower than an "
              "uncalibrated pack's: `d2moe eval` measures the outputs")
