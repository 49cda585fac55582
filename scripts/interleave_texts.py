"""Interleave text files in fixed-size blocks: calibration text drawn from every domain, not only the first file's.

    .venv/bin/python scripts/interleave_texts.py d2moe_cli/assets/text/*.train.txt --out train_mix.txt

Round robin over the files, BLOCK characters from each in turn, until every file is used up (BENCHMARKS.md §6.7's
calibration text for both d2moe `--calib` and llama-imatrix).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def interleave(texts: list[str], block: int) -> str:
    parts = []
    for start in range(0, max(map(len, texts)), block):
        parts += [t[start:start + block] for t in texts if start < len(t)]
    return "".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--block", type=int, default=3000, help="characters taken from each file in turn")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    a.out.write_text(interleave([f.read_text() for f in sorted(a.files)], a.block))


if __name__ == "__main__":
    main()
