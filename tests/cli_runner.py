"""The d2moe CLI run in-process for tests: exit code, stdout and stderr of one command line."""

from __future__ import annotations

from d2moe.cli import main


def invoke(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `d2moe ARGV...`; a SystemExit without a code is 0, a non-integer one 1."""
    try:
        main([*map(str, argv)])
        code = 0
    except SystemExit as exc:
        code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err
