"""MemoryPlan (the budget split, the minimum and its error) and MemoryMeter (live bytes, peaks)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.errors import BudgetError, UsageError
from d2moe.runtime.budget import (
    MemoryPlan,
    kv_bytes_per_token,
    safetensors_payload_bytes,
    workspace_bytes,
)
from d2moe.runtime.memory import MemoryMeter
from d2moe.runtime.units import parse_size

MiB = 1024**2
sizes = st.integers(0, 10**9)


@settings(max_examples=200, deadline=None)
@given(sizes, st.integers(0, 10**5), st.integers(0, 4096), st.integers(1, 10**8), sizes, st.integers(1, 4), sizes)
def test_expert_cache_is_budget_minus_the_rest(dense, kv_tok, tokens, expert, work, slots, extra):
    minimum = dense + kv_tok * tokens + slots * expert + work + 2 * expert
    plan = MemoryPlan.build(minimum + extra, dense, kv_tok, tokens, expert, work, staging_slots=slots)
    assert plan.minimum == minimum
    assert plan.expert_cache == plan.budget - (plan.dense + plan.kv + plan.staging + plan.workspace)
    assert plan.dense + plan.kv + plan.staging + plan.workspace + plan.expert_cache == plan.budget
    assert plan.cache_experts >= plan.min_cache_experts == 2
    with pytest.raises(BudgetError):
        MemoryPlan.build(minimum - 1, dense, kv_tok, tokens, expert, work, staging_slots=slots)


def test_below_minimum_message_names_the_parts_and_a_budget_that_works():
    args = dict(dense_bytes=80 * MiB, kv_bytes_per_token=10 * 1024, max_tokens=2048,
                expert_bytes=10 * MiB, workspace_bytes=3 * MiB)
    with pytest.raises(BudgetError) as err:
        MemoryPlan.build(100 * MiB, **args)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("memory budget 100 MiB is below the minimum 133 MiB for this model (dense 80 MiB")
    assert "KV 20 MiB + staging/workspace 13 MiB + 2 experts 20 MiB)" in msg
    suggested = re.search(r"use --memory-budget (\S+) or more", msg).group(1)
    assert suggested == "133MiB"
    plan = MemoryPlan.build(parse_size(suggested), **args)  # the advice works
    assert plan.expert_cache >= 2 * plan.expert_bytes


def test_negative_inputs_are_usage_errors():
    with pytest.raises(UsageError, match="max_tokens"):
        MemoryPlan.build(10**9, 0, 1, -1, 1, 0)


def test_kv_bytes_per_token_matches_a_real_transformers_cache(tiny_mixtral):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads((tiny_mixtral / "config.json").read_text())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_mixtral)).float().eval()
    tokens = 7
    with torch.no_grad():
        out = model(torch.randint(0, 200, (1, tokens)), use_cache=True)
    kv = out.past_key_values
    held = sum(t.nbytes for layer in kv.layers for t in (layer.keys, layer.values))
    assert held == tokens * kv_bytes_per_token(config, dtype_bytes=4)
    # a config nesting the text model (multimodal wrappers) gives the same answer
    assert kv_bytes_per_token({"text_config": config}, 4) == kv_bytes_per_token(config, 4)


def test_workspace_and_safetensors_sizes(tmp_path):
    from safetensors.torch import save_file

    shapes = {"gate": (4096, 1024), "up": (4096, 1024), "down": (1024, 4096)}
    config = {"hidden_size": 1024, "num_attention_heads": 8, "vocab_size": 32000}
    one, many = workspace_bytes(config, shapes, 1), workspace_bytes(config, shapes, 512)
    fp32_expert = sum(torch.empty(s).nbytes for s in shapes.values())
    assert one < many and one < fp32_expert  # kernels never hold a dequantized expert
    # the tokens' activations are counted: x, gate, up, h in float32 at least
    assert many - one >= 4 * 511 * (1024 + 3 * 4096)
    # a chunk of queries over a longer context counts its attention scores over every key
    assert workspace_bytes(config, shapes, 64, context=4096) - workspace_bytes(config, shapes, 64) == 4 * 8 * 64 * 4032
    tensors = {"a": torch.zeros(3, 5, dtype=torch.bfloat16), "b": torch.zeros(7, dtype=torch.float32)}
    save_file(tensors, tmp_path / "dense.safetensors", metadata={"k": "v"})
    assert safetensors_payload_bytes(tmp_path / "dense.safetensors") == 3 * 5 * 2 + 7 * 4


def test_for_checkpoint_uses_the_checkpoint_numbers(tmp_path):
    from safetensors.torch import save_file

    from d2moe.quantize import MWQConfig

    save_file({"w": torch.zeros(1024, dtype=torch.float16)}, tmp_path / "dense.safetensors")

    class Ckpt:  # the attributes MemoryPlan reads from a packed checkpoint
        path = tmp_path
        cfg = MWQConfig(bits=(2, 3, 4))
        config = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64}
        matrix_shapes = {"gate": (128, 64), "up": (128, 64), "down": (64, 128)}

        @staticmethod
        def level_nbytes(level):
            return {2: 8192, 3: 12288, 4: 16384}[level]

    plan = MemoryPlan.for_checkpoint(Ckpt, 64 * MiB, max_tokens=100)
    assert plan.dense == 2048 and plan.kv == 100 * 2 * 2 * 2 * 16 * 2
    assert plan.expert_bytes == 16384
    assert plan.workspace == workspace_bytes(Ckpt.config, Ckpt.matrix_shapes, 100)
    assert MemoryPlan.for_checkpoint(Ckpt, 64 * MiB, 100, level=2).expert_bytes == 8192
    chunked = MemoryPlan.for_checkpoint(Ckpt, 64 * MiB, max_tokens=100, forward_tokens=10)
    assert chunked.workspace == workspace_bytes(Ckpt.config, Ckpt.matrix_shapes, 10, context=100) < plan.workspace
    assert chunked.kv == plan.kv  # the KV cache still holds every token


def test_meter_peak_bounds_every_sample_and_counts_shared_storage_once():
    meter = MemoryMeter()
    w = torch.zeros(256, 64)  # 64 KiB
    meter.register("dense", "w", w)
    meter.register("dense", "w_view", w[:10])  # same storage: not counted twice
    totals = [meter.sample().total]
    assert totals[0] == w.nbytes
    kv = [torch.zeros(1000), torch.zeros(3000)]
    meter.register("kv", "layers", kv)
    meter.register("staging", "buf", bytearray(5000))
    totals.append(meter.sample().total)
    assert totals[-1] == w.nbytes + 16000 + 5000
    meter.unregister("staging", "buf")
    meter.register("workspace", "n", lambda: 123)
    s = meter.sample()
    totals.append(s.total)
    assert s.by_category == {"dense": w.nbytes, "kv": 16000, "staging": 0, "workspace": 123}
    assert meter.peak == max(totals) and all(meter.peak >= t for t in totals)
    assert meter.peak_by_category["staging"] == 5000 and meter.samples == 3


def test_meter_rss_peak_counts_a_peak_between_samples():
    """Where Linux reports the peak RSS (VmHWM), a peak that came and went between samples still counts."""
    meter = MemoryMeter()
    if not meter._hwm:
        pytest.skip("this kernel does not let a process reset and read its peak RSS")
    blob = bytearray(b"\x01" * (64 * MiB))  # resident while it lives; never sampled
    del blob
    assert meter.rss_peak_delta >= 32 * MiB


def test_meter_rss_delta_sees_a_real_allocation():
    meter = MemoryMeter()
    blob = b"\x01" * (64 * MiB)  # written, so its pages are resident
    meter.register("staging", "blob", blob)
    meter.sample()
    assert meter.rss_peak_delta >= 32 * MiB
    report = meter.report()
    assert report["peak_bytes"] == 64 * MiB and report["rss_peak_delta_bytes"] == meter.rss_peak_delta
    del blob


def test_plan_for_a_real_packed_checkpoint(tiny_mixtral, tmp_path):
    from d2moe.quantize import MWQConfig
    from d2moe.quantize.convert.pack import pack_checkpoint
    from d2moe.quantize.format import open_checkpoint

    out = tmp_path / "packed"
    pack_checkpoint(tiny_mixtral, out, MWQConfig(bits=(2, 3, 4)), progress=False)
    ckpt = open_checkpoint(out)
    plan = MemoryPlan.for_checkpoint(ckpt, 64 * MiB, max_tokens=128)
    dense = ckpt.load_dense()
    assert plan.dense == sum(t.nbytes for t in dense.values())
    assert plan.expert_bytes == ckpt.level_nbytes(4) > ckpt.level_nbytes(2)
    assert plan.kv == 128 * kv_bytes_per_token(ckpt.config, 2)
    with pytest.raises(BudgetError, match=r"use --memory-budget \d+MiB or more"):
        MemoryPlan.for_checkpoint(ckpt, plan.minimum - 1, max_tokens=128)


def test_static_objects_are_measured_once_and_still_count_shared_storage_once():
    meter = MemoryMeter()
    w = torch.zeros(256, 64)  # 64 KiB
    meter.register("dense", "params", [w], static=True)
    meter.register("workspace", "view", w[:4])  # shares the static storage: not counted again
    assert meter.sample().total == w.nbytes
    w2 = torch.zeros(10)
    meter.register("workspace", "more", w2)
    assert meter.sample().by_category == {"dense": w.nbytes, "workspace": w2.nbytes}


@pytest.mark.parametrize("text", ["9" * 400, "2000000TiB", "9" * 400 + ".5GiB"])
def test_absurd_sizes_are_one_clear_error_not_an_overflow(text):
    with pytest.raises(UsageError, match="larger than any machine"):
        parse_size(text, "--memory-budget")


@pytest.mark.parametrize("text", ["1.5", "50", "1000"])
def test_a_small_number_without_a_unit_is_refused(text):
    with pytest.raises(UsageError, match=f"has no unit: write e.g. {text}GiB"):
        parse_size(text, "--memory-budget")
    assert parse_size("8000000") == 8_000_000  # bytes, from 1 MiB up
