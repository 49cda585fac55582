"""One fuzz case against a packed checkpoint: damage one file, run one reader path, classify the outcome.

Used by scripts/fuzz_checkpoint.py (the long campaign) and tests/quantize/test_fuzz_checkpoint.py
(a bounded one in `make test`).

Targets: every file of the checkpoint (d2moe.json, config.json, dense, gate, each experts file,
tokenizer files, chat template). Damage: byte mutations (truncate, bit flips, header flips, random
splices, appended bytes), JSON-aware edits of a random field (huge, negative, zero, wrong type,
null, deleted, added), and replacements by special files (FIFO, links to /dev/zero and
/dev/urandom, a directory, a dangling or looping link, an empty file).

Paths: `load` (the library: open_checkpoint, load_dense, the gate as `run` loads it, every expert's
top-level prefix read and crc-checked), `inspect` (`d2moe inspect --verify --json` in-process) and
`run` (`d2moe run`, 3 tokens, in-process).

Outcomes: `clean` (d2moe's own error / exit code 2-6), `benign` (accepted, and every weight the
path used is identical to the pristine checkpoint's, or `run` printed the pristine tokens),
`crash` (any other exception, exit 1, a traceback), `hang` (over the time limit), `silent`
(accepted with weights or tokens that differ from the pristine ones).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import struct
from pathlib import Path

RUN_ARGS = ["-p", "Once upon a time", "--max-new-tokens", "3", "--no-chat-template", "--json", "-m", "1GiB",
            "--io-threads", "1"]
SPECIAL = ("fifo", "dev_zero", "dev_urandom", "directory", "dangling_link", "link_loop", "empty")
NASTY = [0, -1, 1, 2, 7, 2**31, 2**63, 10**12, 10**400, 1e308, -1e-9, 0.5, "", "x" * 40, None, True, False, [], {},
         [[[[[]]]]], "../../etc/passwd", "\u0000", [1, 2, 3]]


class Hang(Exception):
    pass


def build_fixture(root: Path) -> Path:
    """A tiny Mixtral (2 MoE layers x 4 experts, tokenizer, chat template) packed with a random gate."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import torch
    from tiny_models import make_tiny_checkpoint

    from d2moe.quantize import MWQConfig
    from d2moe.quantize import format as fmt
    from d2moe.quantize.adapters import adapter_for
    from d2moe.quantize.convert.pack import pack_checkpoint
    from d2moe.runtime.gate import BitWidthGate, model_fingerprint, save_gate

    src = make_tiny_checkpoint("mixtral", root / "src")
    pack_checkpoint(src, root / "plain", MWQConfig(), progress=False)
    ckpt = fmt.open_checkpoint(root / "plain")
    adapter = adapter_for(ckpt.config)
    dense = ckpt.load_dense()
    routers = [dense[adapter.router_key(layer)] for layer in ckpt.moe_layers]
    torch.manual_seed(0)
    gate = BitWidthGate(ckpt.config["hidden_size"], ckpt.num_experts, ckpt.moe_layers, (2, 3, 4), (0.3, 0.4, 0.3),
                        proj_dim=8)
    path = save_gate(gate, root / "gate.safetensors", model_fingerprint(ckpt.config, routers))
    pack_checkpoint(src, root / "packed", MWQConfig(), router=path, progress=False)
    shutil.rmtree(root / "plain")
    return root / "packed"


# ---- what each path produces from a checkpoint (compared with the pristine one) ------------------

def load_everything(path: Path) -> dict:
    """Everything `run` would use, read through the library's checks."""
    from d2moe.quantize import format as fmt
    from d2moe.runtime.gate import load_gate
    from d2moe.runtime.session import check_gate_capacity

    ckpt = fmt.open_checkpoint(path)
    out = {f"dense/{k}": v for k, v in ckpt.load_dense().items()}
    if ckpt.gate_path is not None:
        ckpt.verify_file("gate")
        gate = load_gate(ckpt.gate_path, expect_levels=ckpt.cfg.bits)
        check_gate_capacity(gate.meta["capacity"], ckpt.gate_capacity, ckpt.gate_path)
        out.update({f"gate/{k}": v for k, v in gate.state_dict().items()})
    for (layer, expert) in sorted(ckpt.experts):
        data = ckpt.read_prefix(layer, expert, ckpt.cfg.bk)
        ckpt.decode_expert(layer, expert, ckpt.cfg.bk, data, verify=True)
        out[f"expert/{layer}/{expert}"] = data
    out["levels"] = list(ckpt.cfg.bits)
    return out


def same(a: dict, b: dict) -> bool:
    import torch

    if a.keys() != b.keys():
        return False
    for k, x in a.items():
        y = b[k]
        if isinstance(x, torch.Tensor):
            if not isinstance(y, torch.Tensor) or x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def cli(argv: list[str]) -> tuple[int, str, str]:
    from d2moe.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def run_tokens(path: Path) -> list:
    code, out, err = cli(["run", str(path), *RUN_ARGS])
    if code:
        raise CliExit(code, err)
    return [o["text"] for o in json.loads(out)["outputs"]]


class CliExit(Exception):
    def __init__(self, code: int, err: str):
        super().__init__(f"exit {code}: {err.strip()[-300:]}")
        self.code = code


# ---- damage --------------------------------------------------------------------------------------

def _json_edit(raw: bytes, rng: random.Random) -> bytes:
    doc = json.loads(raw)
    parent, key = None, None
    node = doc
    for _ in range(rng.randint(1, 6)):  # walk down to a random field
        if isinstance(node, dict) and node:
            parent, key = node, rng.choice(sorted(node))
        elif isinstance(node, list) and node:
            parent, key = node, rng.randrange(len(node))
        else:
            break
        node = parent[key]
    if parent is None:
        return b"[]"
    action = rng.random()
    if action < 0.1 and isinstance(parent, dict):
        del parent[key]
    elif action < 0.15 and isinstance(parent, dict):
        parent[f"extra_{rng.randrange(99)}"] = rng.choice(NASTY)
    elif action < 0.45 and isinstance(node, (int, float)) and not isinstance(node, bool):
        parent[key] = node + rng.choice([-1, 1, 2**20, -(2**20)]) if isinstance(node, int) else node * rng.choice([0, -1, 10, 1e-9])
    else:
        parent[key] = rng.choice(NASTY)
    return json.dumps(doc).encode()


def _bytes_edit(raw: bytes, name: str, mode: str, rng: random.Random) -> bytes:
    raw = bytearray(raw)
    if not raw:
        return b"x"
    if mode == "truncate":
        return bytes(raw[: rng.randrange(len(raw))])
    if mode == "append":
        return bytes(raw) + bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 4096])))
    if mode == "flip_header" and name.endswith(".safetensors") and len(raw) >= 8:
        end = min(len(raw), 8 + struct.unpack("<Q", bytes(raw[:8]))[0])
        raw[rng.randrange(end)] ^= 1 << rng.randrange(8)
    elif mode == "splice":
        at = rng.randrange(len(raw))
        raw[at: at + 16] = bytes(rng.randrange(256) for _ in range(16))
    else:  # flip
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    return bytes(raw)


def damage(case_dir: Path, pristine: Path, rng: random.Random) -> str:
    """Make `case_dir` a copy of `pristine` (hard links) with one file damaged; return a description."""
    names = sorted(p.name for p in pristine.iterdir())
    case_dir.mkdir()
    for n in names:
        os.link(pristine / n, case_dir / n)
    weights = [n for n in names if n.endswith(".safetensors")]
    jsons = ["d2moe.json", "config.json"]
    r = rng.random()
    target = rng.choice(jsons) if r < 0.3 else rng.choice(weights) if r < 0.85 else rng.choice(names)
    path = case_dir / target
    raw = (pristine / target).read_bytes()
    path.unlink()  # never write through a hard link to the pristine file
    m = rng.random()
    if m < 0.05:
        kind = rng.choice(SPECIAL)
        {"fifo": lambda: os.mkfifo(path), "dev_zero": lambda: path.symlink_to("/dev/zero"),
         "dev_urandom": lambda: path.symlink_to("/dev/urandom"), "directory": lambda: path.mkdir(),
         "dangling_link": lambda: path.symlink_to(case_dir / "nowhere"), "link_loop": lambda: path.symlink_to(path),
         "empty": lambda: path.write_bytes(b"")}[kind]()
        return f"{target}:special:{kind}"
    if target.endswith(".json") and m < 0.55:
        try:
            path.write_bytes(_json_edit(raw, rng))
            return f"{target}:json"
        except ValueError:
            pass
    mode = rng.choice(["truncate", "flip", "flip", "flip_header", "splice", "append"])
    path.write_bytes(_bytes_edit(raw, target, mode, rng))
    return f"{target}:{mode}"


# ---- one case ------------------------------------------------------------------------------------

def _alarm(_sig, _frame):
    raise Hang()


def run_case(index: int, seed: int, pristine: Path, reference: dict, reference_tokens: list, work: Path,
             run_share: float = 0.03, inspect_share: float = 0.05, limit_s: float = 20.0) -> tuple[str, str]:
    """(outcome, detail) of case `index`."""
    from d2moe.errors import D2MoEError

    rng = random.Random(seed * 1_000_003 + index)
    case_dir = work / f"case-{index}"
    what = damage(case_dir, pristine, rng)
    p = rng.random()
    mode = "run" if p < run_share else "inspect" if p < run_share + inspect_share else "load"
    detail = f"{mode} {what}"
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, limit_s * (3 if mode == "run" else 1))
    try:
        if mode == "run":
            tokens = run_tokens(case_dir)
            return ("benign" if tokens == reference_tokens else "silent"), detail
        if mode == "inspect":
            code, _, err = cli(["inspect", str(case_dir), "--verify", "--json"])
            if code:
                raise CliExit(code, err)
        got = load_everything(case_dir)
        return ("benign" if same(got, reference) else "silent"), detail
    except Hang:
        return "hang", detail
    except CliExit as exc:
        return ("clean" if 2 <= exc.code <= 6 else "crash"), f"{detail}: {exc}"
    except D2MoEError:
        return "clean", detail
    except Exception as exc:  # noqa: BLE001  anything else escaping is a bug
        return "crash", f"{detail}: {type(exc).__name__}: {str(exc)[:300]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        shutil.rmtree(case_dir, ignore_errors=True)
