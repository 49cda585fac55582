"""calibrated_fit at --bits 2,3,4,8 on one Mixtral-sized down matrix (4096x14336, 512-column blocks), and
output_errors alone with and without `judged` (where the build has it); prints the seconds and a hash of the
chosen planes. Run once per build, alternating: `python output_errors_judged.py LABEL`."""

import hashlib
import json
import sys
import time

import torch

from d2moe.quantize import MWQConfig, calib, gptq, native

torch.manual_seed(0)
lib = native.load()
cfg = MWQConfig((2, 3, 4, 8))
w = (torch.randn(4096, 14336) * 0.02).bfloat16()
x = torch.randn(2048, 14336)
stats = calib.ColumnStats(x.square().mean(0), x[:256].bfloat16(), gptq.second_moment(x, 512) / len(x))
t = time.perf_counter()
tensor, _, _ = calib.calibrated_fit(lib, w, cfg, stats, 1, weighting="abs")
out = {"label": sys.argv[1], "calibrated_fit_s": round(time.perf_counter() - t, 2),
       "planes_sha": hashlib.sha256(tensor.planes.numpy().tobytes()).hexdigest()[:16]}
if "judged" in calib.output_errors.__code__.co_varnames:
    w32 = w.float()
    for key, judged in (("output_errors_all_s", None), ("output_errors_judged_s", [0, 1, 2])):
        t = time.perf_counter()
        calib.output_errors(w32, tensor, stats.sample, judged)
        out[key] = round(time.perf_counter() - t, 2)
print(json.dumps(out), flush=True)
