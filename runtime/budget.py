"""The memory plan of a run: what a memory budget must hold, and what is left for the expert cache.

Budget = everything the run holds on its device:

    dense weights + KV cache (max tokens) + staging (expert bytes landing from disk)
    + workspace (what the expert kernels and the model's activations hold for max tokens)
    + expert cache

The expert cache gets what the rest leaves. The kernels compute from the packed bytes, so the
workspace is activations plus one bounded dequantized tile (prefill), not an fp32 expert. The
pipeline needs one expert computing while the next one loads, so the cache must hold at least two
expert prefixes at the highest level in use; a budget below that fails before anything is loaded,
saying the minimum.

Public API
----------
MemoryPlan.build(budget_bytes, dense_bytes, kv_bytes_per_token, max_tokens, expert_bytes,
                 workspace_bytes, staging_slots=1) -> MemoryPlan     # BudgetError below the minimum
MemoryPlan.for_checkpoint(ckpt, budget_bytes, max_tokens, level=None, kv_dtype_bytes=2,
                          dense_bytes=None, staging_slots=1, threads=1, forward_tokens=None) -> MemoryPlan
    fields: budget, dense, kv, staging, workspace, expert_cache, expert_bytes, minimum;
    .summary() -> dict for --json / tables; .min_cache_experts
    .with_dense(dense_bytes) -> MemoryPlan            # converted dense weights' saving goes to the cache
kv_bytes_per_token(config, dtype_bytes=2) -> int   # layers x 2 (K,V) x kv_heads x head_dim x dtype
workspace_bytes(config, matrix_shapes, tokens, threads=1, context=None) -> int   # one forward of `tokens` positions
safetensors_payload_bytes(path) -> int              # tensor bytes of a safetensors file (header only)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from d2moe.errors import BudgetError, FormatError, UsageError, min_mib
from d2moe.quantize.format.constants import DENSE_NAME
from d2moe.runtime.units import format_size

MIN_CACHE_EXPERTS = 2  # one computing, one loading
_MIB = 1024**2


@dataclass(frozen=True)
class MemoryPlan:
    """Byte split of one memory budget (all fields in bytes)."""

    budget: int  # --memory-budget
    dense: int  # non-expert weights as held on the device
    kv: int  # KV cache for max_tokens
    staging: int  # buffers expert bytes land in before they join the cache
    workspace: int  # expert kernels' buffers and the model's activations for max tokens
    expert_cache: int  # what is left: capacity given to ExpertCache
    expert_bytes: int  # largest expert prefix at the highest level in use
    minimum: int  # smallest budget that can run

    @property
    def min_cache_experts(self) -> int:
        return MIN_CACHE_EXPERTS

    def with_dense(self, dense_bytes: int) -> MemoryPlan:
        """The plan once the dense weights are known to hold `dense_bytes`: what they hold below the
        planned size (--dense-weights int8/int4 convert them after loading) joins the expert cache."""
        saved = max(0, self.dense - int(dense_bytes))
        return replace(self, dense=self.dense - saved, expert_cache=self.expert_cache + saved,
                       minimum=self.minimum - saved)

    @property
    def cache_experts(self) -> int:
        """How many full top-level expert prefixes the cache can hold."""
        return self.expert_cache // self.expert_bytes if self.expert_bytes else 0

    def summary(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def build(
        cls,
        budget_bytes: int,
        dense_bytes: int,
        kv_bytes_per_token: int,
        max_tokens: int,
        expert_bytes: int,
        workspace_bytes: int,
        staging_slots: int = 1,
    ) -> MemoryPlan:
        for name, v in (("dense_bytes", dense_bytes), ("kv_bytes_per_token", kv_bytes_per_token),
                        ("max_tokens", max_tokens), ("expert_bytes", expert_bytes),
                        ("workspace_bytes", workspace_bytes), ("staging_slots", staging_slots)):
            if v < 0:
                raise UsageError(f"memory plan: {name} = {v} must be >= 0")
        kv = int(kv_bytes_per_token) * int(max_tokens)
        staging = int(staging_slots) * int(expert_bytes)
        fixed = int(dense_bytes) + kv + staging + int(workspace_bytes)
        minimum = fixed + MIN_CACHE_EXPERTS * int(expert_bytes)
        if budget_bytes < minimum:
            raise BudgetError(
                f"memory budget {_size(budget_bytes)} is below the minimum {min_mib(minimum)} MiB for this model "
                f"(dense {_size(dense_bytes)} + KV {_size(kv)} "
                f"+ staging/workspace {_size(staging + workspace_bytes)} "
                f"+ {MIN_CACHE_EXPERTS} experts {_size(MIN_CACHE_EXPERTS * expert_bytes)})",
                minimum=minimum,
            )
        return cls(
            budget=int(budget_bytes), dense=int(dense_bytes), kv=kv, staging=staging,
            workspace=int(workspace_bytes), expert_cache=int(budget_bytes) - fixed,
            expert_bytes=int(expert_bytes), minimum=minimum,
        )

    @classmethod
    def for_checkpoint(
        cls,
        ckpt,
        budget_bytes: int,
        max_tokens: int,
        level: int | None = None,
        kv_dtype_bytes: int = 2,
        dense_bytes: int | None = None,
        staging_slots: int = 1,
        threads: int = 1,
        forward_tokens: int | None = None,
    ) -> MemoryPlan:
        """The plan for a packed checkpoint (`d2moe.quantize.format`), at `level` (default: the highest).

        `dense_bytes` defaults to the tensor bytes of the checkpoint's dense.safetensors (its
        source dtype); pass the held size instead when the run converts dtypes. `forward_tokens`: the
        most positions one forward computes (a chunked prefill's chunk over the batch); the workspace is
        sized for it, attending over up to `max_tokens` keys (default: one forward of all `max_tokens`).
        """
        level = ckpt.cfg.bk if level is None else level
        if dense_bytes is None:
            dense_bytes = safetensors_payload_bytes(_dense_path(ckpt))
        config = with_defaults(ckpt.config)
        return cls.build(
            budget_bytes=budget_bytes,
            dense_bytes=dense_bytes,
            kv_bytes_per_token=kv_bytes_per_token(config, kv_dtype_bytes),
            max_tokens=max_tokens,
            expert_bytes=ckpt.level_nbytes(level),
            workspace_bytes=workspace_bytes(config, ckpt.matrix_shapes, min(forward_tokens or max_tokens, max_tokens),
                                            threads, context=max_tokens),
            staging_slots=staging_slots,
        )


def _size(n: int) -> str:
    """'100 MiB', '1.50 GiB': format_size without a '.00' tail."""
    return format_size(n).replace(".00 ", " ")


def _dense_path(ckpt) -> Path:
    if getattr(ckpt, "dense_path", None) is not None:
        return Path(ckpt.dense_path)
    if getattr(ckpt, "path", None) is not None:
        return Path(ckpt.path) / DENSE_NAME
    raise UsageError("MemoryPlan.for_checkpoint: pass dense_bytes= (the checkpoint exposes no dense file path)")


def with_defaults(config: Mapping) -> Mapping:
    """config.json with the fields it leaves out filled by its architecture's defaults, as transformers builds the
    model (save_pretrained writes only the fields that differ from them, e.g. no num_attention_heads where it is
    the default); the config as it is for an architecture d2moe does not know."""
    from d2moe.errors import D2MoEError
    from d2moe.quantize.adapters import adapter_for

    try:
        return {**adapter_for(dict(config)).hf_config(dict(config)).to_dict(), **config}
    except D2MoEError:
        return config


def text_config(config: Mapping) -> Mapping:
    """The language model's fields: a multimodal config.json's text_config, else the config itself."""
    inner = config.get("text_config")
    return inner if isinstance(inner, Mapping) else config


def kv_bytes_per_token(config: Mapping, dtype_bytes: int = 2) -> int:
    """KV cache bytes one token adds: layers x 2 (K and V) x kv_heads x head_dim x dtype size."""
    cfg = text_config(config)
    try:
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    except KeyError as e:
        raise FormatError(f"config.json has no {e.args[0]!r}: cannot size the KV cache") from e
    return layers * 2 * kv_heads * head_dim * int(dtype_bytes)


def workspace_bytes(config: Mapping, matrix_shapes: Mapping[str, tuple[int, int]], tokens: int, threads: int = 1,
                    context: int | None = None) -> int:
    """Bytes computing `tokens` positions at once may hold besides weights, KV and the cache: the
    expert kernels' working set (d2moe.kernels.dispatch.workspace_bound) plus the model's own
    activations (residual stream and projections in float32, one layer's attention scores of `tokens`
    queries over `context` keys (default `tokens`), the last position's logits), with 24 MiB for the
    allocator's and interpreter's slack."""
    from d2moe.kernels.dispatch import workspace_bound

    cfg = text_config(config)
    tokens = max(1, int(tokens))
    context = max(tokens, int(context or tokens))
    hidden = int(cfg.get("hidden_size") or matrix_shapes["down"][0])
    heads = int(cfg.get("num_attention_heads") or 1)
    vocab = int(cfg.get("vocab_size") or 0)
    dense_inter = int(cfg.get("intermediate_size") or 0) if cfg.get("shared_expert_intermediate_size") else 0
    activations = 4 * tokens * (12 * hidden + 2 * dense_inter) + 4 * heads * tokens * context + 8 * vocab
    return workspace_bound(matrix_shapes, tokens, threads) + activations + 24 * _MIB


def safetensors_payload_bytes(path: str | Path) -> int:
    """Sum of tensor byte sizes in a safetensors file, read from its (validated) header only."""
    from d2moe.quantize.format.safetensors_io import read_header

    header = read_header(Path(path))
    return sum(t.nbytes for t in header.tensors.values())
