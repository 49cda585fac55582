"""Files a user hands a command (prompts, evaluation text): a regular file read whole up to a cap, or `-` for
standard input (a pipe: `cat prompts.jsonl | d2moe run CKPT --prompts-file -`). Any other special file (a FIFO
without a writer, /dev/zero, a directory) is refused without blocking or reading, as a checkpoint's files are
(d2moe.quantize.format.files, issue 11). And files a command will write at its end (a report, a plot), checked
before the work that makes them."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from d2moe.errors import InputError, IOFailure, UsageError

PROMPT_BYTES = 256 * 1024 * 1024  # what --prompt - and --prompts-file read at most


def stdin_once(*options: tuple[str, object]) -> None:
    """UsageError if more than one of these (option, value) pairs reads standard input (value "-"): the first
    would take all of it and the second find nothing."""
    readers = [option for option, value in options if value is not None and str(value) == "-"]
    if len(readers) > 1:
        named = " and ".join(f"{option} -" for option in readers)
        verb = "both read" if len(readers) == 2 else "all read"
        raise UsageError(f"{named} {verb} standard input, which holds one text: pipe one, pass the other as a file")


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


def read_prompt_text(text: str, option: str) -> str:
    """A prompt option's text: itself, or standard input for "-" with the one line ending `echo` adds dropped."""
    if text != "-":
        return text
    read = read_user_text("-", PROMPT_BYTES, option)
    return read[:-2] if read.endswith("\r\n") else read[:-1] if read.endswith("\n") else read


def read_user_text(path: Path | str, cap: int, option: str) -> str:
    """read_user_file decoded as UTF-8, a leading byte-order mark dropped (an editor's "UTF-8 with BOM"); InputError
    naming the first byte that is not UTF-8."""
    try:
        return read_user_file(path, cap, option).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{option} {path} is not UTF-8 text ({exc.reason} at byte {exc.start}): pass a text file") from None


def check_writable(path: Path | str, option: str) -> None:
    """`path` (a file the command writes when its work is done) can be written there: UsageError for a directory,
    IOFailure for a folder that cannot be written in, before the work (a long training or sweep lost its output at
    the end). Nothing is created: a folder still to be made is judged by the nearest one that exists."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path} is a directory: name a file")
    existing = path.parent.absolute()
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise IOFailure(f"{option} {path}: cannot write in {existing} ({exc.strerror}): pick a writable place") from None
