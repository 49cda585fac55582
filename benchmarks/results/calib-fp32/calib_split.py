"""Where the calibration pass spends its time: the experts module (float32) against the rest of each layer call."""
import json, resource, sys, time
from pathlib import Path
import torch
from d2moe.router_train import activations
spent = {"experts": 0.0}
orig = activations._StatsExperts.forward
def timed(self, *a, **k):
    t = time.perf_counter()
    try:
        return orig(self, *a, **k)
    finally:
        spent["experts"] += time.perf_counter() - t
activations._StatsExperts.forward = timed
t = time.perf_counter()
w, cid, rep = activations.expert_column_stats(Path(sys.argv[1]), [sys.argv[2]], int(sys.argv[3]), progress=True)
total = time.perf_counter() - t
print(json.dumps({"seconds": round(total, 1), "experts_s": round(spent["experts"], 1), "rest_s": round(total - spent["experts"], 1),
                  "tokens": rep["tokens"], "maxrss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
                  "threads": torch.get_num_threads(), "calib_id": cid[:12]}))
