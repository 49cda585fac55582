"""Does a source's config.json describe its weights? Checked before `pack` does any work.

transformers fills every field config.json leaves out with the architecture's default (vocab 32000, 8 experts,
32 layers, ...); save_pretrained writes only the fields that differ from them, so a missing field is normal. A
config that lost a field that differed still builds a model, only not the one the weights are: the pack would
succeed and `run` fail later on files the user cannot fix by packing again. So the dense weights must have the
shapes the config implies, and every weight the model needs must be there (the experts are ExpertSource's).
"""

from __future__ import annotations

from d2moe.errors import InputError


def check_dense_weights(src, source, adapter, dense: list[tuple[str, str]], moe_layers: list[int]) -> None:
    """InputError where a dense tensor's shape differs from the one config.json implies, a tensor is not part of
    that model, or a weight the model needs is missing (the tied LM head and the routed experts excepted)."""
    from d2moe.runtime.model import build_skeleton

    model = build_skeleton(adapter, source.config)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for src_key, model_key in dense:
        shape = tuple(source.info(src_key).shape)
        if model_key not in want:
            raise InputError(f"{src}: tensor {src_key} is not part of the {adapter.model_type} model config.json "
                             "describes (config and weights disagree); restore the source's config.json")
        if shape != want[model_key]:
            raise InputError(f"{src}: tensor {src_key} is {list(shape)}, config.json implies {list(want[model_key])} "
                             "(config and weights disagree); restore the source's config.json")
    have = {model_key for _, model_key in dense}
    experts = tuple(f"{adapter.experts_path(layer)}." for layer in moe_layers)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    for name, _ in model.named_parameters():
        if name not in have and name not in tied and not name.startswith(experts):
            raise InputError(f"{src}: the model config.json describes needs {name}, which the checkpoint lacks "
                             "(config and weights disagree); restore the source's config.json")
