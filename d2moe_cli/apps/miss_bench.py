"""The miss-handling axis of `d2moe bench` and `d2moe eval`: decode-mode perplexity, labels, the Pareto plot.

Why a decode-mode perplexity: `--on-miss` acts on a layer step's work items whose pairs are all
unimportant. A windowed forward of 256 tokens sends some important pair to nearly every expert, so
almost nothing would be handled and the score would hide what the modes cost. `decode_perplexity`
feeds the text one token per forward through the KV cache, as generation does (teacher forcing), so
every step sees the cache and the misses a decode step sees.

A bench configuration is a label `POLICY` (on-miss load) or `POLICY+MODE` (e.g. `d2moe+substitute`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from d2moe.errors import UsageError

# one colour per mode of d2moe.runtime.miss.MISS_MODES in the Pareto plot (a test checks that none is missing)
MODE_COLORS = {"load": "tab:blue", "lowbit": "tab:green", "substitute": "tab:orange", "skip": "tab:red",
               "reuse": "tab:purple"}


def miss_modes(text: str | None) -> list[str]:
    """'load,skip,reuse:0' -> ['load', 'skip', 'reuse:0'] ('all': every mode), validated. A mode may carry its own
    --miss-threshold after a colon, so one sweep can hold one mode at two thresholds."""
    from d2moe.runtime.miss import MISS_MODES

    if text is None:
        return ["load"]
    if not text.strip(", "):
        raise UsageError(f"--on-miss {text!r} names no mode: give one or more of load,lowbit,substitute,skip,reuse "
                         "(or all), or leave it out")
    modes = list(MISS_MODES) if text.strip() == "all" else [m.strip() for m in text.split(",") if m.strip()]
    for m in modes:
        name, _ = split_mode(m, 0.0)  # its threshold checked here too
        if name not in MISS_MODES:
            raise UsageError(f"--on-miss {m!r} is unknown: use one or more of {', '.join(MISS_MODES)} (or all), "
                             "each optionally with its threshold (reuse:0)")
    if len(set(modes)) != len(modes):
        raise UsageError(f"--on-miss {text!r} repeats a mode")
    return modes


def split_mode(mode: str, threshold: float) -> tuple[str, float]:
    """'reuse:0' -> ('reuse', 0.0); 'reuse' -> ('reuse', threshold): a mode and the miss threshold it runs with."""
    name, colon, value = mode.partition(":")
    if not colon:
        return name, threshold
    try:
        own = float(value)
    except ValueError:
        own = float("nan")
    if not 0.0 <= own <= 1.0:
        raise UsageError(f"--on-miss {mode!r}: the threshold after ':' must be a number in [0, 1] (e.g. reuse:0)")
    return name, own


def label(policy: str, mode: str) -> str:
    return policy if mode == "load" else f"{policy}+{mode}"


def split_label(text: str) -> tuple[str, str]:
    """'d2moe+skip' -> ('d2moe', 'skip'); 'd2moe' -> ('d2moe', 'load')."""
    policy, _, mode = text.partition("+")
    return policy, mode or "load"


@torch.inference_mode()
def decode_perplexity(model, token_ids: Sequence[int], seq_len: int = 256,
                      on_window: Callable[[int, int], None] | None = None):
    """Perplexity of `token_ids` scored one token per forward (KV cache), windows of `seq_len` tokens.

    Windows as d2moe.apps.evaluate.sliding_windows with stride = seq_len: every token but the first is
    scored once, with the context of its window. Returns a PerplexityResult.
    """
    from transformers import DynamicCache

    from d2moe.apps.evaluate import PerplexityResult, sliding_windows, token_nll

    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    windows = sliding_windows(len(ids), seq_len, seq_len)
    device = next(model.parameters()).device
    nll_sum, scored = 0.0, 0
    for i, w in enumerate(windows):
        cache = DynamicCache(config=model.config)
        for pos in range(w.begin, w.end - 1):
            logits = model(input_ids=ids[pos:pos + 1][None].to(device), past_key_values=cache, use_cache=True).logits
            if pos + 1 >= w.score_from:
                nll_sum += float(token_nll(logits[0, -1:].cpu(), ids[pos + 1:pos + 2]).sum())
                scored += 1
        if on_window:
            on_window(i + 1, len(windows))
    return PerplexityResult(nll_sum=nll_sum, n_tokens=scored, seq_len=seq_len, stride=seq_len, windows=len(windows))


def score_perplexity(session, logits_fn, token_ids, seq_len: int, stride, on_window, scoring: str):
    """`d2moe eval`'s perplexity: windowed forwards, or decode mode ("decode") on a runtime session."""
    from d2moe.apps.evaluate import perplexity

    if token_ids is None:
        return None
    if scoring == "decode" and session is not None:
        return decode_perplexity(session.model, token_ids, seq_len, on_window)
    return perplexity(logits_fn, token_ids, seq_len, stride, on_window)


def quality_runner(checkpoint, token_ids: Sequence[int], seq_len: int, io_bandwidth: float | None, io_threads: int,
                   miss_threshold: float, miss_importance: str, tokenizer=None, max_tokens: int | None = None,
                   dense_weights: str = "source") -> Callable:
    """(label, budget) -> {"perplexity", "misses"}: a fresh session at that budget scores the text in decode mode."""
    from d2moe.apps.evaluate import parse_policy
    from d2moe.runtime.session import RunOptions, Session

    def run(config: str, budget) -> dict:
        policy, mode = split_label(config)
        mode, threshold = split_mode(mode, miss_threshold)
        name, level = parse_policy(policy)
        options = RunOptions(memory_budget=budget.bytes, policy=name, level=level, io_bandwidth=io_bandwidth,
                             io_threads=io_threads, max_tokens=max(max_tokens or 0, seq_len), on_miss=mode,
                             miss_threshold=threshold, miss_importance=miss_importance, dense_weights=dense_weights)
        with Session(checkpoint, options, tokenizer=tokenizer) as session:
            session.pipeline.reset_stats()
            result = decode_perplexity(session.model, token_ids, seq_len)
            stats = session._miss_report()
        return {"perplexity": result.ppl, "misses": stats}

    return run


def plot_pareto(report, path) -> None:
    """Perplexity vs decode tok/s, one panel per budget: a marker per policy, a colour per miss mode."""
    try:
        import matplotlib
    except ImportError as exc:
        from d2moe.errors import DependencyError

        raise DependencyError("--pareto-plot needs matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [b for b in report.budgets if any(r.ok and r.perplexity for r in report.results if r.budget == b)]
    if not budgets:
        raise UsageError("--pareto-plot needs perplexities: give --quality-text FILE")
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.2 * len(budgets), 3.8), dpi=120, squeeze=False)
    markers = dict(zip(sorted({r.policy for r in report.results}), "osD^v<>ph*", strict=False))
    colors = MODE_COLORS
    for ax, budget in zip(axes[0], budgets, strict=True):
        for r in report.results:
            if r.budget != budget or not r.ok or r.perplexity is None:
                continue
            ax.scatter(r.median("decode_tokens_per_s"), r.perplexity, marker=markers[r.policy],
                       color=colors.get(r.on_miss.partition(":")[0], "gray"), s=70 if r.policy == "d2moe" else 36,
                       edgecolors="black" if r.policy == "d2moe" else "none")
        ax.set_title(f"budget {budget.label}")
        ax.set_xlabel("decode tokens/s")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("decode-mode perplexity")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker=m, linestyle="", color="gray", label=p) for p, m in markers.items()]
    handles += [Line2D([], [], marker="o", linestyle="", color=c, label=f"on-miss {k}") for k, c in colors.items()]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="best")
    fig.suptitle("Perplexity vs decode throughput: policy x miss handling")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
