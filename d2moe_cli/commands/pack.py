"""`d2moe pack`: quantize a Hugging Face MoE checkpoint into a packed, bit-nested d2moe checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from d2moe.options import parse_bits
from d2moe.quantize.adapters import SUPPORTED
from d2moe.quantize.types import DEFAULT_SCHEME, default_group_size


def register(app: typer.Typer) -> None:
    @app.command("pack")
    def pack_cmd(
        ctx: typer.Context,
        src: Annotated[Path, typer.Argument(help="Hugging Face MoE checkpoint directory (config.json + *.safetensors) "
                                                  f"of a supported model_type: {', '.join(SUPPORTED)}")],
        out: Annotated[Path, typer.Argument(help="packed checkpoint directory to create")],
        bits: Annotated[str, typer.Option(help="levels (bit-widths) one stored copy serves, ascending")] = "2,3,4",
        group_size: Annotated[int | None, typer.Option(help="input columns sharing one scale/offset (default: 32 for subblock, 64 otherwise; 16 is Q2_K's sub-block: +0.25 bits per weight and nearer the source, 1.03-1.32x the kernel time on AVX-512, 1.2-1.3x on AVX2, BENCHMARKS.md §0.16-0.17)")] = None,
        scheme: Annotated[str, typer.Option(help="subblock (the default: one grid per 32 columns fitted for the lowest level, its scale/offset as 4-bit codes against per-256 float16; best quality per bit) | sliced (float16 scale/offset per 64 columns; ~10% faster kernels) | residual (fitted plane magnitudes)")] = DEFAULT_SCHEME,
        dtype: Annotated[str | None, typer.Option(help="dense weights' dtype: float16 | bfloat16 | float32 (default: source's)")] = None,
        router: Annotated[Path | None, typer.Option(help="trained bit-width gate (from `d2moe train-router`) to include")] = None,
        force: Annotated[bool, typer.Option("--force", help="replace OUT if it is an existing packed checkpoint")] = False,
        workers: Annotated[int | None, typer.Option(help="threads fitting each matrix (default: CPU count); output is the same")] = None,
        resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted pack of the same inputs and options (finished parts are verified by crc32 and kept)")] = False,
        refits: Annotated[int | None, typer.Option(help="least-squares refits of each group's grid after the clip search (sliced; default 1)")] = None,
        calib: Annotated[list[str] | None, typer.Option(help="calibration text: a txt/jsonl/parquet file or a hub dataset (repeatable); weights each expert's grid search by its input activations (imatrix-style) and chooses its codes by their outputs on them (GPTQ, every level nested)")] = None,
        calib_tokens: Annotated[int, typer.Option(help="calibration tokens run through the source model for --calib (BENCHMARKS.md §6.10: 16384 scored worse on every level of three trained models)")] = 32768,
        similarity: Annotated[bool, typer.Option("--similarity/--no-similarity", help="store each expert's nearest neighbours (output cosine on a random probe) for `run --on-miss substitute`")] = True,
        lossless: Annotated[bool, typer.Option("--lossless", help="also store each expert's exact source weights, losslessly coded (for `run --lossless`)")] = False,
        lossless_codec: Annotated[str, typer.Option(help="codec of the exponent stream for --lossless: zstd | brotli | none (the raw weights: uncompressed 16-bit offloading)")] = "zstd",
        weighting: Annotated[str | None, typer.Option(help="each weight's share of the fit's error (sliced): abs (|x|, Q2_K's; the default) | magnitude (sqrt(2 mean x^2 + x^2), Q4_K's) | mse (equal)")] = None,
        quiet: Annotated[bool, typer.Option("--quiet", help="no progress on stderr")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="print the report as one JSON object on stdout (progress stays on stderr)")] = False,
    ) -> None:
        """Pack SRC into OUT: dense weights + one bit-nested blob per expert (levels read by prefix)."""
        from d2moe.quantize.convert.pack import pack_checkpoint
        from d2moe.quantize.types import MWQConfig

        if group_size is None:
            group_size = default_group_size(scheme)
        cfg = MWQConfig(bits=parse_bits(bits), group_size=group_size, scheme=scheme)
        from d2moe.errors import UsageError

        for option, name, needs, on in (("--calib-tokens", "calib_tokens", "--calib TEXT", calib),
                                        ("--lossless-codec", "lossless_codec", "--lossless", lossless)):
            if not on and ctx.get_parameter_source(name).name != "DEFAULT":  # would do nothing, silently
                raise UsageError(f"{option} applies to {needs.split()[0]}: give {needs} too, or leave {option} out")
        calibration = None
        if calib:  # tokenised now; the model runs layer by layer as pack fits each
            from d2moe.router_train.activations import SEQ_LEN, CalibrationPass

            if calib_tokens < SEQ_LEN:
                raise UsageError(f"--calib-tokens {calib_tokens} is less than one calibration sequence: use {SEQ_LEN} "
                                 "or more")
            calibration = CalibrationPass(src, calib, calib_tokens, progress=not quiet)
            got = int(calibration.ids.numel())
            if got < calib_tokens // SEQ_LEN * SEQ_LEN:  # whole sequences: 1000 asks for one
                print(f"pack: note: --calib gives {got} tokens in sequences of {SEQ_LEN}, fewer than --calib-tokens "
                      f"{calib_tokens}: calibrating on {got} (add text for more)", file=sys.stderr, flush=True)
        try:
            report = pack_checkpoint(src, out, cfg, dtype=dtype, router=router, progress=not quiet, force=force,
                                     workers=workers, resume=resume, refits=refits, calib=calibration,
                                     similarity=similarity, lossless=lossless_codec if lossless else None,
                                     weighting=weighting)
        except OSError as exc:  # e.g. OUT on a read-only or pseudo file system (/proc), disk full
            from d2moe.errors import IOFailure, describe_os_error

            raise IOFailure(f"cannot pack into {out}: {describe_os_error(exc)}") from None
        report["calib"] = None if calibration is None else calibration.report()
        if as_json:
            typer.echo(json.dumps(report, sort_keys=True))
        else:
            _print_report(report)


def _print_report(r: dict) -> None:
    from rich.console import Console
    from rich.markup import escape  # an OUT named "packed [v2]" is a path, not markup
    from rich.table import Table

    from d2moe.runtime.units import format_size

    table = Table(title=f"{escape(str(r['out']))}: {r['arch']}, {r['moe_layers']} MoE layers x {r['experts_per_layer']} experts, "
                        f"{r['seconds']:.1f} s")
    for col in ("level", "expert bytes", "SQNR min dB", "SQNR median dB"):
        table.add_column(col, justify="right")
    for level, nbytes in r["bytes_per_level"].items():
        q = r["sqnr_db"][level]
        table.add_row(f"{level}-bit", format_size(nbytes), f"{q['min']:.2f}" if q else "-", f"{q['median']:.2f}" if q else "-")
    console = Console()
    console.print(table)
    console.print(f"dense {format_size(r['dense_bytes'])}, packed total {format_size(r['packed_bytes'])} "
                  f"(source {format_size(r['source_bytes'])}); gate: {'yes' if r['gate'] else 'none'}")
    if r.get("calib"):
        console.print(_calibration_line(r["calib"]), soft_wrap=True)


def _calibration_line(c: dict) -> str:
    """What --calib did, in one line: tokens, time, the product dtypes, and the experts fitted unweighted."""
    starved = c["experts_without_enough_tokens"]
    line = (f"calibration: {c['tokens']} tokens in {c['seconds']:.0f} s, products {c['products']['forward']} "
            f"(judge {c['products']['judge']}); {c['experts'] - len(starved)} of {c['experts']} experts weighted")
    if starved:
        named = ", ".join(f"layer {layer} expert {e} ({n} tokens)" for layer, e, n in starved[:8])
        line += f"; fitted unweighted for want of tokens: {named}" + (f" and {len(starved) - 8} more" if len(starved) > 8 else "")
    return line
