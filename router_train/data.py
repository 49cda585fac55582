"""Calibration text for the gate: local files (txt / jsonl / json / parquet) or a hub dataset, as token blocks.

Texts are joined with newlines, tokenized and cut into blocks of `seq_len` tokens (the tail shorter
than a block is dropped); when the tokenizer has a BOS token every block starts with it, the way
causal LMs see a window in training (and what held-out perplexity scripts use). Loading goes through `datasets`
(`load_dataset("text" | "json" | "parquet", data_files=...)`), so large files stream from its cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from d2moe.errors import InputError
from d2moe.hub import offline_hint, offline_unless_reachable

LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _looks_local(spec: str) -> bool:
    p = Path(spec)
    return p.exists() or p.suffix.lower() in LOCAL_BUILDERS or spec.startswith((".", "/", "~"))


class _datasets_quiet:
    """`datasets`' logger held at CRITICAL and its progress bars off within the block (a local file loads in
    moments; a bar left on the terminal would come before an error's one line)."""

    def __enter__(self) -> None:
        import datasets.utils as ds_utils
        from datasets.utils import logging as ds_logging

        self._logging, self._level = ds_logging, ds_logging.get_verbosity()
        self._utils, self._bars = ds_utils, not ds_utils.are_progress_bars_disabled()
        ds_logging.set_verbosity(ds_logging.CRITICAL)
        ds_utils.disable_progress_bars()

    def __exit__(self, *exc) -> None:
        self._logging.set_verbosity(self._level)
        if self._bars:
            self._utils.enable_progress_bars()


def _first_bad_utf8(path: Path) -> str | None:
    """'not UTF-8 text at byte N' for a text or JSON-lines file that is not UTF-8 (a binary file passed by mistake),
    else None. Read a MiB at a time: the file may be large."""
    import codecs

    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            pending = len(decoder.getstate()[0])  # a character the last read split: decoded with this chunk
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                return f"not UTF-8 text at byte {offset - pending + exc.start}: pass a UTF-8 text file"
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return f"not UTF-8 text: it ends inside a character at byte {offset}"
    return None


def _first_bad_json_line(path: Path) -> str | None:
    """'line N is not JSON (why): ...' for the first line of a JSON-lines file that does not parse, else None."""
    import json

    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as exc:
                    return f'line {number} is not JSON ({exc.msg}): write one {{"text": "..."}} object per line'
    return None


def load_texts(specs: Sequence[str], text_field: str = "text", hub_split: str = "train", option: str = "--data"
               ) -> list[str]:
    """The documents of every `spec` (a local file or a hub dataset name), in order. `option` is the flag that
    passed them, for the error messages (train-router's --data, pack's --calib)."""
    from datasets import load_dataset

    if not specs:
        raise InputError(f"no calibration data: pass {option} FILE (txt, jsonl or parquet) or a hub dataset name")
    texts: list[str] = []
    for spec in specs:
        if _looks_local(spec):
            path = Path(spec).expanduser()
            if path.exists() and not path.is_file():
                raise InputError(f"calibration file {spec} is not a regular file (a directory, FIFO or device): pass "
                                 f"{option} a txt/jsonl/parquet file")
            if not path.is_file():
                raise InputError(f"calibration file {spec} does not exist: pass {option} with an existing txt/jsonl/parquet file")
            if path.stat().st_size == 0:
                raise InputError(f"calibration file {spec} is empty: pass {option} a file that holds text")
            builder = LOCAL_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise InputError(f"calibration file {spec}: unknown type {path.suffix!r}; use .txt, .jsonl or .parquet")
            try:
                with _datasets_quiet():  # its own error line would come before ours
                    ds = load_dataset(builder, data_files=str(path), split="train")
            except Exception as exc:
                textual = builder in ("text", "json")
                why = ((_first_bad_utf8(path) if textual else None)
                       or (_first_bad_json_line(path) if builder == "json" else None)
                       or str(exc).splitlines()[0][:200])
                raise InputError(f"calibration file {spec} could not be read as {builder}: {why}") from None
        else:
            from huggingface_hub.utils import logging as hub_logging

            hub_logging.set_verbosity_error()  # its retry warnings would come before the one error line
            with offline_unless_reachable() as offline:
                try:
                    ds = load_dataset(spec, split=hub_split)
                except Exception as exc:
                    raise InputError(
                        f"calibration dataset {spec!r} could not be loaded from the hub ({offline_hint(offline)}"
                        f"{type(exc).__name__}): pass a local file instead ({option} FILE.txt)"
                    ) from None
        if text_field not in ds.column_names:
            raise InputError(f"calibration data {spec} has no {text_field!r} column (columns: {ds.column_names})")
        texts.extend(t for t in ds[text_field] if isinstance(t, str) and t.strip())
    if not texts:
        raise InputError(f"calibration data {list(specs)} holds no text")
    return texts


def token_blocks(
    texts: Sequence[str], tokenizer, seq_len: int, max_blocks: int | None = None, bos: bool = True,
    data_option: str = "--data", seq_option: str | None = "--seq-len",
) -> torch.Tensor:
    """LongTensor [N, seq_len] of consecutive token blocks over the joined texts (BOS first if `bos`). The options
    that passed the texts and set seq_len (None: fixed) are named in the error when there is too little text."""
    if seq_len < 2:
        raise InputError(f"--seq-len {seq_len} is too short: use at least 2 tokens")
    bos_id = tokenizer.bos_token_id if bos else None
    body = seq_len - (bos_id is not None)
    ids: list[int] = []
    need = None if max_blocks is None else max_blocks * body
    for chunk in _chunks("\n".join(texts), 200_000):
        ids.extend(tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"])  # cut into blocks below: no "longer than" warning
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // body
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        block = f"one block of {seq_option} {seq_len}" if seq_option else f"one sequence of {seq_len} tokens"
        fix = f"add text to {data_option}" + (f" or lower {seq_option}" if seq_option else "")
        raise InputError(f"calibration data gives {len(ids)} token{'' if len(ids) == 1 else 's'}, fewer than {block}: {fix}")
    blocks = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)
    if bos_id is not None:
        blocks = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), blocks], dim=1)
    return blocks


def _chunks(text: str, size: int):
    """Cut text at newlines into pieces of about `size` characters (tokenizers are faster on pieces)."""
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            nl = text.rfind("\n", start, end)
            end = nl + 1 if nl > start else end
        yield text[start:end]
        start = end


def split_blocks(blocks: torch.Tensor, eval_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, eval): the last `eval_blocks` blocks are held out for the before/after report."""
    eval_blocks = max(0, min(eval_blocks, blocks.shape[0] - 1))
    if eval_blocks == 0:
        return blocks, blocks[:0]
    return blocks[:-eval_blocks], blocks[-eval_blocks:]
