"""Data-free: does sorting input columns by norm before grouping lower the |w|-weighted error? Weight space only."""
import sys, torch
from safetensors.torch import load_file
from pathlib import Path
from d2moe.quantize import native
from d2moe.quantize.mwq import dequantize
from d2moe.quantize.types import MWQConfig
torch.set_num_threads(1)
lib = native.load()
model = Path(sys.argv[1]); group = int(sys.argv[2]) if len(sys.argv) > 2 else 32
sd = {}
for f in sorted(model.glob("*.safetensors")):
    sd.update(load_file(f))
levels = (2, 3, 4)
def werr(w, q):  # |w|-weighted squared error, as the fit's objective
    return float(((w - q) ** 2 * w.abs()).sum())
tot = {k: {b: 0.0 for b in levels} for k in ("plain", "sorted", "sorted_max")}
cv = []
for name, t in sd.items():
    if "experts" not in name or t.dim() < 2:
        continue
    mats = t.float().reshape(-1, *t.shape[-2:]) if t.dim() == 3 else [t.float()]
    for w in mats:
        norms = w.norm(dim=0)
        cv.append(float(norms.std() / norms.mean()))
        for key, order in (("plain", None), ("sorted", torch.argsort(norms)), ("sorted_max", torch.argsort(w.abs().amax(0)))):
            ws = w if order is None else w[:, order].contiguous()
            fit = native.fit_sliced(lib, ws.contiguous(), MWQConfig(levels, group, scheme="subblock"), weighting="abs", refits=1).tensor
            for b in levels:
                q = dequantize(fit, b)
                if order is not None:
                    q = q[:, torch.argsort(order)]
                tot[key][b] += werr(w, q)
print("column-norm CV mean %.3f max %.3f over %d matrices" % (sum(cv)/len(cv), max(cv), len(cv)))
for k in tot:
    print(k, {b: "%.4g" % tot[k][b] for b in levels}, "ratio", {b: round(tot[k][b]/tot["plain"][b], 4) for b in levels})
