"""Where pack --calib's fit of one Mixtral-shaped matrix spends its time: each step of calibrated_fit timed apart.
Usage: fit_parts.py THREADS gate|down BLOCK  (bf16 weights, 256-token bf16 sample, H from 2048 inputs)."""
import hashlib, json, sys, time, torch
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from d2moe.quantize import native, gptq, MWQConfig
from d2moe.quantize.calib import ColumnStats, output_errors, _pick_rows, JUDGED_SPAN
torch.set_num_threads(int(sys.argv[1]))
which, block = sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
lib, cfg = native.load(), MWQConfig()
pool = ThreadPoolExecutor(int(sys.argv[1])) if int(sys.argv[1]) > 1 else None
shape = (14336, 4096) if which == "gate" else (4096, 14336)
w = (torch.randn(*shape) * 0.02).bfloat16()
x = torch.randn(2048, shape[1]) * (1 + torch.rand(shape[1]) * 3)
stats = ColumnStats(x.square().mean(0) / x.square().mean(), x[:256].bfloat16(), gptq.second_moment(x, block) / len(x))
del x
parts, t0 = {}, time.perf_counter()
def lap(name):
    global t0
    t = time.perf_counter(); parts[name] = round(parts.get(name, 0) + t - t0, 3); t0 = t
weighted = native.fit_sliced(lib, w, cfg, stats.weight, 1, pool, weighting=native.DEFAULT_WEIGHTING); lap("fit_weighted")
plain = native.fit_sliced(lib, w, cfg, None, 1, pool, weighting=native.DEFAULT_WEIGHTING); lap("fit_plain")
w32 = w.float(); judged = [i for i, b in enumerate(cfg.bits) if b - cfg.bits[0] <= JUDGED_SPAN]; lap("w32")
cands = [plain.tensor, weighted.tensor]
errs = [output_errors(w32, t, stats.sample, judged) for t in cands]; lap("output_errors_x2")
tensor, chosen = _pick_rows(cands, errs, judged); lap("pick")
grids, u = tensor.group_params(), gptq.inverse_factor(stats.hessian); lap("inverse_factor")
gq = [replace(tensor, planes=gptq.nested_planes(w32, u, *grids, cfg.bits, cfg.group_size, win, lib, pool)) for win in gptq.WINDOWS]; lap("gptq_x2")
errs2 = [output_errors(w32, t, stats.sample, judged) for t in gq]; lap("output_errors_x2b")
tensor, chosen = _pick_rows([tensor, *gq], [chosen, *errs2], judged); lap("pick2")
parts["total"] = round(sum(parts.values()), 3)
print(json.dumps({"which": which, "block": block, "threads": torch.get_num_threads(), **parts,
                  "planes_sha": hashlib.sha256(tensor.planes.numpy().tobytes()).hexdigest()[:12]}), flush=True)
