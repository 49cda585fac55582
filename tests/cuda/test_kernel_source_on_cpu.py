"""kernels/cuda/mwq.cu's own source, compiled for the host and run thread by thread on the CPU
(tests/cuda/simt_host.cpp), against the torch reference through the same self-check the GPU runs."""

from __future__ import annotations

import pytest
import simt  # tests/cuda/simt.py (pytest puts this folder on sys.path)
import torch

from d2moe.kernels import cuda_abi as abi
from d2moe.kernels import selfcheck
from d2moe.kernels.cuda import CudaExperts, relocate

pytestmark = pytest.mark.skipif(simt.compiler() is None, reason="no host C++ compiler")


@pytest.fixture(scope="module")
def simt_so(tmp_path_factory):
    return simt.build(tmp_path_factory.mktemp("simt"))


def test_every_kernel_passes_the_self_check_running_its_own_source(simt_so):
    rows = selfcheck.run_selfcheck(CudaExperts(simt.SimtLauncher(simt_so)), seed=3)
    assert selfcheck.failures(rows) == {}
    assert {r.kernel for r in rows} == {"dequant_f16", "dequant_bf16", "gemv", "gemv_grouped"}


def test_the_general_gemv_path_alone_passes_too(tmp_path):
    """D2_GENERIC_ONLY sends word-aligned layouts down the general path as well (the GPU bench's A/B)."""
    so = simt.build(tmp_path, defines=("D2_GENERIC_ONLY",))
    assert selfcheck.failures(selfcheck.run_selfcheck(CudaExperts(simt.SimtLauncher(so)), seed=4)) == {}


def test_word_aligned_layouts_take_the_fast_path_and_others_the_general_one(tmp_path):
    """A fault planted in the fast path only fails the word-aligned cases (groups of 32 and 64 columns)
    and leaves the groups of 8 and 24 columns, which the general path computes, passing."""
    src = abi.SOURCE.read_text()
    assert src.count("- 8388608.f") == 1
    broken = tmp_path / "mwq_fast_fault.cu"
    broken.write_text(src.replace("- 8388608.f", "- 8388607.f"))
    rows = selfcheck.run_selfcheck(CudaExperts(simt.SimtLauncher(simt.build(tmp_path, broken))))
    for kernel in ("gemv", "gemv_grouped", "dequant_f16", "dequant_bf16"):
        # (subblock's planes follow parameters of other sizes: whether they are word-aligned varies by case)
        mine = [r for r in rows if r.kernel == kernel and r.scheme != "subblock"]
        assert all(not r.ok for r in mine if "/g32" in r.shape or "/g64" in r.shape), kernel
        assert all(r.ok for r in mine if "/g8" in r.shape or "/g24" in r.shape), kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequant_into_an_unaligned_output_takes_the_general_path(simt_so, dtype):
    """The fast dequantization stores 16 bytes at a time: an output not 16-byte aligned must not take it."""
    gen = torch.Generator().manual_seed(5)
    m = relocate(selfcheck.random_matrix(9, 128, 32, "sliced", gen), "cpu")
    launcher = simt.SimtLauncher(simt_so)
    d = CudaExperts(launcher).describe(m, 3)
    for shift in (0, 1):  # elements past a 64-byte aligned start
        buf = torch.full((9 * 128 + 8,), float("nan"), dtype=dtype)
        out = buf[shift:shift + 9 * 128]
        grid, block = abi.dequant_geometry(9, 128)
        launcher.launch("d2_dequant", grid, block, (launcher.ptr(d.struct), launcher.ptr(out), abi.OUT_KINDS[dtype]))
        ref = selfcheck._reference(m, 3)
        got = out.reshape(9, 128)
        if dtype == torch.float32:
            assert torch.allclose(got, ref, rtol=1e-6, atol=1e-6), shift
        else:
            assert selfcheck._ratio_dequant(got, ref, dtype) <= 1.0, shift


@pytest.mark.parametrize("scheme", ["sliced", "residual"])
@pytest.mark.parametrize("rows,cols,group", [(16, 4096, 64), (33, 1024, 128), (7, 320, 32), (5, 96, 16)])
def test_gemv_at_decode_shapes_matches_the_reference(simt_so, scheme, rows, cols, group):
    """Word-aligned groups of 32..128 columns and a group smaller than a word, 1..8 tokens, levels 2..8."""
    gen = torch.Generator().manual_seed(rows + cols)
    m = relocate(selfcheck.random_matrix(rows, cols, group, scheme, gen), "cpu")
    experts = CudaExperts(simt.SimtLauncher(simt_so))
    for level in (2, 3, 4, 8):
        ref = selfcheck._reference(m, level)
        d = experts.describe(m, level)
        for n in (1, 2, 8):
            x = torch.randn(n, cols, generator=gen)
            assert selfcheck._ratio_gemv(experts.gemv([(d, x)])[0], x, ref) <= 1.0, (level, n)


def test_a_missing_barrier_in_the_source_is_caught(simt_so, tmp_path):
    """The fibers run as far as they can between barriers, so a kernel that reads shared memory
    before every thread has written it gets stale values here too."""
    src = abi.SOURCE.read_text()
    stage = src.index("void d2_stage_x(")
    first_sync = src.index("__syncthreads();", src.index("__syncthreads();", stage) + 1)  # the one after staging x
    broken = tmp_path / "mwq_no_barrier.cu"
    broken.write_text(src[:first_sync] + src[first_sync + len("__syncthreads();"):])
    rows = selfcheck.run_selfcheck(CudaExperts(simt.SimtLauncher(simt.build(tmp_path, broken))))
    assert "gemv" in selfcheck.failures(rows)
