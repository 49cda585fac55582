"""d2moe: run Mixture-of-Experts LLMs under a memory budget.

Kept import-light on purpose: `d2moe.errors` is imported by every stage, and the CLI imports
torch/transformers only inside the command that needs them.
"""

import os
import sys
from pathlib import Path

__version__ = "0.1.0"


def _unshadow_checkout_root() -> None:
    """Take a source checkout's root off sys.path (it gets there as the working directory of
    `python -m d2moe` / `python -m pytest`). Its top-level folders `kernels/`, `quantize/` and
    `runtime/` are d2moe's own, imported only as `d2moe.*`; under their bare names they shadow
    other distributions — transformers >= 5.25 imports Hugging Face's `kernels` package at import
    time and found ours (ImportError: cannot import name 'CUDAProperties' from 'kernels')."""
    here = Path(__file__).resolve().parent
    root = here.parent
    if here.name != "d2moe_cli" or not (root / "kernels" / "__init__.py").is_file():
        return  # an installed wheel: site-packages/d2moe, nothing to take off
    cwd = os.getcwd()
    sys.path[:] = [p for p in sys.path if Path(p or cwd).resolve() != root]


_unshadow_checkout_root()
