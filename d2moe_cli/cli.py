"""The `d2moe` command line: thin typer commands over one library call each.

Each command lives in `d2moe.commands.<name>` and registers itself with `register(app)`.
Project errors print as one red line and exit with their class's code (d2moe.errors: 2 usage, 3 bad
input, 4 corrupt file, 5 I/O, 6 environment); an operating-system error that reaches here is one
line with exit 5; D2MOE_DEBUG=1 shows the traceback.
"""

import importlib
import os
import sys

import typer

from d2moe.errors import EXIT_INTERRUPTED, EXIT_IO, D2MoEError, InputError, UsageError, describe_os_error

app = typer.Typer(
    name="d2moe",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

COMMANDS = ("pack", "inspect", "run", "train_router", "eval", "bench", "demo", "doctor")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        from d2moe.quantize.format.constants import FORMAT_VERSION

        typer.echo(f"d2moe {version('d2moe')} (checkpoint format {FORMAT_VERSION})")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Run Mixture-of-Experts LLMs under a memory budget (D²MoE: bit-nested experts, dual routing, HEBF)."""


for _name in COMMANDS:
    importlib.import_module(f"d2moe.commands.{_name}").register(app)


def _print_error(message: str, every_process_meets_it: bool = False) -> None:
    if every_process_meets_it and os.environ.get("RANK", "0") != "0":
        return  # a multi-process launch (torchrun sets RANK): the first process states an input error once for all
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {message}", markup=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point: every error one line (usage errors exit 2, ours with their class's code); --help as typer prints it."""
    args = sys.argv[1:] if argv is None else argv
    if "--json" in args or not sys.stderr.isatty():  # no third-party bars in logs or next to JSON
        from d2moe.progress import quiet_third_party_bars

        quiet_third_party_bars()
    try:
        # not standalone: usage errors come here, to be one line like ours, not a box under a usage line
        code = app(args=argv, prog_name="d2moe", standalone_mode=False)
    except typer.TyperException as exc:  # click's (typer vendors it): usage errors, bad parameters
        if type(exc).__name__ == "NoArgsIsHelpError":  # `d2moe` alone: the help itself
            exc.show()
            sys.exit(exc.exit_code)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        _print_error(_escape(exc.format_message() + hint), every_process_meets_it=True)
        sys.exit(exc.exit_code)
    except typer.Abort:  # end of input where a prompt waited
        _print_error("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except D2MoEError as exc:
        if os.environ.get("D2MOE_DEBUG"):
            raise
        _print_error(_escape(str(exc)), every_process_meets_it=isinstance(exc, UsageError | InputError))
        sys.exit(exc.exit_code)
    except OSError as exc:  # the OS refused a read or write that no command turned into a D2MoEError
        if os.environ.get("D2MOE_DEBUG"):
            raise
        _print_error(_escape(describe_os_error(exc)))
        sys.exit(EXIT_IO)
    except KeyboardInterrupt:
        _print_error("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C into exit code 130 without a word
        _print_error("interrupted")
    if isinstance(code, int) and not isinstance(code, bool) and code:
        sys.exit(code)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
