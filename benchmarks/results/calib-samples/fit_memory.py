"""fit_memory.py gate|down: RssAnon through one calibrated_fit of a Mixtral-shaped bf16 matrix, as pack runs it
(after tight_allocator's exit, 2 threads), sampled every 5 ms; the peak inside each step (weighted and plain fits,
output_errors, GPTQ's factor and planes, the row choices) over RssAnon before the fit. One JSON line."""
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from d2moe.quantize import MWQConfig, calib, gptq, native
from d2moe.quantize.calib import ColumnStats, calibrated_fit
from d2moe.runtime.memory import tight_allocator


def anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) >> 10
    return -1


stage, peaks, stop = ["setup"], {}, [False]


def sampler():
    while not stop[0]:
        a = anon()
        peaks[stage[0]] = max(peaks.get(stage[0], 0), a)
        time.sleep(0.005)


def traced(name, fn):
    def wrapper(*a, **k):
        prev = stage[0]
        stage[0] = name
        try:
            return fn(*a, **k)
        finally:
            stage[0] = prev
    return wrapper


native.fit_sliced = traced("fit_sliced", native.fit_sliced)
calib.output_errors = traced("output_errors", calib.output_errors)
gptq.inverse_factor = traced("inverse_factor", gptq.inverse_factor)
gptq.nested_planes = traced("nested_planes", gptq.nested_planes)
calib._pick_rows = traced("pick_rows", calib._pick_rows)

which = sys.argv[1]
torch.set_num_threads(2)
torch.manual_seed(0)
shape = (14336, 4096) if which == "gate" else (4096, 14336)
x = torch.randn(2048, shape[1]) * (1 + torch.rand(shape[1]) * 3)
stats = ColumnStats(x.square().mean(0) / x.square().mean(), x[:256].bfloat16(), gptq.second_moment(x, 512) / len(x))
del x
w = (torch.randn(*shape) * 0.02).bfloat16()
with tight_allocator():
    pass
threading.Thread(target=sampler, daemon=True).start()
lib, cfg = native.load(), MWQConfig()
with ThreadPoolExecutor(2) as pool:
    for rep in range(2):
        time.sleep(0.05)
        base = anon()
        stage[0] = f"fit{rep}"
        t, _, _ = calibrated_fit(lib, w, cfg, stats, 1, pool)
        stage[0] = "after"
        time.sleep(0.05)
        result = {k: v - base for k, v in peaks.items() if k != "setup"}
        print(json.dumps({"matrix": which, "repeat": rep, "base_anon_mib": base, "peak_over_base_mib": result,
                          "result_mib": anon() - base}), flush=True)
        peaks.clear()
        del t
stop[0] = True
