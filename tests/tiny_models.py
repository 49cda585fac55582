"""Tiny random Mixture-of-Experts checkpoints, written the way a user downloads them.

`make_tiny_checkpoint(arch, path)` builds a real transformers-5 model from a small config
(hidden 64, expert intermediate 128, 4 experts, top-2, vocab 256: every size a multiple of 64
so group size 64 works), saves it with `save_pretrained` (safetensors; sharded on request) and
writes a small offline word-level tokenizer with a chat template beside it.

`layout="legacy"` keeps what `save_pretrained` writes (per-expert keys such as
`model.layers.0.block_sparse_moe.experts.0.w1.weight`); `layout="fused"` writes the in-memory
state dict instead (`model.layers.0.mlp.experts.gate_up_proj [E, 2I, H]`), the other form a
checkpoint can take.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "phimoe")

_SPECIALS = ("<unk>", "<pad>", "<s>", "</s>")
UNK_ID, PAD_ID, BOS_ID, EOS_ID = range(4)

_CORPUS = (
    "the quick brown fox jumps over the lazy dog .",
    "a mixture of experts routes every token to a few experts .",
    "memory is small so experts load from disk when they are needed .",
    "one stored copy of each expert serves every bit width .",
    "hello world , this is a tiny model for tests .",
    "user : what is the capital of france ? assistant : paris .",
    "numbers 0 1 2 3 4 5 6 7 8 9 and letters a b c d e f g h i j k l m n o p q r s t u v w x y z",
)

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=256,
    initializer_range=0.02,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
    tie_word_embeddings=False,
)

_MLA = dict(num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16)

_ARCH_CONFIG: dict[str, dict] = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
        shared_expert_intermediate_size=128, decoder_sparse_step=1,
    ),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, decoder_sparse_step=1, head_dim=16),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    # layer 0 keeps a dense MLP (first_k_dense_replace=1): only layers 1, 2 are MoE
    "deepseek_v2": dict(
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, n_shared_experts=1,
        first_k_dense_replace=1, num_hidden_layers=3, n_group=1, topk_group=1, **_MLA,
    ),
    "deepseek_v3": dict(
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, n_shared_experts=1,
        first_k_dense_replace=1, num_hidden_layers=3, n_group=1, topk_group=1, **_MLA,
    ),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2),
}


def tiny_config(arch: str, **overrides):
    """The transformers config of the tiny `arch` model (overrides win)."""
    from transformers import AutoConfig

    if arch not in _ARCH_CONFIG:
        raise ValueError(f"no tiny config for {arch!r}: use one of {TINY_ARCHS}")
    return AutoConfig.for_model(arch, **{**_COMMON, **_ARCH_CONFIG[arch], **overrides})


def make_tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised (std 0.02, like a real model) tiny `arch` model in eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def make_tiny_tokenizer(path: Path):
    """Train a word-level tokenizer on a few sentences (offline, deterministic) and save it to `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=256, special_tokens=list(_SPECIALS), min_frequency=1)
    tok.train_from_iterator(list(_CORPUS), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def make_tiny_checkpoint(
    arch: str,
    path: Path,
    seed: int = 0,
    sharded: bool = False,
    layout: str = "legacy",
    dtype: str = "float32",
    tokenizer: bool = True,
    **overrides,
) -> Path:
    """Write a tiny random `arch` checkpoint (config.json, safetensors, tokenizer) to `path`; return `path`.

    sharded: several `model-0000x-of-0000n.safetensors` + `model.safetensors.index.json`.
    layout: "legacy" (per-expert keys, as `save_pretrained` writes) or "fused" (model state-dict keys).
    overrides: config fields (e.g. num_hidden_layers=3, hidden_size=128).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = make_tiny_model(arch, seed=seed, dtype=getattr(torch, dtype), **overrides)
    if layout == "legacy":
        model.save_pretrained(str(path), max_shard_size="200KB" if sharded else "50GB")
    elif layout == "fused":
        _save_fused(model, path, sharded)
    else:
        raise ValueError(f"layout {layout!r}: use 'legacy' or 'fused'")
    if tokenizer:
        make_tiny_tokenizer(path)
    return path


def _save_fused(model, path: Path, sharded: bool) -> None:
    """Save the in-memory (fused-expert) state dict as a HF checkpoint: config + safetensors (+ index)."""
    from safetensors.torch import save_file

    model.config.save_pretrained(str(path))
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    if not sharded:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(state)
    chunks = [names[i::3] for i in range(3)]
    weight_map, total = {}, 0
    for i, chunk in enumerate(chunks):
        fname = f"model-{i + 1:05d}-of-{len(chunks):05d}.safetensors"
        save_file({k: state[k] for k in chunk}, str(path / fname), metadata={"format": "pt"})
        for k in chunk:
            weight_map[k] = fname
            total += state[k].numel() * state[k].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
