"""Files a user hands a command (prompts, evaluation text): regular files, and pipes too (`-` or /dev/stdin,
`<(...)`), read whole up to a cap. A checkpoint's files are another matter: d2moe.quantize.format.files reads
those as regular files only, because a FIFO there is a forged or broken checkpoint."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from d2moe.errors import InputError


def read_user_file(path: Path | str, cap: int, option: str) -> bytes:
    """The bytes of `path` ("-": standard input), InputError naming `option` if it is missing, a directory,
    unreadable or over `cap` bytes."""
    if str(path) == "-":
        data = sys.stdin.buffer.read(cap + 1)
    else:
        path = Path(path)
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise InputError(f"{option} {path} does not exist: pass a readable file (or - for standard input)") from None
        except OSError as exc:
            raise InputError(f"{option} {path} cannot be read ({exc.strerror})") from None
        if stat.S_ISDIR(mode):
            raise InputError(f"{option} {path} is a directory: pass a file (or - for standard input)")
        try:
            with open(path, "rb") as f:
                data = f.read(cap + 1)
        except OSError as exc:
            raise InputError(f"{option} {path} cannot be read ({exc.strerror})") from None
    if len(data) > cap:
        raise InputError(f"{option} {path} holds more than {cap} bytes: pass a smaller file")
    return data


def read_user_text(path: Path | str, cap: int, option: str) -> str:
    """read_user_file decoded as UTF-8 (InputError if it is not)."""
    try:
        return read_user_file(path, cap, option).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{option} {path} is not UTF-8 text ({exc.reason})") from None
