"""Copy the shared text corpora into d2moe_cli/assets/text/, split into train / held-out.

Each file is split at the first line break after 90% of its characters: the first part is
`<name>.train.txt`, the rest `<name>.heldout.txt` (a user's clone has no ../shared, so the
embedded model's data must live in the repository). Deterministic: same input, same bytes.

Grimm's Fairy Tales (Project Gutenberg eBook 52521) loses its Gutenberg framing lines and the
transcriber's notes; the licence note is kept in assets/text/NOTICE.md.

    .venv/bin/python scripts/prepare_text.py [--src ../shared/data] [--dst d2moe_cli/assets/text]
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("tinyshakespeare", "grimm_tales", "wikitext2_valid")
TRAIN_FRACTION = 0.9


def strip_gutenberg(text: str) -> str:
    """Drop the Project Gutenberg start/end markers, end line and the transcriber's notes."""
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("*** START OF"))
    end = next(i for i, line in enumerate(lines) if line.startswith("*** END OF"))
    body = lines[start + 1 : end]
    for cut_marker in ("Transcriber’s Notes", "End of the Project Gutenberg"):
        hits = [i for i, line in enumerate(body) if line.strip().startswith(cut_marker)]
        if hits:
            body = body[: hits[-1]]
    return "\n".join(body).strip("\n") + "\n"


def split_train_heldout(text: str, fraction: float = TRAIN_FRACTION) -> tuple[str, str]:
    """Split at the first newline at or after `fraction` of the characters (no line is cut)."""
    cut = text.index("\n", int(len(text) * fraction)) + 1
    return text[:cut], text[cut:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=REPO.parent / "shared" / "data", help="folder of the source .txt files")
    parser.add_argument("--dst", type=Path, default=REPO / "d2moe_cli" / "assets" / "text", help="output folder")
    args = parser.parse_args()
    args.dst.mkdir(parents=True, exist_ok=True)
    for name in SOURCES:
        text = (args.src / f"{name}.txt").read_text(encoding="utf-8").replace("\r\n", "\n")
        if name == "grimm_tales":
            text = strip_gutenberg(text)
        train, heldout = split_train_heldout(text)
        (args.dst / f"{name}.train.txt").write_text(train, encoding="utf-8")
        (args.dst / f"{name}.heldout.txt").write_text(heldout, encoding="utf-8")
        print(f"{name}: {len(train):,} train chars, {len(heldout):,} held-out chars")


if __name__ == "__main__":
    main()
