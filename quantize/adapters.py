"""Architecture adapters: where each supported MoE model keeps its experts.

An adapter answers, for one `model_type`:
- which checkpoint keys are expert matrices, in either form a checkpoint may hold them:
  per-expert ("legacy", what transformers' `save_pretrained` writes, e.g.
  `model.layers.3.block_sparse_moe.experts.5.w1.weight`) or fused (the transformers-5 module
  form, `model.layers.3.mlp.experts.gate_up_proj [E, 2I, H]` and `...down_proj [E, H, I]`);
- the transformers-5 model key of every other (dense) weight;
- the model class, the MoE layers, the expert count and matrix shapes, the experts module to
  replace and the model's own router weight.

Matrix names are the SwiGLU roles: gate [I, H], up [I, H], down [H, I] (H hidden size, I the
expert's intermediate size). Only models transformers implements natively are supported: a
config asking for remote code is refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

from d2moe.errors import InputError, UnsupportedModelError


@dataclass(frozen=True)
class ExpertKey:
    """A per-expert checkpoint tensor: matrix `matrix` of expert `expert` in layer `layer`."""

    layer: int
    expert: int
    matrix: str  # "gate" | "up" | "down"


@dataclass(frozen=True)
class FusedExpertKey:
    """A fused checkpoint tensor holding one or two matrices of every expert of a layer.

    `matrices == ("gate", "up")`: shape [E, 2I, H], gate rows first; `("down",)`: [E, H, I].
    """

    layer: int
    matrices: tuple[str, ...]


@dataclass(frozen=True)
class Adapter:
    """How one architecture lays out its experts (see the module docstring)."""

    model_type: str
    class_name: str  # transformers model class, e.g. "MixtralForCausalLM"
    experts_attr: str  # config field with the routed-expert count
    intermediate_attr: str  # config field with one expert's intermediate size
    legacy_block: str  # module name of the MoE block in legacy checkpoints
    legacy_names: tuple[tuple[str, str], ...]  # (legacy matrix name, our matrix name)
    dense_renames: tuple[tuple[str, str], ...] = ()  # regex renames from checkpoint to model keys
    router_name: str = "gate"  # the router module inside the model's MoE block
    latent_attention: bool = False  # DeepSeek's MLA: transformers expands keys to every head, so kv heads = heads

    # ---- config -----------------------------------------------------------------------------

    def hf_config(self, config: dict):
        """The transformers config object (fills defaults exactly as the model does); cached per config."""
        cfg = _hf_config(self.model_type, json.dumps(config, sort_keys=True, default=str))
        heads, kv_heads = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
        if self.latent_attention and kv_heads != heads:
            raise InputError(f"config.json of this {self.model_type} model sets num_key_value_heads {kv_heads} but "
                             f"num_attention_heads {heads}: its latent attention (MLA) gives every head its own keys "
                             f"and values, so transformers cannot run it; set both to {heads}, as DeepSeek's configs do")
        return cfg

    def model_class(self):
        import transformers

        return getattr(transformers, self.class_name)

    def num_layers(self, config: dict) -> int:
        return int(self.hf_config(config).num_hidden_layers)

    def num_experts(self, config: dict) -> int:
        return int(getattr(self.hf_config(config), self.experts_attr))

    def moe_layers(self, config: dict) -> list[int]:
        """Indices of the decoder layers whose MLP is a routed mixture of experts."""
        cfg = self.hf_config(config)
        n = int(cfg.num_hidden_layers)
        if self.model_type in ("qwen2_moe", "qwen3_moe"):
            only_mlp = set(cfg.mlp_only_layers or [])
            step = int(cfg.decoder_sparse_step)
            if int(cfg.num_experts) <= 0 or step <= 0:
                return []
            return [i for i in range(n) if i not in only_mlp and (i + 1) % step == 0]
        if self.model_type in ("deepseek_v2", "deepseek_v3"):
            first = int(cfg.first_k_dense_replace or 0)
            return list(range(first, n))
        return list(range(n))

    def matrix_shapes(self, config: dict) -> dict[str, tuple[int, int]]:
        """(rows, columns) of each expert matrix: gate/up [I, H], down [H, I]."""
        cfg = self.hf_config(config)
        hidden, inter = int(cfg.hidden_size), int(getattr(cfg, self.intermediate_attr))
        return {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}

    # ---- keys -------------------------------------------------------------------------------

    def experts_path(self, layer: int) -> str:
        """Model module holding layer `layer`'s routed experts (the module the runtime replaces)."""
        return f"model.layers.{layer}.mlp.experts"

    def router_key(self, layer: int) -> str:
        """Model state-dict key of layer `layer`'s own router weight [E, H]."""
        return f"model.layers.{layer}.mlp.{self.router_name}.weight"

    def expert_key(self, src_key: str) -> ExpertKey | FusedExpertKey | None:
        """What an expert tensor of the source checkpoint holds; None for a dense tensor."""
        m = _LEGACY.match(src_key)
        if m:
            names = dict(self.legacy_names)
            if m.group("block") != self.legacy_block or m.group("name") not in names:
                raise UnsupportedModelError(
                    f"checkpoint tensor {src_key!r} is an expert matrix this {self.model_type} adapter "
                    f"does not know (expected {', '.join(sorted(names))}): is this really {self.model_type}?"
                )
            return ExpertKey(int(m.group("layer")), int(m.group("expert")), names[m.group("name")])
        m = _FUSED.match(src_key)
        if m:
            matrices = ("gate", "up") if m.group("name") == "gate_up_proj" else ("down",)
            return FusedExpertKey(int(m.group("layer")), matrices)
        if src_key.startswith("layers.") and (_LEGACY.match("model." + src_key) or _FUSED.match("model." + src_key)):
            raise UnsupportedModelError(
                f"checkpoint tensor {src_key!r} lacks the 'model.' prefix of a {self.class_name} checkpoint (saved "
                f"from the base model class?): load it with transformers' AutoModelForCausalLM and save_pretrained "
                "it again")
        if _ANY_EXPERT.search(src_key):  # e.g. FP8 `weight_scale_inv`, GPTQ `qweight`, expert biases
            raise UnsupportedModelError(
                f"checkpoint tensor {src_key!r} is an expert tensor d2moe cannot pack: only unquantized "
                "(float16/bfloat16/float32) bias-free expert weights are supported"
            )
        return None

    def dense_key(self, src_key: str) -> str:
        """The transformers-5 model key of a dense (non-expert) checkpoint tensor."""
        key = src_key
        for pattern, repl in self.dense_renames:
            key = re.sub(pattern, repl, key)
        return key

    def is_ignored(self, src_key: str, config: dict) -> bool:
        """Tensors the model itself does not load (e.g. DeepSeek-V3's multi-token-prediction layer)."""
        m = _LAYER.match(src_key)
        return bool(m) and int(m.group(1)) >= self.num_layers(config)


@lru_cache(maxsize=16)
def _hf_config(model_type: str, config_json: str):
    from transformers import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[model_type].from_dict(json.loads(config_json))
    except Exception as exc:  # transformers validates field values
        why = " ".join(str(exc).split())  # transformers' message runs over lines: the error is one
        raise InputError(f"config.json of this {model_type} model is invalid: {why[:300]}") from exc


_LEGACY = re.compile(
    r"^model\.layers\.(?P<layer>\d+)\.(?P<block>[a-z_]+)\.experts\.(?P<expert>\d+)\.(?P<name>\w+)\.weight$"
)
_FUSED = re.compile(r"^model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<name>gate_up_proj|down_proj)$")
_ANY_EXPERT = re.compile(r"\.experts\.(\d+\.|gate_up_proj|down_proj)")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")

_SWIGLU = (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down"))
_W123 = (("w1", "gate"), ("w3", "up"), ("w2", "down"))

ADAPTERS: dict[str, Adapter] = {
    a.model_type: a
    for a in (
        Adapter(
            "mixtral", "MixtralForCausalLM", "num_local_experts", "intermediate_size",
            legacy_block="block_sparse_moe", legacy_names=_W123,
            dense_renames=((r"\.block_sparse_moe\.", ".mlp."),),
        ),
        Adapter("qwen2_moe", "Qwen2MoeForCausalLM", "num_experts", "moe_intermediate_size", "mlp", _SWIGLU),
        Adapter("qwen3_moe", "Qwen3MoeForCausalLM", "num_experts", "moe_intermediate_size", "mlp", _SWIGLU),
        Adapter("olmoe", "OlmoeForCausalLM", "num_experts", "intermediate_size", "mlp", _SWIGLU),
        Adapter("deepseek_v2", "DeepseekV2ForCausalLM", "n_routed_experts", "moe_intermediate_size", "mlp", _SWIGLU,
                latent_attention=True),
        Adapter("deepseek_v3", "DeepseekV3ForCausalLM", "n_routed_experts", "moe_intermediate_size", "mlp", _SWIGLU,
                latent_attention=True),
        Adapter(
            "phimoe", "PhimoeForCausalLM", "num_local_experts", "intermediate_size",
            legacy_block="block_sparse_moe", legacy_names=_W123,
            dense_renames=((r"\.block_sparse_moe\.", ".mlp."), (r"\.mlp\.gate\.weight$", ".mlp.router.weight")),
            router_name="router",
        ),
    )
}

SUPPORTED = tuple(sorted(ADAPTERS))


def adapter_for(config: dict) -> Adapter:
    """The adapter for a HF `config.json` dict; UnsupportedModelError if there is none."""
    if not isinstance(config, dict):
        raise InputError("config.json must hold a JSON object")
    if config.get("auto_map") or config.get("trust_remote_code"):
        raise UnsupportedModelError(
            "config.json asks for remote code (auto_map/trust_remote_code): d2moe only runs architectures "
            f"transformers implements natively ({', '.join(SUPPORTED)})"
        )
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported: d2moe supports {', '.join(SUPPORTED)}"
        )
    return ADAPTERS[model_type]
