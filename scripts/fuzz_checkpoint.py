"""Fuzz the packed-checkpoint readers: N damaged checkpoints through load / inspect / run.

    .venv/bin/python scripts/fuzz_checkpoint.py 10000 [--seed 0] [--workers 2] [--json out.json]

Packs a tiny Mixtral with a gate once, then runs N cases (scripts/fuzz_cases.py: one file damaged
per case, one reader path, outcome classified). Cases run in worker processes, so a segfault or a
hard hang is recorded against its case (crash / hang) and the worker restarts; each case also has an
in-process time limit. Prints the table (tried / clean error / benign / crash / hang / silent) and
exits 1 unless crash, hang and silent are all 0. Deterministic for a given seed and N.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTCOMES = ("clean", "benign", "crash", "hang", "silent")
WORKER_SILENCE_S = 180.0  # a worker that prints nothing this long is hung (beyond its own alarms)


def worker(args) -> None:
    """Run cases [start, stop) and print one JSON line per case (and one before it starts)."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    import fuzz_cases as fc

    pristine, work = Path(args.pristine), Path(args.work)
    reference = fc.load_everything(pristine)
    tokens = fc.run_tokens(pristine)
    for i in range(args.start, args.stop):
        print(json.dumps({"begin": i}), flush=True)
        outcome, detail = fc.run_case(i, args.seed, pristine, reference, tokens, work, run_share=args.run_share,
                                      inspect_share=args.inspect_share)
        print(json.dumps({"case": i, "outcome": outcome, "detail": detail}), flush=True)


def _spawn(args, start: int, stop: int, pristine: Path, work: Path) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--worker", "--pristine", str(pristine), "--work", str(work), "--seed", str(args.seed),
           "--start", str(start), "--stop", str(stop), "--run-share", str(args.run_share),
           "--inspect-share", str(args.inspect_share)]
    env = {**os.environ, "D2MOE_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)


def campaign(n: int, seed: int = 0, workers: int = 2, run_share: float = 0.1, inspect_share: float = 0.1,
             log=print) -> dict:
    """Run n cases; return {"counts": {...}, "paths": {...}, "failures": [...], "seconds": s}."""
    sys.path.insert(0, str(HERE))
    import fuzz_cases as fc

    from d2moe.progress import quiet_third_party_bars

    quiet_third_party_bars()
    root = Path(tempfile.mkdtemp(prefix="d2moe-fuzz-"))
    pristine = fc.build_fixture(root)
    args = argparse.Namespace(seed=seed, run_share=run_share, inspect_share=inspect_share)
    counts: collections.Counter = collections.Counter()
    paths: collections.Counter = collections.Counter()
    failures: list[dict] = []
    t0 = time.perf_counter()
    chunks = [(i * n // workers, (i + 1) * n // workers) for i in range(workers)]
    live: dict[int, dict] = {}
    for w, (start, stop) in enumerate(chunks):
        if stop > start:
            (root / f"w{w}").mkdir()
            live[w] = {"proc": _spawn(args, start, stop, pristine, root / f"w{w}"), "next": start, "stop": stop,
                       "inflight": None, "seen": time.monotonic()}

    def record(case: int, outcome: str, detail: str) -> None:
        counts[outcome] += 1
        paths[detail.split(" ", 1)[0]] += 1
        if outcome not in ("clean", "benign"):
            failures.append({"case": case, "outcome": outcome, "detail": detail})
            log(f"{outcome}: case {case}: {detail}")
        done = sum(counts.values())
        if done % 500 == 0:
            log(f"{done}/{n} cases, {time.perf_counter() - t0:.0f} s: {dict(counts)}")

    while live:
        fds = {st["proc"].stdout.fileno(): w for w, st in live.items()}
        ready, _, _ = select.select(list(fds), [], [], 5.0)
        for fd in ready:
            w = fds[fd]
            st = live[w]
            line = st["proc"].stdout.readline()
            st["seen"] = time.monotonic()
            if line:
                msg = json.loads(line)
                if "begin" in msg:
                    st["inflight"] = msg["begin"]
                else:
                    st["inflight"], st["next"] = None, msg["case"] + 1
                    record(msg["case"], msg["outcome"], msg["detail"])
                continue
            st["proc"].wait()  # the worker died: the case in flight crashed it
            if st["inflight"] is not None:
                record(st["inflight"], "crash", f"worker died (exit {st['proc'].returncode})")
                st["next"] = st["inflight"] + 1
            _restart(live, w, st, args, pristine, root)
        for w, st in list(live.items()):
            if w in live and time.monotonic() - st["seen"] > WORKER_SILENCE_S:
                st["proc"].kill()
                st["proc"].wait()
                if st["inflight"] is not None:
                    record(st["inflight"], "hang", "worker silent past the limit")
                    st["next"] = st["inflight"] + 1
                _restart(live, w, st, args, pristine, root)
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    return {"counts": {k: counts[k] for k in OUTCOMES}, "paths": dict(paths), "failures": failures,
            "seconds": round(time.perf_counter() - t0, 1), "n": n, "seed": seed}


def _restart(live, w, st, args, pristine, root) -> None:
    if st["next"] >= st["stop"]:
        del live[w]
        return
    st.update(proc=_spawn(args, st["next"], st["stop"], pristine, root / f"w{w}"), inflight=None, seen=time.monotonic())


def table(result: dict) -> str:
    c = result["counts"]
    rows = ["| tried | clean error | benign (accepted, weights/tokens identical) | crash | hang | silent |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {result['n']} | {c['clean']} | {c['benign']} | {c['crash']} | {c['hang']} | {c['silent']} |"]
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int, nargs="?", default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--run-share", type=float, default=0.1, help="fraction of cases through `d2moe run`")
    ap.add_argument("--inspect-share", type=float, default=0.1, help="fraction through `d2moe inspect --verify`")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--pristine", "--work"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--stop", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    result = campaign(args.n, args.seed, args.workers, args.run_share, args.inspect_share)
    result["machine"] = f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}"
    result["command"] = " ".join(["scripts/fuzz_checkpoint.py", *sys.argv[1:]])
    print(table(result))
    print(f"paths: {result['paths']}; {result['seconds']} s; {result['machine']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    bad = sum(result["counts"][k] for k in ("crash", "hang", "silent"))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
