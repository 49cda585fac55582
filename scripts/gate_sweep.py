"""Does the trained bit-width gate beat simple assignments? Held-out perplexity against average bits.

On the embedded fixture model (d2moe_cli/assets/tiny-mixtral), quantized once with MWQ:
1. matched bits: capacity 0.3/0.4/0.3 (average 3.0 bits) as a model-wide budget (--capacity-scope
   model: per-layer caps calibrated after training) and as a per-layer rule (scope layer) — trained
   gates vs uniform 3-bit, vs a random assignment with the gate's per-layer level histogram (its
   choices shuffled among each layer's pairs), vs the router-weight rule (heavier expert, more bits);
2. α sweep with no capacity limit (the gate alone decides): a perplexity-vs-average-bits curve
   against uniform 2/3/4 bits and against random mixes at the same average bits;
   the α = 0.005 gate (≈ 3.0 bits) is also put under the 0.3/0.4/0.3 budget by calibration alone;
3. capacity sweep at other averages (2.5, 3.5 bits, scope model): trained gate vs random assignment
   at the same histogram.
4. with --compare-seeds only: the α-only recipe (no caps while training, then calibrated caps) from
   zero init vs router-rule init, per seed, against the router-weight rule.
Gates are calibrated on the *.train.txt files and evaluated on the *.heldout.txt files.

    .venv/bin/python scripts/gate_sweep.py                       # ~10-15 min on one CPU thread
    .venv/bin/python scripts/gate_sweep.py --steps 20 --quick    # smoke run
    .venv/bin/python scripts/gate_sweep.py --compare-seeds 0,1,2 # α-only recipe, zero vs router init, per seed
                                                                 # (adds "recipe_seeds" to the existing --out-json)
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "d2moe_cli" / "assets"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", type=Path, default=ASSETS / "tiny-mixtral")
    a("--text-dir", type=Path, default=ASSETS / "text")
    a("--bits", default="2,3,4")
    a("--group-size", type=int, default=64)
    a("--scheme", default="residual")
    a("--seq-len", type=int, default=128)
    a("--train-blocks", type=int, default=96, help="calibration blocks (from all *.train.txt)")
    a("--eval-blocks", type=int, default=16, help="held-out blocks per *.heldout.txt file")
    a("--steps", type=int, default=100)
    a("--batch-size", type=int, default=4)
    a("--lr", type=float, default=1e-2)
    a("--alphas", default="0.005,0.01,0.02,0.05", help="bit costs for the unlimited-capacity sweep")
    a("--recalibrate-every", type=int, default=10)
    a("--calibration-blocks", type=int, default=16)
    a("--seed", type=int, default=0)
    a("--quick", action="store_true", help="matched-bits comparison only")
    a("--compare-seeds", default=None,
      help="only compare the α-only recipe (no caps in training, then calibrated caps) from zero and router init "
           "over these seeds; merged into --out-json as 'recipe_seeds'")
    a("--alpha", type=float, default=0.005, help="bit cost of the --compare-seeds recipes")
    a("--out-json", type=Path, default=REPO / "benchmarks" / "results" / "router.json")
    a("--plot", type=Path, default=REPO / "benchmarks" / "router_curve.png")
    return p.parse_args(argv)


def load_blocks(session, files: list[Path], seq_len: int, max_blocks: int) -> torch.Tensor:
    from d2moe.router_train.data import token_blocks

    return torch.cat([token_blocks([f.read_text()], session.tokenizer, seq_len, max_blocks) for f in files])


def router_weight_gate(session, capacity, scope):
    """The untrained router-weight rule: logits = 4 (w - 1/2) (-1, 0, +1) — heavier experts prefer more bits."""
    gate = session.new_gate(capacity, proj_dim=0, expert_embedding=False, capacity_scope=scope)
    gate.init_router_rule()
    return gate


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    from d2moe.quantize.types import MWQConfig
    from d2moe.router_train.calibrate import calibrate_layer_capacity
    from d2moe.router_train.session import evaluate, open_session
    from d2moe.router_train.train import TrainConfig, finish_capacity, train_gate

    t0 = time.perf_counter()
    bits = tuple(int(b) for b in args.bits.split(","))
    session = open_session(args.model, MWQConfig(bits=bits, group_size=args.group_size, scheme=args.scheme))
    train = load_blocks(session, sorted(args.text_dir.glob("*.train.txt")), args.seq_len, args.train_blocks // 3)
    heldout = load_blocks(session, sorted(args.text_dir.glob("*.heldout.txt")), args.seq_len, args.eval_blocks)
    print(f"model {args.model.name}: train blocks {tuple(train.shape)}, held-out blocks {tuple(heldout.shape)}; "
          f"quantized in {time.perf_counter() - t0:.1f}s", flush=True)

    def ev(mode, gate=None):
        if gate is not None:
            session.use_gate(gate)
        r = evaluate(session, heldout, mode, batch_size=8, seed=args.seed)
        return {k: r[k] for k in ("ppl", "nll", "kl", "avg_bits") if k in r} | (
            {"level_fractions": r["level_fractions"]} if "level_fractions" in r else {})

    def fit(capacity, alpha, scope="model", init="router", recal=args.recalibrate_every, steps=args.steps,
            estimator="ste", proj_dim=32, expert_embedding=True, seed=args.seed):
        cfg = TrainConfig(src=str(args.model), data=(), bits=bits, capacity=capacity, seq_len=args.seq_len,
                          batch_size=args.batch_size, max_steps=steps, lr=args.lr, seed=seed, bit_cost=alpha,
                          estimator=estimator, proj_dim=proj_dim, expert_embedding=expert_embedding,
                          capacity_scope=scope, recalibrate_every=recal, calibration_blocks=args.calibration_blocks,
                          init=init)
        torch.manual_seed(seed)
        gate = session.new_gate(capacity, proj_dim, expert_embedding, scope, init)
        t = time.perf_counter()
        hist = train_gate(session, gate, train, cfg)
        finish_capacity(session, gate, train, cfg)
        print(f"  trained capacity={capacity} scope={scope} init={init} recal={recal} α={alpha} seed={seed}: {steps} steps in "
              f"{time.perf_counter() - t:.0f}s, KL {sum(h.task for h in hist[:10]) / 10:.4g} -> "
              f"{sum(h.task for h in hist[-10:]) / 10:.4g}; layer caps {caps_text(gate)}", flush=True)
        return gate

    def caps_text(gate):
        if gate.layer_capacity is None:
            return "-"
        return " · ".join("/".join(f"{c:.2f}" for c in row) for row in gate.layer_capacity.values())

    def both(name, gate):  # the gate and a random assignment with its per-layer histogram
        results["matched"][name] = ev("gated", gate) | {"layer_capacity": gate.layer_capacity}
        results["matched"][name + " — random, same histogram"] = ev("shuffled", gate)

    results: dict = {"uniform": {}, "matched": {}, "alpha_sweep": [], "capacity_sweep": []}
    results["full"] = ev("full")
    for b in bits:
        results["uniform"][str(b)] = ev(f"uniform:{b}")
        print(f"uniform {b}-bit: ppl {results['uniform'][str(b)]['ppl']:.3f}", flush=True)

    cap = (0.3, 0.4, 0.3)
    rule = router_weight_gate(session, cap, "model")
    calibrate_layer_capacity(session, rule, train[: args.calibration_blocks])
    both("router-weight rule, scope model", rule)
    if args.compare_seeds is not None:
        compare_seeds(args, results, fit, ev, caps_text, cap, t0, argv)
        return
    results["matched"]["router-weight rule, scope layer"] = ev("gated", router_weight_gate(session, cap, "layer"))
    gate = fit(cap, 0.0, scope="model", init="router")
    both("trained gate, scope model, router init", gate)
    if not args.quick:
        both("trained gate, scope model, zero init", fit(cap, 0.0, scope="model", init="zero"))
        results["matched"]["trained gate, scope layer, zero init"] = ev("gated", fit(cap, 0.0, scope="layer", init="zero"))
        results["matched"]["trained gate, scope layer, router init"] = ev("gated", fit(cap, 0.0, scope="layer"))
    results["matched"]["uniform 3-bit"] = results["uniform"]["3"]
    for name, r in results["matched"].items():
        print(f"matched ~3.0 bits: {name:30s} ppl {r['ppl']:.3f}  bits {r.get('avg_bits', 3.0):.3f}", flush=True)

    if not args.quick:
        unlimited = (1.0,) * len(bits)
        for alpha in (float(a) for a in args.alphas.split(",")):
            g = fit(unlimited, alpha, init="zero")
            r = ev("gated", g)
            r_rand = ev("shuffled", g)
            results["alpha_sweep"].append({"alpha": alpha, "gate": r, "random_same_histogram": r_rand})
            print(f"α={alpha}: gate ppl {r['ppl']:.3f} at {r['avg_bits']:.3f} bits; random {r_rand['ppl']:.3f}", flush=True)
            if abs(r["avg_bits"] - 3.0) < 0.1:  # the same gate under the 0.3/0.4/0.3 budget: calibration only
                g.set_capacity(cap, "model")
                calibrate_layer_capacity(session, g, train[: args.calibration_blocks])
                both(f"α = {alpha} gate (no caps in training), then calibrated caps", g)
        for cap2 in ((0.5, 0.5, 0.0), (0.0, 0.5, 0.5)):
            g = fit(cap2, 0.0)
            r, r_rand = ev("gated", g), ev("shuffled", g)
            results["capacity_sweep"].append({"capacity": cap2, "gate": r, "random_same_histogram": r_rand})
            print(f"capacity {cap2}: gate ppl {r['ppl']:.3f} at {r['avg_bits']:.3f} bits; random {r_rand['ppl']:.3f}",
                  flush=True)

    results["gate_parameters"] = gate.num_parameters()
    results["expert_parameters"] = session.expert_parameters
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["command"] = "OMP_NUM_THREADS=1 .venv/bin/python scripts/gate_sweep.py " + shlex.join(argv or sys.argv[1:])
    results["setup"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(results, indent=2) + "\n")
    if results["alpha_sweep"]:
        plot(results, args.plot)
    print(f"done in {results['seconds']}s → {args.out_json}", flush=True)


def compare_seeds(args, results, fit, ev, caps_text, cap, t0, argv) -> None:
    """The α-only recipe (no caps while training, then calibrated model-scope caps) from zero vs router init, per seed."""
    rows = []
    for seed in (int(s) for s in args.compare_seeds.split(",")):
        for init in ("zero", "router"):
            g = fit(cap, args.alpha, scope="model", init=init, recal=0, seed=seed)
            r = ev("gated", g)
            rows.append({"seed": seed, "init": init, "alpha": args.alpha, "steps": args.steps, "gate": r,
                         "layer_capacity": caps_text(g)})
            print(f"seed {seed} init {init}: ppl {r['ppl']:.3f} KL {r['kl']:.4f} bits {r['avg_bits']:.3f}", flush=True)
    out = json.loads(args.out_json.read_text()) if args.out_json.is_file() else {}
    out["recipe_seeds"] = {
        "rows": rows,
        "router_weight_rule": results["matched"]["router-weight rule, scope model"],
        "uniform": results["uniform"], "full": results["full"],
        "seconds": round(time.perf_counter() - t0, 1),
        "command": "OMP_NUM_THREADS=1 .venv/bin/python scripts/gate_sweep.py " + shlex.join(argv or sys.argv[1:]),
    }
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(out, indent=2) + "\n")
    for init in ("zero", "router"):
        ppl = [r["gate"]["ppl"] for r in rows if r["init"] == init]
        print(f"init {init}: ppl mean {sum(ppl) / len(ppl):.3f} over {len(ppl)} seeds ({', '.join(f'{p:.2f}' for p in ppl)})")
    print(f"done in {out['recipe_seeds']['seconds']}s → {args.out_json}", flush=True)


def interpolate_uniform(results: dict, avg_bits: float) -> float:
    """Perplexity of the straight line between the two uniform levels around `avg_bits` (log-ppl linear)."""
    pts = sorted((int(b), math.log(r["ppl"])) for b, r in results["uniform"].items())
    for (b0, l0), (b1, l1) in zip(pts, pts[1:], strict=False):
        if b0 <= avg_bits <= b1:
            return math.exp(l0 + (l1 - l0) * (avg_bits - b0) / (b1 - b0))
    return float("nan")


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ub = sorted((int(b), r["ppl"]) for b, r in results["uniform"].items())
    ax.plot([b for b, _ in ub], [p for _, p in ub], "s--", color="grey", label="uniform level")
    sw = sorted(results["alpha_sweep"], key=lambda s: s["gate"]["avg_bits"])
    ax.plot([s["gate"]["avg_bits"] for s in sw], [s["gate"]["ppl"] for s in sw], "o-", label="gate, α sweep (no capacity)")
    ax.plot([s["random_same_histogram"]["avg_bits"] for s in sw], [s["random_same_histogram"]["ppl"] for s in sw], "x:",
            label="random, same histogram")
    cs = [results["matched"]["trained gate, scope model, router init"]] + [s["gate"] for s in results["capacity_sweep"]]
    ax.plot([c["avg_bits"] for c in cs], [c["ppl"] for c in cs], "^", color="C3", label="gate, capacity budget (scope model)")
    rr = results["matched"]["router-weight rule, scope model"]
    ax.plot([rr["avg_bits"]], [rr["ppl"]], "D", color="C4", label="router-weight rule (scope model)")
    rl = results["matched"]["trained gate, scope layer, zero init"] if "trained gate, scope layer, zero init" in results["matched"] else None
    if rl:
        ax.plot([rl["avg_bits"]], [rl["ppl"]], "v", color="C5", label="gate, per-layer capacity")
    ax.axhline(results["full"]["ppl"], color="k", lw=0.8, label="full precision")
    ax.set_xlabel("average bits per (token, expert)")
    ax.set_ylabel("held-out perplexity")
    ax.legend(fontsize=8)
    ax.set_title("tiny-mixtral: bit-width gate vs uniform levels")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
