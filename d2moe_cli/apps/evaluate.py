"""Model quality: sliding-window perplexity and zero-shot accuracy through lm-eval-harness.

Both work on a `LogitsFn`: any callable mapping input_ids [1, T] to logits [1, T, V]. The
runtime model (offloaded experts at a level or under a policy) and the transformers reference
both provide one, so the same code scores every configuration.

Perplexity (the Hugging Face recipe): windows of `seq_len` tokens every `stride` tokens; a
window scores only the tokens the previous window did not, each with all the context its window
holds, so every scored token sees at least seq_len - stride tokens of context. With stride ==
seq_len consecutive windows overlap by one token (the HF loop drops that token; here it is the
next window's context), so every token but the first is scored exactly once: `n_tokens` =
len(ids) - 1 for any stride.

Shape letters: T = tokens in a window, V = vocabulary.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from d2moe.errors import DependencyError, InputError, UsageError
from d2moe.hub import offline_hint, offline_unless_reachable

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # input_ids [1, T] (int64) -> logits [1, T, V]

LM_EVAL_HINT = "pip install lm-eval  (or: pip install 'd2moe[eval]')"


# --------------------------------------------------------------------------- perplexity


@dataclass(frozen=True)
class Window:
    """One forward of the sliding window: tokens [begin, end), scoring tokens [score_from, end)."""

    begin: int
    end: int
    score_from: int


@dataclass(frozen=True)
class PerplexityResult:
    """Summed negative log-likelihood (nats) over the scored tokens."""

    nll_sum: float
    n_tokens: int  # tokens scored
    seq_len: int
    stride: int
    windows: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.n_tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)

    def to_dict(self) -> dict:
        return {
            "ppl": self.ppl, "mean_nll": self.mean_nll, "nll_sum": self.nll_sum, "tokens": self.n_tokens,
            "seq_len": self.seq_len, "stride": self.stride, "windows": self.windows,
        }


def sliding_windows(n_tokens: int, seq_len: int, stride: int | None = None) -> list[Window]:
    """The windows that score tokens 1 .. n_tokens-1 once each (token 0 has no context).

    A window after the first starts `max(1, seq_len - stride)` tokens before the first token it
    scores: that overlap is its context.
    """
    stride = seq_len if stride is None else stride
    if seq_len < 2:
        raise UsageError(f"--seq-len {seq_len} must be at least 2")
    if not 1 <= stride <= seq_len:
        raise UsageError(f"--stride {stride} must be between 1 and --seq-len ({seq_len})")
    if n_tokens < 2:
        raise InputError(f"the evaluation text encodes to {n_tokens} token(s): perplexity needs at least 2")
    overlap = max(1, seq_len - stride)
    windows = [Window(0, min(seq_len, n_tokens), 1)]
    while windows[-1].end < n_tokens:
        scored_to = windows[-1].end
        begin = scored_to - overlap
        windows.append(Window(begin, min(begin + seq_len, n_tokens), scored_to))
    return windows


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) per position: logits [T, V], targets [T] -> [T] (float64)."""
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return -logprobs.gather(-1, targets[:, None].long()).squeeze(-1)


@torch.inference_mode()
def perplexity(
    logits_fn: LogitsFn,
    token_ids: Sequence[int] | torch.Tensor,
    seq_len: int = 256,
    stride: int | None = None,
    on_window: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of `token_ids` under `logits_fn`; on_window(done, total) reports progress."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    stride = seq_len if stride is None else stride
    windows = sliding_windows(len(ids), seq_len, stride)
    nll_sum, scored = 0.0, 0
    for i, w in enumerate(windows):
        logits = logits_fn(ids[w.begin:w.end][None])[0]  # [T, V]
        # logits at position t predict token t + 1
        pred = logits[w.score_from - 1 - w.begin: w.end - 1 - w.begin]
        nll = token_nll(pred, ids[w.score_from:w.end])
        nll_sum += float(nll.sum())
        scored += len(nll)
        if on_window:
            on_window(i + 1, len(windows))
    return PerplexityResult(nll_sum=nll_sum, n_tokens=scored, seq_len=seq_len, stride=stride, windows=len(windows))


def model_logits_fn(model) -> LogitsFn:
    """A LogitsFn over a transformers causal LM (no KV cache: each window is a fresh forward)."""

    def forward(input_ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids, use_cache=False).logits

    return forward


# --------------------------------------------------------------------------- evaluation text


MAX_TEXT_BYTES = 1 << 30


def load_text_files(paths: Sequence[Path | str], option: str = "--text") -> str:
    """The files' text joined by blank lines (pipes and - for standard input too; InputError naming `option` and a
    missing or empty file)."""
    from d2moe.user_files import read_user_text, stdin_once

    stdin_once(*((option, p) for p in paths))
    parts = []
    for p in paths:
        text = read_user_text(p, MAX_TEXT_BYTES, option)  # a binary file passed by mistake is not scored
        if not text.strip():
            raise InputError(f"{option} {p} is empty: pass a file with text in it")
        parts.append(text)
    return "\n\n".join(parts)


def load_dataset_text(spec: str, column: str = "text") -> str:
    """Text of a `datasets` dataset named `NAME[:config[:split]]` (split default 'test'), rows joined by blank lines.

    The HF perplexity recipe for wikitext is `wikitext:wikitext-2-raw-v1:test`. A local JSON/text
    file works too: `json:/path/data.jsonl:train` or `text:/path/file.txt:train`.
    """
    name, config, split = ([*spec.split(":", 2), None, None])[:3]
    split = split or "test"
    try:
        import datasets
    except ImportError as exc:  # datasets is a core dependency; this guards a broken install
        raise DependencyError("the `datasets` package is missing: pip install datasets") from exc
    local = name in ("json", "text", "csv", "parquet") and config
    with contextlib.nullcontext(False) if local else offline_unless_reachable() as offline:
        try:
            if local:
                ds = datasets.load_dataset(name, data_files={split: config}, split=split)
            else:
                ds = datasets.load_dataset(name, config, split=split)
        except Exception as exc:  # noqa: BLE001  (network, unknown name, missing split: all one message)
            raise InputError(
                f"--dataset {spec!r} could not be loaded ({offline_hint(offline)}{type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}); offline, use --text FILE instead"
            ) from exc
    if column not in ds.column_names:
        raise InputError(f"--dataset {spec!r} has no {column!r} column (columns: {', '.join(ds.column_names)})")
    text = "\n\n".join(row for row in ds[column] if row and row.strip())
    if not text:
        raise InputError(f"--dataset {spec!r} split {split!r} holds no text")
    return text


def encode_text(tokenizer, text: str, max_tokens: int | None = None) -> list[int]:
    """Token ids of `text` as the tokenizer encodes a document (special tokens included), truncated."""
    ids = list(tokenizer(text)["input_ids"])
    if max_tokens is not None:
        if max_tokens < 2:
            raise UsageError(f"--max-tokens {max_tokens} must be at least 2")
        ids = ids[:max_tokens]
    return ids


# --------------------------------------------------------------------------- zero-shot (lm-eval-harness)


def lm_eval_available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def require_lm_eval():
    try:
        import lm_eval
        from lm_eval.api.model import TemplateLM
    except ImportError as exc:
        raise DependencyError(f"zero-shot tasks need lm-eval-harness, which is not installed: {LM_EVAL_HINT}") from exc
    return lm_eval, TemplateLM


def make_lm_eval_model(logits_fn: LogitsFn, tokenizer, max_length: int = 2048, name: str = "d2moe"):
    """An lm-eval `LM` whose loglikelihoods come from `logits_fn` (one sequence per forward)."""
    _, TemplateLM = require_lm_eval()
    from lm_eval import utils as lm_utils

    class D2MoELM(TemplateLM):
        """lm-eval adapter over a d2moe LogitsFn (the runtime model at a level or under a policy)."""

        def __init__(self) -> None:
            super().__init__()
            self.tokenizer = tokenizer
            self.max_length = max_length
            self.model_name = name

        @property
        def eot_token_id(self) -> int:
            eos = tokenizer.eos_token_id
            return eos if eos is not None else tokenizer.bos_token_id

        @property
        def prefix_token_id(self) -> int:
            bos = tokenizer.bos_token_id
            return bos if bos is not None else self.eot_token_id

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            return list(tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"])

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            return [score_continuation(logits_fn, ctx, cont, self.max_length) for _, ctx, cont in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            out = []
            for (string,) in [req.args for req in requests]:
                windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1,
                ))
                out.append(sum(score_continuation(logits_fn, ctx, cont, self.max_length)[0] for ctx, cont in windows))
            return out

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            return [self._greedy(ctx, dict(gen)) for ctx, gen in [req.args for req in requests]]

        def _greedy(self, context: str, gen: dict) -> str:
            until = gen.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids = self.tok_encode(context)
            new: list[int] = []
            for _ in range(int(gen.get("max_gen_toks", 64))):
                window = torch.tensor([(ids + new)[-self.max_length:]], dtype=torch.long)
                token = int(logits_fn(window)[0, -1].argmax())
                if token == self.eot_token_id:
                    break
                new.append(token)
                text = tokenizer.decode(new, skip_special_tokens=True)
                if any(stop in text for stop in until):
                    break
            text = tokenizer.decode(new, skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0]
            return text

    return D2MoELM()


class _quiet_lm_eval:
    """lm-eval's per-stage tqdm bars and INFO/WARNING logs held back (our CLI shows its own progress).

    What lm-eval writes to stderr is captured and shown only when the evaluation fails.
    """

    def __enter__(self) -> None:
        import contextlib
        import io
        import logging

        self._logger = logging.getLogger("lm_eval")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)
        self._buffer = io.StringIO()
        self._redirect = contextlib.redirect_stderr(self._buffer)
        self._redirect.__enter__()

    def __exit__(self, exc_type, *exc) -> None:
        import sys

        self._redirect.__exit__(exc_type, *exc)
        self._logger.setLevel(self._level)
        if exc_type is not None:
            sys.stderr.write(self._buffer.getvalue())


@torch.inference_mode()
def score_continuation(
    logits_fn: LogitsFn, context: Sequence[int], continuation: Sequence[int], max_length: int
) -> tuple[float, bool]:
    """(sum log p(continuation | context), whether greedy decoding gives exactly the continuation)."""
    if not continuation:
        return 0.0, True
    ids = (list(context) + list(continuation))[-(max_length + 1):]
    inp = torch.tensor([ids[:-1]], dtype=torch.long)  # [1, T]
    logits = logits_fn(inp)[0, -len(continuation):]  # [C, V]: the positions predicting the continuation
    target = torch.tensor(list(continuation), dtype=torch.long)
    logprob = -float(token_nll(logits, target).sum())
    greedy = bool((logits.argmax(dim=-1) == target).all())
    return logprob, greedy


def zero_shot(
    logits_fn: LogitsFn,
    tokenizer,
    tasks: Sequence[str],
    tasks_dir: Path | str | None = None,
    limit: int | None = None,
    num_fewshot: int = 0,
    max_length: int = 2048,
) -> dict[str, dict[str, float]]:
    """lm-eval `simple_evaluate` of `tasks` (built-in names, or names of YAML tasks under `tasks_dir`).

    Returns {task: {metric: value}} with lm-eval's metric names stripped of the filter suffix
    ("acc,none" -> "acc", "acc_stderr,none" -> "acc_stderr").
    """
    lm_eval, _ = require_lm_eval()
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise UsageError("--tasks is empty: name at least one task (e.g. --tasks piqa,arc_easy)")
    if tasks_dir is not None and not Path(tasks_dir).is_dir():
        raise InputError(f"--tasks-dir {tasks_dir} is not a directory of lm-eval task YAML files")
    manager = None
    if tasks_dir is not None:  # indexing only the local YAMLs takes ms; lm-eval's ~15k built-ins take seconds
        manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
        if any(t not in manager.all_tasks for t in tasks):
            manager = None
    manager = manager or TaskManager(include_path=str(tasks_dir) if tasks_dir else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" under {tasks_dir}" if tasks_dir else ""
        raise UsageError(f"unknown lm-eval task(s) {', '.join(unknown)}{where}: see `lm-eval ls tasks` or pass --tasks-dir")
    lm = make_lm_eval_model(logits_fn, tokenizer, max_length=max_length)
    with offline_unless_reachable() as offline:
        try:
            with _quiet_lm_eval():
                results = lm_eval.simple_evaluate(
                    model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                    log_samples=False, bootstrap_iters=1000,
                )
        except (ConnectionError, OSError) as exc:
            raise InputError(
                f"an lm-eval task's data could not be loaded ({offline_hint(offline)}{type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}); offline, use local task YAMLs with --tasks-dir"
            ) from exc
    table = {}
    for task, metrics in results["results"].items():
        table[task] = {
            key.split(",")[0]: float(value) for key, value in metrics.items()
            if "," in key and isinstance(value, (int, float))
        }
    return table


# --------------------------------------------------------------------------- packed checkpoints


UNLIMITED_BUDGET = 1 << 40  # the budget changes speed, never output: eval defaults to holding everything


@dataclass(frozen=True)
class EvalTarget:
    """One configuration to score: a policy (at a uniform level or with its own level choice), or the source."""

    label: str  # "4-bit", "d2moe", "moqe-dynaio@4", "reference"
    policy: str | None  # None: the unquantized source model through transformers
    level: int | None = None  # uniform level (None: the policy's own level choice)


def parse_policy(text: str) -> tuple[str, int | None]:
    """'moqe-dynaio@4' -> ('moqe-dynaio', 4); 'd2moe' -> ('d2moe', None)."""
    name, _, level = text.partition("@")
    if not level:
        return name, None
    from d2moe.runtime.policies import HOLD_LEVELS

    if name in HOLD_LEVELS:  # its level is its name's: an @ was silently dropped
        raise UsageError(f"policy {text!r}: {name} holds every expert at {HOLD_LEVELS[name]} bits by its name; for "
                         f"another uniform level use moqe-dynaio@{level}")
    try:
        return name, int(level)
    except ValueError:
        raise UsageError(f"policy {text!r}: the part after @ must be a bit-width (e.g. moqe-dynaio@4)") from None


def eval_targets(bits: Sequence[int], level: str | None = None, policy: str | None = None) -> list[EvalTarget]:
    """What `d2moe eval` scores: each level of `level` ('all', '4' or '2,4') or the `policy`; default: d2moe."""
    if level is not None and policy is not None:
        raise UsageError("--level and --policy exclude each other: --level L scores uniform L-bit experts")
    if level is not None:
        chosen = list(bits) if level == "all" else _level_list(level)
        for b in chosen:
            if b not in bits:
                raise UsageError(f"--level {b} is not a packed level (levels: {', '.join(map(str, bits))}); "
                                 "use one of them or --level all")
        return [EvalTarget(f"{b}-bit", "moqe-dynaio", b) for b in dict.fromkeys(chosen)]  # 2,2 is one row
    if policy is not None and not policy.strip(", "):
        raise UsageError(f"--policy {policy!r} names no policy: give one (d2moe) or a list (d2moe,lru), or leave it out")
    targets = []
    for item in dict.fromkeys(x.strip() for x in (policy or "d2moe").split(",")):
        name, lvl = parse_policy(item)
        targets.append(EvalTarget(item, name, lvl))
    return targets


def _level_list(text: str) -> list[int]:
    try:
        chosen = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        chosen = []
    if not chosen:
        raise UsageError(f"--level {text!r}: give a bit-width (4), a list (2,4) or 'all'")
    return chosen


def session_logits_fn(session) -> LogitsFn:
    """A LogitsFn over a runtime `Session`'s model (offloaded experts, its policy's levels)."""
    return model_logits_fn(session.model)


def evaluate_target(
    checkpoint: Path | str,
    target: EvalTarget,
    token_ids: Sequence[int] | None,
    seq_len: int = 256,
    stride: int | None = None,
    memory_budget: int | None = None,
    reference: Path | str | None = None,
    tasks: Sequence[str] = (),
    tasks_dir: Path | str | None = None,
    limit: int | None = None,
    on_window: Callable[[int, int], None] | None = None,
    run_options: dict | None = None,
    scoring: str = "window",
) -> dict:
    """Perplexity (when token_ids are given) and zero-shot accuracy (when tasks are) of one target.

    run_options: more RunOptions fields (on_miss...); scoring "decode": one token per forward (miss_bench).

    Returns {"target", "policy", "level", "levels" (policy's level choice), "perplexity" (dict | None),
    "zero_shot" ({task: {metric: value}}), "tokens_per_level" ({bits: pairs}), "expert_bytes"
    (all experts at the target's level, or None), "seconds"}.
    """
    import time

    start = time.perf_counter()
    row: dict = {"target": target.label, "policy": target.policy, "level": target.level}
    if target.policy is None:
        model, tokenizer = _load_reference(reference, checkpoint)
        logits_fn, session = model_logits_fn(model), None
        row.update(levels="unquantized source (transformers)", expert_bytes=None)
    else:
        from d2moe.runtime.session import RunOptions, Session

        options = RunOptions(memory_budget=memory_budget or UNLIMITED_BUDGET, policy=target.policy,
                             level=target.level, max_tokens=max(seq_len, 2), **(run_options or {}))
        session = Session(checkpoint, options)
        logits_fn, tokenizer = session_logits_fn(session), session.tokenizer
        ckpt = session.ckpt
        row.update(levels=session.describe_levels(), expert_bytes=(
            len(ckpt.moe_layers) * ckpt.num_experts * ckpt.level_nbytes(target.level) if target.level else None))
        session.pipeline.reset_stats()
    try:
        from d2moe.apps.miss_bench import score_perplexity

        result = score_perplexity(session, logits_fn, token_ids, seq_len, stride, on_window, scoring)
        row["perplexity"] = result.to_dict() if result else None
        row["zero_shot"] = zero_shot(logits_fn, tokenizer, tasks, tasks_dir, limit, max_length=seq_len) if tasks else {}
        pairs = session.pipeline.stats.pairs_per_level if session is not None else {}
        row["tokens_per_level"] = {str(b): int(n) for b, n in sorted(pairs.items())}
        row["scoring"], row["misses"] = scoring, session._miss_report() if session is not None else None
    finally:
        if session is not None:
            session.close()
    row["seconds"] = time.perf_counter() - start
    return row


def unavailable_row(target: EvalTarget, reason: str, scoring: str = "window") -> dict:
    """The row of a target that could not run (e.g. it does not fit --memory-budget): evaluate_target's keys, its
    results empty, status "n/a" and the reason (eval's table and JSON keep one shape per row)."""
    return {"target": target.label, "policy": target.policy, "level": target.level, "levels": "n/a",
            "perplexity": None, "zero_shot": {}, "tokens_per_level": {}, "expert_bytes": None, "scoring": scoring,
            "misses": None, "seconds": 0.0, "status": "n/a", "reason": reason}


def mean_bits(tokens_per_level: dict[str, int]) -> float | None:
    """Average bit-width over the (token, expert) pairs a run computed."""
    total = sum(tokens_per_level.values())
    return sum(int(b) * n for b, n in tokens_per_level.items()) / total if total else None


def _load_reference(path: Path | str | None, packed: Path | str | None = None):
    """The unquantized source model in its own dtype (the 16-bit row: what the lossless tier computes) and its
    tokenizer, through transformers. A source that is not the one `packed` was made from (config.json and weight
    files differ from the fingerprint pack recorded) gets a note: its row compares other weights."""
    if path is None:
        raise UsageError("the reference target needs the source checkpoint: pass --reference SRC")
    path = Path(path)
    if (path / "d2moe.json").is_file():
        raise InputError(f"--reference {path} is a d2moe packed checkpoint: pass the Hugging Face checkpoint it was "
                         "packed from")
    if not (path / "config.json").is_file():
        raise InputError(f"--reference {path} is not a Hugging Face checkpoint directory (no config.json)")
    if packed is not None:
        from d2moe.progress import note
        from d2moe.quantize.convert.source import SourceCheckpoint
        from d2moe.quantize.format import open_checkpoint

        recorded = open_checkpoint(packed).manifest["source"]
        source = SourceCheckpoint(path)
        source.index_weights()  # the fingerprint names the weight files: pack's own steps
        if source.fingerprint() != recorded["sha256"]:
            note(f"--reference {path} is not the checkpoint {packed} was packed from ({recorded['path']}: config.json "
                 "or weight files differ): its row compares other weights")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto").eval()
    return model, AutoTokenizer.from_pretrained(str(path))
