"""Run SCRIPT as if this CPU had (`bfloat16`) or lacked (`float32`) native bfloat16 GEMMs, so one machine times both of
pack --calib's product dtypes (d2moe.quantize.calib.product_dtype): products.py bfloat16|float32 SCRIPT ARGS..."""
import runpy, sys
from d2moe.kernels import cpu
mode, script, *args = sys.argv[1:]
assert mode in ("bfloat16", "float32"), mode
cpu.has_bf16_gemm = lambda: mode == "bfloat16"
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
