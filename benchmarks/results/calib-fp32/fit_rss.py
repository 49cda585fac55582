import json, resource, sys, torch
from d2moe.quantize import native, gptq, MWQConfig
from d2moe.quantize.calib import ColumnStats, calibrated_fit
torch.manual_seed(0)
lib = native.load()
w = (torch.randn(4096, 14336) * 0.02).bfloat16()
x = torch.randn(2048, 14336)
stats = ColumnStats(x.square().mean(0), x[:256].bfloat16(), gptq.second_moment(x, 512) / len(x))
del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
calibrated_fit(lib, w, MWQConfig(), stats, 1, weighting="abs")
print(json.dumps({"tree": native.__file__.split("/quantize")[0], "maxrss_before_fit_gib": round(before, 3),
                  "maxrss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}))
