"""kill -9 a real pack at chosen moments, `--resume` it, and compare with an uninterrupted pack byte for byte.

One uninterrupted `d2moe pack` gives the reference digests and its time T. Then one trial per kill
point f: a fresh `pack`, SIGKILL after f*T seconds, what the staging folder holds at that moment,
then `pack --resume` to the end (what it kept, how long it took). Checks: every file's sha256 equals
the reference, and no temporary folder is left beside OUT.

    .venv/bin/python scripts/pack_resume_check.py /work/scale/olmoe --kills 0.3,0.6,0.9 [--bits 2,3,4]
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
    ap.add_argument("--kills", default="0.3,0.6,0.9", help="kill points as fractions of the uninterrupted time")
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
        trials = []
        for f in (float(x) for x in args.kills.split(",")):
            shutil.rmtree(out, ignore_errors=True)
            p = subprocess.Popen(pack_cmd(args.src, out, args.bits, False), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
            try:
                p.wait(timeout=f * full_s)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait()
            trial = {"kill_at_s": round(f * full_s, 1), "killed": p.returncode == -signal.SIGKILL,
                     "finished_parts_at_kill": sorted(x.name[: -len(".done.json")] for q in scratch.glob(".resumed.d2moe-tmp-*")
                                                      for x in q.iterdir() if x.name.endswith(".done.json"))}
            if not out.exists():
                t1 = time.perf_counter()
                r = subprocess.run(pack_cmd(args.src, out, args.bits, True), capture_output=True, text=True)
                trial["resume_s"] = round(time.perf_counter() - t1, 1)
                trial["resume_rc"] = r.returncode
                trial["kept"] = [ln.split("kept ")[1].split(" ")[0] for ln in r.stderr.splitlines() if "kept" in ln]
            trial["byte_identical"] = out.is_dir() and digests(out) == reference
            trial["temporary_folders_left"] = [q.name for q in scratch.glob(".*d2moe-*")]
            trials.append(trial)
        result = {"source": str(args.src), "bits": args.bits, "uninterrupted_s": round(full_s, 1), "trials": trials}
        ok = all(t["byte_identical"] and not t["temporary_folders_left"] for t in trials)
        print(json.dumps(result, indent=1))
        if not ok:
            sys.exit(1)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
