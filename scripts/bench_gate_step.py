"""Time one decode step's level selection: the torch gate against its frozen numpy form (GateLevels).

`.venv/bin/python scripts/bench_gate_step.py [--hidden 192 --experts 8 --top-k 2 --steps 2000]`
(random MLP gate of that shape, one thread; same levels either way, see tests/runtime/test_gate_fast.py).
"""

from __future__ import annotations

import argparse
import time

import torch

from d2moe.runtime.gate import BitWidthGate
from d2moe.runtime.policies import GateLevels


def per_call_us(fn, steps: int) -> float:
    for _ in range(steps // 10):
        fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    gate = BitWidthGate(hidden_size=args.hidden, num_experts=args.experts, moe_layers=[0])
    levels = GateLevels(gate)
    hidden = torch.randn(1, args.hidden)
    index = torch.randperm(args.experts)[: args.top_k][None]
    weights = torch.softmax(torch.randn(1, args.top_k), dim=-1)
    torch_us = per_call_us(lambda: gate.select_levels(0, hidden, index, weights), args.steps)
    frozen_us = per_call_us(lambda: levels.select(0, hidden, index, weights), args.steps)
    print(f"level selection per decode step: torch gate {torch_us:.0f} us, frozen numpy gate {frozen_us:.0f} us "
          f"({torch_us / frozen_us:.1f}x)")


if __name__ == "__main__":
    main()
