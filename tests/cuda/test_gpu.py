"""On a real GPU only (marker gpu; skipped elsewhere): the kernels' own arithmetic."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu


def _gpu_or_skip():
    try:
        from d2moe.kernels.cuda_build import require_cuda

        require_cuda()
    except Exception as exc:
        pytest.skip(f"no usable CUDA GPU here: {exc}")


def test_every_kernel_passes_the_self_check_on_the_gpu():
    _gpu_or_skip()
    from d2moe.kernels import selfcheck
    from d2moe.kernels.cuda import CudaExperts, CupyLauncher

    rows = selfcheck.run_selfcheck(CudaExperts(CupyLauncher()))
    assert all(r.ok for r in rows), [r for r in rows if not r.ok][:5]


def test_a_corrupted_result_on_the_gpu_is_caught(monkeypatch):
    _gpu_or_skip()
    from d2moe.kernels import selfcheck
    from d2moe.kernels.cuda import CudaExperts, CupyLauncher

    experts = CudaExperts(CupyLauncher())
    real = experts.gemv
    monkeypatch.setattr(experts, "gemv", lambda items: [y.add_(1e-2) for y in real(items)])
    assert "gemv" in selfcheck.failures(selfcheck.run_selfcheck(experts))
