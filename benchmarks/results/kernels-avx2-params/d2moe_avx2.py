"""The d2moe CLI with its kernels built -march=x86-64-v3 (AVX2 + FMA + F16C, no AVX-512): what a laptop without
AVX-512 runs, timed on this AVX-512 host. bench_peers.py's `cmd=python d2moe_avx2.py`; another commit's CLI on that
build: `cmd=python at_rev.py WORKTREE d2moe_avx2.py` (BENCHMARKS.md 0.17)."""
from d2moe.kernels import cpu

cpu._FLAGS[:] = [f if f != "-march=native" else "-march=x86-64-v3" for f in cpu._FLAGS]
cpu.load.cache_clear()
assert cpu.load().d2_simd_level() == 2, "not the AVX2 build"
from d2moe.cli import main  # noqa: E402

main()
