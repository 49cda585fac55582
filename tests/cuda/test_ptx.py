"""Every CUDA kernel compiles to PTX for sm_80, sm_87 (Jetson Orin) and sm_90 through NVRTC: no GPU
or driver needed. A deliberately broken copy of the source must fail the same check."""

from __future__ import annotations

import pytest

from d2moe.kernels import cuda_build

try:
    from cupy_backends.cuda.libs import nvrtc

    nvrtc.getVersion()
    _SKIP = None
except Exception as exc:  # ImportError, or the NVRTC library missing (nvidia-cuda-nvrtc-cu12)
    _SKIP = f"CuPy/NVRTC not importable ({type(exc).__name__}): pip install -e '.[cuda]' runs this check"

pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


def test_every_kernel_compiles_to_ptx_for_every_arch():
    results = cuda_build.check_ptx()
    assert [r.arch for r in results] == list(cuda_build.PTX_ARCHS)
    assert all(r.entries == cuda_build.KERNELS and r.ptx_bytes > 1000 for r in results)


@pytest.mark.parametrize("breakage", [
    ("if (n < ntok) acc[n] += v * xs[n][lane][j];", "if (n < ntok) acc[n] += v * xs[n][lane][j]"),  # syntax: missing ;
    ("fn(j, c, d2_weight(m, w, j, base, a));", "fn(j, c, d2_weight(m, w, j, base));"),  # arity
])
def test_a_broken_copy_fails_the_check(tmp_path, breakage):
    old, new = breakage
    src = cuda_build.SOURCE.read_text()
    assert old in src
    broken = tmp_path / "mwq.cu"
    broken.write_text(src.replace(old, new, 1))
    with pytest.raises(cuda_build.CudaBuildError, match="mwq.cu"):
        cuda_build.check_ptx(source=broken)


def test_a_missing_kernel_fails_the_check(tmp_path):
    src = cuda_build.SOURCE.read_text().replace('extern "C" __global__ void d2_dequant', "__global__ void d2_dequant_x")
    path = tmp_path / "mwq.cu"
    path.write_text(src)
    with pytest.raises(cuda_build.CudaBuildError, match="lacks kernels"):
        cuda_build.check_ptx(archs=("sm_90",), source=path)
