"""pack --calib's per-matrix cost at Mixtral shapes: the uncalibrated native fit beside calibrated_fit's parts."""
import json, resource, time, torch
from d2moe.quantize import native, gptq, MWQConfig
from d2moe.quantize.calib import ColumnStats, calibrated_fit, output_errors, pick_rows
torch.manual_seed(0)
lib = native.load()
cfg = MWQConfig()
out = []
for name, (O, I) in {"down 4096x14336": (4096, 14336)}.items():
    w = (torch.randn(O, I) * 0.02).bfloat16()
    x = torch.randn(2048, I)
    for block in (512, 32):
        stats = ColumnStats(x.square().mean(0), x[:256].bfloat16(), gptq.second_moment(x, block) / len(x))
        t = time.perf_counter(); native.fit_sliced(lib, w, cfg, None, 1, weighting="abs"); plain = time.perf_counter() - t
        t = time.perf_counter(); calibrated_fit(lib, w, cfg, stats, 1, weighting="abs"); calib = time.perf_counter() - t
        row = {"matrix": name, "block": block, "plain_fit_s": round(plain, 1), "calibrated_fit_s": round(calib, 1),
               "ratio": round(calib / plain, 1)}
        print(json.dumps(row), flush=True)
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
