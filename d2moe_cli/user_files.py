"""Files a user hands a command (prompts, evaluation text): a regular file read whole up to a cap, or `-` for
standard input (a pipe: `cat prompts.jsonl | d2moe run CKPT --prompts-file -`). Any other special file (a FIFO
without a writer, /dev/zero, a directory) is refused without blocking or reading, as a checkpoint's files are
(d2moe.quantize.format.files, issue 11)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from d2moe.errors import InputError


def read_user_file(path: Path | str, cap: int, option: str) -> bytes:
    """The bytes of `path` ("-": standard input), InputError naming `option` if it is missing, not a regular file,
    unreadable or over `cap` bytes."""
    if str(path) == "-":
        if sys.stdin is None:  # closed (`<&-`), as under some daemons and cron
            raise InputError(f"{option} -: standard input is closed: pipe the text in, or pass a file")
        data = sys.stdin.buffer.read(cap + 1)
    else:
        from d2moe.quantize.format.files import NotRegularFile, open_regular_fd

        try:
            fd = open_regular_fd(path)
        except FileNotFoundError:
            raise InputError(f"{option} {path} does not exist: pass a readable file (or - for standard input)") from None
        except NotRegularFile as exc:
            raise InputError(f"{option} {path} is {exc.kind}, not a regular file: pass a file, or - to read "
                             "standard input") from None
        except OSError as exc:
            raise InputError(f"{option} {path} cannot be read ({exc.strerror})") from None
        with os.fdopen(fd, "rb") as f:
            try:
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
