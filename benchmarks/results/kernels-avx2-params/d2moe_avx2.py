"""The d2moe CLI with its kernels built -march=x86-64-v3 (AVX2 + FMA + F16C, no AVX-512): what a laptop without
AVX-512 runs, timed on this AVX-512 host. `--at WORKTREE` first points the editable install at another commit's
worktree (the before row). bench_peers.py's `cmd=python d2moe_avx2.py [--at W]` (BENCHMARKS.md 0.17)."""
import sys

if sys.argv[1:2] == ["--at"]:
    import __editable___d2moe_0_1_0_finder as f

    for k, v in list(f.MAPPING.items()):
        f.MAPPING[k] = v.replace("/work/main", sys.argv[2])
    del sys.argv[1:3]

from d2moe.kernels import cpu  # noqa: E402

cpu._FLAGS[:] = [f if f != "-march=native" else "-march=x86-64-v3" for f in cpu._FLAGS]
cpu.load.cache_clear()
assert cpu.load().d2_simd_level() == 2, "not the AVX2 build"
from d2moe.cli import main  # noqa: E402

main()
