"""Compiling kernels/cuda/mwq.cu: to PTX through NVRTC (no GPU or driver needed: CI's check), and
into a `cupy.RawModule` on a GPU (cached per process; CuPy caches the binary on disk too).

`require_cuda()` is the one place that says why `--device cuda` cannot run here, as one line:
CuPy missing (install hint) or no usable GPU/driver.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from d2moe.errors import DependencyError
from d2moe.kernels.cuda_abi import SOURCE

KERNELS = ("d2_dequant", "d2_gemv")
PTX_ARCHS = ("sm_80", "sm_87", "sm_90")  # A100, Jetson Orin, H100/H200
OPTIONS = ("-std=c++17",)
INSTALL_HINT = "install it with pip install -e '.[cuda]'"


class CudaBuildError(Exception):
    """NVRTC rejected the source: the message carries the compiler log."""


@dataclass(frozen=True)
class PtxResult:
    arch: str
    ptx_bytes: int
    seconds: float
    entries: tuple[str, ...]


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as exc:
        raise DependencyError(f"CuPy's NVRTC bindings are not importable ({exc}): {INSTALL_HINT}") from None
    return nvrtc


def compile_ptx(arch: str = "sm_90", source: str | Path | None = None) -> tuple[str, float]:
    """PTX text of the source (default: kernels/cuda/mwq.cu) for `arch`, and the seconds it took.
    CudaBuildError with the compiler log when NVRTC rejects it."""
    nvrtc = _nvrtc()
    path = Path(source) if source is not None else SOURCE
    text = path.read_text()
    t0 = time.perf_counter()
    prog = nvrtc.createProgram(text, path.name, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [f"-arch=compute_{arch.removeprefix('sm_')}", *OPTIONS])
        except nvrtc.NVRTCError as exc:
            raise CudaBuildError(f"{path.name} ({arch}): {exc}\n{nvrtc.getProgramLog(prog)}") from None
        ptx = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    return ptx.rstrip("\x00"), time.perf_counter() - t0


def check_ptx(archs=PTX_ARCHS, source: str | Path | None = None) -> list[PtxResult]:
    """Compile for every arch; each must define every kernel. CudaBuildError otherwise."""
    out = []
    for arch in archs:
        ptx, seconds = compile_ptx(arch, source)
        entries = tuple(k for k in KERNELS if f".entry {k}(" in ptx)
        if entries != KERNELS:
            raise CudaBuildError(f"{arch}: PTX lacks kernels {sorted(set(KERNELS) - set(entries))}")
        out.append(PtxResult(arch, len(ptx), seconds, entries))
    return out


def require_cuda(otherwise: str = "or use --device cpu") -> None:
    """Raise one clear error unless CuPy imports and a CUDA GPU with a driver is usable (`otherwise`: the remedy
    besides a GPU machine, for the command asking)."""
    try:
        import cupy
    except ImportError:
        raise DependencyError(f"--device cuda needs CuPy, which is not installed: {INSTALL_HINT}") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError: no driver, driver too old, no device
        raise DependencyError(f"--device cuda: no usable CUDA GPU here ({str(exc).strip() or type(exc).__name__}): "
                         f"run on a machine with an NVIDIA GPU and driver, {otherwise}") from None
    if count < 1:
        raise DependencyError(f"--device cuda: CuPy sees no CUDA GPU: run on a machine with an NVIDIA GPU, {otherwise}")
    import torch

    if not torch.cuda.is_available():
        raise DependencyError("--device cuda: this torch build has no CUDA support: install a CUDA build of torch "
                              "(pip install torch --index-url https://download.pytorch.org/whl/cu126)")


@lru_cache(maxsize=4)
def module(defines: tuple[str, ...] = ()):
    """The kernels as a `cupy.RawModule` on the current GPU (compiled at first use); `defines` such as
    D2_GENERIC_ONLY build a variant (scripts/gpu_bench.py)."""
    import cupy

    return cupy.RawModule(code=SOURCE.read_text(), options=OPTIONS + tuple(f"-D{d}" for d in defines),
                          name_expressions=None)
