"""Weight-space, level 2 only: scale+offset per 32 vs offset per 16 (scale per 32) vs both per 16. Float params, brute force."""
import sys, torch
from safetensors.torch import load_file
torch.set_num_threads(2)
sd = load_file(sys.argv[1])
SC = torch.linspace(0.5, 1.4, 28)
OF = torch.linspace(-0.6, 0.6, 25)
def fit(w, g, og):  # w [N, g] groups; offsets shared per og-column halves (og divides g)
    wmin, wmax = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    base = (wmax - wmin).clamp_min(1e-12) / 3
    wt = w.abs()
    best = torch.full((w.shape[0],), float("inf"))
    for f in SC:
        s = base * f  # [N,1]
        tot = torch.zeros(w.shape[0])
        for h in range(g // og):
            ws, wts = w[:, h*og:(h+1)*og], wt[:, h*og:(h+1)*og]
            # centre the grid on the sub-range, then shift
            mid = (ws.amax(1, keepdim=True) + ws.amin(1, keepdim=True)) / 2 if og < g else (wmax + wmin) / 2
            bh = torch.full((w.shape[0],), float("inf"))
            for d in OF:
                lo = mid - 1.5 * s + d * s
                q = ((ws - lo) / s).round().clamp(0, 3) * s + lo
                e = ((ws - q) ** 2 * wts).sum(1)
                bh = torch.minimum(bh, e)
            tot += bh
        best = torch.minimum(best, tot)
    return float(best.sum())
res = {"g32": 0.0, "k16s32": 0.0, "g16": 0.0}
for name, t in sd.items():
    if "experts" not in name or t.dim() < 2: continue
    w = t.float().reshape(-1, t.shape[-1])
    w32 = w.reshape(-1, 32)
    res["g32"] += fit(w32, 32, 32)
    res["k16s32"] += fit(w32, 32, 16)
    res["g16"] += fit(w.reshape(-1, 16), 16, 16)
print(res); print({k: round(v / res["g32"], 4) for k, v in res.items()})
