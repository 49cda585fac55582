"""kill -9 a real pack at chosen moments, `--resume` it, and compare with an uninterrupted pack byte for byte.

One uninterrupted `d2moe pack` gives the reference digests. Then a chain: start `pack`, SIGKILL it
after T1 seconds; `pack --resume`, SIGKILL after T2; ... ; a last `pack --resume` runs to the end.
Checks: every file's sha256 equals the reference, and no temporary folder is left beside OUT.

    .venv/bin/python scripts/pack_resume_check.py /work/scale/olmoe --kills 20,45,70 [--bits 2,3,4]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def digests(d: Path) -> dict[str, str]:
    out = {}
    for p in sorted(d.iterdir()):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        out[p.name] = h.hexdigest()
    return out


def pack_cmd(src: Path, out: Path, bits: str, resume: bool) -> list[str]:
    return [sys.executable, "-m", "d2moe", "pack", str(src), str(out), "--bits", bits, "--json", "--quiet"] + \
        (["--resume"] if resume else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("--kills", default="20,45,70", help="seconds after each start at which to SIGKILL")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--scratch", type=Path, default=None)
    args = ap.parse_args()
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="d2moe-resume-"))
    try:
        ref_out, out = scratch / "reference", scratch / "resumed"
        t0 = time.perf_counter()
        subprocess.run(pack_cmd(args.src, ref_out, args.bits, False), check=True, capture_output=True)
        reference = digests(ref_out)
        full_s = time.perf_counter() - t0
        kills = []
        for i, t in enumerate(float(x) for x in args.kills.split(",")):
            p = subprocess.Popen(pack_cmd(args.src, out, args.bits, i > 0), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
            try:
                p.wait(timeout=t)
                kills.append({"after_s": t, "killed": False, "note": "finished before the kill"})
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait()
                staged = [q.name for q in scratch.glob(".resumed.d2moe-tmp-*")]
                parts = sorted(x.name for q in scratch.glob(".resumed.d2moe-tmp-*") for x in q.iterdir()
                               if x.name.endswith(".done.json"))
                kills.append({"after_s": t, "killed": True, "staging": staged, "finished_parts": parts,
                              "kept_on_resume": [ln for ln in (p.stderr.read() or "").splitlines() if "kept" in ln]})
        t1 = time.perf_counter()
        final = subprocess.run(pack_cmd(args.src, out, args.bits, True), capture_output=True, text=True)
        resume_s = time.perf_counter() - t1
        kept = [ln for ln in final.stderr.splitlines() if "kept" in ln]
        result = {
            "source": str(args.src), "bits": args.bits, "uninterrupted_s": round(full_s, 1),
            "last_resume_s": round(resume_s, 1), "kills": kills, "last_resume_kept": kept,
            "byte_identical": final.returncode == 0 and digests(out) == reference,
            "temporary_folders_left": [q.name for q in scratch.glob(".*d2moe-*")],
        }
        print(json.dumps(result, indent=1))
        if not result["byte_identical"] or result["temporary_folders_left"]:
            sys.exit(1)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
