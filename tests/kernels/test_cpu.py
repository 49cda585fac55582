"""Native CPU kernels against the torch reference: every level, scheme, group size, odd shapes, both paths."""

from __future__ import annotations

import pytest
import torch

from d2moe.kernels import cpu
from d2moe.kernels.dispatch import ExpertKernels, dequantize_packed
from d2moe.kernels.packed import PackedMatrix
from d2moe.quantize import MWQConfig, quantize_mwq

lib = cpu.load()
pytestmark = pytest.mark.skipif(lib is None, reason="no C compiler: the native kernels cannot be built here")


def _matrix(rows, cols, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02 + torch.randn(rows, 1, generator=g) * 0.01
    return PackedMatrix.from_mwq(quantize_mwq(w, cfg))


def _code_zero(m: PackedMatrix, level: int) -> torch.Tensor:
    """Each group's value at code 0, the kernel's exact base: offset + sum_t mul_t coef_t bias_t, float32 [O, G]."""
    m = m.expanded()  # scheme subblock: its float16 parameters per group, as the kernels expand them
    base = m.offset.float().clone()
    for t in m.terms(level):
        base += t.mul * t.bias * t.coef.float()
    return base


def _sum_half_steps(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Half the step of each group's quantized sum [N, G]: the span's largest |sum| / 32511 / 2, one step per
    256 columns (cpu.sum_groups groups)."""
    n, cols = x.shape
    sums = x.view(n, cols // group_size, group_size).sum(-1)
    span = cpu.sum_groups(group_size)
    out = torch.empty_like(sums)
    for g0 in range(0, sums.shape[1], span):
        out[:, g0:g0 + span] = sums[:, g0:g0 + span].abs().amax(-1, keepdim=True) / 32511 / 2
    return out


def _error_bound(w: torch.Tensor, x: torch.Tensor, group_size: int, bits: int = 16, base: torch.Tensor | None = None) -> torch.Tensor:
    """What quantizing x per group may cost: sum_c |w_oc - base_og| * (step_g(c) / 2), plus what quantizing the
    group sums (15 bits per 256 columns) may cost, sum_g |base_og| * sum_step / 2, plus float rounding.

    The kernel adds base * (group sum of x) in float, so only w - base meets the quantized activations. Without
    `base` all of w meets them, and each group's largest |w| stands in for |base|."""
    n, cols = x.shape
    amax = x.abs().view(n, cols // group_size, group_size).amax(-1)  # [N, G]
    half_step = (amax / (32511 if bits == 16 else 127) / 2).repeat_interleave(group_size, dim=1)  # [N, I]
    dev = w if base is None else w - base.repeat_interleave(group_size, dim=1)
    at_zero = w.abs().view(w.shape[0], -1, group_size).amax(-1) if base is None else base.abs()  # [O, G]
    return (half_step @ dev.abs().T + _sum_half_steps(x, group_size) @ at_zero.T + 1e-5 * (x.abs() @ w.abs().T)
            + 1e-7)  # [N, O]


CASES = [  # (rows, cols, group size): odd row counts, every chunking path (64-wide, 32-wide, portable),
    # full 256-column blocks with and without a tail (the blocked layout's two halves)
    (37, 128, 64), (64, 192, 64), (5, 256, 128), (33, 96, 32), (17, 64, 16), (9, 40, 8), (70, 512, 64),
    (11, 1024 + 64, 64), (7, 512 + 32, 32), (6, 768 + 128, 128),
    (40, 320, 64), (48, 256, 128),  # whole 16-row blocks with a tail / without (ROWS16 on AVX-512)
    (32, 256 + 64, 16), (16, 128, 8),  # ROWS16 with groups of one accumulator
    (19, 256 + 160, 16),  # AVX2 group 16: a blocked block, eight groups past it, then single chunks
]


def _blocked_spec(rows: torch.Tensor) -> torch.Tensor:
    """The blocked layout in torch: in every full 32-byte block, byte j's bit k is column 32 k + j."""
    n, nbytes = rows.shape
    bits = (rows.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1  # [n, bytes, 8]: column 8 byte + bit
    cols = bits.reshape(n, nbytes * 8)
    full = (nbytes // 32) * 256
    blocks = cols[:, :full].reshape(n, -1, 8, 32).transpose(-1, -2)  # [n, block, j, k]
    packed = (blocks << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8).reshape(n, -1)
    return torch.cat([packed, rows[:, full // 8:]], dim=1)


def _rows16_spec(planes: torch.Tensor) -> torch.Tensor:
    """ROWS16 in torch: per plane and full block of 16 rows, word j (8 bytes) holds columns 4j..4j+3 of the
    16 rows, bit 4 i + k = row i, column 4 j + k; the rows past the last full block keep the file's layout."""
    k, n, nbytes = planes.shape
    full = n - n % 16
    bits = ((planes[:, :full].unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(k, full // 16, 16, -1, 4)
    words = bits.permute(0, 1, 3, 2, 4).reshape(k, full // 16, -1, 8, 8)  # [plane, block, word, byte, bit]
    packed = (words << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8).reshape(k, full, nbytes)
    return torch.cat([packed, planes[:, full:]], dim=1)


def _rows16_params_spec(params: torch.Tensor) -> torch.Tensor:
    k, n, groups = params.shape
    full = n - n % 16
    blocks = params[:, :full].reshape(k, full // 16, 16, groups).transpose(-1, -2).reshape(k, full, groups)
    return torch.cat([blocks, params[:, full:]], dim=1)


@pytest.mark.parametrize("row_bytes", [8, 32, 36, 96, 100])
def test_blocking_planes_is_the_specified_permutation(row_bytes):
    g = torch.Generator().manual_seed(row_bytes)
    if cpu.ready_layout() == cpu.ROWS16:  # whole 64-column words only (group sizes % 64)
        planes = torch.randint(0, 256, (3, 37, 8 * row_bytes), generator=g, dtype=torch.uint8)
        got = planes.clone()
        cpu.block_planes(got)
        assert torch.equal(got, _rows16_spec(planes))
        params = torch.randn(2, 37, row_bytes, generator=g).half()
        got = params.clone()
        cpu.block_params(got)
        assert torch.equal(got, _rows16_params_spec(params))
        return
    rows = torch.randint(0, 256, (5, row_bytes), generator=g, dtype=torch.uint8)
    got = rows.clone()
    cpu.block_planes(got)
    assert torch.equal(got, _blocked_spec(rows))


@pytest.mark.parametrize("layout", ["rows", "blocked"])
@pytest.mark.parametrize("scheme", ["sliced", "residual", "subblock"])
@pytest.mark.parametrize("rows,cols,gs", CASES)
def test_gemv_within_the_activation_quantization_bound(scheme, rows, cols, gs, layout):
    cfg = MWQConfig(bits=(2, 3, 4, 8) if scheme == "residual" else (1, 2, 3, 4, 8), group_size=gs, scheme=scheme)
    m = _matrix(rows, cols, cfg, seed=rows + cols)
    km = cpu.blocked(m) if layout == "blocked" else m
    g = torch.Generator().manual_seed(1)
    for level in cfg.bits:
        w = dequantize_packed(m, level)
        desc = cpu.MatrixDesc(km, level)
        for tokens in (1, 3, 8, 11):
            x = torch.randn(tokens, cols, generator=g) * torch.rand(1, cols, generator=g) * 3  # uneven columns
            ref = x @ w.T
            for bits in (16, 8):
                bound = _error_bound(w, x, gs, bits, _code_zero(m, level))
                qx = cpu.QuantizedX(lib, x, gs, bits)
                fast = cpu.gemv(lib, desc, qx)
                portable = cpu.gemv(lib, desc, qx, force_portable=True)
                assert ((fast - ref).abs() <= bound).all(), (level, tokens, bits)
                assert ((portable - ref).abs() <= bound).all(), (level, tokens, bits)
                # both paths compute the same exact integer dot products: they differ only by float rounding,
                # in sums whose terms reach |x| @ |w|
                assert ((fast - portable).abs() <= 1e-5 * (x.abs() @ w.abs().T) + 1e-6).all(), (level, tokens, bits)


@pytest.mark.parametrize("scheme", ["sliced", "residual", "subblock"])
def test_dequantized_tiles_are_the_reference_bit_for_bit(scheme):
    for gs, cols, layout in ((32, 192, "rows"), (64, 192, "rows"), (64, 320, "blocked"), (32, 544, "blocked"),
                             (16, 192, "rows"), (16, 544, "blocked")):
        cfg = MWQConfig(bits=(2, 3, 4, 8), group_size=gs, scheme=scheme)
        m = _matrix(45, cols, cfg)
        km = cpu.blocked(m) if layout == "blocked" else m
        for level in cfg.bits:
            desc = cpu.MatrixDesc(km, level)
            ref = dequantize_packed(m, level)
            for portable in (False, True):
                assert torch.equal(cpu.dequant_rows(lib, desc, 0, 45, force_portable=portable), ref)
                assert torch.equal(cpu.dequant_rows(lib, desc, 10, 29, force_portable=portable), ref[10:29])
                bf16 = cpu.dequant_rows(lib, desc, 0, 45, dtype=torch.bfloat16, force_portable=portable)
                assert torch.equal(bf16, ref.to(torch.bfloat16))  # rounded to nearest even, like torch


def test_subblock_codes_and_super_blocks_are_laid_out_per_16_rows():
    """Scheme subblock's parameter codes (uint8 [O, G]) and super-block parameters (float16 [O, S, 2]) take the
    ROWS16 order ([G, 16] and [S * 2, 16] per full block of 16 rows) where the planes do; elsewhere they stay."""
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 256, (37, 24), generator=g, dtype=torch.uint8)
    supers = torch.randn(37, 3, 2, generator=g).half()
    got_codes, got_supers = codes.clone(), supers.clone()
    cpu.block_params(got_codes)
    cpu.block_params(got_supers)
    if cpu.ready_layout() != cpu.ROWS16:
        assert torch.equal(got_codes, codes) and torch.equal(got_supers, supers)
        return
    assert torch.equal(got_codes, _rows16_params_spec(codes[None])[0])
    assert torch.equal(got_supers.view(37, 6), _rows16_params_spec(supers.view(1, 37, 6))[0])


def test_blocked_layout_needs_64_column_words():
    if cpu.ready_layout() != cpu.ROWS16:
        pytest.skip("ROWS16 is the AVX-512 kernels' layout")
    assert cpu.blocks_planes(32, (192, 256)) and cpu.blocks_planes(16, (4096,)) and cpu.blocks_planes(64)
    assert not cpu.blocks_planes(32, (160,)) and not cpu.blocks_planes(8) and not cpu.blocks_planes(16, (64, 48))


@pytest.mark.parametrize("gs,cols", [(16, 4096 + 64), (32, 256), (64, 640), (128, 384), (48, 96)])
def test_group_sums_are_int16_halves_with_one_step_per_256_columns(gs, cols):
    g = torch.Generator().manual_seed(gs)
    x = torch.randn(3, cols, generator=g) * torch.rand(1, cols, generator=g) * 3
    x[1] = 0  # a token of zeros: zero steps, zero sums
    qx = cpu.QuantizedX(lib, x, gs, 8)
    *_, sx, sh, sl, ds = qx.tensors
    groups, span = cols // gs, cpu.sum_groups(gs)
    assert span == (256 // gs if 256 % gs == 0 else 1) and ds.shape == (3, -(-groups // span))
    code = 256 * sh.int() + sl.int()
    assert code.abs().max() <= 32511 and sh.abs().max() <= 127
    steps = ds.repeat_interleave(span, dim=1)[:, :groups]
    assert torch.equal(sx, steps * code.float())  # the value every path multiplies
    exact = x.view(3, groups, gs).sum(-1)
    assert ((sx - exact).abs() <= _sum_half_steps(x, gs) * (1 + 1e-5) + 1e-6 * exact.abs()).all()
    assert torch.equal(ds[1], torch.zeros_like(ds[1])) and torch.equal(sx[1], torch.zeros_like(sx[1]))


def test_zero_and_constant_inputs():
    cfg = MWQConfig(bits=(2, 4), group_size=64, scheme="sliced")
    m = _matrix(16, 128, cfg)
    desc = cpu.MatrixDesc(m, 4)
    zero = cpu.gemv(lib, desc, cpu.QuantizedX(lib, torch.zeros(2, 128), 64))
    assert torch.equal(zero, torch.zeros(2, 16))
    ones = torch.ones(1, 128)
    torch.testing.assert_close(cpu.gemv(lib, desc, cpu.QuantizedX(lib, ones, 64)), ones @ dequantize_packed(m, 4).T,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["rows", "blocked"])
@pytest.mark.parametrize("split", ["native", "python"])
def test_threads_split_rows_without_changing_a_bit(layout, split, monkeypatch):
    monkeypatch.setenv("D2MOE_SPLIT", split)
    cfg = MWQConfig(bits=(2, 4), group_size=64)
    m = _matrix(2100, 1024, cfg)  # 2100 x 1024 x 4 tokens: above the threshold where threads pay
    desc = cpu.MatrixDesc(cpu.blocked(m) if layout == "blocked" else m, 4)  # ROWS16: 131 blocks + 4 rows
    qx = cpu.QuantizedX(lib, torch.randn(4, 1024), 64)
    splitter = cpu.RowSplitter(2, min_rows_per_chunk=16)
    try:
        one = cpu.gemv(lib, desc, qx)
        two = cpu.gemv(lib, desc, qx, splitter)
        if split == "native":  # the library's pool ran it
            assert lib.d2_pool_workers() >= 1 and splitter._pool is None
        else:  # the second Python thread really ran
            assert splitter._pool is not None
    finally:
        splitter.close()
    assert torch.equal(one, two)


def test_the_native_pool_survives_many_calls_thread_counts_and_a_fork(monkeypatch):
    """Back-to-back calls (workers spinning), calls after a pause (workers asleep), 2 and 3 threads, the
    dense kernel, and a forked child (the parent's workers are not there: the child starts its own)."""
    import multiprocessing
    import time

    monkeypatch.setenv("D2MOE_SPLIT", "native")
    cfg = MWQConfig(bits=(2, 4), group_size=64)
    desc = cpu.MatrixDesc(_matrix(1024, 2048, cfg), 2)
    qx = cpu.QuantizedX(lib, torch.randn(8, 2048), 64)
    w = torch.randn(1536, 2048)
    x = torch.randn(4, 2048)
    one, dense_one = cpu.gemv(lib, desc, qx), cpu.dense_gemv(lib, w, x)
    for threads in (2, 3):
        splitter = cpu.RowSplitter(threads)
        for i in range(60):
            if i % 20 == 19:
                time.sleep(0.05)  # past the spin window: the workers sleep and are woken
            assert torch.equal(cpu.gemv(lib, desc, qx, splitter), one)
            assert torch.equal(cpu.dense_gemv(lib, w, x, splitter=splitter), dense_one)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        assert pool.apply(_gemv_in_child, (desc.matrix,)) is True


def test_the_native_pool_under_preemption_keeps_every_result(monkeypatch):
    """More threads than cores and many short calls back to back: threads are preempted mid-call, late
    ones meet the next call; every result must still equal the single-thread one."""
    monkeypatch.setenv("D2MOE_SPLIT", "native")
    cfg = MWQConfig(bits=(2, 4), group_size=64)
    desc = cpu.MatrixDesc(_matrix(512, 2048, cfg, 3), 2)
    qx = cpu.QuantizedX(lib, torch.randn(8, 2048), 64)  # 512 x 2048 x 8: just at the threshold where threads split
    one = cpu.gemv(lib, desc, qx)
    splitter = cpu.RowSplitter(4, min_rows_per_chunk=16)
    assert splitter.chunks(512, 512 * 2048 * 8) > 1
    for _ in range(300):
        assert torch.equal(cpu.gemv(lib, desc, qx, splitter), one)


def _gemv_in_child(m) -> bool:
    desc = cpu.MatrixDesc(m, 2)
    torch.manual_seed(0)
    qx = cpu.QuantizedX(lib, torch.randn(8, 2048), 64)
    return bool(torch.equal(cpu.gemv(lib, desc, qx, cpu.RowSplitter(2)), cpu.gemv(lib, desc, qx)))


@pytest.mark.parametrize("tokens", [1, 8, 40])
def test_expert_forward_paths_agree_with_the_reference(tokens):
    cfg = MWQConfig(bits=(2, 3, 4), group_size=32)
    mats = {"gate": _matrix(96, 64, cfg, 1), "up": _matrix(96, 64, cfg, 2), "down": _matrix(64, 96, cfg, 3)}
    x = torch.randn(tokens, 64)
    native, ref = ExpertKernels("native", gemv_max_tokens=8, activation_bits=16), ExpertKernels("reference")
    for level in cfg.bits:
        y = native.forward(native.prepare(mats, level), x, torch.nn.functional.silu)
        want = ref.forward(ref.prepare(mats, level), x, torch.nn.functional.silu)
        if tokens <= native.gemv_max_tokens:  # the exact integer kernel
            torch.testing.assert_close(y, want, rtol=2e-4, atol=2e-5)
        else:  # prefill tiles compute in bf16, as a bf16 model does: within bf16's rounding
            assert (y - want).abs().max() <= 2e-2 * want.abs().max()
    # cost falls with the level: the planes read are level/8 of a byte per weight
    assert native.prepare(mats, 2).gate.level == 2


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("shape", [(96, 64, 32), (512, 1024, 64), (3 * 256 + 128, 512, 128)])
def test_one_call_expert_equals_the_composed_kernels(shape, bits, monkeypatch):
    """expert_silu (quantize, gate and up GEMVs, SwiGLU, quantize, down GEMV in C) against the same steps
    from Python: equal up to the float rounding of silu, at every level; its own threaded rows bit-equal to
    one thread; and the forward takes it for SiLU experts only."""
    inter, hidden, gs = shape
    cfg = MWQConfig(bits=(2, 3, 4), group_size=gs)
    mats = {"gate": _matrix(inter, hidden, cfg, 1), "up": _matrix(inter, hidden, cfg, 2),
            "down": _matrix(hidden, inter, cfg, 3)}
    kernels = ExpertKernels("native", activation_bits=bits)
    splitter = cpu.RowSplitter(2, min_rows_per_chunk=16)
    for level in cfg.bits:
        p = kernels.prepare(mats, level)
        for tokens in (1, 5, 8):
            x = torch.randn(tokens, hidden)
            qx = cpu.QuantizedX(lib, x, gs, bits)
            h = torch.nn.functional.silu(cpu.gemv(lib, p.gate, qx)) * cpu.gemv(lib, p.up, qx)
            want = cpu.gemv(lib, p.down, cpu.QuantizedX(lib, h, gs, bits))
            got, workspace = cpu.expert_silu(lib, p.gate, p.up, p.down, x, bits)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
            assert workspace >= tokens * inter * 8  # gate and up outputs at least
            assert torch.equal(cpu.expert_silu(lib, p.gate, p.up, p.down, x, bits, splitter)[0], got)
            assert torch.equal(kernels.forward(p, x, torch.nn.functional.silu), got)
            gelu = kernels.forward(p, x, torch.nn.functional.gelu)  # not SiLU: the composed form
            qx = cpu.QuantizedX(lib, x, gs, bits)
            h = torch.nn.functional.gelu(cpu.gemv(lib, p.gate, qx)) * cpu.gemv(lib, p.up, qx)
            assert torch.equal(gelu, cpu.gemv(lib, p.down, cpu.QuantizedX(lib, h, gs, bits)))
    splitter.close()
    p = kernels.prepare(mats, 2)
    with pytest.raises(ValueError, match="do not chain"):
        cpu.expert_silu(lib, p.gate, p.down, p.down, torch.randn(1, hidden), bits)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_steps_experts_in_one_call_equal_one_call_each(threads, monkeypatch):
    """d2_experts_silu: small experts whole on the pool's threads (more experts than threads, and fewer),
    large ones one after another split by rows, mixed levels and token counts; every output bit-equal to
    its expert's own call, and the step's grouped forward (forward_group) the same."""
    monkeypatch.setenv("D2MOE_SPLIT", "native")
    cfg = MWQConfig(bits=(2, 3, 4), group_size=64)
    kernels = ExpertKernels("native", threads=threads)
    small = [kernels.prepare({"gate": _matrix(128, 256, cfg, 3 * e), "up": _matrix(128, 256, cfg, 3 * e + 1),
                              "down": _matrix(256, 128, cfg, 3 * e + 2)}, 2 + e % 3) for e in range(9)]
    big = kernels.prepare({"gate": _matrix(2048, 4096, cfg, 40), "up": _matrix(2048, 4096, cfg, 41),
                           "down": _matrix(4096, 2048, cfg, 42)}, 4)
    for preps in (small, small[:2], [big, small[0]]):
        xs = [torch.randn(1 + i % 3, p.gate.cols) for i, p in enumerate(preps)]
        bits = [kernels.activation_bits_for(p.level) for p in preps]
        ys, workspace = cpu.experts_silu(lib, [(p.gate, p.up, p.down, x, b) for p, x, b in zip(preps, xs, bits, strict=True)],
                                         kernels.splitter)
        assert workspace > 0
        for p, x, b, y in zip(preps, xs, bits, ys, strict=True):
            assert torch.equal(y, cpu.expert_silu(lib, p.gate, p.up, p.down, x, b)[0])
        grouped = kernels.forward_group(list(zip(preps, xs, strict=True)), torch.nn.functional.silu)
        assert all(torch.equal(a, b) for a, b in zip(grouped, ys, strict=True))
    if threads > 1:
        assert lib.d2_pool_workers() >= threads - 1
    kernels.splitter.close()


@pytest.mark.parametrize("bits", [8, 16])
def test_one_call_linear_is_gemv_of_the_quantized_input_bit_for_bit(bits, monkeypatch):
    """cpu.linear (x quantized in the library's arena) = gemv(QuantizedX(x)), 1 and 2 threads, 1-8 tokens."""
    monkeypatch.setenv("D2MOE_SPLIT", "native")
    cfg = MWQConfig(bits=(4,), group_size=64)
    for rows, cols in [(2048, 1024), (37, 128)]:
        desc = cpu.MatrixDesc(cpu.blocked(_matrix(rows, cols, cfg, rows)), 4)
        splitter = cpu.RowSplitter(2, min_rows_per_chunk=16)
        for tokens in (1, 3, 8):
            x = torch.randn(tokens, cols)
            want = cpu.gemv(lib, desc, cpu.QuantizedX(lib, x, 64, bits))
            assert torch.equal(cpu.linear(lib, desc, x, bits), want)
            assert torch.equal(cpu.linear(lib, desc, x, bits, splitter), want)
        splitter.close()


def test_no_compiler_falls_back_to_the_reference_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu, "compiler", lambda: None)
    cpu.load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="no C compiler"):
            assert cpu.load() is None
        kernels = ExpertKernels("auto")
        assert kernels.name == "torch reference"
        with pytest.raises(Exception, match="unavailable"):
            ExpertKernels("native")
    finally:
        monkeypatch.undo()
        cpu.load.cache_clear()
    assert cpu.load() is not None


def test_a_broken_build_falls_back_and_the_cache_is_keyed_by_source(monkeypatch, tmp_path):
    broken = tmp_path / "broken.c"
    broken.write_text("int d2_simd_level(void) { return 1 }\n")  # a syntax error
    monkeypatch.setenv("D2MOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu, "SOURCE", broken)
    cpu.load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="building the CPU expert kernels failed"):
            assert cpu.load() is None
        assert not list((tmp_path / "cache").rglob("*.so"))  # nothing half-written left behind
    finally:
        monkeypatch.undo()
        cpu.load.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
@pytest.mark.parametrize("tokens", [1, 5, 8, 13])
def test_dense_gemv_matches_float_matmul(dtype, tokens):
    g = torch.Generator().manual_seed(tokens)
    cols = 200  # not a multiple of 32: the tail loop runs too
    if dtype == torch.int8:
        w = torch.randint(-127, 128, (77, cols), generator=g, dtype=torch.int8)
        scale = torch.rand(77, generator=g) * 0.01
    else:
        w, scale = (torch.randn(77, cols, generator=g) * 0.05).to(dtype), None
    x = torch.randn(tokens, cols, generator=g)
    ref = x.double() @ w.double().T * (1 if scale is None else scale.double())
    for portable in (False, True):
        y = cpu.dense_gemv(lib, w, x, scale, force_portable=portable)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_patched_linears_keep_the_layer_result_and_leave_big_inputs_to_torch():
    from d2moe.kernels.dense import MAX_TOKENS, patch_linears

    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.SiLU(), torch.nn.Linear(48, 16, bias=False))
    model = model.to(torch.bfloat16).eval()
    x = torch.randn(3, 64).bfloat16()
    with torch.no_grad():
        want = model(x)
        big = torch.randn(MAX_TOKENS + 1, 64).bfloat16()
        want_big = model(big)
        assert patch_linears(model, lib, cpu.RowSplitter(1)) == 2
        got = model(x)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)  # bf16 output rounding
        assert torch.equal(model(big), want_big)  # prefill-sized inputs: torch's own matmul


def test_int8_dense_weights_halve_the_bytes_within_the_rounding_bound():
    from d2moe.kernels.dense import INT8_MIN_ELEMS, patch_linears, quantize_rows_int8

    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 256, generator=g)
    q, scale = quantize_rows_int8(w)
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()  # half a step per weight
    big = torch.nn.Linear(256, INT8_MIN_ELEMS // 256, bias=True).bfloat16().eval()
    small = torch.nn.Linear(256, 8, bias=False).bfloat16().eval()
    model = torch.nn.Sequential(big, small)
    x = torch.randn(2, 256).bfloat16()
    with torch.no_grad():
        want = model(x).float()
        before = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        patch_linears(model, lib, cpu.RowSplitter(1), weights="int8")
        after = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        got, got_prefill = model(x).float(), model(x.repeat(8, 1)).float()[:2]  # decode and tiled prefill paths
    assert not hasattr(big, "weight") and small.weight.dtype == torch.bfloat16  # only the large layer
    assert after < 0.6 * before
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    torch.testing.assert_close(got, got_prefill, rtol=2e-2, atol=2e-2)


def test_int4_dense_weights_are_the_expert_format_at_a_quarter_of_the_bytes():
    from d2moe.kernels.dense import patch_linears, quantize_int4
    from d2moe.kernels.dispatch import gemv_limit

    g = torch.Generator().manual_seed(0)
    big = torch.nn.Linear(512, 256, bias=True).bfloat16().eval()
    odd = torch.nn.Linear(520, 256, bias=False).bfloat16().eval()  # 520 columns: not groups of 64, int8 instead
    with torch.no_grad():
        big.weight.copy_(torch.randn(256, 512, generator=g) * 0.05)
        w4 = cpu.dequant_rows(lib, cpu.MatrixDesc(quantize_int4(big.weight), 4), 0, 256)  # the fit is deterministic
        x = torch.randn(3, 512, generator=g).bfloat16()
        before = sum(t.numel() * t.element_size() for t in big.parameters())
        want = x.float() @ w4.T + big.bias.float()
        patch_linears(torch.nn.Sequential(big, odd), lib, cpu.RowSplitter(1), weights="int4")
        after = sum(t.numel() * t.element_size() for t in [*big.parameters(), *big.buffers()])
        got = big(x).float()
        got_prefill = big(x.repeat(gemv_limit(8, torch.float32) // 3 + 1, 1)).float()[:3]  # the tiled path
    assert not hasattr(big, "weight") and hasattr(odd, "weight_int8")
    assert after < 0.3 * before  # 4.5 bits per weight (+ the bias) against 16
    # the 4-bit weight exactly, up to int8 activations (decode: the kernels' bound) and bf16 output rounding
    rounding = want.abs() * 2**-8 + 1e-6
    assert ((got - want).abs() <= _error_bound(w4, x.float(), 64, 8) + rounding).all()
    assert ((got_prefill - want).abs() <= 1e-4 * (x.float().abs() @ w4.abs().T) + rounding).all()


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(14336, 4096), (4096, 14336), (768, 2048)])  # Mixtral w1/w3, w2; Qwen3
def test_real_shapes_within_the_bound(shape):
    """At real expert shapes (random planes: the kernel's arithmetic does not depend on the values)."""
    rows, cols = shape
    g = torch.Generator().manual_seed(0)
    cfg = MWQConfig(bits=(2, 3, 4, 8), group_size=64, scheme="sliced")
    planes = tuple(torch.randint(0, 256, (rows, cols // 8), generator=g, dtype=torch.uint8) for _ in range(8))
    scale = (torch.rand(rows, cols // 64, generator=g) * 1e-3 + 1e-4).half()
    offset = (torch.randn(rows, cols // 64, generator=g) * 1e-3).half()
    m = PackedMatrix((rows, cols), cfg, 8, scale, offset, planes, ())
    x = torch.randn(3, cols, generator=g)
    ready = cpu.blocked(m)  # the layout the runtime's cache holds on this CPU
    for level in (2, 4, 8):
        w = dequantize_packed(m, level)
        for bits in (8, 16):
            for km in (m, ready):
                y = cpu.gemv(lib, cpu.MatrixDesc(km, level), cpu.QuantizedX(lib, x, 64, bits))
                assert ((y - x @ w.T).abs() <= _error_bound(w, x, 64, bits, _code_zero(m, level))).all(), (level, bits, km.blocked)


def test_the_integer_kernel_takes_more_rows_where_tiles_are_float32():
    """Prefill's path per level: int8-activation levels keep the integer kernel to 64 rows where tiles
    would be float32 (no native bf16 GEMM), int16 levels and bf16 tiles switch at 16; an explicit
    `gemv_max_tokens` wins everywhere."""
    from d2moe.kernels import dispatch

    auto = ExpertKernels("native")
    int8_rows = dispatch.GEMV_MAX_TOKENS_INT8_FP32 if dispatch.TILE_DTYPE == torch.float32 else dispatch.GEMV_MAX_TOKENS
    assert auto.gemv_limit(2) == auto.gemv_limit(4) == int8_rows
    assert auto.gemv_limit(8) == dispatch.GEMV_MAX_TOKENS
    assert ExpertKernels("native", activation_bits=16).gemv_limit(2) == dispatch.GEMV_MAX_TOKENS
    assert ExpertKernels("native", gemv_max_tokens=5).gemv_limit(8) == 5
    # on the ROWS16 layout int8 levels keep the integer kernel to 256 rows against float32 tiles, 128 against bf16;
    # int16 do not
    assert auto.gemv_limit(4, cpu.ROWS16) == dispatch.GEMV_MAX_TOKENS_ROWS16[dispatch.TILE_DTYPE]
    assert auto.gemv_limit(8, cpu.ROWS16) == dispatch.GEMV_MAX_TOKENS


def test_bf16_tiles_take_few_gemm_shapes_and_the_plan_counts_their_kernels():
    """oneDNN keeps a kernel per bf16 GEMM shape: the token columns are padded onto a ladder (four widths an octave,
    at most a quarter of padding past 128 tokens) and the workspace counts the kernels; float32 tiles keep none."""
    from d2moe.kernels import dispatch

    widths = [dispatch.gemm_width(t, torch.bfloat16) for t in range(1, 513)]
    assert all(w >= t and w % 16 == 0 for t, w in enumerate(widths, 1))
    assert all(w <= 1.25 * t for t, w in enumerate(widths, 1) if t > 128)
    assert len(set(widths)) == 16 and dispatch.gemm_width(37, torch.float32) == 37
    shapes = {"gate": (96, 128), "up": (96, 128), "down": (128, 96)}
    kernels = dispatch.tile_kernel_bytes(shapes, 512)
    if dispatch.TILE_DTYPE == torch.bfloat16:
        assert kernels == 16 * 2 * dispatch.GEMM_KERNEL_BYTES  # two matrix shapes, each in one tile
        assert dispatch.tile_kernel_bytes(shapes, 40) == 3 * 2 * dispatch.GEMM_KERNEL_BYTES  # widths 16, 32, 48
    else:
        assert kernels == 0
    assert dispatch.workspace_bound(shapes, 512, 1) > kernels + 4 * 512 * (128 + 3 * 96)  # and the activations
