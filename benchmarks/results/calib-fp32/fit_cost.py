"""pack --calib's cost for one Mixtral-shaped down matrix (4096x14336, bf16, 2048 calibration inputs, 512-column
blocks): calibrated_fit in all and one output_errors call, on this tree's d2moe."""
import json, sys, time, torch
from d2moe.quantize import native, gptq, MWQConfig
from d2moe.quantize.calib import ColumnStats, calibrated_fit, output_errors
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
torch.manual_seed(0)
lib = native.load()
cfg = MWQConfig()
w = (torch.randn(4096, 14336) * 0.02).bfloat16()
x = torch.randn(2048, 14336)
stats = ColumnStats(x.square().mean(0), x[:256].bfloat16(), gptq.second_moment(x, 512) / len(x))
t = time.perf_counter(); fit = native.fit_sliced(lib, w, cfg, None, 1, weighting="abs"); plain = time.perf_counter() - t
t = time.perf_counter(); output_errors(w.float(), fit.tensor, stats.sample); oe = time.perf_counter() - t
t = time.perf_counter(); tensor, err, _ = calibrated_fit(lib, w, cfg, stats, 1, weighting="abs"); cf = time.perf_counter() - t
import hashlib
print(json.dumps({"tree": native.__file__.split("/quantize")[0], "threads": torch.get_num_threads(), "plain_fit_s": round(plain, 2),
                  "output_errors_s": round(oe, 2), "calibrated_fit_s": round(cf, 2),
                  "planes_sha": hashlib.sha256(tensor.planes.numpy().tobytes()).hexdigest()[:12]}), flush=True)
