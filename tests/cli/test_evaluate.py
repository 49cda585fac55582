"""Perplexity windows, hand-checked NLL, and the lm-eval adapter on a local multiple-choice task."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.apps import evaluate
from d2moe.apps.evaluate import (
    encode_text,
    lm_eval_available,
    model_logits_fn,
    perplexity,
    score_continuation,
    sliding_windows,
    zero_shot,
)
from d2moe.errors import DependencyError, InputError, UsageError

DATA = Path(__file__).parents[1] / "data"
TASKS = DATA / "tasks"


@pytest.fixture(scope="module")
def reference(tiny_mixtral):
    """The tiny Mixtral as transformers builds it, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral).eval()
    return model, AutoTokenizer.from_pretrained(tiny_mixtral)


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 256, (n,), generator=torch.Generator().manual_seed(seed))


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 300), seq_len=st.integers(2, 64), data=st.data())
def test_windows_score_every_token_but_the_first_once(n, seq_len, data):
    stride = data.draw(st.integers(1, seq_len))
    windows = sliding_windows(n, seq_len, stride)
    scored = [t for w in windows for t in range(w.score_from, w.end)]
    assert scored == list(range(1, n))
    for w in windows:
        assert w.end - w.begin <= seq_len and w.begin < w.score_from <= w.end
        # every scored token sees at least seq_len - stride tokens of context (or all there is)
        assert w.score_from - w.begin >= min(seq_len - stride, w.score_from)


def test_window_options_are_checked():
    with pytest.raises(UsageError, match="--stride"):
        sliding_windows(10, 8, 9)
    with pytest.raises(UsageError, match="--seq-len"):
        sliding_windows(10, 1, 1)
    with pytest.raises(InputError, match="at least 2"):
        sliding_windows(1, 8, 8)


def test_single_window_matches_cross_entropy(reference):
    model, _ = reference
    ids = _ids(40)
    res = perplexity(model_logits_fn(model), ids, seq_len=64)
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
    ref = F.cross_entropy(logits[:-1].double(), ids[1:], reduction="sum").item()
    assert res.windows == 1 and res.n_tokens == 39
    assert res.nll_sum == pytest.approx(ref, rel=1e-9)
    assert res.ppl == pytest.approx(math.exp(ref / 39), rel=1e-9)


def test_strided_windows_match_a_per_token_reference(reference):
    """Each token scored with exactly the context its window gives it (one forward per token here)."""
    model, _ = reference
    ids = _ids(50, seed=1)
    seq_len, stride = 16, 6
    res = perplexity(model_logits_fn(model), ids, seq_len=seq_len, stride=stride)
    expected = 0.0
    with torch.no_grad():
        for w in sliding_windows(len(ids), seq_len, stride):
            for t in range(w.score_from, w.end):
                logits = model(input_ids=ids[w.begin:t][None]).logits[0, -1]
                expected -= torch.log_softmax(logits.double(), -1)[ids[t]].item()
    assert res.n_tokens == 49
    assert res.nll_sum == pytest.approx(expected, rel=1e-6)
    disjoint = perplexity(model_logits_fn(model), ids, seq_len=seq_len)
    assert disjoint.n_tokens == 49 and disjoint.windows == 4
    assert disjoint.nll_sum != pytest.approx(res.nll_sum, rel=1e-9)  # less context per token: a different figure


def test_encode_and_text_loading(tmp_path, reference):
    _, tok = reference
    f = tmp_path / "a.txt"
    f.write_text("the quick brown fox jumps over the lazy dog .")
    text = evaluate.load_text_files([f, f])
    assert text.count("fox") == 2
    assert len(encode_text(tok, text, max_tokens=5)) == 5
    with pytest.raises(InputError, match="does not exist"):
        evaluate.load_text_files([tmp_path / "missing.txt"])
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(InputError, match="empty"):
        evaluate.load_text_files([tmp_path / "empty.txt"])
    with pytest.raises(UsageError, match="--max-tokens"):
        encode_text(tok, text, max_tokens=1)


def test_local_json_dataset(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "hello world"}\n{"text": ""}\n{"text": "a b c"}\n')
    assert evaluate.load_dataset_text(f"json:{f}:train") == "hello world\n\na b c"
    with pytest.raises(InputError, match="no 'body' column"):
        evaluate.load_dataset_text(f"json:{f}:train", column="body")


def test_score_continuation_is_the_sum_of_token_logprobs(reference):
    model, _ = reference
    fn = model_logits_fn(model)
    ctx, cont = [5, 6, 7, 8], [9, 10, 11]
    logprob, greedy = score_continuation(fn, ctx, cont, max_length=64)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ctx + cont[:-1]])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    expected = sum(lp[len(ctx) - 1 + i, c].item() for i, c in enumerate(cont))
    assert logprob == pytest.approx(expected, rel=1e-9)
    assert greedy == all(int(lp[len(ctx) - 1 + i].argmax()) == c for i, c in enumerate(cont))
    # truncation keeps the last max_length + 1 tokens: the continuation is always fully scored
    lp_short, _ = score_continuation(fn, ctx, cont, max_length=4)
    assert math.isfinite(lp_short) and lp_short < 0


@pytest.mark.skipif(not lm_eval_available(), reason="lm-eval is not installed (pip install lm-eval)")
def test_lm_eval_local_task_accuracy_matches_own_scoring(reference):
    """simple_evaluate over a local JSONL task through our adapter == argmax of our own loglikelihoods."""
    import json

    model, tok = reference
    fn = model_logits_fn(model)
    table = zero_shot(fn, tok, ["d2moe_tiny_mc"], tasks_dir=TASKS)
    items = [json.loads(line) for line in (TASKS / "d2moe_tiny_mc" / "items.jsonl").read_text().splitlines()]
    lm = evaluate.make_lm_eval_model(fn, tok)
    correct = correct_norm = 0
    for item in items:
        ctx_ids = lm.tok_encode(item["question"])
        scores, norm = [], []
        for choice in item["choices"]:
            whole = lm.tok_encode(item["question"] + " " + choice)
            lp, _ = score_continuation(fn, ctx_ids, whole[len(ctx_ids):], 2048)
            scores.append(lp)
            norm.append(lp / len(" " + choice))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == item["answer"])
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == item["answer"])
    assert table["d2moe_tiny_mc"]["acc"] == pytest.approx(correct / len(items))
    assert table["d2moe_tiny_mc"]["acc_norm"] == pytest.approx(correct_norm / len(items))


@pytest.mark.skipif(not lm_eval_available(), reason="lm-eval is not installed (pip install lm-eval)")
def test_lm_eval_bad_tasks_dir_is_an_input_error(reference, tmp_path):
    model, tok = reference
    with pytest.raises(UsageError, match="--tasks is empty"):
        zero_shot(model_logits_fn(model), tok, [], tasks_dir=TASKS)
    with pytest.raises(InputError, match="--tasks-dir"):
        zero_shot(model_logits_fn(model), tok, ["x"], tasks_dir=tmp_path / "nope")


def test_missing_lm_eval_is_a_dependency_error(monkeypatch, reference):
    import sys

    model, tok = reference
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails as if not installed
    assert not lm_eval_available()
    with pytest.raises(DependencyError, match="pip install lm-eval"):
        zero_shot(model_logits_fn(model), tok, ["d2moe_tiny_mc"], tasks_dir=TASKS)
