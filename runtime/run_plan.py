"""What a run is asked for (`RunOptions`) and its plan, made before any weight is read (`plan_run`).

`plan_run` opens and checks the packed checkpoint, picks the policy and sizes memory: dense + KV (for
`max_tokens`) + staging + workspace + expert cache <= budget, else BudgetError naming the minimum.
`Session` starts here; tools that only size budgets (demo, bench) call it alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from d2moe.errors import BudgetError, InputError, UsageError, min_mib
from d2moe.quantize.format.sections import DTYPE_BYTES
from d2moe.runtime.units import format_size


@dataclass(frozen=True)
class RunOptions:
    """How a packed checkpoint runs."""

    memory_budget: int  # bytes the run may hold: dense + KV + expert cache + staging + workspace
    policy: str = "d2moe"  # see d2moe.runtime.policies.POLICIES
    level: int | None = None  # uniform level (moqe-dynaio; overrides the gate for d2moe)
    router_levels: tuple[int, int] | None = None  # (high, low) for router-weight levels
    schedule: str | None = None  # load order override: hebf | johnson | id (default: the policy's)
    cache_policy: str = "decay"  # decay | lru
    cache_decay: float = 0.9  # per-step decay of activation frequency
    io_threads: int = 4  # reads in flight at once (also the staging slots)
    io_bandwidth: float | None = None  # bytes/s cap emulating a device disk (None: the real disk)
    direct_io: bool = True  # O_DIRECT where the filesystem allows it
    max_tokens: int = 1024  # KV-cache tokens reserved: batch x (prompt + new tokens)
    # most positions one forward computes (None: max_tokens): longer prompts prefill in chunks of
    # forward_tokens // batch positions per row, and the workspace is sized for one such chunk
    forward_tokens: int | None = None
    calibration_tokens: int = 16  # edgemoe: tokens counted before per-expert levels are fixed
    use_gate: bool = True  # use the checkpoint's trained gate when the policy wants one
    threads: int | None = None  # kernel row threads (None: the process default, d2moe.options.set_threads)
    kernels: str = "auto"  # auto (native where it builds) | native | reference (the torch oracle)
    dense_weights: str = "source"  # source (the packed dtype) | int8 (per-row, half of bf16's bytes) | int4 (MWQ 4-bit)
    activations: str = "auto"  # decode activations in the expert kernels: auto (int8 up to level 4) | int8 | int16
    device: str = "cpu"  # cpu | cuda (experts cached on the GPU, CUDA kernels; d2moe.runtime.device)
    on_miss: str = "load"  # what a miss does: load | lowbit | substitute | skip | reuse (d2moe.runtime.miss)
    miss_threshold: float = 0.35  # importance below which a missed pair is handled by on_miss
    miss_importance: str = "weight"  # weight (router weight) | gate (the selector's level)
    reuse_aware: bool = True  # the policy's reuse-aware reads (d2moe: fetch-ahead, hold when all fits); False: off
    lossless: bool = False  # serve the exact source experts from the lossless tier (d2moe.runtime.lossless)

    @property
    def miss(self):
        from d2moe.runtime.miss import MissOptions

        return MissOptions(self.on_miss, self.miss_threshold, self.miss_importance)


def staging_slots(options: RunOptions) -> int:
    """Expert-sized staging slots the memory plan keeps beside the cache. On the CPU, reads reserve their room
    in the cache (d2moe.runtime.experts), so staging only takes a read the cache cannot make room for: one
    upgrade, its bytes and the joined copy (2 slots). The lossless tier's decoded bytes and --device cuda's
    pinned ring stage every read in flight and the one computing after a full cache."""
    if options.device == "cpu" and not options.lossless:
        return 2
    return options.io_threads + 1


def dense_converter(ckpt, adapter, skeleton, options: RunOptions):
    """The converter of --dense-weights int8/int4 (layers converted as dense.safetensors is read), or None where
    the dense layers keep their source form (`source`, --lossless, a GPU)."""
    if options.dense_weights == "source" or options.lossless or options.device != "cpu":
        return None
    from d2moe.kernels.dense import StreamingConverter

    return StreamingConverter(skeleton, options.dense_weights, keep={adapter.router_key(layer) for layer in ckpt.moe_layers})


def dense_plan_bytes(ckpt, adapter, skeleton, options: RunOptions) -> int:
    """Peak bytes of the dense weights: the file's tensors, or, when they are converted while loading, the
    converted layers plus the largest single conversion in flight."""
    from d2moe.runtime.budget import safetensors_payload_bytes

    converter = dense_converter(ckpt, adapter, skeleton, options)
    if converter is None:
        return safetensors_payload_bytes(ckpt.dense_path)
    from d2moe.quantize.format.checked import ST_TO_TORCH
    from d2moe.quantize.format.safetensors_io import read_header

    header = read_header(ckpt.dense_path)
    return converter.plan_bytes({k: (t.shape, ST_TO_TORCH.get(t.dtype), t.nbytes) for k, t in header.tensors.items()})


def plan_run(checkpoint: str | Path, options: RunOptions):
    """Open `checkpoint` and plan memory for a run with `options`, reading no weight.

    Returns (ckpt, adapter, policy spec, hold level | None, meta skeleton, MemoryPlan). Raises the
    run's up-front errors: unknown policy, unpacked level, budget below the minimum. `Session` starts
    here; tools that only size budgets (demo, bench) call it alone.
    """
    from d2moe.kernels.cpu import threads as kernel_threads
    from d2moe.quantize.adapters import adapter_for
    from d2moe.quantize.format import open_checkpoint
    from d2moe.runtime.budget import MemoryPlan
    from d2moe.runtime.model import build_skeleton, meta_buffer_bytes
    from d2moe.runtime.policies import HOLD_LEVELS, check_level, get_policy
    from d2moe.runtime.policies import hold_level as policy_hold_level

    spec = get_policy(options.policy, options.schedule)
    if not options.reuse_aware:
        from dataclasses import replace

        spec = replace(spec, fetch_ahead=False, hold_if_fits=False)
    if options.level is not None and options.router_levels is not None:
        raise UsageError(f"--level {options.level} (every pair at one level) and --router-levels "
                         f"{','.join(map(str, options.router_levels))} (levels by router weight) are two level rules: "
                         "give one")
    options.miss  # noqa: B018  (validates --on-miss and its options before anything is read)
    from d2moe.kernels.dense import check_weights

    check_weights(options.dense_weights)  # before the plan counts dense layers as converted
    if options.io_threads < 1:
        raise UsageError(f"--io-threads {options.io_threads} must be at least 1")
    if options.forward_tokens is not None and options.forward_tokens < 1:
        raise UsageError(f"forward_tokens {options.forward_tokens} must be at least 1")
    path = Path(checkpoint)
    if not path.exists():
        raise InputError(f"checkpoint {path} does not exist: make one with `d2moe pack SRC {path}`")
    ckpt = open_checkpoint(path)
    if options.lossless:
        from d2moe.runtime.lossless import LosslessView

        if options.device != "cpu":
            raise UsageError("--lossless runs on the CPU: drop --device")
        levels = [o for o, given in ((f"--policy {spec.name}", spec.name in HOLD_LEVELS), ("--level", options.level),
                                     ("--router-levels", options.router_levels)) if given]
        if levels:
            raise UsageError(f"--lossless serves the exact source experts, at no level: drop {' and '.join(levels)}")
        if options.on_miss != "load":
            raise UsageError(f"--lossless serves the exact source experts: --on-miss {options.on_miss} would make its "
                             "output inexact (drop it)")
        if options.dense_weights != "source":
            raise UsageError(f"--lossless keeps the dense layers as transformers computes them (its logits are "
                             f"transformers' own): drop --dense-weights {options.dense_weights}")
        ckpt = LosslessView(ckpt)
    adapter = adapter_for(ckpt.config)
    bits = ckpt.cfg.bits
    hold_level = policy_hold_level(spec.name, options.level)
    asked = [(options.level, "--level"), *((x, "--router-levels") for x in options.router_levels or ())]
    if hold_level is not None and hold_level != options.level:  # hold-int4 / hold-int8 name their level
        asked.append((hold_level, "--policy"))
    for lv, option in asked:
        if lv is not None:
            check_level(lv, bits, spec.name, option)
    top = hold_level or max([options.level or 0, *(options.router_levels or ())]) or ckpt.cfg.bk
    skeleton = build_skeleton(adapter, ckpt.config)
    dense_bytes = dense_plan_bytes(ckpt, adapter, skeleton, options) + meta_buffer_bytes(skeleton)
    kv_dtype = DTYPE_BYTES.get(str(ckpt.dtype).replace("torch.", ""), 4)
    def plan_for(budget: int) -> MemoryPlan:
        return MemoryPlan.for_checkpoint(
            ckpt, budget, options.max_tokens, level=top, kv_dtype_bytes=kv_dtype, dense_bytes=dense_bytes,
            staging_slots=staging_slots(options),
            threads=options.threads or kernel_threads(), forward_tokens=options.forward_tokens,
        )

    if hold_level is None:
        return ckpt, adapter, spec, hold_level, skeleton, plan_for(options.memory_budget)
    # a hold policy's minimum is everything else plus the whole set at its level: said at once, whichever is short
    need = len(ckpt.moe_layers) * ckpt.num_experts * ckpt.level_nbytes(hold_level)
    unlimited = plan_for(1 << 60)
    minimum = unlimited.budget - unlimited.expert_cache + need
    if options.memory_budget < minimum:
        raise BudgetError(
            f"--policy {spec.name} holds every expert at {hold_level} bits ({format_size(need)}): memory budget "
            f"{format_size(options.memory_budget)} is below the minimum {min_mib(minimum)} MiB",
            minimum=minimum,
        )
    return ckpt, adapter, spec, hold_level, skeleton, plan_for(options.memory_budget)
