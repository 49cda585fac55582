"""The embedded model and text (d2moe_cli/assets): loadable, small, trained, and honestly held out."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "d2moe_cli" / "assets"
MODEL_DIR = ASSETS / "tiny-mixtral"
TEXT_DIR = ASSETS / "text"
SOURCES = ("tinyshakespeare", "grimm_tales", "wikitext2_valid")
MAX_BYTES = 15 * 1000 * 1000


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    return model, tokenizer


def test_model_loads_as_a_mixtral_moe_with_group_friendly_dims(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    cfg = model.config
    assert type(model).__name__ == "MixtralForCausalLM"
    assert cfg.num_local_experts == 8 and cfg.num_experts_per_tok == 2
    assert cfg.hidden_size % 64 == 0 and cfg.intermediate_size % 64 == 0
    assert cfg.vocab_size == len(tokenizer)
    experts = model.model.layers[0].mlp.experts
    assert tuple(experts.gate_up_proj.shape) == (8, 2 * cfg.intermediate_size, cfg.hidden_size)
    assert tuple(experts.down_proj.shape) == (8, cfg.hidden_size, cfg.intermediate_size)


def test_weights_are_half_precision_and_fit_the_size_cap():
    from safetensors import safe_open

    files = [p for p in MODEL_DIR.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    assert total <= MAX_BYTES, f"{MODEL_DIR} is {total / 1e6:.2f} MB, over the 15 MB cap"
    weights = sorted(MODEL_DIR.glob("*.safetensors"))
    assert weights, "no safetensors weights in the embedded model"
    with safe_open(str(weights[0]), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes <= {"F16", "BF16"}, dtypes


def test_tokenizer_round_trips_text_and_has_bos_eos_and_a_chat_template(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    text = (TEXT_DIR / "grimm_tales.heldout.txt").read_text(encoding="utf-8")[:2000]
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.eos_token_id is not None and tokenizer.eos_token_id != tokenizer.bos_token_id
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True, tokenize=False)
    assert "Hello" in chat and chat.rstrip().endswith("<|assistant|>")


@pytest.mark.parametrize("name", SOURCES)
def test_heldout_text_does_not_overlap_the_training_text(name):
    train = (TEXT_DIR / f"{name}.train.txt").read_text(encoding="utf-8")
    heldout = (TEXT_DIR / f"{name}.heldout.txt").read_text(encoding="utf-8")
    assert len(heldout) >= 0.08 * (len(train) + len(heldout)), "held-out part should be ~10% of the text"
    # 24 evenly spaced 200-character passages of the held-out file: none appears in the training file
    width = 200
    starts = range(0, len(heldout) - width, max(1, (len(heldout) - width) // 24))
    leaked = [s for s in starts if heldout[s : s + width] in train]
    assert not leaked, f"{name}: held-out passages at offsets {leaked[:5]} also occur in the training text"


@pytest.mark.parametrize("name", SOURCES)
def test_split_files_rebuild_the_shared_source(name):
    source = REPO.parent / "shared" / "data" / f"{name}.txt"
    if not source.is_file():
        pytest.skip("no ../shared/data beside this checkout")
    spec = importlib.util.spec_from_file_location("prepare_text", REPO / "scripts" / "prepare_text.py")
    prepare_text = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare_text)
    text = source.read_text(encoding="utf-8").replace("\r\n", "\n")
    if name == "grimm_tales":
        text = prepare_text.strip_gutenberg(text)
        assert "PROJECT GUTENBERG" not in text
    train = (TEXT_DIR / f"{name}.train.txt").read_text(encoding="utf-8")
    heldout = (TEXT_DIR / f"{name}.heldout.txt").read_text(encoding="utf-8")
    assert train + heldout == text


@torch.no_grad()
def test_heldout_perplexity_is_far_below_a_uniform_guess(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    vocab = model.config.vocab_size
    for name in SOURCES:
        text = (TEXT_DIR / f"{name}.heldout.txt").read_text(encoding="utf-8")[:1200]
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :256]  # [1, S], <s> first
        logits = model(input_ids=ids).logits  # [1, S, V]
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        ppl = math.exp(float(nll))
        # a uniform model scores `vocab`; the trained one must be an order of magnitude better
        assert ppl < vocab / 10, f"{name}: held-out perplexity {ppl:.1f} is not far below uniform ({vocab})"
