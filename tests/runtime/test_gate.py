"""The bit-width gate: capacity rule, gate model, fingerprint and the gate file."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.errors import FormatError, GateMismatchError, UsageError
from d2moe.runtime.gate import (
    PROBE_DIRECTIONS,
    BitWidthGate,
    assign_with_capacity,
    capacity_caps,
    load_gate,
    model_fingerprint,
    model_probe,
    pooled_layer_capacity,
    read_gate_meta,
    same_model_probe,
    save_gate,
    validate_capacity,
)

CAPACITIES = [(0.3, 0.4, 0.3), (0.25, 0.25, 0.25, 0.25), (0.5, 0.5), (1.0, 0.0, 0.0), (0.1, 0.2, 0.7), (1.0, 1.0, 1.0)]


def _fractions(draw, n_levels: int) -> tuple[float, ...]:
    raw = draw(st.lists(st.integers(0, 20), min_size=n_levels, max_size=n_levels).filter(lambda xs: sum(xs) > 0))
    return tuple(x / sum(raw) for x in raw)


@st.composite
def logits_and_capacity(draw):
    n_levels = draw(st.integers(1, 5))
    n = draw(st.integers(0, 300))
    cap = _fractions(draw, n_levels)
    seed = draw(st.integers(0, 2**31 - 1))
    ties = draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, n_levels, generator=g)
    if ties:  # many identical rows: priority must fall back on the pair index
        logits = logits.round()
    return logits, cap


@settings(max_examples=150, deadline=None)
@given(logits_and_capacity())
def test_capacity_respected_and_everyone_assigned(case):
    logits, cap = case
    n, n_levels = logits.shape
    out = assign_with_capacity(logits, cap)
    assert out.shape == (n,) and out.dtype == torch.long
    assert ((out >= 0) & (out < n_levels)).all()
    counts = torch.bincount(out, minlength=n_levels).tolist()
    for k, c in enumerate(cap):
        assert counts[k] <= math.ceil(c * n), (k, counts, cap)
    assert sum(capacity_caps(cap, n)) >= n


@settings(max_examples=100, deadline=None)
@given(logits_and_capacity())
def test_over_capacity_rule_is_deterministic_and_prefers_first_choices(case):
    logits, cap = case
    a = assign_with_capacity(logits, cap)
    b = assign_with_capacity(logits.clone(), cap)
    assert torch.equal(a, b)
    # pairs whose first choice still had room at the end all got their first choice
    n, n_levels = logits.shape
    caps = capacity_caps(cap, n)
    counts = torch.bincount(a, minlength=n_levels)
    first = torch.argsort(-logits.double(), dim=1, stable=True)[:, 0]
    for i in range(n):
        if counts[first[i]] < caps[first[i]]:
            assert a[i] == first[i]


def test_capacity_unlimited_is_argmax_and_tight_capacity_fixes_histogram():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1000, 3, generator=g)
    assert torch.equal(assign_with_capacity(logits, (1.0, 1.0, 1.0)), logits.argmax(1))
    counts = torch.bincount(assign_with_capacity(logits, (0.3, 0.4, 0.3)), minlength=3).tolist()
    assert counts == [300, 400, 300]


def test_most_confident_pairs_win_a_full_level():
    # everyone wants level 0, which has room for 2 of 4: the two most confident get it
    logits = torch.tensor([[1.0, 0.0], [5.0, 0.0], [3.0, 0.0], [5.0, 0.0]])
    out = assign_with_capacity(logits, (0.5, 0.5))
    assert out.tolist() == [1, 0, 1, 0]  # pairs 1 and 3 (confidence 5, tie broken by index) then 2 falls


def test_independent_of_thread_count():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5000, 4, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = assign_with_capacity(logits, (0.25, 0.25, 0.25, 0.25))
        torch.set_num_threads(max(2, threads))
        many = assign_with_capacity(logits, (0.25, 0.25, 0.25, 0.25))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("cap", [(0.3, 0.4), (0.2, 0.2, 0.2), (-0.1, 0.6, 0.5), (float("nan"), 0.5, 0.5)])
def test_bad_capacity_rejected(cap):
    with pytest.raises(UsageError, match="capacity"):
        validate_capacity(cap, (2, 3, 4))


def _gate(seed=0, **kw) -> BitWidthGate:
    torch.manual_seed(seed)
    gate = BitWidthGate(hidden_size=64, num_experts=4, moe_layers=[0, 1], **kw)
    for p in gate.parameters():  # non-trivial weights, so logits differ per token / expert / router weight
        torch.nn.init.normal_(p, std=0.5)
    return gate


def _routing(t=16, h=64, e=4, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=g)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    w = torch.softmax(torch.randn(t, k, generator=g), -1)
    return hidden, idx, w


@pytest.mark.parametrize("proj_dim", [0, 32])
def test_gate_shapes_levels_and_inputs_matter(proj_dim):
    gate = _gate(proj_dim=proj_dim)
    hidden, idx, w = _routing()
    logits = gate.logits(1, hidden, idx, w)
    assert logits.shape == (16, 2, 3)
    bits = gate.select_levels(1, hidden, idx, w)
    assert bits.dtype == torch.long and bits.shape == (16, 2)
    assert set(bits.flatten().tolist()) <= {2, 3, 4}
    counts = {b: int((bits == b).sum()) for b in (2, 3, 4)}
    assert counts[2] <= math.ceil(0.3 * 32) and counts[3] <= math.ceil(0.4 * 32) and counts[4] <= math.ceil(0.3 * 32)
    # each input changes the logits: expert identity, router weight, hidden state
    assert not torch.allclose(logits, gate.logits(1, hidden, idx.flip(-1), w))
    assert not torch.allclose(logits, gate.logits(1, hidden, idx, w * 0.5))
    assert not torch.allclose(logits, gate.logits(1, hidden + 1, idx, w))
    with pytest.raises(UsageError, match="layer 7"):
        gate.logits(7, hidden, idx, w)


def test_gate_is_small_next_to_an_expert():
    # Mixtral-8x7B sizes: H=4096, I=14336, 8 experts, 32 layers
    gate = BitWidthGate(4096, 8, [0], proj_dim=32)
    one_expert = 3 * 4096 * 14336
    assert gate.num_parameters() < one_expert / 1000


def test_fingerprint_depends_on_config_and_router_and_not_dtype():
    cfg = {"model_type": "mixtral", "hidden_size": 64, "num_hidden_layers": 2, "num_local_experts": 4}
    g = torch.Generator().manual_seed(0)
    routers = [torch.randn(4, 64, generator=g) for _ in range(2)]
    fp = model_fingerprint(cfg, routers)
    assert fp == model_fingerprint(dict(cfg, unrelated_field=1), [r.clone() for r in routers])
    bf = [r.to(torch.bfloat16) for r in routers]  # a packed bf16 copy of a bf16 source gives the same bytes
    assert model_fingerprint(cfg, bf) == model_fingerprint(cfg, [r.float() for r in bf])
    assert fp != model_fingerprint(cfg, routers[::-1])
    assert fp != model_fingerprint(dict(cfg, hidden_size=128), routers)
    bumped = [routers[0].clone(), routers[1].clone()]
    bumped[1][3, 5] += 1e-3
    assert fp != model_fingerprint(cfg, bumped)


def test_probe_knows_the_model_in_any_precision_and_no_other():
    """The fingerprint hashes exact bytes; the probe recognises one model's routers stored or run in float32,
    bfloat16 or float16 (pack --dtype, float32 routers beside bfloat16 weights), and tells other routers apart."""
    cfg = {"model_type": "mixtral", "hidden_size": 64, "num_hidden_layers": 2, "num_local_experts": 8}
    g = torch.Generator().manual_seed(0)
    routers = [torch.randn(8, 64, generator=g) * 0.02 for _ in range(2)]
    probe = model_probe(cfg, routers)
    assert len(probe["routers"]) == 2 and all(len(row) == PROBE_DIRECTIONS for row in probe["routers"])
    for dtype in (torch.bfloat16, torch.float16):
        copy = [r.to(dtype) for r in routers]
        assert model_fingerprint(cfg, copy) != model_fingerprint(cfg, routers)
        assert same_model_probe(probe, model_probe(cfg, copy))
    assert not same_model_probe(probe, model_probe(cfg, routers[::-1]))
    assert not same_model_probe(probe, model_probe(cfg, [torch.randn(8, 64, generator=g) * 0.02 for _ in range(2)]))
    assert not same_model_probe(probe, model_probe(dict(cfg, hidden_size=128), routers))
    assert not same_model_probe(probe, model_probe(cfg, routers[:1])) and not same_model_probe(None, probe)


def test_gate_of_a_float32_model_fits_its_bfloat16_pack(tmp_path):
    cfg = {"model_type": "mixtral", "hidden_size": 64, "num_hidden_layers": 2, "num_local_experts": 4}
    g = torch.Generator().manual_seed(1)
    routers = [torch.randn(4, 64, generator=g) * 0.02 for _ in range(2)]
    gate = BitWidthGate(64, 4, [0, 1], (2, 3, 4), (0.3, 0.4, 0.3))
    path = save_gate(gate, tmp_path / "gate.safetensors", model_fingerprint(cfg, routers), probe=model_probe(cfg, routers))
    bf = [r.to(torch.bfloat16) for r in routers]
    load_gate(path, expect_fingerprint=model_fingerprint(cfg, bf), expect_probe=model_probe(cfg, bf))
    other = [r.flip(0) for r in bf]
    with pytest.raises(GateMismatchError, match="another model"):
        load_gate(path, expect_fingerprint=model_fingerprint(cfg, other), expect_probe=model_probe(cfg, other))
    old = save_gate(gate, tmp_path / "old.safetensors", model_fingerprint(cfg, routers))  # a gate without a probe
    with pytest.raises(GateMismatchError, match="another model"):
        load_gate(old, expect_fingerprint=model_fingerprint(cfg, bf), expect_probe=model_probe(cfg, bf))


@pytest.mark.parametrize("probe", [{"dims": {}, "routers": [[1.0, 2.0, 3.0, 4.0]]},  # one layer of two
                                   {"dims": {}, "routers": [[1.0] * 4, [float("nan")] * 4]},
                                   {"dims": {}, "routers": [[1.0] * 4, [1.0] * 3]}, {"routers": []}, [1, 2]])
def test_malformed_probe_in_a_gate_file_is_a_format_error(tmp_path, probe):
    path = save_gate(BitWidthGate(64, 4, [0, 1], (2, 3, 4), (0.3, 0.4, 0.3)), tmp_path / "g.safetensors", "a" * 64,
                     probe=probe)
    with pytest.raises(FormatError, match="gate metadata is missing or malformed"):
        load_gate(path)


@pytest.mark.parametrize("proj_dim,emb", [(0, True), (32, True), (16, False)])
def test_gate_file_round_trip(tmp_path, proj_dim, emb):
    gate = _gate(proj_dim=proj_dim, expert_embedding=emb, capacity=(0.2, 0.5, 0.3))
    path = save_gate(gate, tmp_path / "gate.safetensors", "ab" * 32, {"steps": 3})
    loaded = load_gate(path, expect_fingerprint="ab" * 32, expect_levels=[2, 3, 4])
    assert loaded.levels == gate.levels and loaded.capacity == gate.capacity and loaded.moe_layers == gate.moe_layers
    assert loaded.architecture == gate.architecture and loaded.fingerprint == "ab" * 32
    for k, v in gate.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    hidden, idx, w = _routing()
    assert torch.equal(gate.select_levels(0, hidden, idx, w), loaded.select_levels(0, hidden, idx, w))
    meta = read_gate_meta(path)
    assert meta["extra"] == {"steps": 3} and meta["hidden_size"] == 64 and meta["num_experts"] == 4


def test_mismatched_gate_rejected(tmp_path):
    path = save_gate(_gate(), tmp_path / "gate.safetensors", "a" * 64)
    with pytest.raises(GateMismatchError, match="another model.*train-router"):
        load_gate(path, expect_fingerprint="b" * 64)
    with pytest.raises(GateMismatchError, match=r"levels \[2, 3, 4\] but the checkpoint has \[2, 4, 8\]"):
        load_gate(path, expect_levels=[2, 4, 8])


def test_corrupt_or_foreign_gate_file_rejected(tmp_path):
    from safetensors.torch import save_file

    good = save_gate(_gate(), tmp_path / "gate.safetensors", "a" * 64)
    data = good.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    for bad in (truncated, garbage, foreign, tmp_path / "missing.safetensors"):
        with pytest.raises(FormatError):
            load_gate(bad)

    # metadata edits: future version, malformed JSON, tensors that do not match the metadata
    def rewrite(name, meta_update=None, tensors_update=None):
        from safetensors import safe_open

        with safe_open(str(good), framework="pt") as f:
            meta = dict(f.metadata())
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta.update(meta_update or {})
        tensors.update(tensors_update or {})
        out = tmp_path / name
        save_file(tensors, str(out), metadata=meta)
        return out

    gate_meta = read_gate_meta(good)
    with pytest.raises(FormatError, match="version"):
        load_gate(rewrite("v9.safetensors", {"format_version": "9"}))
    with pytest.raises(FormatError, match="malformed"):
        load_gate(rewrite("badjson.safetensors", {"gate": "{not json"}))
    with pytest.raises(FormatError, match="do not match"):
        load_gate(rewrite("layers.safetensors", {"gate": json.dumps(dict(gate_meta, moe_layers=[0, 1, 2]))}))
    with pytest.raises(FormatError, match="expected float32"):
        load_gate(rewrite("shape.safetensors", tensors_update={"layers.0.proj.weight": torch.zeros(3, 3)}))
    with pytest.raises(FormatError, match="NaN"):
        load_gate(rewrite("nan.safetensors", tensors_update={"layers.1.router_dir": torch.full((32,), float("nan"))}))


# ----------------------------------------------------------------------------- capacity scope "model"


def _layer_logits(seed=0, sizes=(400, 400, 400)):
    g = torch.Generator().manual_seed(seed)
    # layer 0 is confident about the top level, layer 2 about the bottom one: pooling should follow that
    shift = torch.tensor([[-2.0, 0.0, 2.0], [0.0, 0.0, 0.0], [2.0, 0.0, -2.0]])
    return {layer: torch.randn(n, 3, generator=g) + shift[i] for i, (layer, n) in enumerate(zip((0, 3, 5), sizes, strict=True))}


@pytest.mark.parametrize("cap", [(0.3, 0.4, 0.3), (0.1, 0.2, 0.7), (0.5, 0.5, 0.0)])
def test_pooled_calibration_usage_equals_the_budget(cap):
    logits = _layer_logits(sizes=(300, 500, 200))
    rows = pooled_layer_capacity(logits, cap)
    n = {layer: x.shape[0] for layer, x in logits.items()}
    total = sum(n.values())
    for row in rows.values():
        assert validate_capacity(row, (2, 3, 4)) == row and abs(sum(row) - 1) < 1e-9
    pooled = [sum(rows[layer][k] * n[layer] for layer in rows) / total for k in range(3)]
    for k, c in enumerate(cap):
        assert abs(pooled[k] - c) <= 1 / total + 1e-9, (pooled, cap)
    # layers differ: the one leaning to 4 bits gets more 4-bit room than the one leaning to 2 bits
    if cap[2] > 0:
        assert rows[0][2] > rows[5][2] and rows[5][0] > rows[0][0]


def test_pooled_calibration_leaves_unlimited_levels_open():
    rows = pooled_layer_capacity(_layer_logits(), (0.5, 1.0, 0.5))
    assert all(row[1] == 1.0 for row in rows.values())
    assert all(row == (1.0, 1.0, 1.0) for row in pooled_layer_capacity(_layer_logits(), (1.0, 1.0, 1.0)).values())


def _pooled_gate(seed=0):
    gate = _gate(seed, capacity=(0.3, 0.4, 0.3), capacity_scope="model")
    logits = {layer: gate.logits(layer, *_routing(t=64, seed=seed + layer)).reshape(-1, 3).detach() for layer in (0, 1)}
    gate.set_capacity(gate.capacity, "model", pooled_layer_capacity(logits, gate.capacity))
    return gate


def test_per_layer_caps_respected_on_every_batch():
    gate = _pooled_gate()
    assert gate.layer_capacity[0] != gate.layer_capacity[1]  # the seeded heads lean differently
    for batch in range(6):
        hidden, idx, w = _routing(t=8 + 9 * batch, seed=100 + batch)
        for layer in (0, 1):
            bits = gate.select_levels(layer, hidden, idx, w)
            n = bits.numel()
            caps = capacity_caps(gate.capacity_for(layer), n)
            counts = [int((bits == b).sum()) for b in gate.levels]
            assert all(c <= cap for c, cap in zip(counts, caps, strict=True)), (layer, counts, caps)
    layer_scope = _gate(capacity=(0.3, 0.4, 0.3), capacity_scope="layer")
    assert layer_scope.layer_capacity is None and layer_scope.capacity_for(1) == (0.3, 0.4, 0.3)
    with pytest.raises(UsageError, match="scope model"):
        layer_scope.set_capacity((0.3, 0.4, 0.3), "layer", {0: (0.3, 0.4, 0.3), 1: (0.3, 0.4, 0.3)})
    with pytest.raises(UsageError, match="one row per MoE layer"):
        gate.set_capacity((0.3, 0.4, 0.3), "model", {0: (0.3, 0.4, 0.3)})
    with pytest.raises(UsageError, match="scope"):
        gate.set_capacity((0.3, 0.4, 0.3), "global")


def test_router_rule_start_prefers_bits_by_router_weight():
    for proj_dim in (0, 32):
        gate = BitWidthGate(64, 4, [0], proj_dim=proj_dim, router_skip=True)
        gate.init_router_rule()
        hidden, idx, _ = _routing(t=4)
        w = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.5, 0.5], [0.3, 0.7]])
        levels = gate.logits(0, hidden, idx, w).argmax(-1)
        assert levels[0].tolist() == [2, 0] and levels[1].tolist() == [2, 0] and levels[3].tolist() == [0, 2]
    with pytest.raises(UsageError, match="router_skip"):
        BitWidthGate(64, 4, [0], proj_dim=8).init_router_rule()


def test_layer_capacity_file_round_trip(tmp_path):
    gate = _pooled_gate()
    path = save_gate(gate, tmp_path / "gate.safetensors", "c" * 64)
    loaded = load_gate(path)
    assert loaded.capacity_scope == "model" and loaded.layer_capacity == gate.layer_capacity
    hidden, idx, w = _routing(t=40, seed=9)
    for layer in (0, 1):
        assert torch.equal(gate.select_levels(layer, hidden, idx, w), loaded.select_levels(layer, hidden, idx, w))
    meta = read_gate_meta(path)
    assert meta["capacity_scope"] == "model" and set(meta["layer_capacity"]) == {0, 1}
    skip = BitWidthGate(64, 4, [0, 1], proj_dim=8, router_skip=True)
    skip.init_router_rule()
    again = load_gate(save_gate(skip, tmp_path / "skip.safetensors", "c" * 64))
    assert again.router_skip and torch.equal(again.heads["1"].router_out, skip.heads["1"].router_out)


def test_ill_formed_layer_capacity_rejected(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    good = save_gate(_pooled_gate(), tmp_path / "gate.safetensors", "c" * 64)
    with safe_open(str(good), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(header["gate"])

    def rewrite(name, **update):
        out = tmp_path / name
        save_file(tensors, str(out), metadata=dict(header, gate=json.dumps(dict(meta, **update))))
        return out

    row = [0.3, 0.4, 0.3]
    cases = {
        "missing_layer": dict(layer_capacity={"0": row}),
        "extra_layer": dict(layer_capacity={"0": row, "1": row, "2": row}),
        "short_row": dict(layer_capacity={"0": row, "1": [0.5, 0.5]}),
        "not_a_distribution": dict(layer_capacity={"0": row, "1": [0.1, 0.1, 0.1]}),
        "negative": dict(layer_capacity={"0": row, "1": [-0.2, 0.6, 0.6]}),
        "scope_layer_with_rows": dict(capacity_scope="layer"),
        "unknown_scope": dict(capacity_scope="global"),
        "not_numbers": dict(layer_capacity={"0": row, "1": ["a", 0.5, 0.5]}),
    }
    for name, update in cases.items():
        with pytest.raises(FormatError):
            load_gate(rewrite(f"{name}.safetensors", **update))
    # a file from before scopes existed reads as the per-layer rule
    old = {k: v for k, v in meta.items() if k not in ("capacity_scope", "layer_capacity")}
    out = tmp_path / "old.safetensors"
    save_file(tensors, str(out), metadata=dict(header, gate=json.dumps(old)))
    legacy = load_gate(out)
    assert legacy.capacity_scope == "layer" and legacy.layer_capacity is None
