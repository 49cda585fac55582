"""Shared fixtures: tiny random MoE checkpoints on disk (built once per session, read-only to tests)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import d2moe  # noqa: F401  (first: takes the checkout root off sys.path before transformers loads)

# tests run on a small shared CPU: one intra-op thread avoids oversubscription (10x slowdowns seen)
torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import TINY_ARCHS, make_tiny_checkpoint  # noqa: E402

CORE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test starts on one torch thread (commands under test may change it, e.g. `--threads`)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint_factory(tmp_path_factory):
    """`factory(arch, sharded=False, layout="legacy", seed=0, **overrides) -> Path`, cached per argument set.

    The returned directory is shared across tests: copy it before modifying anything inside.
    """
    cache: dict[tuple, Path] = {}

    def factory(arch: str, sharded: bool = False, layout: str = "legacy", seed: int = 0, **overrides) -> Path:
        key = (arch, sharded, layout, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            name = f"{arch}-{'sharded' if sharded else 'single'}-{layout}-s{seed}-{len(cache)}"
            out = tmp_path_factory.mktemp("tiny") / name
            cache[key] = make_tiny_checkpoint(arch, out, seed=seed, sharded=sharded, layout=layout, **overrides)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def tiny_mixtral(tiny_checkpoint_factory) -> Path:
    """A tiny Mixtral checkpoint (2 layers, 4 experts, top-2, hidden 64, intermediate 128, vocab 256)."""
    return tiny_checkpoint_factory("mixtral")


@pytest.fixture(scope="session", params=CORE_ARCHS)
def tiny_checkpoint(request, tiny_checkpoint_factory) -> Path:
    """A tiny checkpoint for each core architecture in turn."""
    return tiny_checkpoint_factory(request.param)


@pytest.fixture(scope="session")
def packed_checkpoint_factory(tmp_path_factory, tiny_checkpoint_factory):
    """`factory(arch, bits=(2, 3, 4), scheme="sliced", group_size=64, **source_kwargs) -> (src, packed)`, cached.

    Packs with the real `pack_checkpoint`; shared across tests: copy before modifying.
    """
    cache: dict[tuple, tuple[Path, Path]] = {}

    def factory(arch: str, bits=(2, 3, 4), scheme: str = "sliced", group_size: int = 64, **source_kwargs):
        from d2moe.quantize import MWQConfig
        from d2moe.quantize.convert.pack import pack_checkpoint

        key = (arch, tuple(bits), scheme, group_size, tuple(sorted(source_kwargs.items())))
        if key not in cache:
            src = tiny_checkpoint_factory(arch, **source_kwargs)
            out = tmp_path_factory.mktemp("packed") / f"{arch}-{len(cache)}"
            pack_checkpoint(src, out, MWQConfig(bits=tuple(bits), group_size=group_size, scheme=scheme), progress=False)
            cache[key] = (src, out)
        return cache[key]

    return factory


__all__ = ["TINY_ARCHS", "CORE_ARCHS"]
