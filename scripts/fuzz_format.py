"""Long fuzz run of the packed-checkpoint reader (the test suite runs a bounded one).

Packs a tiny Mixtral, then damages one file per run (truncation, bit flips, header flips, random
splices) and opens it with verify=True, decoding every expert at every level. The only acceptable
outcomes: a FormatError, or success where the damage cannot reach the weights.

    .venv/bin/python scripts/fuzz_format.py --runs 5000
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "runtime")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    import test_format_corrupt as cases
    from tiny_models import make_tiny_checkpoint

    from d2moe.quantize import MWQConfig
    from d2moe.quantize.convert.pack import pack_checkpoint

    work = Path(tempfile.mkdtemp(prefix="d2moe-fuzz-"))
    src = make_tiny_checkpoint("mixtral", work / "src")
    packed = work / "packed"
    pack_checkpoint(src, packed, MWQConfig(), progress=False)
    one_run = cases.test_fuzz_damage_gives_format_error_or_success.hypothesis.inner_test
    rng, t0 = random.Random(args.seed), time.perf_counter()
    outcomes: collections.Counter = collections.Counter()
    for _ in range(args.runs):
        target, mode = rng.choice(cases.FUZZ_FILES), rng.choice(["truncate", "flip", "flip_header", "splice"])
        try:
            one_run(packed, target, mode, rng.randrange(2**32))
            outcomes["ok"] += 1
        except AssertionError as exc:
            outcomes["UNNOTICED"] += 1
            print(f"unnoticed damage: {target} {mode}: {exc}")
        except Exception as exc:  # anything but FormatError escaping is a reader bug
            outcomes["CRASH"] += 1
            print(f"crash: {target} {mode}: {type(exc).__name__}: {exc}")
    print(f"{args.runs} runs in {time.perf_counter() - t0:.0f} s: {dict(outcomes)}")
    sys.exit(1 if outcomes["UNNOTICED"] or outcomes["CRASH"] else 0)


if __name__ == "__main__":
    main()
