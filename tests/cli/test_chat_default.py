"""Issue 11 item 7: the default run of a base model that ships a chat template gives text, not newlines."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from cli_runner import invoke

from d2moe.runtime.chat import use_chat_template

ASSET = Path(__file__).parents[2] / "d2moe_cli" / "assets" / "tiny-mixtral"


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from d2moe.quantize import MWQConfig
    from d2moe.quantize.convert.pack import pack_checkpoint

    out = tmp_path_factory.mktemp("chat") / "packed"
    pack_checkpoint(ASSET, out, MWQConfig(), progress=False)
    return out


def _run(capsys, *argv):
    return invoke(capsys, "run", *argv)


def test_default_run_of_the_embedded_base_model_gives_text(packed, capsys):
    code, out, err = _run(capsys, packed, "-p", "Once upon a time", "--max-new-tokens", 60, "--json")
    assert code == 0
    text = json.loads(out)["outputs"][0]["text"]
    assert sum(c.isalpha() for c in text) >= 40, repr(text)  # the template gave only "\n\n\n…"
    assert "does not look like a chat model" in err and "--chat-template" in err
    code, out, err = _run(capsys, packed, "-p", "Once upon a time", "--max-new-tokens", 4, "--chat-template", "--json")
    assert code == 0 and "chat model" not in err  # asked for: applied, no note


@pytest.mark.parametrize("names, template, requested, applied", [
    (["Mixtral-8x7B-Instruct-v0.1"], "t", None, True),
    (["Qwen1.5-MoE-A2.7B-Chat"], "t", None, True),
    (["gemma-2-9b-it"], "t", None, True),
    (["Mixtral-8x7B-v0.1"], "t", None, False),
    (["Qwen3-30B-A3B-Base"], "t", None, False),
    (["OLMoE-1B-7B-0924-Instruct"], None, None, False),  # no template: nothing to apply
    (["Mixtral-8x7B-v0.1"], "t", True, True),  # the flag forces it
    (["Mixtral-8x7B-Instruct-v0.1"], "t", False, False),
])
def test_chat_template_decision(tmp_path, monkeypatch, names, template, requested, applied):
    import d2moe.runtime.chat as chat

    monkeypatch.setattr(chat, "model_names", lambda checkpoint, tokenizer=None: names)
    use, _ = use_chat_template(requested, SimpleNamespace(chat_template=template, name_or_path=""), tmp_path)
    assert use is applied


def test_forcing_a_chat_template_the_tokenizer_lacks_is_refused(tmp_path):
    """Audit: `--chat-template` without a template ran with a note, the forced option silently not honoured."""
    from d2moe.errors import UsageError

    with pytest.raises(UsageError, match="has no chat template; leave the option out"):
        use_chat_template(True, SimpleNamespace(chat_template=None, name_or_path=""), tmp_path)
    assert use_chat_template(False, SimpleNamespace(chat_template=None, name_or_path=""), tmp_path) == (False, None)


def test_a_hugging_face_cache_snapshot_goes_by_its_models_name(tmp_path):
    """Packed from ~/.cache/huggingface/hub, the source folder is a commit hash: the name is the folder above."""
    from tiny_models import make_tiny_checkpoint

    from d2moe.quantize import MWQConfig
    from d2moe.quantize.convert.pack import pack_checkpoint
    from d2moe.runtime.chat import model_names

    snapshot = make_tiny_checkpoint("mixtral", tmp_path / "models--me--Tiny-MoE-Instruct" / "snapshots" / "abc123")
    pack_checkpoint(snapshot, tmp_path / "packed", MWQConfig(bits=(2, 4)), progress=False)
    assert json.loads((tmp_path / "packed" / "d2moe.json").read_text())["source"]["path"] == "Tiny-MoE-Instruct"
    names = model_names(tmp_path / "packed", SimpleNamespace(name_or_path=str(snapshot)))
    assert "Tiny-MoE-Instruct" in names and "abc123" not in names
