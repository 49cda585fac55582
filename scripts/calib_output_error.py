"""How near packed experts' outputs are to the source's on inputs from a text (for `pack --calib` studies).

Gathers each expert's routed inputs on TEXT with the calibration pass `pack --calib` uses (so with text
never used for calibration this measures held-out error), then, per pack and level, the sum over every expert
matrix of ||X (w - q_b)||^2 over the sum of ||X w||^2 (x 1e-4). `--unit-tokens` scales each input to unit norm
first, so every token counts alike.

    .venv/bin/python scripts/calib_output_error.py SRC --text HELDOUT.txt PACK [PACK ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from d2moe.quantize import calib
from d2moe.quantize.adapters import adapter_for
from d2moe.quantize.convert.source import ExpertSource, SourceCheckpoint
from d2moe.quantize.format import open_checkpoint
from d2moe.quantize.mwq import dequantize
from d2moe.router_train import activations


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("packs", type=Path, nargs="+")
    ap.add_argument("--text", required=True)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--inputs-per-expert", type=int, default=2048)
    ap.add_argument("--unit-tokens", action="store_true")
    args = ap.parse_args()
    calib.SAMPLE_TOKENS = activations.SAMPLE_TOKENS = args.inputs_per_expert
    stats, _, _ = activations.expert_column_stats(args.source, [args.text], args.tokens, progress=False)
    source = SourceCheckpoint(args.source)
    adapter = adapter_for(source.config)
    source.index_weights()
    experts = ExpertSource(source, adapter, adapter.moe_layers(source.config), adapter.num_experts(source.config),
                           adapter.matrix_shapes(source.config))
    for path in args.packs:
        ckpt = open_checkpoint(path)
        top = ckpt.cfg.bits[-1]
        noise = dict.fromkeys(ckpt.cfg.bits, 0.0)
        signal = 0.0
        for (layer, e, m), st in sorted(stats.items()):
            w, x = experts.matrix(layer, e, m).float(), st.sample.float()
            if args.unit_tokens:
                x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
            t = ckpt.decode_expert(layer, e, top, ckpt.read_prefix(layer, e, top))[m].to_mwq()
            signal += float((x @ w.T).square().sum())
            for b in ckpt.cfg.bits:
                noise[b] += float((x @ (w - dequantize(t, b)).T).square().sum())
        cells = "  ".join(f"level {b}: {v / signal * 1e4:.3f}" for b, v in noise.items())
        print(f"{path.name}  {cells}  (x1e-4)", flush=True)


if __name__ == "__main__":
    main()
