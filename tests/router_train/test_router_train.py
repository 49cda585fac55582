"""Training the gate on a tiny random Mixtral: real quantized experts, real loss, real files."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from d2moe.errors import InputError, UnsupportedModelError, UsageError
from d2moe.quantize.mwq import dequantize, quantize_mwq
from d2moe.quantize.types import MWQConfig
from d2moe.router_train.data import load_texts, token_blocks
from d2moe.router_train.session import evaluate, open_session
from d2moe.router_train.train import TrainConfig, batch_indices, train_router
from d2moe.runtime.gate import capacity_caps, load_gate

WORDS = (
    "the quick brown fox jumps over lazy dog a mixture of experts routes every token to few memory is small so "
    "load from disk when they are needed one stored copy each expert serves bit width hello world this tiny model"
).split()


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))) for _ in range(400)]
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _cfg(src, data, tmp_path, **kw) -> TrainConfig:
    base = dict(src=str(src), data=(str(data),), output=str(tmp_path / "gate.safetensors"), seq_len=32, batch_size=4,
                max_steps=30, lr=1e-2, seed=0, bit_cost=0.0, eval_blocks=4, save_every=1000)
    base.update(kw)
    return TrainConfig(**base)


def test_training_experts_are_the_real_mwq_reconstructions(tiny_mixtral):
    mwq = MWQConfig(bits=(2, 3, 4), group_size=64)
    session = open_session(tiny_mixtral, mwq)
    m = session.experts[1]
    gate_up = m.original.gate_up_proj[2]  # [2I, H]
    inter = gate_up.shape[0] // 2
    for li, b in enumerate(mwq.bits):
        assert torch.equal(m.gate_up_levels[li, 2, :inter], dequantize(quantize_mwq(gate_up[:inter], mwq), b))
        assert torch.equal(m.down_levels[li, 2], dequantize(quantize_mwq(m.original.down_proj[2], mwq), b))
    # quality ordering on real data through the whole model: more bits, closer to the full model
    blocks = torch.randint(4, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    kl = [evaluate(session, blocks, f"uniform:{b}")["kl"] for b in mwq.bits]
    assert kl[0] > kl[1] > kl[2] > 0


def test_loss_decreases_and_gate_learns_to_spend_bits(tiny_mixtral, calib_file, tmp_path):
    # no capacity limit and no bit price: the KL to the full model must fall well below its start
    res = train_router(_cfg(tiny_mixtral, calib_file, tmp_path, capacity=(1.0, 1.0, 1.0)))
    first = sum(h.task for h in res.history[:5]) / 5
    last = sum(h.task for h in res.history[-5:]) / 5
    assert last < 0.9 * first, (first, last)
    before, after = res.report["eval"]["before"], res.report["eval"]["after"]
    assert after["kl"] < 0.9 * before["kl"]
    assert after["avg_bits"] > before["avg_bits"]


def test_bit_cost_buys_fewer_bits(tiny_mixtral, calib_file, tmp_path):
    free = train_router(_cfg(tiny_mixtral, calib_file, tmp_path / "a", capacity=(1.0, 1.0, 1.0), max_steps=20))
    priced = train_router(_cfg(tiny_mixtral, calib_file, tmp_path / "b", capacity=(1.0, 1.0, 1.0), max_steps=20,
                               bit_cost=1e-3))
    assert priced.report["avg_bits"] < 2.5 < 3.5 < free.report["avg_bits"]


def test_capacity_respected_while_training_and_report_written(tiny_mixtral, calib_file, tmp_path):
    # scope "layer": every layer applies c to its own pairs, so every batch's histogram is pinned
    cap = (0.3, 0.4, 0.3)
    seen = []
    res = train_router(_cfg(tiny_mixtral, calib_file, tmp_path, capacity=cap, max_steps=8, capacity_scope="layer"),
                       on_step=lambda log: seen.append(log.avg_bits))
    assert len(seen) == 8
    n_pairs = 4 * 32 * 2  # one eval batch: blocks * seq_len * top-k
    assert res.report["calibration"]["eval_blocks"] == 4
    for layer, hist in res.report["bits_histogram"].items():
        assert sum(hist) == n_pairs
        assert all(h <= c for h, c in zip(hist, capacity_caps(cap, n_pairs), strict=True)), (layer, hist)
    # the batch histogram is pinned by tight capacities: 0.3*2 + 0.4*3 + 0.3*4 = 3.0 bits
    assert all(abs(b - 3.0) < 0.02 for b in seen)
    assert res.report["capacity_scope"] == "layer" and res.report["layer_capacity"] is None
    gate = load_gate(tmp_path / "gate.safetensors", expect_fingerprint=res.report["fingerprint"], expect_levels=[2, 3, 4])
    assert gate.capacity == cap and gate.moe_layers == (0, 1) and gate.capacity_scope == "layer"
    assert res.report["gate_parameters"] == gate.num_parameters()
    for k, v in res.gate.state_dict().items():
        assert torch.equal(v.cpu(), gate.state_dict()[k])


@pytest.mark.parametrize("recalibrate_every", [2, 0])
def test_model_scope_budget_calibrated_and_per_layer_caps_hold(tiny_mixtral, calib_file, tmp_path, recalibrate_every):
    cap = (0.3, 0.4, 0.3)
    res = train_router(_cfg(tiny_mixtral, calib_file, tmp_path, capacity=cap, max_steps=6, calibration_blocks=4,
                            recalibrate_every=recalibrate_every, bit_cost=1e-3))
    gate = load_gate(tmp_path / "gate.safetensors", expect_fingerprint=res.report["fingerprint"])
    assert gate.capacity_scope == "model" and gate.capacity == cap and set(gate.layer_capacity) == {0, 1}
    assert res.report["layer_capacity"] == {str(k): [round(c, 6) for c in v] for k, v in gate.layer_capacity.items()}
    session = open_session(tiny_mixtral, MWQConfig(bits=(2, 3, 4)))
    session.use_gate(gate)
    blocks = token_blocks(load_texts([str(calib_file)]), session.tokenizer, 32)
    # pooled usage on the calibration blocks equals the budget (within one pair)
    calib = blocks[:4]
    session.logits(calib, "gated")
    counts = sum(torch.bincount(session.experts[layer].stats["chosen"].flatten(), minlength=3) for layer in (0, 1))
    n = int(counts.sum())
    assert n == 2 * 4 * 32 * 2
    for k, c in enumerate(cap):
        assert abs(int(counts[k]) / n - c) <= 1 / n * 2 + 1e-9, (counts.tolist(), cap)
    # and on other batches every layer stays within its own caps
    for start in range(8, 20, 3):
        ids = blocks[start:start + 3]
        session.logits(ids, "gated")
        for layer in (0, 1):
            chosen = session.experts[layer].stats["chosen"].flatten()
            caps = capacity_caps(gate.capacity_for(layer), chosen.numel())
            assert all(h <= c for h, c in zip(torch.bincount(chosen, minlength=3).tolist(), caps, strict=True))


@pytest.mark.parametrize("estimator", ["ste", "gumbel"])
def test_resume_is_exact(tiny_mixtral, calib_file, tmp_path, estimator):
    # scope "model" with caps recalibrated every 2 steps: a recalibration falls on both sides of the resume
    kw = dict(estimator=estimator, recalibrate_every=2, calibration_blocks=4)
    straight = train_router(_cfg(tiny_mixtral, calib_file, tmp_path / "a", max_steps=6, **kw))
    first = _cfg(tiny_mixtral, calib_file, tmp_path / "b", max_steps=3, save_every=3, **kw)
    train_router(first)
    resumed = train_router(_cfg(tiny_mixtral, calib_file, tmp_path / "b", max_steps=6, save_every=3, resume=True, **kw))
    assert resumed.report["resumed_from_step"] == 3
    for k, v in straight.gate.state_dict().items():
        assert torch.equal(v, resumed.gate.state_dict()[k]), k
    assert [h.loss for h in straight.history] == [h.loss for h in resumed.history]
    assert straight.gate.layer_capacity == resumed.gate.layer_capacity
    with pytest.raises(UsageError, match="other options.*seed"):
        train_router(_cfg(tiny_mixtral, calib_file, tmp_path / "b", max_steps=6, seed=1, resume=True, **kw))


def test_labels_target_and_linear_head(tiny_mixtral, calib_file, tmp_path):
    res = train_router(_cfg(tiny_mixtral, calib_file, tmp_path, target="labels", proj_dim=0, max_steps=4))
    h = res.history[0]
    assert h.task == h.ce > 1.0  # label NLL of a random 256-token model is about log(256)
    assert res.report["gate_architecture"]["kind"] == "linear"


def test_batches_are_a_function_of_seed_and_step():
    a = [batch_indices(s, 4, 10, seed=3) for s in range(5)]
    assert all(torch.equal(x, batch_indices(s, 4, 10, seed=3)) for s, x in enumerate(a))
    # two and a half epochs: every block appears exactly twice in the first 20 positions
    seen = torch.cat(a)
    assert torch.bincount(seen, minlength=10).tolist() == [2] * 10


def test_calibration_formats(tmp_path, tiny_mixtral):
    import datasets
    from transformers import AutoTokenizer

    docs = ["the quick brown fox", "jumps over the lazy dog", "hello world"]
    (tmp_path / "a.txt").write_text("\n".join(docs) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(f'{{"text": "{d}"}}' for d in docs) + "\n")
    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "c.parquet"))
    for name in ("a.txt", "b.jsonl", "c.parquet"):
        assert load_texts([str(tmp_path / name)]) == docs
    tok = AutoTokenizer.from_pretrained(str(tiny_mixtral))
    blocks = token_blocks(docs * 5, tok, seq_len=8)
    assert blocks.shape[1] == 8 and blocks.shape[0] >= 6
    assert (blocks[:, 0] == tok.bos_token_id).all()  # every window starts like a training window
    plain = token_blocks(docs * 5, tok, seq_len=8, bos=False)
    assert torch.equal(plain.flatten()[:7], blocks[0, 1:])
    with pytest.raises(InputError, match="does not exist: pass --data"):
        load_texts([str(tmp_path / "missing.txt")])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(InputError, match="is empty: pass --calib"):  # pack's flag named where pack passed it
        load_texts([str(tmp_path / "empty.txt")], option="--calib")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(InputError, match="holds no text"):
        load_texts([str(tmp_path / "blank.txt")])
    with pytest.raises(InputError, match="fewer than one block"):
        token_blocks(["hello"], tok, seq_len=64)
    with pytest.raises(InputError, match="no calibration data"):
        load_texts([])


def test_errors_name_the_problem(tiny_mixtral, calib_file, tmp_path, tiny_checkpoint_factory):
    with pytest.raises(UsageError, match="one fraction per level"):
        _cfg(tiny_mixtral, calib_file, tmp_path, capacity=(0.5, 0.5))
    with pytest.raises(UsageError, match="sum"):
        _cfg(tiny_mixtral, calib_file, tmp_path, capacity=(0.2, 0.2, 0.2))
    with pytest.raises(UsageError, match="--capacity-scope"):
        _cfg(tiny_mixtral, calib_file, tmp_path, capacity_scope="global")
    with pytest.raises(UsageError, match="--init"):
        _cfg(tiny_mixtral, calib_file, tmp_path, init="random")
    with pytest.raises(InputError, match="no config.json"):
        train_router(_cfg(tmp_path, calib_file, tmp_path))
    bad = tmp_path / "foreign"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    with pytest.raises(UnsupportedModelError, match="llama"):
        train_router(_cfg(bad, calib_file, tmp_path))


def test_estimator_option_reaches_the_experts(tiny_mixtral, calib_file, tmp_path):
    ste = train_router(_cfg(tiny_mixtral, calib_file, tmp_path / "s", max_steps=3, capacity=(1.0, 1.0, 1.0)))
    gum = train_router(_cfg(tiny_mixtral, calib_file, tmp_path / "g", max_steps=3, capacity=(1.0, 1.0, 1.0),
                            estimator="gumbel"))
    assert [h.avg_bits for h in ste.history] != [h.avg_bits for h in gum.history]  # Gumbel noise moves choices


def test_a_jsonl_line_that_is_not_json_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{broken\n')
    with pytest.raises(InputError, match='line 3 is not JSON .*"text"'):
        load_texts([str(bad)])


def test_a_binary_calibration_file_is_named_not_utf8_at_its_first_bad_byte(tmp_path, capfd):
    """A binary file passed as text (a checkpoint shard named .txt, say) is told where it stops being UTF-8, past a
    MiB-sized read with a character split across two reads, and nothing else reaches the terminal."""
    good = ("é" * (1 << 19)).encode()  # 1 MiB of two-byte characters: the second read starts inside none
    good = b"x" + good  # ... and now one is split across the first and second read
    for name in ("shard.txt", "shard.jsonl"):
        path = tmp_path / name
        path.write_bytes(good + b"\xff\xfe rest")
        with pytest.raises(InputError, match=f"{name} could not be read as .*: not UTF-8 text at byte {len(good)}: "):
            load_texts([str(path)], option="--calib")
    assert capfd.readouterr().err == ""


def test_a_calibration_path_that_is_a_directory_is_named_as_such(tmp_path):
    with pytest.raises(InputError, match="is not a regular file"):
        load_texts([str(tmp_path)], option="--calib")
