"""The native CPU kernels (kernels/cpu/mwq_cpu.c): built at first use, called through ctypes.

The C source is compiled once per machine with the system compiler (`cc -O3 -march=native`: the
kernels use AVX-512 VNNI or AVX2 where the CPU has them, portable C elsewhere) into a cache folder
(`$D2MOE_CACHE` or `~/.cache/d2moe`), keyed by the source, the compiler and the CPU's flags, and
written atomically so concurrent first uses are safe. A matrix's rows are split over threads inside the
library (kernels/cpu/pool.c: one call per matrix); callers that split from Python (prefill tiles) rely on
ctypes releasing the GIL during a call.

`load()` returns None (after one warning) when no compiler is found or the build fails; the
dispatcher (kernels/dispatch.py) then uses the torch reference.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from functools import lru_cache
from pathlib import Path

import torch

from d2moe.kernels.packed import PackedMatrix
from d2moe.quantize.subblock import SUPER_PARAMS

SOURCE = Path(__file__).parent / "cpu" / "mwq_cpu.c"  # the expert kernels; built with DENSE_SOURCE into one library
DENSE_SOURCE = Path(__file__).parent / "cpu" / "dense_cpu.c"  # dense GEMV and single-query attention
POOL_SOURCE = Path(__file__).parent / "cpu" / "pool.c"  # row splitting inside the library (RowSplitter)
GATE_SOURCE = Path(__file__).parent / "cpu" / "gate_cpu.c"  # the served bit-width gate's decode steps
MAX_TERMS = 8
MAX_PLANES = 8
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-fno-math-errno", "-std=gnu11", "-pthread"]
_c_float_p = ctypes.POINTER(ctypes.c_float)


class _Matrix(ctypes.Structure):
    _fields_ = [
        ("rows", ctypes.c_int32), ("cols", ctypes.c_int32), ("group_size", ctypes.c_int32), ("nterms", ctypes.c_int32),
        ("planes", ctypes.c_void_p * MAX_PLANES),
        ("offset", ctypes.c_void_p),
        ("coef", ctypes.c_void_p * MAX_TERMS),
        ("term_first", ctypes.c_int32 * MAX_TERMS), ("term_nplanes", ctypes.c_int32 * MAX_TERMS),
        ("term_mul", ctypes.c_float * MAX_TERMS), ("term_bias", ctypes.c_float * MAX_TERMS),
        ("layout", ctypes.c_int32),
        ("pcode", ctypes.c_void_p), ("psuper", ctypes.c_void_p),  # scheme subblock (else NULL)
    ]


class _QX(ctypes.Structure):
    _fields_ = [
        ("ntok", ctypes.c_int32), ("cols", ctypes.c_int32), ("group_size", ctypes.c_int32),
        ("hi", ctypes.c_void_p), ("lo", ctypes.c_void_p), ("dx", ctypes.c_void_p), ("sx", ctypes.c_void_p),
        ("sh", ctypes.c_void_p), ("sl", ctypes.c_void_p), ("ds", ctypes.c_void_p),
    ]


class _ExpertItem(ctypes.Structure):
    """kernels/cpu/mwq_cpu.c's d2_expert_item: one expert of a step's batch (d2_experts_silu)."""

    _fields_ = [("gate", ctypes.c_void_p), ("up", ctypes.c_void_p), ("down", ctypes.c_void_p),
                ("x", ctypes.c_void_p), ("y", ctypes.c_void_p), ("ntok", ctypes.c_int32),
                ("act_bits", ctypes.c_int32), ("chunks_in", ctypes.c_int32), ("chunks_down", ctypes.c_int32),
                ("used", ctypes.c_int64)]


class GateHead(ctypes.Structure):
    """kernels/cpu/gate_cpu.c's D2GateHead: one layer's bit-width gate head (addresses of float32 arrays)."""

    _fields_ = [(name, ctypes.c_void_p) for name in
                ("proj_w", "proj_b", "router_dir", "expert_emb", "out_w", "out_b", "router_out")] + \
               [(name, ctypes.c_int32) for name in ("E", "D", "L", "H")]


def cache_dir() -> Path:
    return Path(os.environ.get("D2MOE_CACHE") or Path.home() / ".cache" / "d2moe") / "kernels"


def compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return os.uname().machine


@lru_cache(maxsize=1)
def has_bf16_gemm() -> bool:
    """Whether the CPU multiplies bf16 natively (AVX512-BF16, AMX, Arm BF16): torch's bf16 GEMM then runs at
    twice the fp32 rate; without it the bf16 GEMM converts in software (measured ~10x slower than fp32 on an
    AVX2 Zen 3), so prefill tiles go through fp32 instead."""
    flags = set(_cpu_flags().split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def build_shared(cc: str, sources: Path | list[Path] = SOURCE, flags: list[str] = _FLAGS) -> Path:
    """Compile C `sources` (and the headers beside them) into one shared library, once per (sources, headers,
    flags, compiler, CPU): a cached path, named after the first source."""
    sources = [sources] if isinstance(sources, Path) else list(sources)
    headers = sorted({h for s in sources for h in s.parent.glob("*.h")})
    src = b"".join(p.read_bytes() for p in [*sources, *headers])
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(src + " ".join(flags).encode() + version.encode() + _cpu_flags().encode()).hexdigest()[:16]
    out = cache_dir() / f"{sources[0].stem}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, "-o", tmp, *map(str, sources), "-lm"], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"{cc} failed")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)  # atomic: a concurrent first use sees the old name absent or complete
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled kernels, or None (one warning) when they cannot be built here."""
    if os.environ.get("D2MOE_KERNELS", "").lower() == "reference":
        return None
    cc = compiler()
    if cc is None:
        warnings.warn("no C compiler found (set CC): expert kernels fall back to the slower torch reference", stacklevel=2)
        return None
    try:
        lib = ctypes.CDLL(str(build_shared(cc, [SOURCE, DENSE_SOURCE, POOL_SOURCE, GATE_SOURCE])))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        warnings.warn(f"building the CPU expert kernels failed ({exc}): using the slower torch reference", stacklevel=2)
        return None
    mp, qp = ctypes.POINTER(_Matrix), ctypes.POINTER(_QX)
    lib.d2_simd_level.restype = ctypes.c_int
    lib.d2_quantize_x.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,
                                  *[ctypes.c_void_p] * 7]
    lib.d2_scratch_floats.argtypes = [mp]
    lib.d2_scratch_floats.restype = ctypes.c_int64
    lib.d2_gemv_rows.argtypes = [mp, qp, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32,
                                 ctypes.c_void_p, ctypes.c_int32]
    lib.d2_dequant_rows.argtypes = [mp, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p,
                                    ctypes.c_int32, ctypes.c_int32]
    lib.d2_block_planes.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32]
    lib.d2_interleave_planes.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32]
    lib.d2_interleave_params.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32]
    lib.d2_ready_layout.restype = ctypes.c_int
    lib.d2_dense_rows.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p,
                                  ctypes.c_int32, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32,
                                  ctypes.c_int32]
    lib.d2_pool_gemv.argtypes = [mp, qp, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int64, ctypes.c_int32,
                                 ctypes.c_int32, ctypes.c_int32]
    lib.d2_pool_workers.restype = ctypes.c_int32
    lib.d2_pool_dense.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p,
                                  ctypes.c_int32, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32,
                                  ctypes.c_int32, ctypes.c_int32]
    vp, i32, i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
    lib.d2_attend_one.argtypes = [vp, vp, vp, vp, *[i32] * 7, *[i64] * 6, ctypes.c_float, i32]
    lib.d2_attend_one.restype = i32
    lib.d2_linear.argtypes = [mp, vp, i32, i32, vp, i64, i32, i32, i32]
    lib.d2_linear.restype = i64
    lib.d2_experts_silu.argtypes = [vp, i32, i64, i32, i32]
    lib.d2_experts_silu.restype = i64
    lib.d2_gate_levels.argtypes = [ctypes.POINTER(GateHead), vp, i32, vp, vp, i32, vp, vp, vp, vp, vp]
    lib.d2_gate_levels.restype = i32
    return lib


def simd_name() -> str:
    lib = load()
    if lib is None:
        return "torch reference"
    return {1: "avx512-vnni", 2: "avx2"}.get(lib.d2_simd_level(), "portable C")


ROWS, BLOCKED, ROWS16 = 0, 1, 2  # plane layouts (kernels/cpu/mwq_cpu.c, mwq_rows16.h)


def ready_layout() -> int:
    """The layout the loaded vector kernels read fastest: ROWS16 (AVX-512: 16 rows share each word, so one
    VNNI dot product serves 16 rows), BLOCKED (AVX2: bits as byte lanes by load + shift), ROWS (the file's)."""
    lib = load()
    return ROWS if lib is None else int(lib.d2_ready_layout())


def blocks_planes(group_size: int, cols: tuple[int, ...] = ()) -> bool:
    """Whether the cache should hold this machine's kernel-ready layout (block_planes/block_params as bytes
    land) for matrices of these input widths: AVX2 for group sizes % 32 and 16 (its bit-to-byte expansion from
    the file's rows costs more than the multiply), AVX-512 for % 16 with every width % 64 (its 16-row words
    hold 4 columns; from the file's rows every (row, group) pays a reduction)."""
    layout = ready_layout()
    if layout == ROWS16:
        return group_size % 16 == 0 and all(c % 64 == 0 for c in (group_size * 4, *cols))
    return layout == BLOCKED and (group_size % 32 == 0 or group_size == 16)


def block_planes(planes: torch.Tensor) -> None:
    """Planes [..., O, I/8] uint8 (contiguous, CPU; [O, I/8] is one plane) from the file's layout to the
    kernel-ready one, in place."""
    if planes.dtype != torch.uint8 or not planes.is_contiguous() or planes.device.type != "cpu":
        raise ValueError("block_planes needs contiguous uint8 CPU plane rows")
    if not planes.numel():
        return
    if ready_layout() == ROWS16:
        rows, row_bytes = planes.shape[-2], planes.shape[-1]
        load().d2_interleave_planes(planes.data_ptr(), planes.numel() // (rows * row_bytes), rows, row_bytes)
    else:
        load().d2_block_planes(planes.data_ptr(), planes.numel() // planes.shape[-1], planes.shape[-1])


def block_params(params: torch.Tensor) -> None:
    """Per-group parameters [..., O, G] float16 (scale, offset, alpha) to the kernel-ready layout, in
    place: [G, 16] per block of 16 rows under ROWS16; other layouts keep the file's. Scheme subblock's
    parameter codes (uint8 [O, G]) go to [G, 16] bytes per block, its super-block parameters (float16
    [O, S, 2]) to [S * 2, 16]."""
    if params.dtype not in (torch.float16, torch.uint8) or not params.is_contiguous() or params.device.type != "cpu":
        raise ValueError("block_params needs contiguous float16 (or uint8 code) CPU parameter rows")
    if not params.numel() or ready_layout() != ROWS16:
        return
    if params.dtype == torch.uint8:
        rows, groups = params.shape
        full = rows & ~15
        blocks = params[:full].view(full // 16, 16, groups)
        blocks.copy_(blocks.transpose(1, 2).contiguous().view(full // 16, 16, groups))
        return
    if params.dim() == 3 and params.shape[-1] == SUPER_PARAMS:  # subblock's [O, S, 2]
        params = params.view(params.shape[0], -1)
    rows, groups = params.shape[-2], params.shape[-1]
    load().d2_interleave_params(params.data_ptr(), params.numel() // (rows * groups), rows, groups)


def blocked(m: PackedMatrix) -> PackedMatrix:
    """A copy of `m` in the kernel-ready layout (tests and benchmarks; the runtime re-lays out the cache's
    own bytes in place as they land). Unchanged where the layout does not apply (blocks_planes)."""
    if not blocks_planes(m.cfg.group_size, (m.shape[1],)):  # as the runtime decides (portable builds: never)
        return m
    planes = tuple(p.clone() for p in m.planes)
    for p in planes:
        block_planes(p)
    scale, offset, alphas = m.scale.clone(), m.offset.clone(), tuple(a.clone() for a in m.alphas)
    for t in (scale, offset, *alphas):
        block_params(t)
    return dataclasses.replace(m, scale=scale, offset=offset, planes=planes, alphas=alphas, blocked=True)


class MatrixDesc:
    """A PackedMatrix at one level as the C struct (pointers into its views, which `matrix` keeps alive).
    Built only where the native kernels loaded."""

    __slots__ = ("struct", "ref", "matrix", "level", "rows", "cols", "group_size", "scratch_floats")

    def __init__(self, m: PackedMatrix, level: int) -> None:
        rows, cols = m.shape
        terms = m.terms(level)
        views = [m.offset, *m.planes[:level], *(t.coef for t in terms)]  # subblock: supers, planes, codes
        for v in views:
            if not v.is_contiguous() or v.device.type != "cpu":
                raise ValueError("packed matrix views must be contiguous CPU tensors")
        s = _Matrix()
        s.rows, s.cols, s.group_size, s.nterms = rows, cols, m.cfg.group_size, len(terms)
        for p in range(level):
            s.planes[p] = m.planes[p].data_ptr()
        subblock = m.cfg.scheme == "subblock"
        if subblock:
            s.pcode, s.psuper = m.scale.data_ptr(), m.offset.data_ptr()
        else:
            s.offset = m.offset.data_ptr()
        for i, t in enumerate(terms):
            if not subblock:
                s.coef[i] = t.coef.data_ptr()
            s.term_first[i], s.term_nplanes[i], s.term_mul[i], s.term_bias[i] = t.first, t.nplanes, t.mul, t.bias
        s.layout = ready_layout() if m.blocked else ROWS
        self.struct, self.ref, self.matrix, self.level = s, ctypes.byref(s), m, level
        self.rows, self.cols, self.group_size = rows, cols, m.cfg.group_size
        self.scratch_floats = int(load().d2_scratch_floats(self.ref))  # the C side owns the scratch layout


SUM_SPAN = 256  # columns whose group sums share one int16 step (kernels/cpu/mwq_cpu.c's D2_SUM_SPAN)


def sum_groups(group_size: int) -> int:
    """Groups per span of one sum step: a 256-column super-block's where the group size divides it, else one."""
    return SUM_SPAN // group_size if group_size <= SUM_SPAN and SUM_SPAN % group_size == 0 else 1


class QuantizedX:
    """x [N, I] float32 quantized per group for the kernels: `bits=16` as two int8 halves (hi, lo; within
    ~1e-4 of float) or `bits=8` plain int8 (llama.cpp's Q8 activations; one dot product instead of two).
    The group sums are int16 (two int8 halves) with one step per 256 columns: subblock's 16-row kernel dots
    them with its parameter codes; the other paths read their value (sx)."""

    __slots__ = ("struct", "ref", "tensors", "ntok")

    def __init__(self, lib, x: torch.Tensor, group_size: int, bits: int = 16) -> None:
        if bits not in (8, 16):
            raise ValueError(f"activation bits {bits}: use 8 or 16")
        x = x.to(torch.float32).contiguous()
        ntok, cols = x.shape
        groups = cols // group_size
        spans = -(-groups // sum_groups(group_size))
        hi = torch.empty(ntok, cols, dtype=torch.int8)
        lo = torch.empty(ntok, cols, dtype=torch.int8) if bits == 16 else None
        dx, sx = (torch.empty(ntok, groups, dtype=torch.float32) for _ in range(2))
        sh, sl = (torch.empty(ntok, groups, dtype=torch.int8) for _ in range(2))
        ds = torch.empty(ntok, spans, dtype=torch.float32)
        lo_p = lo.data_ptr() if lo is not None else None
        ptrs = [t.data_ptr() for t in (dx, sx, sh, sl, ds)]
        lib.d2_quantize_x(x.data_ptr(), ntok, cols, group_size, hi.data_ptr(), lo_p, *ptrs)
        s = _QX(ntok, cols, group_size, hi.data_ptr(), lo_p, *ptrs)
        self.struct, self.ref, self.ntok = s, ctypes.byref(s), ntok
        self.tensors = tuple(t for t in (x, hi, lo, dx, sx, sh, sl, ds) if t is not None)


_threads: int | None = None


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_threads(threads: int | None) -> None:
    """Process-wide kernel thread count (None: every available core)."""
    global _threads
    _threads = threads


def threads() -> int:
    return _threads or available_cores()


PYTHON_SPLIT_WORK = 1 << 23  # weights x tokens below which a split from Python costs more than it saves
NATIVE_SPLIT_WORK = 1 << 19  # the same inside the library's pool (kernels/cpu/pool.c)


class RowSplitter:
    """Runs a row-range function over `threads` threads (the caller's included), in chunks taken
    dynamically so a thread slowed by another process takes fewer."""

    def __init__(self, threads: int = 1, min_rows_per_chunk: int = 64) -> None:
        self.threads = max(1, int(threads))
        self.min_rows = min_rows_per_chunk
        self._pool = None
        self._lock = threading.Lock()

    def _executor(self):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="d2moe-kernel")
        return self._pool

    def chunks(self, rows: int, work: int, min_rows: int | None = None, native: bool = False) -> int:
        """How many row chunks a call of `work` (weights x tokens) over `rows` is split into; 1: the caller
        runs it alone. A handoff costs ~70 µs from Python (pays above ~8M weight-tokens) and a few µs inside
        the library's pool (`native`: pays from ~0.5M, BENCHMARKS.md §0.12)."""
        min_rows = min_rows or self.min_rows
        if self.threads == 1 or work < (NATIVE_SPLIT_WORK if native else PYTHON_SPLIT_WORK) or rows < 2 * min_rows:
            return 1
        return min(rows // min_rows, self.threads * 8)

    def run(self, fn, rows: int, work: int, min_rows: int | None = None, native=None) -> None:
        """fn(r0, r1) over [0, rows); `work` (weights x tokens) decides whether threads pay. `native(threads,
        nchunks)`, where given, splits the call inside the library instead (kernels/cpu/pool.c: no Python
        handoff per call); D2MOE_SPLIT=python keeps the Python threads (A/B)."""
        in_library = native is not None and os.environ.get("D2MOE_SPLIT") != "python"
        nchunks = self.chunks(rows, work, min_rows, native=in_library)
        if nchunks == 1:
            fn(0, rows)
            return
        threads = self.threads
        if in_library:
            native(threads, nchunks)
            return
        # chunk edges on multiples of 16 rows: the ROWS16 layout computes whole 16-row blocks
        edges = [0, *((rows * i // nchunks) & ~15 for i in range(1, nchunks)), rows]
        bounds = [(a, b) for a, b in zip(edges, edges[1:], strict=False) if b > a]
        bounds.reverse()

        def worker() -> None:
            while True:
                with self._lock:
                    if not bounds:
                        return
                    r0, r1 = bounds.pop()
                fn(r0, r1)

        futures = [self._executor().submit(worker) for _ in range(threads - 1)]
        worker()
        for f in futures:
            f.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


_SERIAL = RowSplitter(1)


def gemv(lib, desc: MatrixDesc, qx: QuantizedX, splitter: RowSplitter = _SERIAL, force_portable: bool = False) -> torch.Tensor:
    """y [N, O] = x W^T for the matrix at its level, from its packed planes."""
    y = torch.empty(qx.ntok, desc.rows, dtype=torch.float32)
    yp = y.data_ptr()
    scratch_n = desc.scratch_floats

    def rows(r0: int, r1: int) -> None:
        scratch = (ctypes.c_float * scratch_n)()
        lib.d2_gemv_rows(desc.ref, qx.ref, yp, desc.rows, r0, r1, scratch, int(force_portable))

    def native(threads: int, nchunks: int) -> None:
        lib.d2_pool_gemv(desc.ref, qx.ref, yp, desc.rows, desc.rows, scratch_n, int(force_portable), threads, nchunks)

    splitter.run(rows, desc.rows, desc.rows * desc.cols * qx.ntok, native=native)
    return y


def linear(lib, desc: MatrixDesc, x: torch.Tensor, bits: int = 8, splitter: RowSplitter = _SERIAL,
           force_portable: bool = False) -> torch.Tensor:
    """y [N, O] = x W^T as gemv(desc, QuantizedX(x)) computes it, in one library call (x quantized in the
    library's per-thread arena, no tensors allocated for it)."""
    x = x.to(torch.float32).contiguous()
    ntok = x.shape[0]
    y = torch.empty(ntok, desc.rows, dtype=torch.float32)
    nchunks = splitter.chunks(desc.rows, desc.rows * desc.cols * ntok, native=True)
    if lib.d2_linear(desc.ref, x.data_ptr(), ntok, bits, y.data_ptr(), desc.scratch_floats, splitter.threads,
                     nchunks, int(force_portable)) < 0:
        raise ValueError(f"linear: {ntok} tokens with {bits}-bit activations cannot be computed")
    return y


def expert_silu(lib, gate: MatrixDesc, up: MatrixDesc, down: MatrixDesc, x: torch.Tensor, bits: int,
                splitter: RowSplitter = _SERIAL, force_portable: bool = False) -> tuple[torch.Tensor, int]:
    """(y [N, H], workspace bytes) = down(silu(gate x) * (up x)) for x [N, H] float32 in one library call: the
    three GEMVs and the SwiGLU between them, rows split on the library's pool as `gemv` would split them
    (`experts_silu` of one expert). ValueError when the matrices do not chain."""
    ys, used = experts_silu(lib, [(gate, up, down, x, bits)], splitter, force_portable)
    return ys[0], used


def experts_silu(lib, work: list[tuple[MatrixDesc, MatrixDesc, MatrixDesc, torch.Tensor, int]],
                 splitter: RowSplitter = _SERIAL, force_portable: bool = False) -> tuple[list[torch.Tensor], int]:
    """expert_silu for each (gate, up, down, x, bits) of a step in one library call: experts too small to
    split by rows run whole on the pool's threads at once, larger ones one after another split by rows.
    Returns the outputs and the workspace bytes held at once."""
    n = len(work)
    items = (_ExpertItem * n)()
    ys, keep = [], []
    scratch = 0
    # whole experts on the threads while there are enough of them and each is below what pays from Python
    # (where a row split would add more handoffs than it balances); else each expert split by rows
    whole = n >= splitter.threads and all(
        splitter.chunks(w[0].rows, w[0].rows * w[0].cols * w[3].shape[0]) == 1 for w in work)
    for item, (gate, up, down, x, bits) in zip(items, work, strict=True):
        x = x.to(torch.float32).contiguous()
        ntok = x.shape[0]
        y = torch.empty(ntok, down.rows, dtype=torch.float32)
        item.gate, item.up, item.down = ctypes.addressof(gate.struct), ctypes.addressof(up.struct), ctypes.addressof(down.struct)
        item.x, item.y, item.ntok, item.act_bits = x.data_ptr(), y.data_ptr(), ntok, bits
        item.chunks_in = 1 if whole else splitter.chunks(gate.rows, gate.rows * gate.cols * ntok, native=True)
        item.chunks_down = 1 if whole else splitter.chunks(down.rows, down.rows * down.cols * ntok, native=True)
        scratch = max(scratch, gate.scratch_floats, up.scratch_floats, down.scratch_floats)
        ys.append(y)
        keep.append(x)
    used = lib.d2_experts_silu(ctypes.addressof(items), n, scratch, splitter.threads, int(force_portable))
    if used < 0:
        bad = next(i for i, it in enumerate(items) if it.used < 0)
        raise _expert_error(*work[bad][:3])
    return ys, int(used)


def _expert_error(gate: MatrixDesc, up: MatrixDesc, down: MatrixDesc) -> ValueError:
    return ValueError(f"expert matrices do not chain (gate {gate.rows}x{gate.cols}, up {up.rows}x{up.cols}, down "
                      f"{down.rows}x{down.cols}), or the kernels' workspace could not be allocated")


def dequant_rows(lib, desc: MatrixDesc, r0: int, r1: int, out: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32, force_portable: bool = False) -> torch.Tensor:
    """Rows [r0, r1) of the weight at the descriptor's level, [r1 - r0, I] float32 (the reference's
    values bit for bit) or bfloat16 (those values rounded to nearest even)."""
    if out is None:
        out = torch.empty(r1 - r0, desc.cols, dtype=dtype)
    if out.dtype not in (torch.float32, torch.bfloat16) or not out.is_contiguous() or out.shape != (r1 - r0, desc.cols):
        raise ValueError(f"dequant_rows needs a contiguous float32/bfloat16 [{r1 - r0}, {desc.cols}] buffer")
    scratch = (ctypes.c_float * desc.scratch_floats)()
    lib.d2_dequant_rows(desc.ref, out.data_ptr(), r0, r1, scratch, int(out.dtype == torch.bfloat16), int(force_portable))
    return out


DENSE_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3}


def dense_gemv(lib, weight: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None = None,
               splitter: RowSplitter = _SERIAL, force_portable: bool = False) -> torch.Tensor:
    """y [N, O] float32 = x [N, I] W^T for a resident row-major W [O, I] (float32, bfloat16, float16,
    or int8 with a float32 `scale` per row), accumulated in float32."""
    rows, cols = weight.shape
    x = x.to(torch.float32).contiguous()
    y = torch.empty(x.shape[0], rows, dtype=torch.float32)
    wp, xp, yp = weight.data_ptr(), x.data_ptr(), y.data_ptr()
    sp = scale.data_ptr() if scale is not None else None
    dtype, ntok = DENSE_DTYPES[weight.dtype], x.shape[0]

    def run(r0: int, r1: int) -> None:
        lib.d2_dense_rows(wp, dtype, sp, cols, xp, ntok, yp, rows, r0, r1, int(force_portable))

    def native(threads: int, nchunks: int) -> None:
        lib.d2_pool_dense(wp, dtype, sp, cols, xp, ntok, yp, rows, rows, int(force_portable), threads, nchunks)

    splitter.run(run, rows, rows * cols * ntok, native=native)
    return y
