"""Which fit of the nested grid would bring the levels nearer the source? A fake-quantization study on a trained MoE.

Each variant quantizes every expert matrix of MODEL at levels --bits (everything else stays as trained), rebuilds
the weights in float at each level and scores held-out perplexity as a ratio to the unquantized model (d2moe's
recipe, windows of 256 tokens: the same harness as llama.cpp's experts in scripts/quality_vs_kquants.py):

- `subblock:gG:rR`  pack's fit (scheme subblock, group G, |x| weighting), R least-squares refits (pack's default 1);
- `kquant:gG[:l2]`  level b1's grid chosen by Q2_K's search (llama.cpp's make_qkx2_quants: 16 candidate scales
                    from the group's min, each refitted by |x|-weighted least squares, the best by weighted absolute
                    error, or squared error with :l2), then pack's 4-bit parameter codes and the nested codes;
- `own:gG`          pack's codes; every level above b1 gets its own float16 (offset, scale) per group, its last bit
                    re-chosen within the level below's cell (an upper bound: +0.5 bits per weight per level);
- `stretch:gG[:rR][:tA/B/..][:m]` pack's fit; each level above b1 reads its cells stretched about the centre of the
                    level-b1 range by a factor from the list (default 1/1.125/1.25/1.375), per group or with :m per
                    matrix, its last bits re-chosen among the children of the level below's code (BENCHMARKS.md §6.9);
- `dedicated:gG`    each level fitted alone as a one-level pack (not nested: what nesting costs);
- `gptq:gG[:rR][:wW]` pack's plain grids, the codes by d2moe.quantize.gptq on --train's statistics, level b1 within W
                    cells of the weight (default gptq.WINDOW);
- `calib:gG[:rR][:wW/W..]` exactly what `pack --calib TRAIN` writes (d2moe.quantize.calib.calibrated_fit), or with
                    other windows for level b1 to choose from per row;
- `rot:gG[:rR][:hH][:out]` incoherence processing (QuIP#/QuaRot, data-free): pack's fit of the matrix times a random-sign
                    Hadamard rotation of H-column blocks (default 64) on its input side (with :out, down on its output
                    side), each level rotated back: what serving rotated experts would buy.

    .venv/bin/python scripts/study_nested_fits.py MODEL --heldout TEXT --variants subblock:g32:r1,kquant:g16 \
        [--llama LLAMA_CPP [--train TRAIN.txt]]

With --llama, llama.cpp's Q2_K / Q3_K / Q4_K experts (and with --train, the same with an imatrix of TRAIN) are scored
in the same harness, as in scripts/quality_vs_kquants.py.

No variant but `subblock` is a format d2moe serves: this measures what a change of fit would buy.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from d2moe.apps.evaluate import encode_text, load_text_files, model_logits_fn, perplexity
from d2moe.kernels.reference import codes_from_planes, dequantize_reference
from d2moe.quantize import gptq, native, subblock
from d2moe.quantize.bitplanes import pack_bits
from d2moe.quantize.calib import calibrated_fit
from d2moe.quantize.grid import grid_codes
from d2moe.quantize.mwq import dequantize
from d2moe.quantize.types import MWQConfig


def kquant_grid(x: torch.Tensor, w: torch.Tensor, nmax: int, absolute: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qkx2_quants(rmin=-0.5, rdelta=0.1, nstep=15) over groups x [N, S], weights w: (step, min) per group."""
    mn = x.amin(-1).clamp(max=0)
    span = (x.amax(-1) - mn).clamp_min(1e-20)

    def error(step, low, q):
        d = step[:, None] * q + low[:, None] - x
        return (w * (d.abs() if absolute else d * d)).sum(-1)

    q = ((x - mn[:, None]) * (nmax / span)[:, None]).round().clamp(0, nmax)
    best_step, best_min = span / nmax, mn.clone()
    best = error(best_step, best_min, q)
    for i in range(16):
        inv = (nmax - 0.5 + 0.1 * i) / span
        q = ((x - mn[:, None]) * inv[:, None]).round().clamp(0, nmax)
        sw, sq, sqq, sxq, sx = w.sum(-1), (w * q).sum(-1), (w * q * q).sum(-1), (w * q * x).sum(-1), (w * x).sum(-1)
        det = sw * sqq - sq * sq
        ok = det > 0
        step = torch.where(ok, (sw * sxq - sx * sq) / torch.where(ok, det, 1.0), 1 / inv)
        low = torch.where(ok, (sqq * sx - sq * sxq) / torch.where(ok, det, 1.0), mn)
        above = low > 0  # Q2_K keeps its minimum at or below zero
        low, step = torch.where(above, 0.0, low), torch.where(above, sxq / sqq.clamp_min(1e-30), step)
        err = error(step, low, q)
        better = (err < best) & (step > 0)
        best_step, best_min, best = (torch.where(better, a, b) for a, b in ((step, best_step), (low, best_min), (err, best)))
    return best_step, best_min


def kquant_fit(w: torch.Tensor, levels: tuple[int, ...], group: int, absolute: bool) -> dict[int, torch.Tensor]:
    b1, bk = levels[0], levels[-1]
    rows, cols = w.shape
    x = w.float().reshape(rows, cols // group, group)
    imp = x.abs()
    step, low = kquant_grid(x.reshape(-1, group), imp.reshape(-1, group), 2**b1 - 1, absolute)
    scale, offset = step.view(rows, -1), (low - 0.5 * step).view(rows, -1)  # point 0 at `low`: its cell's lower edge
    codes, supers = subblock.quantize_params(scale, offset, group,
                                             lambda s, o: subblock.first_level_error(x, s, o, b1, imp))
    s16, o16 = subblock.expand(codes, supers, group)
    planes = pack_bits(grid_codes(x.reshape(-1, group), s16.reshape(-1), o16.reshape(-1), bk, b1).view(rows, cols), bk)
    return {b: dequantize_reference(s16, o16, planes[:b], None, b1, b, group) for b in levels}


def packed_codes(t) -> torch.Tensor:
    """int64 [O, I]: each weight's bk-bit code, from the tensor's bit-planes (most significant first)."""
    return codes_from_planes(t.planes).long()


def own_params(w: torch.Tensor, t, levels: tuple[int, ...], group: int) -> dict[int, torch.Tensor]:
    """Level b1 as packed; each level above its own float16 (offset, scale) per group, refitted by |x|-weighted least
    squares four times, the code's last bit re-chosen within the cell of the level below each time."""
    b1, bk = levels[0], levels[-1]
    x = w.float().reshape(-1, group)
    imp = x.abs() + 1e-3 * x.abs().mean()
    codes = packed_codes(t).reshape(-1, group)
    scale, offset = (v.float().reshape(-1) for v in t.group_params())
    out, prev = {b1: dequantize(t, b1)}, codes >> (bk - b1)
    for b in levels[1:]:
        o, s = offset.clone(), scale * 2.0 ** (b1 - b)
        for _ in range(4):
            lo, hi = 2 * prev, 2 * prev + 1  # codes at level b inside the level below's cell
            near_hi = (o[:, None] + s[:, None] * (hi + 0.5) - x).abs() < (o[:, None] + s[:, None] * (lo + 0.5) - x).abs()
            code = torch.where(near_hi, hi, lo)
            u = code + 0.5
            s0, s1, s2 = imp.sum(-1), (imp * u).sum(-1), (imp * u * u).sum(-1)
            t0, t1 = (imp * x).sum(-1), (imp * u * x).sum(-1)
            det = s0 * s2 - s1 * s1
            ok = det > 1e-9 * s0 * s2
            s_new = (s0 * t1 - s1 * t0) / torch.where(ok, det, 1.0)
            o_new = (t0 - s_new * s1) / s0.clamp_min(1e-30)
            good = ok & (s_new > 0) & torch.isfinite(o_new)
            o, s = torch.where(good, o_new, o), torch.where(good, s_new, s)
        o, s = o.half().float(), s.half().float()
        out[b] = (o[:, None] + s[:, None] * (code + 0.5)).view(w.shape)
        prev = code
    return out


def stretch_params(w: torch.Tensor, t, levels: tuple[int, ...], group: int, table: tuple[float, ...],
                   per: str) -> dict[int, torch.Tensor]:
    """Level b1 as packed; each level above reads its cells stretched about the centre of the level-b1 range by a
    factor from `table`, chosen per group (per="group") or per matrix (per="matrix") by |x|-weighted error, its
    bits re-chosen among the children of the level below's code."""
    b1, bk = levels[0], levels[-1]
    x = w.float().reshape(-1, group)
    imp = x.abs() + 1e-3 * x.abs().mean()
    scale, offset = (v.float().reshape(-1, 1) for v in t.group_params())
    centre = offset + scale * 2.0 ** (b1 - 1)
    out, prev_b = {b1: dequantize(t, b1)}, b1
    codes = packed_codes(t).reshape(-1, group)
    prev = codes >> (bk - b1)
    for b in levels[1:]:
        step = scale * 2.0 ** (b1 - b)
        lo = prev << (b - prev_b)
        hi = lo + 2 ** (b - prev_b) - 1
        best = None
        for g in table:
            q = torch.round(((x - centre) / g + centre - offset) / step - 0.5).clamp(min=lo, max=hi)
            v = centre + g * (offset + step * (q + 0.5) - centre)
            err = (imp * (x - v).square()).sum(-1)
            if per == "matrix":
                err = err.sum().expand_as(err)
            if best is None:
                best = [err, q, v, torch.full_like(err, g)]
            else:
                better = err < best[0]
                best = [torch.where(better, err, best[0]), torch.where(better[:, None], q, best[1]),
                         torch.where(better[:, None], v, best[2]), torch.where(better, g, best[3])]
        hist = {g: round(float((best[3] == g).float().mean()), 3) for g in table}
        print(json.dumps({"stretch_level": b, "chosen": hist}), file=sys.stderr, flush=True)
        out[b] = best[2].view(w.shape)
        prev, prev_b = best[1].long(), b
    return out


def hadamard_rotation(n: int, block: int, seed: int = 0) -> torch.Tensor:
    """Orthogonal [n, n]: random signs, then a normalised Sylvester Hadamard on each block of `block` entries."""
    block = min(block, n & -n)  # the largest power of two dividing n
    h = torch.ones(1, 1)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)).float() * 2 - 1
    return torch.block_diag(*[h / block**0.5] * (n // block)) * signs[None, :]


def quantize(w: torch.Tensor, variant: str, levels: tuple[int, ...], lib, stats=None, matrix: str = "gate") -> dict[int, torch.Tensor]:
    kind, *opts = variant.split(":")
    if kind == "rot":  # incoherence: quantize the rotated matrix, rotate each level back (:hH block, :out rows)
        block = next((int(o[1:]) for o in opts if o.startswith("h")), 64)
        rows = "out" in opts and matrix == "down"  # down rotated on its output side
        r = hadamard_rotation(w.shape[0] if rows else w.shape[1], block)
        wf = w.float()
        rotated = (r @ wf if rows else wf @ r.T).to(w.dtype)
        inner = ":".join(["subblock"] + [o for o in opts if o[0] in "gr"])
        return {b: (r.T @ q.float() if rows else q.float() @ r).to(w.dtype)
                for b, q in quantize(rotated, inner, levels, lib).items()}
    group = next((int(o[1:]) for o in opts if o.startswith("g")), 32)
    refits = next((int(o[1:]) for o in opts if o.startswith("r")), 0)
    if kind == "kquant":
        return kquant_fit(w, levels, group, absolute="l2" not in opts)
    if kind == "dedicated":
        fits = {b: native.fit_sliced(lib, w.contiguous(), MWQConfig((b,), group), weighting="abs").tensor for b in levels}
        return {b: dequantize(t, b) for b, t in fits.items()}
    if kind == "calib":  # exactly pack --calib's fit (weighted and plain fits' rows, then gptq's codes)
        cfg = MWQConfig(levels, group)
        windows = next((tuple(float(v) for v in o[1:].split("/")) for o in opts if o.startswith("w")), gptq.WINDOWS)
        t = (calibrated_fit(lib, w.contiguous(), cfg, stats, refits, weighting="abs", windows=windows)[0]
             if stats is not None else
             native.fit_sliced(lib, w.contiguous(), cfg, weighting="abs", refits=refits).tensor)
        return {b: dequantize(t, b) for b in levels}
    t = native.fit_sliced(lib, w.contiguous(), MWQConfig(levels, group), weighting="abs", refits=refits).tensor
    if kind == "subblock":
        return {b: dequantize(t, b) for b in levels}
    if kind == "own":
        return own_params(w, t, levels, group)
    if kind == "stretch":  # :tA/B/C the factors to choose from, :m one per matrix (else per group)
        table = next((tuple(float(v) for v in o[1:].split("/")) for o in opts if o.startswith("t")), (1.0, 1.125, 1.25, 1.375))
        return stretch_params(w, t, levels, group, table, "matrix" if "m" in opts else "group")
    if kind == "gptq":  # the plain fit's grids, d2moe.quantize.gptq's codes with level b1's window from :wW
        if stats is None:
            return {b: dequantize(t, b) for b in levels}
        window = next((float(o[1:]) for o in opts if o.startswith("w")), gptq.WINDOW)
        codes = gptq.nested_codes(w, stats.hessian, *t.group_params(), levels, group, window, lib)
        t = replace(t, planes=pack_bits(codes, t.cfg.bk))
        return {b: dequantize(t, b) for b in levels}
    raise SystemExit(f"unknown variant {variant!r}: subblock|kquant|own|stretch|dedicated|gptq|calib|rot, then :gG, :rR, :l2, :wW, :hH, :tA/B")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--variants", default="subblock:g32:r1,kquant:g32,own:g32,dedicated:g32")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama", type=Path, help="llama.cpp source tree with build/bin: add its K-quant rows")
    ap.add_argument("--train", type=Path, help="with --llama: also K-quants with an imatrix of this text")
    ap.add_argument("--calib-tokens", type=int, default=32768)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    levels = tuple(int(b) for b in a.bits.split(","))
    lib = native.load()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    ids = encode_text(AutoTokenizer.from_pretrained(a.model), load_text_files([a.heldout]))
    experts = [layer.mlp.experts for layer in model.model.layers]
    original = [(e.gate_up_proj.data.clone(), e.down_proj.data.clone()) for e in experts]

    def ppl() -> float:
        with torch.no_grad():
            return perplexity(model_logits_fn(model), ids, seq_len=256).ppl

    base = ppl()
    print(json.dumps({"variant": "unquantized", "ppl": round(base, 4)}), flush=True)
    stats = {}
    if any(v.split(":")[0] in ("gptq", "calib") for v in a.variants.split(",")):
        if not a.train:
            raise SystemExit("gptq and calib variants need --train (their calibration text)")
        from d2moe.router_train.activations import expert_column_stats

        stats, _, report = expert_column_stats(Path(a.model), [str(a.train)], a.calib_tokens, progress=False)
        print(json.dumps({"calibration": report}), flush=True)
    for variant in a.variants.split(","):
        per_level = {b: [] for b in levels}
        for li, (gate_up, down) in enumerate(original):
            for mi, mats in enumerate((gate_up, down)):
                outs = [quantize(m, variant, levels, lib, stats.get((li, ei, "down" if mi else "gate")),
                                 "down" if mi else "gate")
                        for ei, m in enumerate(mats)]
                for b in levels:
                    per_level[b].append(torch.stack([o[b] for o in outs]))
        ratios = {}
        for b in levels:
            for i, e in enumerate(experts):
                e.gate_up_proj.data, e.down_proj.data = per_level[b][2 * i], per_level[b][2 * i + 1]
            ratios[f"level {b}"] = round(ppl() / base, 5)
        print(json.dumps({"variant": variant, **ratios}), flush=True)
        for i, e in enumerate(experts):
            e.gate_up_proj.data, e.down_proj.data = original[i]
    if a.llama:
        kquant_rows(a, experts, original, ppl, base)


def kquant_rows(a, experts, original, ppl, base: float) -> None:
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality_vs_kquants import KQUANTS, kquant_experts, llama_f16, llama_imatrix

    with tempfile.TemporaryDirectory(prefix="d2moe-study-") as tmp:
        work = Path(tmp)
        f16 = llama_f16(a.llama, Path(a.model), work)
        imatrices = [None] + ([llama_imatrix(a.llama, f16, a.train, 256, a.calib_tokens, work)] if a.train else [])
        for imatrix in imatrices:
            ratios = {}
            for level, (qtype, _) in KQUANTS.items():
                quantized = kquant_experts(a.llama, f16, qtype, imatrix, work, len(experts))
                for e, (gate_up, down), (og, od) in zip(experts, quantized, original, strict=True):
                    e.gate_up_proj.data, e.down_proj.data = gate_up.view_as(og), down.view_as(od)
                ratios[f"level {level}"] = round(ppl() / base, 5)
            for i, e in enumerate(experts):
                e.gate_up_proj.data, e.down_proj.data = original[i]
            name = "K-quants" + (" + imatrix" if imatrix else "")
            print(json.dumps({"variant": name, **ratios}), flush=True)


if __name__ == "__main__":
    main()
