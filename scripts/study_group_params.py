"""Would K-quant-style sub-block scales help the nested levels? A fake-quantization study on a trained MoE.

Each variant quantizes every expert matrix of MODEL (everything else stays as trained), rebuilds the
weights in float at each level of `--bits`, and reports held-out perplexity as a ratio to the
unquantized model (d2moe's perplexity recipe, windows of 256 tokens), with the bits per weight the
variant would store:

- `f16gS`     today's format: one float16 (scale, offset) per S columns, the native fit (clip search + one
              nested least-squares refit), error weighted equally;
- `f16gSm`    the same with `--weighting magnitude` (sqrt(2 mean x^2 + x^2), Q4_K's weighting);
- `f16gSa`    the same with `--weighting abs` (|x|, Q2_K's weighting; pack's default);
- `q8gS[m|a]` sub-block parameters as K-quants store them: the fitted per-S (scale, offset) requantized to
              8-bit codes against float16 (scale step, offset base, offset step) per 256 columns, each
              group's codes chosen among the 4 neighbouring (scale, offset) codes by the fit's own
              objective (mean over levels of log weighted squared error);
- `...rR`     (f16 only) the lowest level's codes kept, its (scale, offset) refitted per R columns by
              weighted least squares and stored in float16 (+32/R bits per weight at that level): what
              a level-b1-only fine grid would buy with nesting intact.

    .venv/bin/python scripts/study_group_params.py MODEL --variants f16g64,f16g64m,q8g32m --heldout TEXT

No variant is a format d2moe can serve: this only measures what a format change would buy.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import torch

from d2moe.apps.evaluate import encode_text, load_text_files, model_logits_fn, perplexity
from d2moe.kernels.reference import dequantize_reference
from d2moe.quantize import native
from d2moe.quantize.types import MWQConfig

SUPER = 256  # columns per super-block (K-quants' 256)
VARIANT = re.compile(r"(f16|q8)g(\d+)(m|a|)(?:r(\d+))?(?:x(\d+))?")  # ...xN: N nested refits (pack's --refits)
FIRST = re.compile(r"k(4|6|8|16)g(\d+)(j|w\d+|)(s?)")  # j: joint objective; wN: joint, level b1 weighted N  # ...s: the clip search also shifts the grid  # level-b1-first grids: parameter bits, sub-block columns, joint objective


def bits_per_weight(kind: str, group: int, level: int, refit: int | None = None) -> float:
    extra = 32 / refit if refit else 0.0  # the level-b1 refit's float16 (scale, offset) per `refit` columns
    if kind == "f16":
        return level + 32 / group + extra
    return level + 16 / group + 48 / SUPER + extra


def refit_lowest(x: torch.Tensor, wb: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int,
                 shift: int, refit: int, importance: torch.Tensor) -> torch.Tensor:
    """Level b1's codes kept (they are the prefix every level shares), its (scale, offset) refitted per
    `refit` columns by weighted least squares: x ~ o + s (q + 1/2). Returns the refitted level-b1 weight."""
    rows, cols = x.shape
    cell = (scale.float() * 2.0 ** -shift).repeat_interleave(group, 1)
    u = ((wb - offset.float().repeat_interleave(group, 1)) / cell - 0.5).round() + 0.5  # q + 1/2, as built
    xs, us, ims = (v.reshape(rows, cols // refit, refit) for v in (x, u, importance))
    s0, s1, s2 = ims.sum(-1), (ims * us).sum(-1), (ims * us * us).sum(-1)
    t0, t1 = (ims * xs).sum(-1), (ims * us * xs).sum(-1)
    det = s0 * s2 - s1 * s1
    s_fit = torch.where(det > 1e-12 * s0 * s2, (s0 * t1 - s1 * t0) / det.clamp_min(1e-30),
                        cell.reshape(rows, cols // refit, refit)[..., 0])
    o_fit = (t0 - s_fit * s1) / s0.clamp_min(1e-30)
    s_fit, o_fit = s_fit.half().float(), o_fit.half().float()
    return (o_fit[..., None] + s_fit[..., None] * us).reshape(rows, cols)


def cell_centres(x: torch.Tensor, offset: torch.Tensor, step: torch.Tensor, bk: int, level: int) -> torch.Tensor:
    """x [N, S] on the grid (offset [N] lower edge, step [N] bk-bit cell) read at `level`: the cell centres."""
    cell = step * 2.0 ** (bk - level)
    q = ((x - offset[:, None]) / cell.clamp_min(1e-30)[:, None]).floor().clamp(0, 2**level - 1)
    return offset[:, None] + (q + 0.5) * cell[:, None]


def super_blocks(n: int, rows: int, cols: int, group: int):
    """For n groups of `group` columns (row-major, [rows, cols]): (seg(v [n], how) -> [rows * S], the reduction
    of v over each super-block of SUPER columns; sb [n], each group's super-block)."""
    per = max(1, SUPER // group)
    n_groups = cols // group
    n_super = -(-n_groups // per)
    idx = torch.arange(n)
    sb = (idx // n_groups) * n_super + (idx % n_groups) // per

    def seg(v, how):
        return torch.zeros(rows * n_super).scatter_reduce(0, sb, v, how, include_self=False)

    return seg, sb


def requantize(x, step, offset, rows, cols, group, levels, importance):
    """Per-group (step, offset) -> 8-bit codes against per-super-block float16 parameters; best of 4 neighbours."""
    bk = levels[-1]
    seg, sb = super_blocks(x.shape[0], rows, cols, group)
    d = (seg(step, "amax") / 255).half().float()[sb]
    o_lo = seg(offset, "amin").half().float()[sb]
    o_step = ((seg(offset, "amax") - seg(offset, "amin")) / 255).half().float()[sb]
    sc0, oc0 = (step / d.clamp_min(1e-30)).floor(), ((offset - o_lo) / o_step.clamp_min(1e-30)).floor()
    best = None
    for ds in (0, 1):
        for do in (0, 1):
            st, of = d * (sc0 + ds).clamp(1, 255), o_lo + o_step * (oc0 + do).clamp(0, 255)
            err = torch.stack([((cell_centres(x, of, st, bk, b) - x).square() * importance).sum(-1) for b in levels])
            obj = err.add_(1e-38).log_().mean(0)
            if best is None:
                best = [st, of, obj]
            else:
                better = obj < best[2]
                best = [torch.where(better, a, b) for a, b in zip((st, of, obj), best, strict=True)]
    return best[0], best[1]


def _first_level_err(x, imp, offset, cell, b1):
    q = ((x - offset[:, None]) / cell.clamp_min(1e-30)[:, None]).floor().clamp(0, 2**b1 - 1)
    return q, ((offset[:, None] + (q + 0.5) * cell[:, None] - x).square() * imp).sum(-1)


def _objective(x, imp, offset, cell, levels, joint):
    """Level b1's weighted error alone (joint 0), or the weighted mean over levels of its log (the nested
    fit's objective; level b1 weighs `joint`, the others 1)."""
    b1 = levels[0]
    if not joint:
        return _first_level_err(x, imp, offset, cell, b1)[1]
    errs = [((cell_centres(x, offset, cell * 2.0 ** (b1 - b), b, b) - x).square() * imp).sum(-1) for b in levels]
    lam = torch.tensor([float(joint)] + [1.0] * (len(levels) - 1))[:, None]
    return (torch.stack(errs).add_(1e-38).log_() * lam).sum(0)


def _level_codes(x, offset, cell, b1, b):
    """Cell-centre multipliers of x at level b on the b1-cell grid: 2^-(b-b1) (q_b + 1/2)."""
    sub = cell * 2.0 ** (b1 - b)
    q = ((x - offset[:, None]) / sub.clamp_min(1e-30)[:, None]).floor().clamp(0, 2**b - 1)
    return (q + 0.5) * 2.0 ** (b1 - b)


def _refit(x, imp, offset, cell, levels, joint):
    """Weighted least squares of (offset, cell) on the current codes: level b1 alone, or every level
    weighted by 1 / its error (native mwq_fit.c's nested refit, a Gauss-Newton step on the mean log)."""
    use = levels if joint else levels[:1]
    a00 = a01 = a11 = r0 = r1 = 0
    for b in use:
        c = _level_codes(x, offset, cell, levels[0], b)
        lam = 1.0
        if joint:
            err = ((offset[:, None] + cell[:, None] * c - x).square() * imp).sum(-1)
            lam = (float(joint) if b == levels[0] else 1.0) / (err + 1e-30)
        a00 = a00 + lam * imp.sum(-1)
        a01 = a01 + lam * (imp * c).sum(-1)
        a11 = a11 + lam * (imp * c * c).sum(-1)
        r0 = r0 + lam * (imp * x).sum(-1)
        r1 = r1 + lam * (imp * c * x).sum(-1)
    det = a00 * a11 - a01 * a01
    ok = det > 1e-9 * a00 * a11
    new_cell = torch.where(ok, (a00 * r1 - a01 * r0) / torch.where(ok, det, torch.ones_like(det)), cell)
    new_off = torch.where(ok, (a11 * r0 - a01 * r1) / torch.where(ok, det, torch.ones_like(det)), offset)
    bad = ~(new_cell > 0) | ~torch.isfinite(new_off)
    return torch.where(bad, offset, new_off), torch.where(bad, cell, new_cell)


def fit_first(x, imp, levels, joint, shifts=False):
    """Per group [N, S]: a uniform b1-bit grid (offset = lower edge of cell 0, cell = its width) chosen for
    level b1 (or jointly), then weighted least-squares refits of (offset, cell) on its codes, kept where better."""
    b1 = levels[0]
    mn, mx = x.amin(-1), x.amax(-1)
    mid, span = (mn + mx) * 0.5, (mx - mn).clamp_min(1e-12)
    best_obj, best_off, best_cell = None, None, None
    for shrink in [1.3 - 0.04 * i for i in range(21)]:
        for shift in ((-0.25, -0.125, 0.0, 0.125, 0.25) if shifts else (0.0,)):
            cell = span * shrink / (2**b1 - 1)  # outer cell centres at shrink x [min, max]
            off = mid - cell * 2 ** (b1 - 1) + shift * cell
            obj = _objective(x, imp, off, cell, levels, joint)
            if best_obj is None:
                best_obj, best_off, best_cell = obj, off, cell
            else:
                better = obj < best_obj
                best_obj, best_off, best_cell = (torch.where(better, a, b) for a, b in ((obj, best_obj), (off, best_off), (cell, best_cell)))
    for _ in range(4):
        off, cell = _refit(x, imp, best_off, best_cell, levels, joint)
        off, cell = off.half().float(), cell.half().float()
        obj = _objective(x, imp, off, cell, levels, joint)
        better = obj < best_obj
        best_obj, best_off, best_cell = (torch.where(better, a, b) for a, b in ((obj, best_obj), (off, best_off), (cell, best_cell)))
    return best_off, best_cell


def quantize_params(x, imp, off, cell, rows, cols, group, pbits, levels, joint):
    """(offset, cell) per group -> pbits-bit codes against float16 (cell step, offset base, offset step) per
    super-block of SUPER columns; each group picks the best of its 4 neighbouring code pairs."""
    if pbits == 16:
        return off.half().float(), cell.half().float()
    top = 2**pbits - 1
    seg, sb = super_blocks(x.shape[0], rows, cols, group)
    d = (seg(cell, "amax") / top).half().float()[sb]
    o_lo = seg(off, "amin").half().float()[sb]
    o_step = ((seg(off, "amax") - seg(off, "amin")) / top).half().float()[sb]
    sc0 = (cell / d.clamp_min(1e-30)).floor()
    oc0 = ((off - o_lo) / o_step.clamp_min(1e-30)).floor()
    best = None
    for ds in (0, 1):
        for do in (0, 1):
            c, o = d * (sc0 + ds).clamp(1, top), o_lo + o_step * (oc0 + do).clamp(0, top)
            obj = _objective(x, imp, o, c, levels, joint)
            if best is None:
                best = [o, c, obj]
            else:
                better = obj < best[2]
                best = [torch.where(better, a, b) for a, b in zip((o, c, obj), best, strict=True)]
    return best[0], best[1]


def quantize_first(w: torch.Tensor, variant: str, levels: tuple[int, ...]) -> dict[int, torch.Tensor]:
    pbits, group, joint, shifts = FIRST.fullmatch(variant).groups()
    pbits, group = int(pbits), int(group)
    joint = 0 if not joint else (1 if joint == "j" else int(joint[1:]))
    rows, cols = w.shape
    x = w.float().reshape(-1, group)
    imp = x.abs() + 1e-3 * x.abs().mean()  # |x|: pack's default weighting
    off, cell = fit_first(x, imp, levels, joint, bool(shifts))
    off, cell = quantize_params(x, imp, off, cell, rows, cols, group, pbits, levels, joint)
    b1 = levels[0]
    return {b: cell_centres(x, off, cell * 2.0 ** (b1 - b), b, b).view(rows, cols) for b in levels}


def quantize(w: torch.Tensor, variant: str, levels: tuple[int, ...]) -> dict[int, torch.Tensor]:
    if FIRST.fullmatch(variant):
        return quantize_first(w, variant, levels)
    kind, group, magnitude, refit, refits = VARIANT.fullmatch(variant).groups()
    group, weighting = int(group), {"": "mse", "m": "magnitude", "a": "abs"}[magnitude]
    cfg = MWQConfig(levels, group)
    t = native.fit_sliced(native.load(), w.contiguous(), cfg, refits=int(refits or 1), weighting=weighting).tensor
    if kind == "f16":
        out = {b: dequantize_reference(t.scale, t.offset, t.planes, None, cfg.b1, b, group) for b in levels}
        if refit:
            x = w.float()
            imp = {"mse": torch.ones_like(x), "magnitude": (2 * x.square().mean(-1, keepdim=True) + x.square()).sqrt(),
                   "abs": x.abs() + 1e-3 * x.abs().mean()}[weighting]
            out[cfg.b1] = refit_lowest(x, out[cfg.b1], t.scale, t.offset, group, 0, int(refit), imp)
        return out
    rows, cols = w.shape
    x = w.float().reshape(-1, group)
    step = t.scale.float().reshape(-1) * 2.0 ** -(cfg.bk - cfg.b1)
    sigma2 = {"mse": None, "magnitude": 2 * x.square().mean(-1, keepdim=True), "abs": 1e-6 * x.square().mean(-1, keepdim=True)}[weighting]
    imp = torch.ones_like(x) if sigma2 is None else (sigma2 + x.square()).sqrt()
    step, offset = requantize(x, step, t.offset.float().reshape(-1), rows, cols, group, levels, imp)
    return {b: cell_centres(x, offset, step, cfg.bk, b).view(rows, cols) for b in levels}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--variants", default="f16g64,f16g64m,f16g32m,q8g32,q8g32m")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    levels = tuple(int(b) for b in a.bits.split(","))
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    ids = encode_text(AutoTokenizer.from_pretrained(a.model), load_text_files([a.heldout]))

    def ppl() -> float:
        with torch.no_grad():
            return perplexity(model_logits_fn(model), ids, seq_len=256).ppl

    experts = [layer.mlp.experts for layer in model.model.layers]
    original = [(e.gate_up_proj.data.clone(), e.down_proj.data.clone()) for e in experts]
    base = ppl()
    print(json.dumps({"variant": "unquantized", "ppl": round(base, 4)}), flush=True)
    for variant in a.variants.split(","):
        if variant.startswith("gguf="):  # llama.cpp's own quantization of the experts, in the same harness
            from quality_vs_kquants import gguf_experts  # this folder; LLAMA_CPP = llama.cpp's source tree

            for i, (gate_up, down) in enumerate(gguf_experts(Path(os.environ["LLAMA_CPP"]), Path(variant[5:]), len(experts))):
                experts[i].gate_up_proj.data = gate_up.view_as(original[i][0]).to(original[i][0].dtype)
                experts[i].down_proj.data = down.view_as(original[i][1]).to(original[i][1].dtype)
            print(json.dumps({"variant": variant, "ratio": round(ppl() / base, 5)}), flush=True)
            for i, e in enumerate(experts):
                e.gate_up_proj.data, e.down_proj.data = original[i]
            continue
        if not (VARIANT.fullmatch(variant) or FIRST.fullmatch(variant)):
            raise SystemExit(f"unknown variant {variant!r}: (f16|q8)gS, optionally suffixed m or a, then rR")
        per_level = {b: [] for b in levels}
        for gate_up, down in original:
            for mats in (gate_up, down):
                out = [quantize(m, variant, levels) for m in mats]
                for b in levels:
                    per_level[b].append(torch.stack([o[b] for o in out]))
        for b in levels:
            for i, e in enumerate(experts):
                e.gate_up_proj.data = per_level[b][2 * i].to(original[i][0].dtype)
                e.down_proj.data = per_level[b][2 * i + 1].to(original[i][1].dtype)
            if FIRST.fullmatch(variant):
                pbits, group, _, _ = FIRST.fullmatch(variant).groups()
                bpw = b + (32 / int(group) if pbits == "16" else 2 * int(pbits) / int(group) + 48 / SUPER)
            else:
                kind, group, _, refit, _ = VARIANT.fullmatch(variant).groups()
                extra = int(refit) if refit and b == levels[0] else None
                bpw = bits_per_weight(kind, int(group), b, extra)
            print(json.dumps({"variant": variant, "level": b, "ratio": round(ppl() / base, 5), "bpw": round(bpw, 4)}), flush=True)
        for i, e in enumerate(experts):
            e.gate_up_proj.data, e.down_proj.data = original[i]


if __name__ == "__main__":
    main()
