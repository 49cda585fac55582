"""pass_memory.py CHECKPOINT TEXT TOKENS: RssAnon around one CalibrationPass.layer_stats call, and what it holds.

Prints JSON lines: RssAnon (MiB) after imports, after the first MoE layer's statistics, the bytes of those
statistics and of the pass's hidden states, and RssAnon after the statistics are dropped."""
import json
import sys
from pathlib import Path


def anon_mib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) >> 10
    return -1


def main() -> None:
    from d2moe.router_train.activations import CalibrationPass

    src, text, tokens = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    calib = CalibrationPass(src, [text], tokens, progress=False)
    print(json.dumps({"stage": "constructed", "anon_mib": anon_mib()}), flush=True)
    stats = calib.layer_stats(calib.moe_layers[0])
    seen, nbytes = set(), 0
    for s in stats.values():
        for t in (s.weight, s.sample, s.hessian):
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                nbytes += t.numel() * t.element_size()
    hidden = getattr(calib, "hidden", None)
    print(json.dumps({"stage": "first layer's statistics", "anon_mib": anon_mib(), "stats_mib": nbytes >> 20,
                      "hidden_mib": 0 if hidden is None else (hidden.numel() * hidden.element_size()) >> 20,
                      "report": calib.report()}), flush=True)
    del stats
    print(json.dumps({"stage": "statistics dropped", "anon_mib": anon_mib()}), flush=True)


if __name__ == "__main__":
    main()
