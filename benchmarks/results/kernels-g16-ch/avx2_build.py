"""g16vs32.py with the kernels built -march=x86-64-v3 (AVX2 + FMA, no AVX-512): the AVX2 path timed on an AVX-512 CPU (BENCHMARKS.md 0.16)."""
import runpy
import sys

from d2moe.kernels import cpu

cpu._FLAGS[:] = [f if f != "-march=native" else "-march=x86-64-v3" for f in cpu._FLAGS]
cpu.load.cache_clear()
lib = cpu.load()
print("simd level", lib.d2_simd_level(), file=sys.stderr)
sys.argv = ["g16vs32.py", *sys.argv[1:]]
runpy.run_path("/work/main/benchmarks/results/kernels-g16-ch/g16vs32.py", run_name="__main__")
