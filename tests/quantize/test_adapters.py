"""Adapters against the real transformers-5 models: every source key lands on a model key."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import TINY_ARCHS

from d2moe.errors import InputError, UnsupportedModelError
from d2moe.quantize.adapters import SUPPORTED, ExpertKey, FusedExpertKey, adapter_for
from d2moe.quantize.convert.source import SourceCheckpoint


def _meta_model(adapter, config: dict):
    with torch.device("meta"):
        return adapter.model_class()(adapter.hf_config(config))


def _source_keys(path) -> list[str]:
    source = SourceCheckpoint(path)
    source.index_weights()
    return sorted(source.weight_map)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("layout", ["legacy", "fused"])
def test_source_keys_map_onto_model_keys(arch, layout, tiny_checkpoint_factory):
    src = tiny_checkpoint_factory(arch, layout=layout)
    config = json.loads((src / "config.json").read_text())
    adapter = adapter_for(config)
    model = _meta_model(adapter, config)
    model_keys = set(model.state_dict())
    moe = adapter.moe_layers(config)
    num_experts, shapes = adapter.num_experts(config), adapter.matrix_shapes(config)

    dense, experts = set(), {}
    for key in _source_keys(src):
        ref = adapter.expert_key(key)
        if ref is None:
            dense.add(adapter.dense_key(key))
        elif isinstance(ref, ExpertKey):
            assert layout == "legacy"
            experts[(ref.layer, ref.expert, ref.matrix)] = key
        else:
            assert layout == "fused" and isinstance(ref, FusedExpertKey)
            for m in ref.matrices:
                experts.update({(ref.layer, e, m): key for e in range(num_experts)})
    expert_params = {f"{adapter.experts_path(layer)}.{p}" for layer in moe for p in ("gate_up_proj", "down_proj")}
    assert dense | expert_params == model_keys  # nothing lost, nothing invented
    assert not dense & expert_params
    assert set(experts) == {(layer, e, m) for layer in moe for e in range(num_experts) for m in ("gate", "up", "down")}

    for layer in moe:
        block = model.get_submodule(adapter.experts_path(layer))
        inter, hidden = shapes["gate"]
        assert tuple(block.gate_up_proj.shape) == (num_experts, 2 * inter, hidden)
        assert tuple(block.down_proj.shape) == (num_experts, *shapes["down"])
        assert tuple(model.state_dict()[adapter.router_key(layer)].shape) == (num_experts, hidden)
    # the MoE layers are exactly the decoder layers that hold routed experts
    with_experts = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    assert with_experts == moe


def test_moe_layer_rules_follow_the_config():
    base = adapter_for({"model_type": "qwen2_moe"})
    cfg = {"model_type": "qwen2_moe", "num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    assert base.moe_layers(cfg) == [1, 5]
    ds = adapter_for({"model_type": "deepseek_v3"})
    assert ds.moe_layers({"model_type": "deepseek_v3", "num_hidden_layers": 5, "first_k_dense_replace": 2}) == [2, 3, 4]


def test_phimoe_router_is_renamed_and_mixtral_block_moves():
    phi = adapter_for({"model_type": "phimoe"})
    assert phi.dense_key("model.layers.2.block_sparse_moe.gate.weight") == "model.layers.2.mlp.router.weight"
    assert phi.router_key(2) == "model.layers.2.mlp.router.weight"
    mix = adapter_for({"model_type": "mixtral"})
    assert mix.dense_key("model.layers.0.block_sparse_moe.gate.weight") == "model.layers.0.mlp.gate.weight"
    assert mix.expert_key("model.layers.7.block_sparse_moe.experts.3.w3.weight") == ExpertKey(7, 3, "up")
    assert mix.expert_key("model.layers.7.mlp.experts.gate_up_proj") == FusedExpertKey(7, ("gate", "up"))
    assert mix.expert_key("model.layers.7.self_attn.q_proj.weight") is None


def test_unsupported_and_remote_code_configs_are_refused():
    with pytest.raises(UnsupportedModelError, match="llama.*supports.*mixtral"):
        adapter_for({"model_type": "llama"})
    with pytest.raises(UnsupportedModelError) as info:
        adapter_for({})
    assert all(name in str(info.value) for name in SUPPORTED)
    with pytest.raises(UnsupportedModelError, match="remote code"):
        adapter_for({"model_type": "mixtral", "auto_map": {"AutoModel": "modeling_x.X"}})
    with pytest.raises(InputError, match="JSON object"):
        adapter_for(["mixtral"])


def test_quantized_or_unknown_expert_tensors_are_refused():
    ds = adapter_for({"model_type": "deepseek_v3"})
    with pytest.raises(UnsupportedModelError, match="weight_scale_inv.*unquantized"):
        ds.expert_key("model.layers.3.mlp.experts.5.gate_proj.weight_scale_inv")
    mix = adapter_for({"model_type": "mixtral"})
    with pytest.raises(UnsupportedModelError, match="w4.*does not know"):
        mix.expert_key("model.layers.0.block_sparse_moe.experts.0.w4.weight")


def test_deepseek_multi_token_prediction_layer_is_ignored():
    ds = adapter_for({"model_type": "deepseek_v3"})
    cfg = {"model_type": "deepseek_v3", "num_hidden_layers": 61}
    assert ds.is_ignored("model.layers.61.mlp.experts.0.up_proj.weight", cfg)
    assert not ds.is_ignored("model.layers.60.mlp.experts.0.up_proj.weight", cfg)
    assert not ds.is_ignored("lm_head.weight", cfg)


def test_tiny_checkpoint_is_what_save_pretrained_writes(tiny_checkpoint_factory):
    src = tiny_checkpoint_factory("mixtral", sharded=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    shard = src / index["weight_map"]["model.layers.0.block_sparse_moe.experts.0.w1.weight"]
    with safe_open(str(shard), framework="pt") as f:
        w = f.get_tensor("model.layers.0.block_sparse_moe.experts.0.w1.weight")
    assert tuple(w.shape) == (128, 64) and 0.01 < w.std().item() < 0.04  # real-model scale
