"""The CUDA path's host side on CPU: argument records vs the C struct, launch geometry, the emulated
kernels against the torch reference, the self-check catching corrupted kernels, device views, staging."""

from __future__ import annotations

import shutil
import subprocess
import warnings

import numpy as np
import pytest
import torch

from d2moe.kernels import cuda_abi as abi
from d2moe.kernels import selfcheck
from d2moe.kernels.cuda import KERNEL_NAMES, CudaExperts, relocate
from d2moe.kernels.cuda_emulator import EmulatedLauncher
from d2moe.kernels.dispatch import dequantize_packed


@pytest.mark.skipif(shutil.which("cc") is None, reason="no host C compiler to read the struct layout")
def test_records_match_the_cuda_struct_layout(tmp_path):
    """numpy's record offsets == the host compiler's offsetof on mwq.cu's struct text (same C rules)."""
    src = abi.SOURCE.read_text()
    structs = src[src.index("#define D2_MAX_TERMS"):src.index("__device__")]
    fields = [(n, "D2Mat") for n in abi.MAT_DTYPE.names] + [(n, "D2Problem") for n in abi.PROBLEM_DTYPE.names]
    prints = "".join(f'printf("%s.%s %zu\\n", "{s}", "{n}", offsetof(struct {s}, {n}));' for n, s in fields)
    (tmp_path / "l.c").write_text("#include <stdio.h>\n#include <stddef.h>\n" + structs.replace(
        "    D2Mat m;", "    struct D2Mat m;")
        + f'int main(void){{{prints}printf("sizes %zu,%zu\\n", sizeof(struct D2Mat), sizeof(struct D2Problem));}}')
    subprocess.run(["cc", "-o", str(tmp_path / "l"), str(tmp_path / "l.c")], check=True)
    got = dict(line.rsplit(" ", 1) for line in subprocess.run([str(tmp_path / "l")], capture_output=True,
                                                               text=True, check=True).stdout.splitlines())
    for name in abi.MAT_DTYPE.names:
        assert int(got[f"D2Mat.{name}"]) == abi.MAT_DTYPE.fields[name][1], name
    for name in abi.PROBLEM_DTYPE.names:
        assert int(got[f"D2Problem.{name}"]) == abi.PROBLEM_DTYPE.fields[name][1], name
    assert got["sizes"] == f"{abi.MAT_DTYPE.itemsize},{abi.PROBLEM_DTYPE.itemsize}"


def test_geometry_covers_every_row_and_word():
    for rows, cols in ((1, 8), (37, 96), (5, 200), (14336, 4096), (4096, 14336)):
        (gx, gy, _), (bx, _, _) = abi.dequant_geometry(rows, cols)
        assert gx == rows and gy * bx * 32 >= cols > (gy - 1) * bx * 32
    (gx, gy, _), (bx, _, _) = abi.gemv_geometry([37, 5, 14336])
    assert gy == 3 and gx * abi.GEMV_ROWS_PER_BLOCK >= 14336 and bx == abi.GEMV_THREADS
    assert abi.token_chunks(11) == [(0, 8), (8, 11)] and abi.token_chunks(8) == [(0, 8)]


def test_mat_record_terms_and_planes():
    gen = torch.Generator().manual_seed(1)
    for scheme in ("sliced", "residual"):
        m = selfcheck.random_matrix(8, 64, 32, scheme, gen)
        rec = abi.mat_record(m, 4, lambda t: t.data_ptr())
        terms = m.terms(4)
        assert int(rec["nterms"]) == len(terms) and rec["planes"][4:].tolist() == [0] * 4
        assert rec["planes"][:4].tolist() == [m.planes[p].data_ptr() for p in range(4)]
        assert [float(v) for v in rec["mul"][: len(terms)]] == [t.mul for t in terms]
        assert int(rec["words_aligned"]) == int(all(p.data_ptr() % 4 == 0 for p in m.planes[:4]))
    assert not abi.words_aligned(200, [0]) and not abi.words_aligned(96, [2]) and abi.words_aligned(96, [4, 8])


def test_every_emulated_kernel_passes_the_self_check():
    rows = selfcheck.run_selfcheck(CudaExperts(EmulatedLauncher()))
    assert {r.kernel for r in rows} == set(KERNEL_NAMES)
    assert {r.scheme for r in rows} == {"sliced", "residual", "subblock"}
    assert {r.level for r in rows} == set(selfcheck.BITS) | {b for _, bits in selfcheck.FAST_LAYOUTS for b in bits}
    assert all(r.ok for r in rows), [r for r in rows if not r.ok][:3]


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_a_corrupted_kernel_is_caught_and_only_it_disabled(kernel):
    experts = CudaExperts(EmulatedLauncher(corrupt={kernel}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        selfcheck.checked(experts)
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and f"CUDA kernel {kernel} failed its self-check" in msgs[0]
    assert experts.enabled == {k: k != kernel for k in KERNEL_NAMES}


def test_a_wrong_launch_geometry_is_caught(monkeypatch):
    """Threads the grid never launches leave outputs unwritten: the check sees it."""
    monkeypatch.setattr(abi, "gemv_geometry", lambda rows: ((max(1, max(rows) // abi.GEMV_ROWS_PER_BLOCK), len(rows), 1),
                                                            (abi.GEMV_THREADS, 1, 1)))
    bad = selfcheck.failures(selfcheck.run_selfcheck(CudaExperts(EmulatedLauncher())))
    assert "gemv" in bad and "dequant_bf16" not in bad  # (grouped: its tallest problem is a whole number of tiles)


def test_disabled_kernels_fall_back_to_the_reference_with_the_same_result():
    gen = torch.Generator().manual_seed(2)
    mats = {k: relocate(selfcheck.random_matrix(r, c, 8, "residual", gen), "cpu", 2)
            for k, r, c in (("gate", 24, 48), ("up", 24, 48), ("down", 48, 24))}  # group 8: 24 columns
    x = torch.randn(3, 48, generator=gen)
    outs = []
    for enabled in (None, {k: False for k in KERNEL_NAMES}):
        e = CudaExperts(EmulatedLauncher(), enabled)
        outs.append(e.forward(e.prepare(mats, 4), x, torch.nn.functional.silu, gemv_max_tokens=2))  # 3 > 2: tiles
        outs.append(e.forward_group([(e.prepare(mats, 3), x[:1]), (e.prepare(mats, 4), x)], torch.nn.functional.silu)[1])
    ref = lambda lv: torch.nn.functional.linear(  # noqa: E731
        torch.nn.functional.silu(x @ dequantize_packed(mats["gate"], lv).t()) * (x @ dequantize_packed(mats["up"], lv).t()),
        dequantize_packed(mats["down"], lv))
    for y in outs:
        torch.testing.assert_close(y, ref(4), rtol=1e-4, atol=1e-5)


def test_device_views_rebase_the_layout_onto_another_buffer():
    from d2moe.runtime.device import device_views

    gen = torch.Generator().manual_seed(3)
    m = relocate(selfcheck.random_matrix(8, 64, 32, "residual", gen), "cpu", 0)
    host = m.scale.untyped_storage()
    base = host.data_ptr()
    copy = torch.empty(0, dtype=torch.uint8).set_(host, 0, (host.nbytes(),)).clone()
    moved = device_views({"gate": m}, base, copy)["gate"]
    assert moved.scale.untyped_storage().data_ptr() == copy.data_ptr()
    torch.testing.assert_close(dequantize_packed(moved, 8), dequantize_packed(m, 8), rtol=0, atol=0)


def test_staging_ring_reuses_finished_slots_and_counts_waits():
    from d2moe.runtime.device import SlotRing, staging_bytes

    busy = {0, 1}
    waited = []
    ring = SlotRing(3, done=lambda i: i not in busy, wait=waited.append)
    assert ring.acquire() == 2
    busy.add(2)
    assert ring.acquire() == 0 and waited == [0] and ring.waits == 1  # every slot busy: waits on the next one
    busy.clear()
    assert [ring.acquire() for _ in range(3)] == [1, 2, 0] and ring.waits == 1
    assert staging_bytes(5, 4097) == 5 * 8192


def test_records_reject_what_the_kernels_cannot_take():
    with pytest.raises(ValueError, match="1..8 tokens"):
        abi.problem_records([(np.zeros((), abi.MAT_DTYPE), 0, 0, 9)])
