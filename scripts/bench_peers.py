"""Benchmark what a user would run instead of d2moe, on one Hugging Face MoE checkpoint.

Rows (each run is a fresh process, measured the same way for every system: peak RSS from wait4,
which counts mmap'd weight pages the process touched, and peak anonymous RSS sampled from /proc,
which does not):
- `transformers-bf16`: `AutoModelForCausalLM.from_pretrained(dtype=bfloat16)`, all in RAM;
- `accelerate-offload-<budget>`: the same with `device_map="auto", max_memory={"cpu": budget},
  offload_folder=...` (what transformers does when the model does not fit; `--offload-budget`,
  a size or a percentage of the bf16 checkpoint, repeatable);
- `llama.cpp-<type>`: the checkpoint converted once to an f16 GGUF with llama.cpp's
  `convert_hf_to_gguf.py`, quantized with `llama-quantize` (cached in --gguf-dir), measured with
  `llama-bench -p P -n N -t T -r 1 -o json` (pp: P random tokens; tg: N tokens from an empty context);
  skipped with a note when --llama-bin has no binaries;
- d2moe rows, one per `--d2moe SPEC` on the packed checkpoint `--packed`: `d2moe run --json` twice
  (decode: the short prompt then N new tokens; prefill: the P-token prompt), figures from its stats.
  SPEC is comma-separated key=value: name (row label), budget (a size like 6GiB, or a percentage
  resolved like `d2moe bench --budgets`: dense + KV + staging + p x the 4-bit expert set), and
  optional level, policy, io (--io-bandwidth, e.g. 2GB/s), io_threads, router_levels (e.g. 4:2), dense
  (--dense-weights source|int8|int4), on_miss (--on-miss, e.g. reuse), threads=default (run without
  --threads: d2moe's own choice), cmd (this row's d2moe command instead of --d2moe-cmd: two builds side
  by side in one run).

Measures: prefill tok/s (a P-token prompt, default 128), decode tok/s (greedy, N new tokens after a
short prompt, KV cache on), peak RSS. transformers decodes exactly like d2moe: N - 1 timed steps
after the token the prefill produced. Repeats are interleaved across systems and thread counts
(`--repeats R`, medians reported). Results go to `--out` (JSON) and a markdown table (stdout, and
`--markdown FILE`) with ratios to `--baseline` at the same thread count.

`--repeats 0` only prepares the GGUFs (convert + quantize) and prints the empty table.

Page cache: offloaded/packed weights read from disk may be served from the page cache when RAM
is free; pass --drop-caches (root) to drop it before every run for cold-disk figures. The device a
user has is smaller than this host: `--device-ram SIZE` runs every transformers/accelerate and d2moe
process in a memory cgroup of SIZE whose limit counts the page cache (bench_proc.MemoryCage), with its
weights evicted from the page cache first, so a tool that re-reads offloaded or mmap'd weights reads
them from the disk as it would there (the "RAM + page cache" column is the cgroup's peak charge).

Usage:
    python scripts/bench_peers.py /work/scale/olmoe --threads 1,2 --repeats 3 \\
        --llama-bin ~/llama.cpp/build/bin --llama-src ~/llama.cpp --gguf-dir /work/scale/gguf \\
        --offload-budget 50% --out results.json --markdown results.md
    python scripts/bench_peers.py d2moe_cli/assets/tiny-mixtral --packed /tmp/tinypack \\
        --systems transformers,d2moe --d2moe "name=level4-all,budget=100%,level=4" \\
        --d2moe "name=d2moe-50pct,budget=50%,io=2GB/s" --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = "d2moe.bench_peers/1"
ROOT = Path(__file__).resolve().parents[1]
PROMPT_SOURCE = ROOT / "d2moe_cli" / "assets" / "text" / "grimm_tales.heldout.txt"
FALLBACK_TEXT = ("Once upon a time there lived a king who had three daughters, and the youngest was so "
                 "beautiful that the sun itself, which has seen so much, was astonished whenever it shone "
                 "on her face. Close by the king's castle lay a great dark forest. ")
SYSTEMS = ("transformers", "offload", "llama", "d2moe")
MEASURES = ("prefill_tok_s", "decode_tok_s", "peak_rss_bytes", "peak_anon_bytes", "d2moe_peak_bytes", "load_s",
            "cage_peak_bytes")


from bench_proc import _tail, last_json, run_measured  # noqa: E402  (same folder)


def hf_child(spec: dict) -> None:
    """In a fresh process: load, prefill the long prompt, decode after the short one; print JSON."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    kwargs: dict = {"dtype": torch.bfloat16}
    if spec.get("offload_bytes"):
        kwargs.update(device_map="auto", max_memory={"cpu": spec["offload_bytes"]},
                      offload_folder=spec["offload_folder"])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["checkpoint"], **kwargs).eval()
    load_s = time.perf_counter() - t0
    placement = sorted({str(v) for v in (getattr(model, "hf_device_map", None) or {"": "cpu"}).values()})
    long_ids = torch.tensor([spec["prefill_ids"]])
    short_ids = torch.tensor([spec["decode_ids"]])
    with torch.inference_mode():
        model(short_ids[:, :4], use_cache=True)  # warm-up: first-call allocations, lazy inits
        t0 = time.perf_counter()
        model(long_ids, use_cache=True)
        prefill_s = time.perf_counter() - t0
        out = model(short_ids, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        steps = spec["new_tokens"] - 1
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        decode_s = time.perf_counter() - t0
    print(json.dumps({"prefill_tok_s": long_ids.shape[1] / prefill_s, "decode_tok_s": steps / decode_s,
                      "load_s": load_s, "prompt_tokens": long_ids.shape[1], "placement": placement}))


# ----------------------------------------------------------------------------- systems


@dataclass
class System:
    """One row: how to measure it at a thread count."""

    name: str
    kind: str  # transformers | offload | llama | d2moe
    params: dict = field(default_factory=dict)
    model_bytes: int | None = None  # its weights on disk
    skipped: str | None = None


class Bench:
    def __init__(self, args, prompts: dict):
        self.args = args
        self.prompts = prompts

    def run(self, system: System, threads: int) -> dict:
        fn = getattr(self, f"_run_{system.kind}")
        return fn(system, threads)

    def _run_transformers(self, system: System, threads: int) -> dict:
        spec = {"checkpoint": str(self.args.checkpoint), "threads": threads, "new_tokens": self.args.new_tokens,
                "prefill_ids": self.prompts["prefill_ids"], "decode_ids": self.prompts["decode_ids"], **system.params}
        folder = None
        if spec.get("offload_bytes"):
            folder = tempfile.mkdtemp(prefix="offload-", dir=self.args.offload_dir)
            spec["offload_folder"] = folder
        try:
            p = run_measured([sys.executable, __file__, "--hf-child", json.dumps(spec)], self.args.timeout,
                             drop_caches=self.args.drop_caches, **self._device(self.args.checkpoint))
        finally:
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
        self._check(p)
        return {**last_json(p.stdout), "peak_rss_bytes": p.peak_rss_bytes,
                "peak_anon_bytes": p.peak_anon_bytes, "wall_s": p.wall_s, "cage_peak_bytes": p.cage_peak_bytes}

    def _device(self, weights: Path) -> dict:
        """--device-ram: run caged at that RAM (page cache included), `weights` evicted from the page cache."""
        return {"ram": self.args.device_ram, "evict": [weights]} if self.args.device_ram else {}

    def _check(self, p, phase: str = "") -> None:
        """RuntimeError naming why a run failed (the device cage's OOM killer, or its exit and stderr)."""
        if p.rc == 0:
            return
        if p.oom_killed:
            raise RuntimeError(f"{phase}killed: out of memory in {self.args.device_ram / 2**30:.2f} GiB of device RAM")
        raise RuntimeError(f"{phase}exit {p.rc}: {_tail(p.stderr)}")

    _run_offload = _run_transformers

    def _run_llama(self, system: System, threads: int) -> dict:
        a = self.args
        cmd = [str(a.llama_bin / "llama-bench"), "-m", str(system.params["gguf"]), "-p", str(a.prompt_tokens),
               "-n", str(a.new_tokens), "-t", str(threads), "-r", "1", "-o", "json"]
        p = run_measured(cmd, a.timeout, drop_caches=a.drop_caches)
        self._check(p)
        tests = last_json(p.stdout)
        pp = [t["avg_ts"] for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0]
        tg = [t["avg_ts"] for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0]
        return {"prefill_tok_s": pp[0] if pp else None, "decode_tok_s": tg[0] if tg else None,
                "prompt_tokens": a.prompt_tokens, "peak_rss_bytes": p.peak_rss_bytes,
                "peak_anon_bytes": p.peak_anon_bytes, "wall_s": p.wall_s}

    def _run_d2moe(self, system: System, threads: int) -> dict:
        a, s = self.args, system.params
        base = [*(shlex.split(s["cmd"]) if "cmd" in s else a.d2moe_cmd), "run", str(s.get("packed", a.packed)), "--memory-budget", str(s["budget_bytes"]), "--json",
                "--no-chat-template"]
        if s.get("threads") != "default":  # threads=default: d2moe's own choice (no --threads)
            base += ["--threads", str(threads)]
        for key, flag in (("level", "--level"), ("policy", "--policy"), ("io", "--io-bandwidth"),
                          ("io_threads", "--io-threads"), ("router_levels", "--router-levels"),
                          ("dense", "--dense-weights"), ("on_miss", "--on-miss")):
            if key in s:  # router_levels=4:2 (a comma would end the key=value pair)
                base += [flag, str(s[key]).replace(":", ",")]
        if "io" in s and not a.drop_caches and not a.device_ram:  # an emulated disk reads through the page
            _warm_page_cache(a.packed)  # cache: warm it, so the pacer, not this host's disk, sets the read rate
        stats, rss, anon, wall, cage = {}, 0, 0, 0.0, None
        for phase, prompt, new in (("decode", self.prompts["decode_text"], a.new_tokens),
                                   ("prefill", self.prompts["prefill_text"], 1)):
            p = run_measured([*base, "--prompt", prompt, "--max-new-tokens", str(new)], a.timeout,
                             drop_caches=a.drop_caches, **self._device(a.packed))
            self._check(p, f"{phase} run ")
            stats[phase] = last_json(p.stdout)["stats"]
            rss, anon, wall = max(rss, p.peak_rss_bytes), max(anon, p.peak_anon_bytes), wall + p.wall_s
            cage = max(cage or 0, p.cage_peak_bytes or 0) or None
        dec, pre = stats["decode"], stats["prefill"]
        return {"prefill_tok_s": pre["prefill_tokens_per_s"], "decode_tok_s": dec["decode_tokens_per_s"],
                "prompt_tokens": pre["prompt_tokens"], "generated_tokens": dec["generated_tokens"],
                "peak_rss_bytes": rss, "peak_anon_bytes": anon, "wall_s": wall, "cage_peak_bytes": cage,
                "d2moe_peak_bytes": max(dec["memory"]["peak_bytes"], pre["memory"]["peak_bytes"]),
                "bytes_read_per_token": dec.get("bytes_read_per_token"), "hit_rate": dec["cache"]["hit_rate"],
                "levels": dec.get("levels")}


# ----------------------------------------------------------------------------- setup


def _warm_page_cache(folder: Path) -> None:
    """Read every file of `folder` once (the page cache keeps them while memory allows)."""
    for f in sorted(folder.iterdir()):
        if f.is_file():
            with open(f, "rb", buffering=0) as fh:
                while fh.read(64 << 20):
                    pass


def build_prompts(checkpoint: Path, prompt_tokens: int, short_tokens: int, source: Path | None) -> dict:
    """Texts whose encodings are exactly the token ids every system is given (as `d2moe run` encodes)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    tok.model_max_length = 10**9  # the source text is long; only its first tokens are used
    text = source.read_text(encoding="utf-8") if source and source.is_file() else FALLBACK_TEXT
    text = " ".join(text.split())
    while len(tok(text, add_special_tokens=False)["input_ids"]) < prompt_tokens + short_tokens + 8:
        text = text + " " + text
    body = tok(text, add_special_tokens=False)["input_ids"]
    out = {}
    for name, n in (("prefill", prompt_tokens), ("decode", short_tokens)):
        ids = body[:n]
        for _ in range(8):  # decode/encode round trips may merge tokens: adjust until the count is exact
            candidate = tok.decode(ids).strip()
            got = tok(candidate)["input_ids"]
            if len(got) == n:
                break
            ids = body[:len(ids) + (n - len(got))]
        out[f"{name}_text"], out[f"{name}_ids"] = candidate, list(got)
    return out


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


def _fresh(path: Path, source_mtime: float) -> bool:
    return path.exists() and path.stat().st_mtime >= source_mtime


def prepare_gguf(args, kind: str) -> Path:
    """The checkpoint as a GGUF of `kind` (F16 or a llama-quantize type), made once and cached in
    --gguf-dir as <checkpoint folder name>-<kind>.gguf; remade when older than what it comes from."""
    stem = args.checkpoint.resolve().name
    f16 = args.gguf_dir / f"{stem}-F16.gguf"
    newest = max(p.stat().st_mtime for p in args.checkpoint.glob("*.safetensors"))
    if not _fresh(f16, newest):
        if args.llama_src is None:
            raise RuntimeError(f"{f16} is missing or stale: pass --llama-src (convert_hf_to_gguf.py) to make it")
        convert = args.llama_src / "convert_hf_to_gguf.py"
        print(f"converting {args.checkpoint} -> {f16}", file=sys.stderr, flush=True)
        tmp = f16.with_suffix(".partial")
        p = subprocess.run([sys.executable, str(convert), str(args.checkpoint), "--outtype", "f16",
                            "--outfile", str(tmp)], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"convert_hf_to_gguf failed: {_tail(p.stderr, 1500)}")
        tmp.rename(f16)
    if kind.upper() == "F16":
        return f16
    out = args.gguf_dir / f"{stem}-{kind}.gguf"
    if not _fresh(out, f16.stat().st_mtime):
        print(f"quantizing {f16.name} -> {out.name}", file=sys.stderr, flush=True)
        tmp = out.with_suffix(".partial")
        p = subprocess.run([str(args.llama_bin / "llama-quantize"), str(f16), str(tmp), kind,
                            str(max(args.threads))], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"llama-quantize {kind} failed: {_tail(p.stderr, 1500)}")
        tmp.rename(out)
    return out


def parse_d2moe_spec(text: str) -> dict:
    try:
        spec = dict(item.split("=", 1) for item in text.split(",") if item.strip())
    except ValueError:
        sys.exit(f"--d2moe {text!r}: write key=value pairs, e.g. name=d2moe-50pct,budget=50%,io=2GB/s")
    unknown = set(spec) - {"name", "budget", "level", "policy", "io", "io_threads", "router_levels", "dense", "threads",
                           "cmd", "packed", "on_miss"}
    if unknown or "budget" not in spec:
        sys.exit(f"--d2moe {text!r}: needs budget=...; keys: name, budget, level, policy, io, io_threads, "
                 f"router_levels, dense (source|int8|int4), threads (default: omit --threads), cmd (this row's d2moe "
                 f"command, e.g. another build's), packed (this row's checkpoint instead of --packed, e.g. another "
                 f"scheme's), on_miss (--on-miss) (unknown: {sorted(unknown)})")
    spec.setdefault("name", f"d2moe-{spec['budget']}")
    return spec


def resolve_d2moe_budget(packed: Path, budget: str, max_tokens: int, io_threads: int,
                         forward_tokens: int | None = None) -> int:
    """Bytes for a d2moe budget: a size as is, a percentage as `d2moe bench --budgets` reads it, with the fixed
    part `d2moe run` plans (its workspace holds one forward of `forward_tokens`: the longer prompt's prefill)."""
    if not budget.endswith("%"):
        from d2moe.runtime.units import parse_size

        return parse_size(budget, "budget")
    from d2moe.apps.benchmark import budget_basis, parse_budgets

    fixed, expert_set, _ = budget_basis(packed, max_tokens=max_tokens, io_threads=io_threads,
                                        forward_tokens=forward_tokens)
    return parse_budgets(budget, fixed, expert_set)[0].bytes


def make_systems(args, prompts: dict) -> list[System]:
    from d2moe.runtime.units import parse_size

    hf_bytes = dir_bytes(args.checkpoint, "*.safetensors")
    systems: list[System] = []
    if "transformers" in args.systems:
        systems.append(System("transformers-bf16", "transformers", model_bytes=hf_bytes))
    if "offload" in args.systems:
        for budget in args.offload_budget:
            nbytes = int(hf_bytes * float(budget[:-1]) / 100) if budget.endswith("%") else parse_size(budget)
            systems.append(System(f"accelerate-offload-{budget}", "offload", {"offload_bytes": nbytes},
                                  model_bytes=hf_bytes))
    if "llama" in args.systems:
        for kind in args.llama_types:
            s = System(f"llama.cpp-{kind}", "llama")
            missing = [b for b in ("llama-bench", "llama-quantize")
                       if args.llama_bin is None or not (args.llama_bin / b).is_file()]
            if missing or args.gguf_dir is None:
                s.skipped = f"no {', '.join(missing)} in --llama-bin" if missing else "needs --gguf-dir"
            else:
                args.gguf_dir.mkdir(parents=True, exist_ok=True)
                try:
                    s.params["gguf"] = prepare_gguf(args, kind)
                    s.model_bytes = s.params["gguf"].stat().st_size
                except RuntimeError as exc:
                    s.skipped = str(exc)
            systems.append(s)
    if "d2moe" in args.systems:
        from d2moe.runtime.generate import forward_tokens

        max_tokens = max(len(prompts["prefill_ids"]) + 1, len(prompts["decode_ids"]) + args.new_tokens)
        forward = forward_tokens([max(len(prompts["prefill_ids"]), len(prompts["decode_ids"]))])  # as `run` plans
        for text in args.d2moe:
            spec = parse_d2moe_spec(text)
            s = System(spec["name"], "d2moe", spec)
            packed = Path(spec["packed"]) if "packed" in spec else args.packed
            if packed is None:
                s.skipped = "needs --packed (a `d2moe pack` output of this checkpoint)"
            else:
                spec["budget_bytes"] = resolve_d2moe_budget(packed, spec["budget"], max_tokens, int(spec.get("io_threads", 4)),
                                                           forward)
                s.model_bytes = dir_bytes(packed)
            systems.append(s)
    return systems


# ----------------------------------------------------------------------------- report


def median_of(runs: list[dict], key: str):
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def markdown(rows: list[dict], baseline: str, header: str) -> str:
    base = {r["threads"]: r for r in rows if r["system"] == baseline and r.get("median")}

    def fmt(v, unit=""):
        if v is None:
            return "-"
        if unit != "B":
            return f"{v:.2f}"
        return f"{v / 2**30:.2f} GiB" if v >= 2**30 else f"{v / 2**20:.1f} MiB"

    def ratio(r, key):
        b = base.get(r["threads"])
        if not b or not r.get("median") or not r["median"].get(key) or not b["median"].get(key):
            return "-"
        return f"{r['median'][key] / b['median'][key]:.2f}×"

    lines = [header, "",
             f"| system | threads | prefill tok/s | decode tok/s | peak RSS | peak anon | RAM + page cache | "
             f"weights on disk | prefill × {baseline} | decode × {baseline} | note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        m = r.get("median") or {}
        note = (r.get("skipped") or r.get("error") or "").strip().splitlines()
        note = note[-1].replace("|", "/")[:160] if note else ""
        lines.append(f"| {r['system']} | {r['threads']} | {fmt(m.get('prefill_tok_s'))} | "
                     f"{fmt(m.get('decode_tok_s'))} | {fmt(m.get('peak_rss_bytes'), 'B')} | "
                     f"{fmt(m.get('peak_anon_bytes'), 'B')} | {fmt(m.get('cage_peak_bytes'), 'B')} | "
                     f"{fmt(r.get('model_bytes'), 'B')} | {ratio(r, 'prefill_tok_s')} | "
                     f"{ratio(r, 'decode_tok_s')} | {note} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="Hugging Face checkpoint directory")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"subset of {','.join(SYSTEMS)}")
    p.add_argument("--prompt-tokens", type=int, default=128, help="P: prefill prompt length")
    p.add_argument("--short-prompt-tokens", type=int, default=8, help="prompt before the decoded tokens")
    p.add_argument("--new-tokens", type=int, default=32, help="N: tokens decoded (greedy)")
    p.add_argument("--threads", default="1", help="comma list of thread counts, e.g. 1,2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-file", type=Path, default=PROMPT_SOURCE, help="text the prompts are cut from")
    p.add_argument("--offload-budget", action="append", default=None,
                   help="accelerate CPU budget: a size (4GiB) or a percentage of the bf16 checkpoint; repeatable "
                        "(default 50%%)")
    p.add_argument("--offload-dir", type=Path, default=None, help="where offload folders go (default: tmp)")
    p.add_argument("--llama-bin", type=Path, default=None, help="directory with llama-bench and llama-quantize")
    p.add_argument("--llama-src", type=Path, default=os.environ.get("LLAMA_CPP_SRC"),
                   help="llama.cpp source (convert_hf_to_gguf.py); env LLAMA_CPP_SRC")
    p.add_argument("--gguf-dir", type=Path, default=None, help="GGUF cache (converted/quantized once)")
    p.add_argument("--llama-types", default="F16,Q4_0,Q2_K", help="GGUF types benchmarked")
    p.add_argument("--packed", type=Path, default=None, help="`d2moe pack` output of CHECKPOINT for d2moe rows")
    p.add_argument("--d2moe", action="append", default=[], metavar="SPEC",
                   help="a d2moe row: name=...,budget=50%%|6GiB[,level=4][,policy=...][,io=2GB/s]; repeatable")
    p.add_argument("--d2moe-cmd", default=None,
                   help="d2moe command line, e.g. 'python -m d2moe' (default: the d2moe beside this python, else PATH)")
    p.add_argument("--baseline", default="transformers-bf16", help="row the ratios are relative to")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run before it is killed")
    p.add_argument("--drop-caches", action="store_true", help="drop the page cache before each run (root)")
    p.add_argument("--device-ram", default=None, metavar="SIZE",
                   help="run every system as on a device with SIZE of RAM: a memory cgroup whose limit counts the "
                        "page cache, weights evicted from the page cache first (mmap'd or offloaded weights then "
                        "come from the disk); llama.cpp rows are not caged")
    p.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if bad := set(args.systems) - set(SYSTEMS):
        p.error(f"--systems: unknown {sorted(bad)}; choose from {','.join(SYSTEMS)}")
    args.threads = [int(t) for t in args.threads.split(",")]
    args.llama_types = [t.strip() for t in args.llama_types.split(",") if t.strip()]
    args.offload_budget = args.offload_budget or ["50%"]
    if args.device_ram is not None:
        from d2moe.runtime.units import parse_size

        args.device_ram = parse_size(args.device_ram, "--device-ram")
    if args.llama_src is not None:
        args.llama_src = Path(args.llama_src).expanduser()
    cmd = args.d2moe_cmd or (str(Path(sys.executable).parent / "d2moe")
                             if (Path(sys.executable).parent / "d2moe").exists() else shutil.which("d2moe"))
    args.d2moe_cmd = shlex.split(cmd) if cmd else ["d2moe"]
    if "d2moe" in args.systems and not args.d2moe:
        args.systems.remove("d2moe")
    return args


def main(argv=None) -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--hf-child":
        hf_child(json.loads(sys.argv[2]))
        return
    args = parse_args(argv)
    prompts = build_prompts(args.checkpoint, args.prompt_tokens, args.short_prompt_tokens, args.prompt_file)
    systems = make_systems(args, prompts)
    bench = Bench(args, prompts)
    runs: dict[tuple[str, int], list[dict]] = {}
    errors: dict[tuple[str, int], str] = {}
    for rep in range(args.repeats):  # interleaved: every system once per repeat, in turn
        for threads in args.threads:
            for s in systems:
                key = (s.name, threads)
                if s.skipped or key in errors:
                    continue
                try:
                    r = bench.run(s, threads)
                except (RuntimeError, ValueError, KeyError, OSError) as exc:
                    errors[key] = f"{type(exc).__name__}: {exc}"
                    print(f"[{rep + 1}/{args.repeats}] {s.name} t={threads}: FAILED {errors[key]}",
                          file=sys.stderr, flush=True)
                    continue
                runs.setdefault(key, []).append(r)
                print(f"[{rep + 1}/{args.repeats}] {s.name} t={threads}: prefill {r['prefill_tok_s'] or 0:.2f} "
                      f"decode {r['decode_tok_s'] or 0:.2f} tok/s, peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB",
                      file=sys.stderr, flush=True)
    rows = []
    for threads in args.threads:
        for s in systems:
            rs = runs.get((s.name, threads), [])
            rows.append({
                "system": s.name, "kind": s.kind, "threads": threads, "model_bytes": s.model_bytes,
                "params": {k: str(v) for k, v in s.params.items()}, "skipped": s.skipped,
                "error": errors.get((s.name, threads)),
                "median": {k: median_of(rs, k) for k in MEASURES} if rs else None,
                "runs": rs,
            })
    settings = {"checkpoint": str(args.checkpoint), "packed": str(args.packed) if args.packed else None,
                "prompt_tokens": len(prompts["prefill_ids"]), "short_prompt_tokens": len(prompts["decode_ids"]),
                "new_tokens": args.new_tokens, "repeats": args.repeats, "threads": args.threads,
                "baseline": args.baseline, "drop_caches": args.drop_caches, "device_ram": args.device_ram}
    machine = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
               "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
    result = {"schema": SCHEMA, "settings": settings, "machine": machine, "rows": rows}
    header = (f"### {args.checkpoint.name}: prefill {settings['prompt_tokens']} tokens, decode {args.new_tokens} "
              f"tokens after {settings['short_prompt_tokens']}, median of {args.repeats}"
              + (f", on {args.device_ram / 2**30:.2f} GiB of device RAM (page cache included)" if args.device_ram else ""))
    table = markdown(rows, args.baseline, header)
    print(table)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
