"""The native subblock fit of one Mixtral-shaped down matrix (4096x14336 bf16, --bits 2,3,4, refits 1, Q2_K's |x|
weighting) with and without column weights: seconds per fit (best of 3) and the planes saved for comparison.
Usage: fit_speed.py THREADS OUT.pt"""
import json, sys, time, torch
from concurrent.futures import ThreadPoolExecutor
from d2moe.quantize import native, MWQConfig
threads = int(sys.argv[1]); torch.set_num_threads(threads)
pool = ThreadPoolExecutor(threads) if threads > 1 else None
torch.manual_seed(0)
lib, cfg = native.load(), MWQConfig()
w = (torch.randn(4096, 14336) * 0.02).bfloat16()
cw = 1 + torch.rand(14336) * 3
out, times = {}, {}
for name, col in (("plain", None), ("weighted", cw / cw.mean())):
    best = 1e9
    for _ in range(3):
        t = time.perf_counter(); fit = native.fit_sliced(lib, w, cfg, col, 1, pool, weighting=native.DEFAULT_WEIGHTING)
        best = min(best, time.perf_counter() - t)
    times[name] = round(best, 3)
    out[name] = {"planes": fit.tensor.planes, "scale": fit.tensor.scale, "offset": fit.tensor.offset, "sq_error": fit.sq_error}
torch.save(out, sys.argv[2])
print(json.dumps({"tree": native.__file__.split("/quantize")[0], "threads": threads, **times,
                  "sq_error": [round(e, 4) for e in out["plain"]["sq_error"]]}), flush=True)
