"""The temporary folder a pack writes into, and what survives an interruption.

A pack writes `.OUT.d2moe-tmp-PID` beside OUT and renames it into place at the end. Each finished
part (dense.safetensors, one experts file per layer) is written as `NAME.part`, fsynced, renamed, and
followed by `NAME.done.json`: its manifest entries and the crc32s that prove it whole. A part is
either done or absent, whatever instant the process dies at (kill -9 included).

On the next pack of the same OUT, folders left by dead processes are removed (and said so), or with
`--resume` the newest one packed with the same inputs and options is adopted: each done part is
verified against its crc32s and kept; the rest is redone. Output is byte-identical to an uninterrupted
run because every part is a deterministic function of the inputs (the `key`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from d2moe.errors import UsageError
from d2moe.quantize.format.crc import crc32
from d2moe.quantize.format.writer import file_crc32

STATE_NAME = "pack-state.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _say(msg: str) -> None:
    print(f"pack: {msg}", file=sys.stderr, flush=True)


class Staging:
    """The temporary folder of one pack into `out`; `fields` are the inputs and options it is a function of (pack's
    key fields), `key` their hash."""

    def __init__(self, out: Path, fields: dict, resume: bool):
        key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
        self.out, self.key = out, key
        self.path = out.parent / f".{out.name}.d2moe-tmp-{os.getpid()}"
        self.adopted = False
        prefix = f".{out.name}.d2moe-tmp-"
        stale = []
        for p in sorted(out.parent.glob(prefix + "*")):
            pid_text = p.name[len(prefix):]
            if not pid_text.isdigit() or not p.is_dir() or p.is_symlink() or p == self.path:
                continue
            if _pid_alive(int(pid_text)):
                raise UsageError(f"another pack (PID {pid_text}) is writing {out} right now: wait for it or stop it")
            stale.append(p)
        keep = self._pick(stale) if resume else None
        if resume and keep is None and stale:
            _refuse_other_options(stale, fields)
        for p in stale:
            if p != keep:
                size = _dir_bytes(p)
                shutil.rmtree(p, ignore_errors=True)
                _say(f"removed {p.name} ({size / 2**20:.1f} MiB) left by an interrupted pack"
                     + ("" if resume else " (pass --resume to continue one instead)"))
        shutil.rmtree(self.path, ignore_errors=True)
        if keep is not None:
            keep.rename(self.path)
            self.adopted = True
        else:
            if resume:
                _say("--resume: no interrupted pack of these inputs and options to continue; starting afresh")
            self.path.mkdir(parents=True)
        _write_atomic(self.path / STATE_NAME, json.dumps({"key": key, "fields": fields}).encode())

    def _pick(self, stale: list[Path]) -> Path | None:
        """The newest stale folder whose state names the same key."""
        for p in sorted(stale, key=lambda p: p.stat().st_mtime, reverse=True):
            try:
                state = json.loads((p / STATE_NAME).read_bytes())
            except (OSError, ValueError):
                continue
            if isinstance(state, dict) and state.get("key") == self.key:
                return p
        return None

    def done(self, name: str, verify) -> dict | None:
        """The recorded entry of part `name` if it was finished and `verify(path, record)` confirms it; else
        None (and whatever is left of it is removed)."""
        part, record_path = self.path / name, self.path / f"{name}.done.json"
        if not self.adopted:
            return None
        record = None
        try:
            record = json.loads(record_path.read_bytes())
            if not (isinstance(record, dict) and record.get("key") == self.key and verify(part, record)):
                record = None
        except (OSError, ValueError, KeyError, TypeError):
            record = None
        if record is None:
            for p in (part, record_path, self.path / f"{name}.part"):
                p.unlink(missing_ok=True)
            return None
        _say(f"--resume: kept {name} (crc32 verified)")
        return record

    def part_path(self, name: str) -> Path:
        return self.path / f"{name}.part"

    def finish(self, name: str, record: dict) -> None:
        """Make part `name` durable: fsync its .part, rename it, then write its record."""
        part = self.part_path(name)
        with open(part, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(part, self.path / name)
        _write_atomic(self.path / f"{name}.done.json", json.dumps({**record, "key": self.key}, sort_keys=True).encode())

    def clean_records(self) -> None:
        """Drop the bookkeeping before the folder becomes the checkpoint."""
        for p in self.path.glob("*.done.json"):
            p.unlink()
        (self.path / STATE_NAME).unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# what a changed key field means to the user (pack._key_fields)
_FIELD_OPTIONS = {"source": "the source checkpoint's files", "bits": "--bits", "group": "--group-size",
                  "scheme": "--scheme", "dtype": "--dtype", "router": "the --router gate", "refits": "--refits",
                  "calib": "--calib or --calib-tokens", "fitter": "--similarity or --weighting",
                  "format": "d2moe's checkpoint format version"}


def _refuse_other_options(stale: list[Path], fields: dict) -> None:
    """--resume found interrupted packs of OUT, none of these inputs and options: say what differs rather than
    remove hours of work (without --resume they are removed, and said so)."""
    newest = max(stale, key=lambda p: p.stat().st_mtime)
    try:
        theirs = json.loads((newest / STATE_NAME).read_bytes()).get("fields")
    except (OSError, ValueError, AttributeError):
        theirs = None
    differ = [] if not isinstance(theirs, dict) else \
        [_FIELD_OPTIONS.get(k, k) for k in sorted(fields) if theirs.get(k) != fields[k]]
    what = f"other {', '.join(differ)}" if differ else "other inputs or options"
    raise UsageError(f"--resume: the interrupted pack in {newest.name} was made with {what}; rerun with the "
                     "options it was started with to continue it, or drop --resume to start afresh (which removes it)")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def verify_experts_file(path: Path, record: dict) -> bool:
    """Every blob segment of a finished experts file matches the crc32s in its record."""
    entries = record["entries"]
    with open(path, "rb") as f:
        for e in entries:
            f.seek(e["offset"])
            start = 0
            for end, crc in zip(e["level_ends"], e["crc32"], strict=True):
                if crc32(f.read(end - start)) != crc:
                    return False
                start = end
    return path.stat().st_size == record["size"]


def verify_whole_file(path: Path, record: dict) -> bool:
    entry = record["entry"]
    return path.stat().st_size == entry["nbytes"] and file_crc32(path) == entry["crc32"]
