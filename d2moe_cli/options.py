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
