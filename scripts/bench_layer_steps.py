"""Time the expert pipeline's layer steps on fixed inputs: the same routing, levels and reads on every run.

    python scripts/bench_layer_steps.py PACKED --memory-budget 2080762496 --io-bandwidth 2GB/s \\
        [--router-levels 4,2] [--steps 96] [--warm 8] [--threads 1] [--seed 1]

`d2moe run` decodes greedily, so two builds whose float sums round differently can generate different
tokens, route differently and read different bytes (on a random-weight checkpoint near-ties are
common). Here every run replays the same seeded (layer, hidden, top-k experts, weights) sequence
through `Session.pipeline.step` — decode-shaped, one token — so an A/B of two builds compares the same
work: ms per layer step and MB read per step, after `--warm` steps.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from d2moe.options import parse_bandwidth
from d2moe.runtime.session import RunOptions, Session
from d2moe.runtime.units import parse_size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("packed")
    p.add_argument("--memory-budget", required=True, help="bytes or a size (e.g. 2GiB)")
    p.add_argument("--io-bandwidth", default=None, help="emulated disk rate, e.g. 2GB/s")
    p.add_argument("--router-levels", default="4,2", help="HIGH,LOW router-weight levels")
    p.add_argument("--steps", type=int, default=96)
    p.add_argument("--warm", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--label", default="")
    a = p.parse_args(argv)
    high, low = (int(v) for v in a.router_levels.split(","))
    opts = RunOptions(memory_budget=parse_size(a.memory_budget), threads=a.threads, router_levels=(high, low),
                      io_bandwidth=parse_bandwidth(a.io_bandwidth))
    with Session(a.packed, opts) as s:
        layers = list(s.ckpt.moe_layers)
        hidden, experts = int(s.model.config.hidden_size), s.ckpt.num_experts
        top_k = s.pipeline.top_k
        g = torch.Generator().manual_seed(a.seed)
        steps = []
        for i in range(a.warm + a.steps):
            idx = torch.randperm(experts, generator=g)[:top_k].view(1, top_k)
            w = torch.rand(1, top_k, generator=g)
            steps.append((layers[i % len(layers)], torch.randn(1, hidden, generator=g) * 0.5, idx, w / w.sum()))
        for step in steps[: a.warm]:
            s.pipeline.step(*step)
        before = s.store.bytes_read
        t0 = time.perf_counter()
        for step in steps[a.warm :]:
            s.pipeline.step(*step)
        seconds = time.perf_counter() - t0
        result = {"label": a.label, "ms_per_step": 1e3 * seconds / a.steps,
                  "mb_read_per_step": (s.store.bytes_read - before) / a.steps / 1e6, "steps": a.steps,
                  "kernels": s.kernels.name, "blocked": s.pipeline.compute.blocked}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
