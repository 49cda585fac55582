"""Whether a prompt goes through the tokenizer's chat template.

A chat template on disk does not make a model a chat model: base checkpoints often ship one (the
embedded tiny Mixtral does, and a 400-token run through it printed only newlines, its role tokens
never trained). `run` applies the template by default only where the model says it is a chat
model: its names (the packed checkpoint's source path, config `_name_or_path`, the tokenizer's
`name_or_path`, the directory) carry an instruct/chat marker (Instruct, Chat, -it, SFT, DPO,
RLHF). Otherwise prompts go in raw and one line says so; `--chat-template` forces it either way.
"""

from __future__ import annotations

import re
from pathlib import Path

from d2moe.errors import UsageError

CHAT_MARKERS = re.compile(r"(instruct|chat|[-_.]it(?:$|[-_.])|sft|dpo|rlhf|orpo)", re.IGNORECASE)
BASE_MARKERS = re.compile(r"(?<![a-z])base(?![a-z])", re.IGNORECASE)


def model_names(checkpoint: str | Path, tokenizer=None) -> list[str]:
    """The names a packed checkpoint goes by (source path, config/tokenizer name, directory)."""
    from d2moe.quantize.convert.source import model_dir_name
    from d2moe.quantize.format.manifest import read_json

    path = Path(checkpoint)
    names = [path.resolve().name]
    for file, keys in (("d2moe.json", ("source", "path")), ("config.json", ("_name_or_path",))):
        try:
            value = read_json(path / file)
            for k in keys:
                value = value[k]
            if isinstance(value, str):
                names.append(model_dir_name(value))
        except Exception:  # a damaged file is reported where it is validated, not here
            continue
    name = getattr(tokenizer, "name_or_path", None)
    if isinstance(name, str) and name:
        names.append(model_dir_name(name))
    return [n for n in names if n]


def use_chat_template(requested: bool | None, tokenizer, checkpoint: str | Path) -> tuple[bool, str | None]:
    """(apply it?, a note for the user or None). `requested`: True/False from the flag, None = decide."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if requested and not has:  # asked for, and nothing to apply: refused, like other options that would do nothing
        raise UsageError(f"--chat-template: the tokenizer of {Path(checkpoint).name} has no chat template; leave the "
                         "option out (prompts go in raw) or add a chat_template to its tokenizer_config.json")
    if requested is not None:
        return requested, None
    if not has:
        return False, None
    names = model_names(checkpoint, tokenizer)
    chat = [n for n in names if CHAT_MARKERS.search(n) and not BASE_MARKERS.search(n)]
    if chat:
        return True, None
    return False, (f"{Path(checkpoint).name} has a chat template but does not look like a chat model "
                   f"(no Instruct/Chat in {', '.join(dict.fromkeys(names))}): prompts go in raw; "
                   "pass --chat-template to apply it")
