"""Decode attention on the native kernel: transformers' attention function for single-query steps.

`use_decode_attention(model, lib, splitter)` points the model's attention at `ATTENTION` (registered with
transformers' AttentionInterface, masks as SDPA makes them). A step with one query per head, no mask, no
sliding window past its keys and no extra terms runs `d2_attend_one` (kernels/cpu/dense_cpu.c: the KV cache
read in place in its dtype, softmax in float32); everything else calls transformers' SDPA function
unchanged. Why: torch's SDPA on a bf16 cache costs ~3.6 µs per cached key and layer for one query on a
Zen 4 core (BENCHMARKS.md §0.12), ~7x what reading the cache takes. The lossless tier keeps transformers'
own attention (its logits must equal transformers').
"""

from __future__ import annotations

import os

import torch
from torch import nn

ATTENTION = "d2moe_sdpa"
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_state: dict = {}


def _sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs):
    """transformers' attention signature: query [B, Hq, 1, Dk], key [B, Hkv, L, Dk], value [B, Hkv, L, Dv] ->
    ([B, 1, Hq, Dv], None)."""
    lib = _state.get("lib")
    window = kwargs.get("sliding_window")
    if (lib is None or query.device.type != "cpu" or query.shape[2] != 1 or attention_mask is not None
            or dropout or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None
            or kwargs.get("position_bias") is not None or kwargs.get("output_attentions")
            or (window is not None and key.shape[2] > window) or key.dtype not in _DTYPES
            or value.dtype != key.dtype or key.stride(-1) != 1 or value.stride(-1) != 1
            or query.shape[1] % key.shape[1] or torch.is_grad_enabled() and query.requires_grad):
        return _prefill_sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                             is_causal=is_causal, **kwargs)
    b, hq, _, dk = query.shape
    hkv, length, dv = key.shape[1], key.shape[2], value.shape[3]
    q = query.to(torch.float32).contiguous()
    out = torch.empty(b, hq, dv, dtype=torch.float32)
    scale = float(scaling) if scaling is not None else dk ** -0.5
    ks, vs = key.stride(), value.stride()
    rc = lib.d2_attend_one(q.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr(), _DTYPES[key.dtype], b, hq,
                           hkv, length, dk, dv, ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], scale,
                           _state["splitter"].threads)
    if rc != 0:
        return _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                       is_causal=is_causal, **kwargs)
    return out.to(query.dtype).unsqueeze(1), None  # [B, 1, Hq, Dv], as SDPA's transpose(1, 2)


def _prefill_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA, with values narrower than the keys (DeepSeek's MLA: 192 against 128) zero-padded to the
    keys' width and the output cut back (exact: the padded columns of softmax(QK^T) V are zeros). torch's CPU flash
    kernel needs one head width; without it SDPA took the math path, whose bf16 GEMMs grow with the context chunk by
    chunk and each kept a oneDNN kernel: a 3 500-token prompt held 52 MiB more on a tiny DeepSeek-V3 (BENCHMARKS.md
    §0.18)."""
    dv, dk = value.shape[-1], query.shape[-1]
    if dv >= dk or query.device.type != "cpu":
        return _sdpa()(module, query, key, value, attention_mask, **kwargs)
    out, weights = _sdpa()(module, query, key, torch.nn.functional.pad(value, (0, dk - dv)), attention_mask, **kwargs)
    return out[..., :dv], weights


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, decode_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def use_decode_attention(model: nn.Module, lib, splitter) -> bool:
    """Point `model`'s attention at the native decode path (transformers' SDPA for the rest); False where
    the library is not built or the model is not on SDPA."""
    if lib is None or getattr(model.config, "_attn_implementation", None) != "sdpa" \
            or os.environ.get("D2MOE_DECODE_ATTENTION") == "0":  # "0": transformers' SDPA throughout (A/B)
        return False
    register()
    _state.update(lib=lib, splitter=splitter)
    model.config._attn_implementation = ATTENTION
    return True
