"""Parsers for option values shared by several commands (one message per mistake, same wording everywhere)."""

from d2moe.errors import UsageError


def parse_bits(text: str, option: str = "--bits") -> tuple[int, ...]:
    """'2,3,4' -> (2, 3, 4), validated as MWQ levels (distinct, ascending, 1..8)."""
    try:
        bits = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise UsageError(f"{option} {text!r} is not a list of integers: write e.g. {option} 2,3,4") from None
    from d2moe.quantize.types import MWQConfig

    return MWQConfig(bits=bits).bits  # validates


def set_threads(threads: int | None) -> None:
    """Torch intra-op threads for this process (None: leave torch's default).

    On a small CPU shared with I/O threads, extra intra-op threads can make a tiny model tens of
    times slower (measured: 2 threads on a busy 2-core machine, 0.5-1.4 vs 22-26 decode tok/s).
    """
    if threads is None:
        return
    if threads < 1:
        raise UsageError(f"--threads {threads} must be at least 1")
    import torch

    torch.set_num_threads(threads)


def parse_bandwidth(text: str | None) -> float | None:
    """'3.5GB/s' -> 3.5e9 bytes per second (the '/s' is optional)."""
    if text is None:
        return None
    from d2moe.units import parse_size

    try:
        return float(parse_size(text.strip().removesuffix("/s").removesuffix("ps"), "--io-bandwidth"))
    except UsageError:
        raise UsageError(f"--io-bandwidth {text!r} is not a rate: write e.g. 3.5GB/s (NVMe) or 1GB/s (eMMC)") from None
