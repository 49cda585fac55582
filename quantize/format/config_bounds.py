"""Bounds on config.json before anything is sized from it.

A packed checkpoint's config.json decides the sizes of what `run` allocates (embeddings, logits,
KV cache, attention heads) and what the router does (top-k). Values no real model has (vocab 1e12,
top-k 0 or above the expert count, 0 heads, head_dim 1e6, negative rope theta) are refused here,
when the checkpoint is opened, with the field named.
"""

from __future__ import annotations

import math

from d2moe.errors import FormatError, InputError
from d2moe.quantize.format.constants import MAX_DIM, MAX_LAYERS

MAX_VOCAB = 1 << 22  # 4M tokens (the largest real vocabularies are ~260k)
MAX_HIDDEN = 1 << 16
MAX_HEADS = 1024
MAX_HEAD_DIM = 2048
MAX_POSITIONS = 1 << 24

# field -> (lowest, highest); a field the config does not have (or sets to null) is not checked
INT_BOUNDS = {
    "vocab_size": (1, MAX_VOCAB),
    "hidden_size": (1, MAX_HIDDEN),
    "num_hidden_layers": (1, MAX_LAYERS),
    "num_attention_heads": (1, MAX_HEADS),
    "num_key_value_heads": (1, MAX_HEADS),
    "head_dim": (1, MAX_HEAD_DIM),
    "max_position_embeddings": (1, MAX_POSITIONS),
    "intermediate_size": (1, MAX_DIM),
    "moe_intermediate_size": (1, MAX_DIM),
    "shared_expert_intermediate_size": (0, MAX_DIM),
    "n_shared_experts": (0, 256),
    "sliding_window": (0, MAX_POSITIONS),
    "q_lora_rank": (1, MAX_HIDDEN),
    "kv_lora_rank": (1, MAX_HIDDEN),
    "qk_rope_head_dim": (1, MAX_HEAD_DIM),
    "qk_nope_head_dim": (1, MAX_HEAD_DIM),
    "v_head_dim": (1, MAX_HEAD_DIM),
}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_config_bounds(hf_config, num_experts: int, where: str) -> None:
    """FormatError naming the first config.json field outside what any real model uses."""
    values = {k: getattr(hf_config, k, None) for k in INT_BOUNDS}
    for name, (lo, hi) in INT_BOUNDS.items():
        v = values[name]
        if v is None:
            continue
        if not _is_int(v) or not lo <= v <= hi:
            raise FormatError(f"{where}: {name} {v!r} must be an integer in {lo}..{hi} (corrupt or forged config.json)")
    heads, kv = values["num_attention_heads"], values["num_key_value_heads"]
    if heads is not None and kv is not None and heads % kv:
        raise FormatError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    # hidden_size need not divide by the heads: transformers takes head_dim = hidden_size // heads (a trained
    # 256-wide model with 6 heads is valid); the dense shapes check at load catches a forged combination.
    if values["sliding_window"] == 0 and getattr(hf_config, "use_sliding_window", True):
        raise FormatError(f"{where}: sliding_window 0 (a window of no tokens): null disables it")
    top_k = getattr(hf_config, "num_experts_per_tok", None)
    if not _is_int(top_k) or not 1 <= top_k <= num_experts:
        raise FormatError(f"{where}: num_experts_per_tok {top_k!r} must be an integer in 1..{num_experts} (the experts "
                          "per layer)")
    eps = getattr(hf_config, "rms_norm_eps", None)
    if eps is not None and not (isinstance(eps, (int, float)) and 0 < eps < 1):
        raise FormatError(f"{where}: rms_norm_eps {eps!r} must lie in (0, 1)")
    for theta in _rope_thetas(hf_config):
        if not (isinstance(theta, (int, float)) and not isinstance(theta, bool) and math.isfinite(theta) and theta > 0):
            raise FormatError(f"{where}: rope_theta {theta!r} must be a positive number")
    vocab = values["vocab_size"]
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids = getattr(hf_config, name, None)
        for i in ids if isinstance(ids, (list, tuple)) else [ids]:
            if i is not None and (not _is_int(i) or not 0 <= i < (vocab or MAX_VOCAB)):
                raise FormatError(f"{where}: {name} {ids!r} must be token ids in 0..{(vocab or MAX_VOCAB) - 1}")


def _rope_thetas(hf_config) -> list:
    out = []
    if getattr(hf_config, "rope_theta", None) is not None:
        out.append(hf_config.rope_theta)
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict):
        for v in [params, *(x for x in params.values() if isinstance(x, dict))]:
            if v.get("rope_theta") is not None:
                out.append(v["rope_theta"])
    return out


def check_source_config(adapter, config: dict, src) -> None:
    """pack and train-router, before any work: the source's config.json within what a packed one must meet (a
    packed checkpoint's is checked again when opened, where a bad value once surfaced after the whole pack)."""
    try:
        check_config_bounds(adapter.hf_config(config), int(adapter.num_experts(config)), f"{src}/config.json")
    except FormatError as exc:
        raise InputError(f"{str(exc).replace(' (corrupt or forged config.json)', '')}: correct the source's "
                         "config.json") from None
