"""Opening a checkpoint's files as untrusted input: regular files only, reads with a hard byte cap.

A forged checkpoint can hold a FIFO (open() blocks forever), a link to /dev/zero or /dev/urandom
(st_size is 0, reading never ends), a directory or a socket where a file should be. Every file
d2moe reads from a checkpoint is opened here with O_NONBLOCK (a FIFO opens at once), checked with
fstat on the open descriptor (no race between the check and the read), and read with a cap that
does not trust st_size.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from d2moe.errors import FormatError

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


class NotRegularFile(Exception):
    """The path is `kind` (file_kind's words), not a regular file."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def open_regular_fd(path: Path | str) -> int:
    """A blocking O_RDONLY descriptor of `path` if it is (or links to) a regular file. Opened with O_NONBLOCK and
    checked with fstat first, so a FIFO without a writer is refused rather than waited on. Raises
    FileNotFoundError, NotRegularFile or another OSError; callers word them (open_regular for a checkpoint's
    files, d2moe.user_files for a user's)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegularFile(file_kind(mode))
    os.set_blocking(fd, True)
    return fd


def open_regular(path: Path, what: str | None = None) -> int:
    """An O_RDONLY descriptor of `path` if it is (or links to) a regular file; FormatError otherwise."""
    what = what or str(path)
    try:
        return open_regular_fd(path)
    except FileNotFoundError:
        raise FormatError(f"{what}: file is missing (re-pack the checkpoint)") from None
    except NotRegularFile as exc:
        raise FormatError(f"{what}: is {exc.kind}, not a regular file (forged or broken checkpoint: re-pack)") from None
    except OSError as exc:
        raise FormatError(f"{what}: cannot be read ({exc.strerror})") from None


def check_regular(path: Path, cap: int, what: str | None = None) -> int:
    """The size of regular file `path` (FormatError if it is anything else or larger than `cap`)."""
    what = what or str(path)
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if size > cap:
        raise FormatError(f"{what}: {size} bytes exceeds the {cap}-byte cap (corrupt or foreign file)")
    return size


def read_capped(path: Path, cap: int, what: str | None = None) -> bytes:
    """All bytes of regular file `path`, FormatError if there are more than `cap` (st_size is not trusted)."""
    what = what or str(path)
    fd = open_regular(path, what)
    try:
        chunks, total = [], 0
        while True:
            try:
                chunk = os.read(fd, min(1 << 22, cap + 1 - total))
            except OSError as exc:
                raise FormatError(f"{what}: cannot be read ({exc.strerror})") from None
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > cap:
                raise FormatError(f"{what}: more than the {cap}-byte cap (corrupt or foreign file)")
    finally:
        os.close(fd)
    return b"".join(chunks)
