"""Parsers for option values shared by several commands (one message per mistake, same wording everywhere)."""

import os

from d2moe.errors import UsageError


def parse_bits(text: str, option: str = "--bits") -> tuple[int, ...]:
    """'2,3,4' -> (2, 3, 4), validated as MWQ levels (distinct, ascending, 1..8)."""
    try:
        bits = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise UsageError(f"{option} {text!r} is not a list of integers: write e.g. {option} 2,3,4") from None
    from d2moe.quantize.types import MWQConfig

    return MWQConfig(bits=bits).bits  # validates


def given_as(ctx, param: str) -> str:
    """How the user set option `param` (for its error messages): its long flag, or the environment variable its
    value came from (D2MOE_MEMORY_BUDGET=lots read as "--memory-budget 'lots'")."""
    option = next(p for p in ctx.command.params if p.name == param)
    source = ctx.get_parameter_source(param)
    if source is not None and source.name == "ENVIRONMENT" and isinstance(option.envvar, str):
        return option.envvar
    return max(option.opts, key=len)


def set_threads(threads: int | None, option: str = "--threads") -> None:
    """Compute threads for this process: the expert and dense kernels' row threads (default: every
    core this process may run on); torch keeps one intra-op thread.

    Torch's intra-op threads spin after each op and take the core the kernels' second thread needs
    (measured on Mixtral shapes, 2 threads: expert compute 1.39 s with torch at 2 threads, the same as
    1 thread), and they stall whenever another process holds a core (3.7 vs 79.8 decode tok/s on the
    embedded model under load); the kernels' splitter hands a slowed thread fewer rows. With
    `--kernels reference` the session gives torch the threads instead.
    """
    if threads is not None and threads < 1:
        raise UsageError(f"{option} {threads} must be at least 1")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads is not None and threads > 4 * cores:  # each thread's share of the rows and its buffers: waits, not speed
        raise UsageError(f"{option} {threads}: this process may run on {cores} cores; use at most {4 * cores} "
                         "(threads beyond the cores only wait for them)")
    import torch

    from d2moe.kernels import cpu

    torch.set_num_threads(1)
    cpu.set_threads(threads)


def parse_bandwidth(text: str | None) -> float | None:
    """'3.5GB/s' -> 3.5e9 bytes per second (the '/s' is optional)."""
    if text is None:
        return None
    from d2moe.runtime.units import parse_size

    try:
        return float(parse_size(text.strip().removesuffix("/s").removesuffix("ps"), "--io-bandwidth"))
    except UsageError:
        raise UsageError(f"--io-bandwidth {text!r} is not a rate: write e.g. 3.5GB/s (NVMe) or 1GB/s (eMMC)") from None
