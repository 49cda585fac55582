"""The tokenizer a packed checkpoint carries, and prompts turned into token ids with it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from d2moe.errors import InputError, UsageError


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a packed checkpoint directory; InputError when there is none."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"checkpoint {path} does not exist: make one with `d2moe pack SRC {path}`")
    try:
        with _utf8_name(path) as name:
            tokenizer = AutoTokenizer.from_pretrained(name)
        tokenizer.name_or_path = str(path)  # the folder's own name, not /proc's
    except Exception as exc:  # transformers raises many kinds for a missing/odd tokenizer
        from d2moe.quantize.format import open_checkpoint

        open_checkpoint(path)  # it reads config.json too: a damaged checkpoint is named as such, not as a tokenizer
        raise InputError(f"{path} has no usable tokenizer ({type(exc).__name__}): copy the source model's "
                         "tokenizer files into it or re-run `d2moe pack`") from None
    # Nothing truncates; run and eval note a text past the model's context themselves (generate.context_length),
    # so the tokenizer's own "sequence length is longer" warning would only repeat it, in transformers' words.
    tokenizer.model_max_length = 1 << 62
    return tokenizer


@contextmanager
def _utf8_name(path: Path):
    """A name of folder `path` that is UTF-8: the tokenizers library takes only such paths, and a folder whose name
    holds other bytes (a Latin-1 name, say) is named by its open descriptor under /proc instead (Linux)."""
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        if not os.path.isdir("/proc/self/fd"):
            raise
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    yield name


def encode_prompts(tokenizer, prompts: Sequence[str], chat_template: bool = True) -> list[list[int]]:
    """Token ids of each prompt, through the chat template when asked and the tokenizer has one."""
    out = []
    for p in prompts:
        try:
            if chat_template and getattr(tokenizer, "chat_template", None):
                text = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                     add_generation_prompt=True)
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                ids = tokenizer(p)["input_ids"]
        except Exception as exc:  # damaged tokenizer files fail here, in transformers, in many ways
            raise InputError(f"the tokenizer cannot encode the prompt ({type(exc).__name__}: {str(exc)[:120]}): "
                             "restore the source model's tokenizer files") from None
        if not ids:
            raise UsageError(f"prompt {p[:40]!r} encodes to no tokens")
        out.append(list(ids))
    return out
