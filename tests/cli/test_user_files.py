"""Files a user hands a command: regular files and standard input read whole up to a cap; every other case one
InputError naming the option, without blocking."""

import io
import os

import pytest

from d2moe.errors import InputError, UsageError
from d2moe.user_files import read_prompt_text, read_user_file, read_user_text, stdin_once


def test_special_files_are_refused_without_blocking_or_reading(tmp_path):
    os.mkfifo(tmp_path / "fifo")  # no writer: opening it for reading would wait forever
    for path in (tmp_path / "fifo", "/dev/zero"):
        with pytest.raises(InputError, match="not a regular file: pass a file, or - to read standard input"):
            read_user_file(path, 1 << 30, "--prompts-file")


def test_dash_reads_standard_input(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"text through a pipe")))
    assert read_user_text("-", 1024, "--text") == "text through a pipe"


@pytest.mark.parametrize("make, match", [
    (lambda d: d / "missing.txt", "--text .*missing.txt does not exist"),
    (lambda d: d, "is a directory, not a regular file"),
    (lambda d: (d / "big.txt", (d / "big.txt").write_bytes(b"x" * 11))[0], "more than 10 bytes"),
    (lambda d: (d / "bin.txt", (d / "bin.txt").write_bytes(b"\xff\xfe\x00"))[0], "not UTF-8"),
])
def test_every_other_case_names_the_option(tmp_path, make, match):
    with pytest.raises(InputError, match=match):
        read_user_text(make(tmp_path), 10, "--text")


def test_regular_files_are_read_whole(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"0123456789")
    assert read_user_file(tmp_path / "a.txt", 10, "--text") == b"0123456789"


def test_closed_standard_input_is_one_error(monkeypatch):
    monkeypatch.setattr("sys.stdin", None)  # `<&-`: Python sets it to None
    with pytest.raises(InputError, match="standard input is closed"):
        read_user_text("-", 10, "--prompt")


def test_standard_input_serves_one_option():
    stdin_once(("--prompt", "-"), ("--prompts-file", None), ("--quality-text", "q.txt"))
    with pytest.raises(UsageError, match="--prompt - and --prompts-file - both read standard input"):
        stdin_once(("--prompt", "-"), ("--prompts-file", "-"))
    with pytest.raises(UsageError, match="--text - and --text - both"):
        stdin_once(("--text", "-"), ("--text", "a.txt"), ("--text", "-"))


@pytest.mark.parametrize("piped, prompt", [
    (b"Hello there\n", "Hello there"),  # the line ending echo adds
    (b"Hello there\r\n", "Hello there"),
    (b"two lines\n\n", "two lines\n"),  # only the last one: a blank line the user typed stays
    (b"no ending", "no ending"),
])
def test_a_piped_prompt_loses_only_its_last_line_ending(monkeypatch, piped, prompt):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(piped)))
    assert read_prompt_text("-", "--prompt") == prompt
    assert read_prompt_text("as typed\n", "--prompt") == "as typed\n"
