"""A launcher that runs kernels/cuda/mwq.cu itself on the CPU (tests/cuda/simt_host.cpp: every CUDA
thread a fiber, blocks in turn), behind the same interface as the GPU's CupyLauncher, so the
self-check and every host path run the kernels' real source without a GPU."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
KERNELS = {"d2_dequant": 0, "d2_gemv": 1}


def compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


def build(out_dir: Path, source: Path | None = None, defines: tuple[str, ...] = ()) -> Path:
    """The host build of mwq.cu (or a variant of it: `source`; `defines` such as D2_GENERIC_ONLY) as a
    shared library (CalledProcessError with the compiler's log)."""
    so = out_dir / f"simt_host{''.join('-' + d for d in defines)}.so"
    flags = [f'-DMWQ_SOURCE="{Path(source).resolve()}"'] if source is not None else []
    flags += [f"-D{d}" for d in defines]
    subprocess.run([compiler(), "-std=c++17", "-O1", "-shared", "-fPIC", *flags, str(HERE / "simt_host.cpp"),
                    "-o", str(so)], check=True, capture_output=True, text=True)
    return so


class SimtLauncher:
    def __init__(self, so: Path) -> None:
        self.device = torch.device("cpu")
        self._lib = ctypes.CDLL(str(so))
        self._lib.simt_launch.argtypes = [ctypes.c_int] + [ctypes.c_uint] * 6 + [ctypes.c_uint64] * 2 + [ctypes.c_int]
        self._keep: list[torch.Tensor] = []
        self.launches: list[tuple[str, tuple, tuple]] = []

    def ptr(self, t: torch.Tensor) -> int:
        return t.data_ptr()

    def upload(self, rec: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.frombuffer(rec.tobytes(), np.uint8).copy())
        self._keep.append(t)
        return t

    def launch(self, name: str, grid, block, args: tuple) -> None:
        self.launches.append((name, tuple(grid), tuple(block)))
        a = [int(v) for v in args] + [0] * (3 - len(args))
        rc = self._lib.simt_launch(KERNELS[name], *(int(g) for g in grid), *(int(b) for b in block), a[0], a[1], a[2])
        if rc != 0:
            raise RuntimeError(f"simt_launch({name}) refused the launch (block too large)")
