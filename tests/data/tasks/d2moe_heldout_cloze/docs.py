"""Builds the held-out cloze items (lm-eval calls `load(**metadata)` for `custom_dataset`).

Per held-out file, ITEMS_PER_FILE items: a random 24-word context, the true next 8 words and 3
8-word spans from other places of the same file, the answer's position random. Seeded: the same
items every time.
"""

import random
from pathlib import Path

TEXT_DIR = Path(__file__).resolve().parents[4] / "d2moe_cli" / "assets" / "text"
ITEMS_PER_FILE = 100
CONTEXT_WORDS, CHOICE_WORDS, CHOICES = 24, 8, 4


def build_items(text: str, n: int, seed: int) -> list[dict]:
    words = text.split()
    span = CONTEXT_WORDS + CHOICE_WORDS
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        p = rng.randrange(0, len(words) - span)
        gold = " ".join(words[p + CONTEXT_WORDS: p + span])
        choices = [gold]
        while len(choices) < CHOICES:
            q = rng.randrange(0, len(words) - CHOICE_WORDS)
            if abs(q - (p + CONTEXT_WORDS)) < span:
                continue
            candidate = " ".join(words[q: q + CHOICE_WORDS])
            if candidate not in choices:
                choices.append(candidate)
        rng.shuffle(choices)
        items.append({"context": " ".join(words[p: p + CONTEXT_WORDS]), "choices": choices,
                      "answer": choices.index(gold)})
    return items


def load(**_metadata):
    import datasets

    rows = []
    for i, path in enumerate(sorted(TEXT_DIR.glob("*.heldout.txt"))):
        rows += build_items(path.read_text(encoding="utf-8"), ITEMS_PER_FILE, seed=i)
    return {"test": datasets.Dataset.from_list(rows)}
