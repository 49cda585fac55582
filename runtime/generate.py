"""A small decode loop over the model's own forward (not `model.generate`): we own timing and streaming.

Several requests run as one batch with left padding; position ids come from the attention mask so a
padded row sees the same positions as it would alone. KV lives in a transformers `DynamicCache`
whose bytes are reported to `on_step` (the memory meter counts them against the budget).

Shape letters: B = batch (requests), S = prompt length (padded), V = vocabulary.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from d2moe.errors import UsageError
from d2moe.kernels.dispatch import torch_threads
from d2moe.runtime.budget import text_config, with_defaults
from d2moe.runtime.memory import prefill_allocator

# transformers 5.2x warns on every forward that `past_key_values` will be renamed `cache` (in 5.40):
# the decode loop calls forward once per token, and the warning would interleave with streamed text
warnings.filterwarnings("ignore", message=r".*`past_key_values` is deprecated", category=FutureWarning)

# prompt positions per row that `run` prefills in one forward (llama.cpp's default micro-batch): enough rows
# for the expert kernels' tile GEMMs, while a long prompt's activations stay bounded
PREFILL_CHUNK = 512


def forward_tokens(prompt_lengths: Sequence[int]) -> int:
    """Most positions one forward of these prompts computes when the prefill goes PREFILL_CHUNK positions per
    row at a time (RunOptions.forward_tokens: the plan's workspace holds one such forward)."""
    return len(prompt_lengths) * min(max(prompt_lengths), PREFILL_CHUNK)


def within_context(longest_prompt: int, max_new_tokens: int, context: int | None) -> tuple[int, str | None]:
    """(new tokens to generate, a note or None): generation stops where the model's context (config.json's
    max_position_embeddings) ends, as llama.cpp's does at its n_ctx; past it, positions the model never saw turned
    the embedded model's text into one word repeated. At least one token (the prompt's own next token)."""
    if not context or longest_prompt + max_new_tokens <= context:
        return max_new_tokens, None
    allowed = max(1, context - longest_prompt)
    if longest_prompt >= context:
        return 1, (f"the prompt has {longest_prompt} tokens, past the model's context of {context} "
                   "(max_position_embeddings): generating 1 token")
    return allowed, (f"--max-new-tokens {max_new_tokens}: the model's context is {context} tokens "
                     f"(max_position_embeddings) and the prompt has {longest_prompt}: generating {allowed}")


def kv_tokens(prompt_lengths: Sequence[int], max_new_tokens: int, context: int | None) -> int:
    """KV-cache tokens a batch needs: its rows' prompts and the new tokens the model's context leaves room for (what
    Session.generate will make), so a --max-new-tokens past the context does not raise the memory plan."""
    longest = max(prompt_lengths)
    return len(prompt_lengths) * (longest + within_context(longest, max_new_tokens, context)[0])


def context_length(config: dict) -> int | None:
    """The model's context (max_position_embeddings; a multimodal config's text_config), or None. A config.json
    that leaves the field out has its architecture's default, as transformers builds the model."""
    n = text_config(with_defaults(config)).get("max_position_embeddings")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


@dataclass(frozen=True)
class SamplingOptions:
    """How the next token is picked."""

    max_new_tokens: int = 64  # per request
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose mass reaches top_p
    seed: int = 0  # sampling generator seed (ignored when greedy)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens {self.max_new_tokens} must be at least 1")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UsageError(f"--temperature {self.temperature} must be a number >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p {self.top_p} must be in (0, 1]")


@dataclass
class DecodeResult:
    """What the loop produced and how long each phase took."""

    new_tokens: list[list[int]]  # per request, without padding, up to and including EOS
    prompt_tokens: int  # real (unpadded) prompt tokens over the batch
    prefill_s: float
    decode_s: float
    ttft_s: float  # time to the first generated token (prefill + first sampling)
    kv_bytes_peak: int = 0
    steps: int = 0  # forward passes after prefill
    finished: list[bool] = field(default_factory=list)  # ended on EOS (not on max_new_tokens)

    @property
    def generated(self) -> int:
        return sum(len(t) for t in self.new_tokens)


def sample_next(logits: torch.Tensor, opts: SamplingOptions, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from logits [B, V] -> [B] (int64)."""
    logits = logits.float()
    if opts.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / opts.temperature, dim=-1)  # [B, V]
    if opts.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= opts.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids [B, S], attention_mask [B, S]) padded on the left."""
    if not batch or any(len(ids) == 0 for ids in batch):
        raise UsageError("every prompt must encode to at least one token")
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
        mask[row, width - len(ids):] = 1
    return input_ids, mask


def kv_cache_bytes(cache) -> int:
    """Bytes the DynamicCache holds right now (keys + values of every layer)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def decode(
    model,
    prompts: Sequence[Sequence[int]],
    opts: SamplingOptions,
    eos_ids: Sequence[int],
    pad_id: int,
    on_tokens: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    prefill_threads: int | None = None,
    prefill_chunk: int | None = None,
) -> DecodeResult:
    """Generate for a batch of token-id prompts.

    on_tokens(tokens [B], alive [B] bool): called after each sampled step (for streaming).
    on_step(kv_bytes): called after each forward with the KV cache's current size.
    prefill_threads: torch intra-op threads for the prompt's forward only (its GEMMs use them well;
    decode steps keep the caller's setting, where torch's spinning threads would slow the kernels).
    prefill_chunk: most prompt positions per row in one forward (None: the whole prompt at once); a
    longer prompt prefills chunk by chunk into the KV cache, so activations stay bounded by the chunk.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device  # cuda for `run --device cuda`
    input_ids, mask = (t.to(device) for t in left_pad(prompts, pad_id))
    generator = torch.Generator(device).manual_seed(opts.seed) if opts.temperature > 0 else None
    eos = torch.tensor(sorted(set(eos_ids)) or [-1], dtype=torch.long, device=device)
    cache = DynamicCache(config=model.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, S]

    batch = input_ids.shape[0]
    alive = torch.ones(batch, dtype=torch.bool, device=device)
    new_tokens: list[list[int]] = [[] for _ in range(batch)]
    kv_peak = 0

    start = time.perf_counter()
    width = input_ids.shape[1]
    chunk = width if prefill_chunk is None else max(1, int(prefill_chunk))
    with torch_threads(prefill_threads or torch.get_num_threads()), prefill_allocator():
        for lo in range(0, width, chunk):  # each chunk attends to the cache so far and to itself (causal)
            hi = min(width, lo + chunk)
            out = model(input_ids=input_ids[:, lo:hi], attention_mask=mask[:, :hi], position_ids=positions[:, lo:hi],
                        past_key_values=cache, use_cache=True, logits_to_keep=1)
            if on_step and hi < width:
                on_step(kv_cache_bytes(cache))
    token = sample_next(out.logits[:, -1], opts, generator)  # [B]
    ttft = time.perf_counter() - start
    prefill_s = ttft
    kv_peak = max(kv_peak, kv_cache_bytes(cache))
    if on_step:
        on_step(kv_peak)

    steps = 0
    decode_start = time.perf_counter()
    while True:
        for row in range(batch):
            if alive[row]:
                new_tokens[row].append(int(token[row]))
        if on_tokens:
            on_tokens(token, alive.clone())
        alive &= ~torch.isin(token, eos)
        if not alive.any() or steps + 1 >= opts.max_new_tokens:
            break
        token = torch.where(alive, token, torch.full_like(token, pad_id))
        mask = torch.cat([mask, alive.long()[:, None]], dim=-1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                    past_key_values=cache, use_cache=True)
        token = sample_next(out.logits[:, -1], opts, generator)
        steps += 1
        kv_now = kv_cache_bytes(cache)
        kv_peak = max(kv_peak, kv_now)
        if on_step:
            on_step(kv_now)
    decode_s = time.perf_counter() - decode_start
    return DecodeResult(
        new_tokens=new_tokens, prompt_tokens=int(mask[:, : input_ids.shape[1]].sum()), prefill_s=prefill_s,
        decode_s=decode_s, ttft_s=ttft, kv_bytes_peak=kv_peak, steps=steps,
        finished=[bool(t) and t[-1] in set(eos.tolist()) for t in new_tokens],
    )
