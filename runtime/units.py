"""Human byte sizes: '512MiB', '6GiB', '6GB', '1.5G', '8000000' (a bare number is bytes, from 1 MiB)."""

import re

from d2moe.errors import UsageError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


MAX_SIZE = float(1 << 60)  # 1 EiB: anything larger is a typo, not a budget


def parse_size(text: str, what: str = "size") -> int:
    """Bytes in `text`; SI units (GB) are powers of 1000, binary units (GiB) powers of 1024."""
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise UsageError(f"{what} {text!r} is not a size: write e.g. 512MiB, 6GiB or 6GB")
    number = float(m.group(1)) * _UNITS[unit]
    if not number < MAX_SIZE:  # also inf/nan from absurdly long digit strings
        shown = text if len(str(text)) <= 24 else f"{str(text)[:20]}…"
        raise UsageError(f"{what} {shown!r} is larger than any machine (over 1 EiB): write e.g. 6GiB")
    value = int(number)
    if value <= 0:
        raise UsageError(f"{what} {text!r} must be positive")
    if not unit and value < 1 << 20:  # '-m 1.5' meant GiB, not one byte
        raise UsageError(f"{what} {text!r} has no unit: write e.g. {m.group(1)}GiB or {m.group(1)}MiB")
    return value


def parse_percent(text: str, what: str = "budget") -> float:
    """p in (0, 1000] from 'p%' (a budget's share of the expert set, as bench and run read it)."""
    try:
        pct = float(str(text).strip()[:-1])
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a percentage: write e.g. 50%") from None
    if not 0 < pct <= 1000:  # also nan
        raise UsageError(f"{what} {text!r} must be a percentage in (0, 1000]")
    return pct


def format_size(n: float) -> str:
    """'1.50 GiB' style, for tables and messages."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
