"""A random matrix and its MWQ config for tests of the native fit's callers (calibration, GPTQ).

`random_matrix(scheme, rows, cols, seed)` -> (lib, cfg, w, generator): levels 2,3,4 in the scheme's default
group (32 for subblock, 64 otherwise); the test is skipped where the native quantizer cannot be built.
"""

from __future__ import annotations

import pytest
import torch


def random_matrix(scheme: str, rows: int, cols: int, seed: int = 0):
    from d2moe.quantize import MWQConfig, native

    lib = native.load()
    if lib is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(seed)
    cfg = MWQConfig(bits=(2, 3, 4), group_size=32 if scheme == "subblock" else 64, scheme=scheme)
    return lib, cfg, torch.randn(rows, cols, generator=g), g
