"""Packed tiny checkpoints for runtime tests, built once per (arch, bits) per test process.

`packed_tiny(tmp_path_factory, arch, bits)` -> (source dir, packed dir): the source is a tiny random
HF checkpoint (tests/tiny_models.py), the packed one comes from the real `pack_checkpoint`.
"""

from __future__ import annotations

from pathlib import Path

from tiny_models import make_tiny_checkpoint

_CACHE: dict[tuple, tuple[Path, Path]] = {}


def packed_tiny(tmp_path_factory, arch: str = "mixtral", bits: tuple[int, ...] = (2, 4, 8), seed: int = 0,
                scheme: str | None = None, **overrides) -> tuple[Path, Path]:
    from d2moe.quantize import MWQConfig
    from d2moe.quantize.convert.pack import pack_checkpoint

    key = (arch, tuple(bits), seed, scheme, tuple(sorted(overrides.items())))
    if key not in _CACHE:
        root = tmp_path_factory.mktemp(f"packed-{arch}")
        src = make_tiny_checkpoint(arch, root / "src", seed=seed, **overrides)
        out = root / "packed"
        cfg = MWQConfig(bits=tuple(bits)) if scheme is None else MWQConfig(bits=tuple(bits), scheme=scheme)
        pack_checkpoint(src, out, cfg, progress=False)
        _CACHE[key] = (src, out)
    return _CACHE[key]
