"""A source checkout as the working directory must not shadow other distributions' modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_checkout_folders_do_not_shadow_bare_module_names():
    # `python -m d2moe` from the checkout puts it on sys.path; transformers >= 5.25 then imported our
    # kernels/ as Hugging Face's `kernels` package and every model load failed.
    code = (
        "import importlib.util, d2moe, pathlib;"
        "root = pathlib.Path(d2moe.__file__).resolve().parents[1];"
        "bad = [n for n in ('kernels', 'quantize', 'runtime', 'router_train')"
        "       if (s := importlib.util.find_spec(n)) and s.origin and pathlib.Path(s.origin).resolve().parent == root / n];"
        "print(bad); assert not bad, bad"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def test_d2moe_still_imports_its_own_kernels_from_the_checkout():
    p = subprocess.run([sys.executable, "-c", "import d2moe.kernels.cpu as c; print(c.__name__)"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "d2moe.kernels.cpu" in p.stdout, p.stderr
