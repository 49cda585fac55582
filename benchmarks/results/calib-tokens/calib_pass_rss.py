import sys, resource, time, json
root = sys.argv[1]
import __editable___d2moe_0_1_0_finder as f
for k, v in list(f.MAPPING.items()):
    f.MAPPING[k] = v.replace("/work/main", root)
from pathlib import Path
from d2moe.router_train import activations
print(activations.__file__, file=sys.stderr)
t = time.perf_counter()
w, cid, rep = activations.expert_column_stats(Path(sys.argv[2]), [sys.argv[3]], int(sys.argv[4]), progress=False)
print(json.dumps({"root": root, "maxrss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
                  "seconds": round(time.perf_counter() - t, 1), "tokens": rep["tokens"]}))
