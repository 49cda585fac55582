"""Model assembly: the architecture's transformers class, dense weights from the packed checkpoint,
each MoE block's experts module replaced by `OffloadedExperts`.

The model is built on the meta device (no memory), its experts modules are swapped, the dense
state dict is loaded with `assign=True` (the loaded tensors become the parameters, in their source
dtype), and the non-persistent buffers the state dict does not carry (rotary inverse frequencies)
are re-created on the CPU by re-running their module's constructor. The model's own routers stay.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection

import torch
from torch import nn

from d2moe.errors import FormatError


def build_skeleton(adapter, config: dict) -> nn.Module:
    """The transformers model of `config` on the meta device, in eval mode, with SDPA attention."""
    hf_config = adapter.hf_config(config)
    hf_config._attn_implementation = "sdpa"
    try:
        with torch.device("meta"):
            model = adapter.model_class()(hf_config)
    except (KeyError, ValueError, TypeError, AttributeError, IndexError, ZeroDivisionError) as exc:
        # config.json values transformers cannot build a model from (an unknown activation or rope type, ...)
        raise FormatError(f"config.json describes a {adapter.model_type} model transformers cannot build "
                          f"({type(exc).__name__}: {str(exc)[:120]}): restore the source's config.json") from None
    return model.eval()


def meta_buffer_bytes(model: nn.Module) -> int:
    """Bytes of the buffers that will be re-created (they are not in the state dict)."""
    return sum(b.numel() * b.element_size() for b in model.buffers() if b.is_meta)


def swap_experts(model: nn.Module, adapter, moe_layers, make_experts: Callable[[int, nn.Module], nn.Module]) -> None:
    """Replace each MoE layer's experts module by `make_experts(layer, original)`."""
    for layer in moe_layers:
        path = adapter.experts_path(layer)
        parent_name, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_name)
        original = getattr(parent, attr, None)
        if original is None:
            raise FormatError(f"the {adapter.model_type} model has no module {path}: the checkpoint's MoE layers "
                              f"do not match its config.json; re-run `d2moe pack`")
        setattr(parent, attr, make_experts(layer, original))


def float32_kept(model: nn.Module, dtype: torch.dtype) -> Callable[[str], bool]:
    """Whether transformers keeps a weight in float32 in a `dtype` model (its class's keep-in-float32 modules)."""
    names = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ()) if dtype in (torch.float16, torch.bfloat16) else set()
    if dtype == torch.float16:
        names |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    patterns = [re.compile(rf"(^|\.){re.escape(n)}(\.|$)") for n in names]
    return lambda key: any(p.search(key) for p in patterns)


def in_model_dtypes(model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """transformers' rule for loading a checkpoint in `dtype`: every float weight in it but those the model keeps
    in float32. A checkpoint may store its routers in float32 beside bfloat16 weights; a Linear router would then
    multiply bfloat16 inputs by float32 weights and fail."""
    kept = float32_kept(model, dtype)
    out = {}
    for key, t in state.items():
        want = torch.float32 if kept(key) else dtype
        out[key] = t.to(want) if t.is_floating_point() and t.dtype != want else t
    return out


def load_dense_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str = "dense.safetensors",
                       converted: Collection[str] = (), dtype: torch.dtype | None = None) -> None:
    """Assign the dense weights (in `dtype` as transformers would load them, where given); every parameter must end
    up real (tied weights re-tied), except the weights of the modules in `converted` (converted while loading:
    kernels.dense.patch_linears installs them)."""
    if dtype is not None:
        state = in_model_dtypes(model, state, dtype)
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # size mismatches: the weights are not the model config.json describes
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc)[:200])
        raise FormatError(f"{where} does not match the model its config.json describes ({first}): mixed-up or "
                          "edited files, re-pack") from None
    if result.unexpected_keys:
        raise FormatError(f"{where} holds {len(result.unexpected_keys)} tensors the model does not have "
                          f"(e.g. {result.unexpected_keys[0]!r}): the checkpoint does not match its config.json")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    skip = {f"{name}.weight" for name in converted}
    missing = [n for n, p in model.named_parameters() if p.is_meta and n not in skip]
    if missing:
        raise FormatError(f"{where} lacks {len(missing)} weights the model needs (e.g. {missing[0]!r}); re-run `d2moe pack`")


def materialise_buffers(model: nn.Module, skip: str = "") -> None:
    """Re-create non-persistent buffers left on meta by rebuilding their module on the CPU; the modules under
    `skip` (e.g. decoder layers whose weights, persistent buffers included, come later) are left as they are."""
    def skipped(name: str) -> bool:
        return bool(skip) and (name == skip or name.startswith(skip + "."))

    for name, module in list(model.named_modules()):
        if skipped(name) or not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        config = getattr(module, "config", None)
        if config is None:
            raise FormatError(f"module {name} ({type(module).__name__}) has buffers the checkpoint cannot restore")
        try:
            fresh = type(module)(config)
        except (KeyError, ValueError, TypeError, AttributeError, IndexError, ZeroDivisionError) as exc:
            raise FormatError(f"config.json: module {name} cannot be rebuilt from it ({type(exc).__name__}: "
                              f"{str(exc)[:120]}): restore the source's config.json") from None
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, fresh)
    left = [n for n, b in model.named_buffers() if b.is_meta and not skipped(n)]
    if left:
        raise FormatError(f"buffer {left[0]} could not be materialised")


def assemble(ckpt, adapter, make_experts: Callable[[int, nn.Module], nn.Module],
             model: nn.Module | None = None, converter=None) -> nn.Module:
    """The runnable model: skeleton (or the given meta `model`) + swapped experts + dense weights + buffers.
    `converter` (kernels.dense.StreamingConverter) converts dense layers as they are read."""
    model = build_skeleton(adapter, ckpt.config) if model is None else model
    swap_experts(model, adapter, ckpt.moe_layers, make_experts)
    state = ckpt.load_dense(sink_for=converter.sink_for if converter is not None else None)
    load_dense_weights(model, state, converted=converter.converted if converter is not None else (),
                       dtype=ckpt.dtype if isinstance(ckpt.dtype, torch.dtype) else getattr(torch, ckpt.dtype))
    materialise_buffers(model)
    return model.eval()


def expert_activation(original: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation of a transformers experts module (SwiGLU's act on the gate projection)."""
    act = getattr(original, "act_fn", None)
    if act is None:
        raise FormatError(f"{type(original).__name__} has no act_fn: this experts module is not SwiGLU")
    return act
