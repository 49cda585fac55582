"""A source whose config.json does not describe its weights is refused before pack does any work, naming the file."""

from __future__ import annotations

import json

import pytest
from tiny_models import make_tiny_checkpoint

from d2moe.errors import InputError
from d2moe.quantize import MWQConfig
from d2moe.quantize.convert.pack import pack_checkpoint
from d2moe.runtime.budget import kv_bytes_per_token, with_defaults


def _without(src, *fields):
    path = src / "config.json"
    config = json.loads(path.read_text())
    for f in fields:
        config.pop(f)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("field, message", [
    ("vocab_size", "weight is [256, 64], config.json implies [32000, 64]"),  # 32000: transformers' default
    ("num_local_experts", "expert 4 matrix gate is missing (config.json implies 8 experts in each of 2 MoE layers"),
    ("hidden_size", "config.json implies"),
])
def test_a_config_that_lost_a_field_is_refused_before_any_work(tmp_path, field, message):
    src = make_tiny_checkpoint("mixtral", tmp_path / "src")
    _without(src, field)
    with pytest.raises(InputError, match="config.json") as err:
        pack_checkpoint(src, tmp_path / "out", MWQConfig(), progress=False)
    assert message in str(err.value) and str(src) in str(err.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_an_untied_model_whose_config_lost_the_flag_misses_its_lm_head(tmp_path):
    src = make_tiny_checkpoint("mixtral", tmp_path / "src", tie_word_embeddings=True)
    _without(src, "tie_word_embeddings")  # Mixtral's default is untied: the model would need lm_head.weight
    with pytest.raises(InputError, match="needs lm_head.weight, which the checkpoint lacks"):
        pack_checkpoint(src, tmp_path / "out", MWQConfig(), progress=False)


def test_fields_save_pretrained_leaves_out_are_the_architecture_defaults():
    """save_pretrained writes only the fields that differ from the defaults: sizing must not require them."""
    config = {"model_type": "mixtral", "hidden_size": 4096, "num_hidden_layers": 2, "num_key_value_heads": 8}
    filled = with_defaults(config)
    assert filled["num_attention_heads"] == 32 and filled["hidden_size"] == 4096
    assert kv_bytes_per_token(filled) == 2 * 2 * 8 * 128 * 2
    assert with_defaults({"model_type": "gpt2"}) == {"model_type": "gpt2"}  # not ours to fill


def test_a_source_without_a_tokenizer_packs_with_a_note_saying_what_run_needs(tmp_path, capsys):
    src = make_tiny_checkpoint("mixtral", tmp_path / "src")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).unlink(missing_ok=True)
    capsys.readouterr()
    pack_checkpoint(src, tmp_path / "out", MWQConfig(), progress=False)
    err = capsys.readouterr().err
    assert f"pack: note: {src} has no tokenizer" in err and "run and eval need one" in err
    pack_checkpoint(make_tiny_checkpoint("mixtral", tmp_path / "src2"), tmp_path / "out2", MWQConfig(), progress=False)
    assert "no tokenizer" not in capsys.readouterr().err


@pytest.mark.parametrize("top_k", [0, 5])
def test_a_top_k_beyond_the_experts_is_refused_before_any_work(tmp_path, top_k):
    """Audit: it surfaced after the whole pack, exit 4, naming config.json inside the removed staging folder."""
    src = make_tiny_checkpoint("mixtral", tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": top_k}))
    with pytest.raises(InputError, match=rf"{src}/config.json: num_experts_per_tok {top_k} must be an integer in 1..4"):
        pack_checkpoint(src, tmp_path / "out", MWQConfig(), progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_a_dangling_link_is_named_as_a_download_cut_short(tmp_path):
    src = make_tiny_checkpoint("mixtral", tmp_path / "src")
    (src / "model.safetensors").unlink()
    (src / "model.safetensors").symlink_to("../blobs/absent")
    with pytest.raises(InputError, match=r"model.safetensors is a link to ../blobs/absent, which does not exist: finish"):
        pack_checkpoint(src, tmp_path / "out", MWQConfig(), progress=False)


def test_names_without_the_model_prefix_are_named_as_such(tmp_path):
    from safetensors.torch import load_file, save_file

    from d2moe.errors import UnsupportedModelError

    src = make_tiny_checkpoint("mixtral", tmp_path / "src")
    state = load_file(src / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in state.items()}, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match="lacks the 'model.' prefix of a MixtralForCausalLM checkpoint"):
        pack_checkpoint(src, tmp_path / "out", MWQConfig(), progress=False)
