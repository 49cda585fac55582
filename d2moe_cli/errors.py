"""The one exception family of d2moe, and the CLI's exit codes.

Every message names the thing that is wrong (file, tensor, expert, option) and how to fix it.
The CLI prints it as one red line and exits with the class's `exit_code`, one code per kind of
failure, so a script can tell them apart:

| code | meaning | raised as |
|---|---|---|
| 0 | success | |
| 1 | internal error (a d2moe bug: a traceback) | any other exception |
| 2 | usage: an option value that cannot be used, a budget below the minimum | `UsageError`, `BudgetError`, typer/click usage errors |
| 3 | bad input: a missing or unusable input (path, prompts, tokenizer, unsupported model, mismatched gate) | `InputError` and subclasses |
| 4 | corrupt file: a packed checkpoint or gate file that is truncated, damaged, forged or of another version | `FormatError` |
| 5 | I/O: the operating system refused a read or write (permissions, disk full, a read-only or pseudo file system) | `IOFailure` (and any `OSError` that reaches the CLI) |
| 6 | environment: an optional dependency is missing | `DependencyError` |
| 130 | interrupted (Ctrl-C) | |
"""

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_CORRUPT = 4
EXIT_IO = 5
EXIT_ENVIRONMENT = 6
EXIT_INTERRUPTED = 130


class D2MoEError(Exception):
    """Base class: anything d2moe reports to a user."""

    exit_code = EXIT_INTERNAL


class UsageError(D2MoEError):
    """An option value that cannot be used (bad size string, bad bit list, conflicting flags)."""

    exit_code = EXIT_USAGE


class InputError(D2MoEError):
    """A missing or unreadable input: path, prompts file, calibration data."""

    exit_code = EXIT_INPUT


class UnsupportedModelError(InputError):
    """A source checkpoint whose architecture has no adapter."""


class FormatError(D2MoEError):
    """A packed checkpoint (or gate file) that is foreign, truncated, corrupted or of another version."""

    exit_code = EXIT_CORRUPT


class GateMismatchError(InputError):
    """A bit-width gate trained for another model, other levels or other capacities."""


class BudgetError(D2MoEError):
    """A memory budget below the minimum the model needs to run at all.

    `minimum` (bytes), where the raiser knows it, ends the message with the remedy "use --memory-budget N MiB or
    more"; `remedy` rephrases it for how the user gave the budget (an environment variable, a percentage).
    """

    exit_code = EXIT_USAGE

    def __init__(self, problem: str, minimum: int | None = None) -> None:
        super().__init__(problem)
        self.problem, self.minimum = problem, minimum
        self.remedy = None if minimum is None else f"use --memory-budget {min_mib(minimum)}MiB or more"

    def __str__(self) -> str:
        return self.problem if self.remedy is None else f"{self.problem}; {self.remedy}"


def min_mib(nbytes: int) -> int:
    """Whole MiB, rounded up: a budget of that many MiB holds `nbytes`."""
    return -(-int(nbytes) // 2**20)


class IOFailure(D2MoEError):
    """The operating system refused a read or a write (permission, disk full, not a writable place)."""

    exit_code = EXIT_IO


class DependencyError(D2MoEError):
    """An optional dependency (cupy, lm-eval, matplotlib) is missing."""

    exit_code = EXIT_ENVIRONMENT


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError: the path(s) it names and what the OS said."""
    what = exc.strerror or type(exc).__name__
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    return f"{paths}: {what} (I/O error)" if paths else f"{what} (I/O error)"
