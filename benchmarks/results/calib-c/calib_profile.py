"""pack --calib's per-matrix cost at Mixtral shapes (one 4096x14336 down matrix, 512-column blocks, no worker pool):
the plain native fit, GPTQ's codes for one window in torch and in C, and calibrated_fit in all (which runs C's)."""
import json, time, torch
from d2moe.quantize import native, gptq, MWQConfig
from d2moe.quantize.calib import ColumnStats, calibrated_fit
torch.manual_seed(0)
lib = native.load()
cfg = MWQConfig()
w = (torch.randn(4096, 14336) * 0.02).bfloat16()
x = torch.randn(2048, 14336)
stats = ColumnStats(x.square().mean(0), x[:256].bfloat16(), gptq.second_moment(x, 512) / len(x))


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t, 2)


fit, plain_s = timed(lambda: native.fit_sliced(lib, w, cfg, None, 1, weighting="abs"))
grid = fit.tensor.group_params()
torch_codes, torch_s = timed(lambda: gptq.nested_codes(w.float(), stats.hessian, *grid, cfg.bits, cfg.group_size))
c_codes, c_s = timed(lambda: gptq.nested_codes(w.float(), stats.hessian, *grid, cfg.bits, cfg.group_size, lib=lib))
_, calib_s = timed(lambda: calibrated_fit(lib, w, cfg, stats, 1, weighting="abs"))
print(json.dumps({"plain_fit_s": plain_s, "gptq_one_window_torch_s": torch_s, "gptq_one_window_c_s": c_s,
                  "codes_equal": round(float((torch_codes == c_codes).float().mean()), 6),
                  "calibrated_fit_s": calib_s, "torch_threads": torch.get_num_threads()}))
