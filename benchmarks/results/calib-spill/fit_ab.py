"""fit_ab.py THREADS gate|down REPEATS: calibrated_fit of one Mixtral-shaped bf16 matrix, timed REPEATS times, under
the allocator setting pack --calib's fits run in (after runtime.memory.tight_allocator's exit), each repeat on a fresh
read of the matrix as pack hands it over (bf16). One JSON line: the times, RssAnon's peak, a hash of the planes.
Run it from this tree and through ../kernels-avx2-params/at_rev.py OLD_WORKTREE, alternating."""
import hashlib
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from d2moe.quantize import MWQConfig, gptq, native
from d2moe.quantize.calib import ColumnStats, calibrated_fit
from d2moe.runtime.memory import tight_allocator

threads, which, repeats = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
torch.manual_seed(0)
shape = (14336, 4096) if which == "gate" else (4096, 14336)
x = torch.randn(2048, shape[1]) * (1 + torch.rand(shape[1]) * 3)
stats = ColumnStats(x.square().mean(0) / x.square().mean(), x[:256].bfloat16(), gptq.second_moment(x, 512) / len(x))
del x
w0 = (torch.randn(*shape) * 0.02).bfloat16()
import os  # noqa: E402

import d2moe.runtime.memory as memory  # noqa: E402

if os.environ.get("FIT_MMAP_THRESHOLD"):  # what the fits' allocator setting costs (new trees only)
    memory.FIT_MMAP_THRESHOLD = int(os.environ["FIT_MMAP_THRESHOLD"])
with tight_allocator():
    pass
lib, cfg, times, digest = native.load(), MWQConfig(), [], None
with ThreadPoolExecutor(threads) as pool:
    for _ in range(repeats):
        w = w0.float() if os.environ.get("AS_FLOAT32") else w0.clone()  # the float32 copy the old fit made
        t0 = time.perf_counter()
        t, _, _ = calibrated_fit(lib, w, cfg, stats, 1, pool)
        times.append(round(time.perf_counter() - t0, 3))
        digest = hashlib.sha256(t.planes.numpy().tobytes()).hexdigest()[:16]
        del w, t
hwm = next(int(ln.split()[1]) >> 10 for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM"))
print(json.dumps({"matrix": which, "threads": threads, "times_s": times, "peak_rss_mib": hwm, "planes": digest}))
