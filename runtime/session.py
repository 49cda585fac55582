"""One object a CLI, bench or eval call builds to run a packed checkpoint under a memory budget.

`Session(checkpoint_path, RunOptions(...))`:
1-2. opens and validates the packed checkpoint, picks the policy and plans memory before loading
   anything (d2moe.runtime.run_plan: `RunOptions`, `plan_run`);
3. builds the model (meta skeleton, experts swapped for `OffloadedExperts`, dense weights assigned,
   rotary buffers rebuilt), the expert store, the cache, and the level selector (the trained gate
   when the checkpoint has one and the policy uses it);
4. registers what it holds with a `MemoryMeter` and samples it while it runs.

`session.generate(prompts, SamplingOptions)` tokenizes (chat template unless disabled), batches
with left padding, runs the decode loop and returns a `GenerationReport` with the texts and the
run's statistics (`report.stats` is what `--json` prints).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from d2moe.errors import BudgetError, InputError, UsageError
from d2moe.runtime.budget import text_config
from d2moe.runtime.prompts import encode_prompts, load_tokenizer
from d2moe.runtime.run_plan import RunOptions, dense_converter, plan_run, staging_slots

PREFILL_THREADS_MIN_HIDDEN = 1024  # hidden size from which the prompt's forward runs torch on every kernel thread

__all__ = ["GenerationReport", "RunOptions", "Session", "encode_prompts", "load_tokenizer", "plan_run"]


@dataclass
class GenerationReport:
    """Texts and statistics of one `Session.generate` call."""

    texts: list[str]
    token_ids: list[list[int]]
    stats: dict = field(default_factory=dict)


class Session:
    """A packed checkpoint, ready to generate under a memory budget (see the module docstring)."""

    def __init__(self, checkpoint: str | Path, options: RunOptions, tokenizer=None) -> None:
        from d2moe.kernels.attention import use_decode_attention
        from d2moe.kernels.cpu import threads as kernel_threads
        from d2moe.kernels.dense import patch_linears
        from d2moe.kernels.dispatch import ExpertKernels
        from d2moe.runtime.buffers import BufferPool
        from d2moe.runtime.cache import ExpertCache
        from d2moe.runtime.device import check_device, emulated
        from d2moe.runtime.experts import ExpertPipeline, OffloadedExperts
        from d2moe.runtime.memory import MemoryMeter, limit_allocator_overhead, nbytes_of
        from d2moe.runtime.model import assemble, expert_activation
        from d2moe.runtime.store import ExpertStore

        self.options = options
        check_device(options.device)  # one clear line when --device cuda cannot run here
        on_gpu = options.device == "cuda" and not emulated()  # emulated: the CUDA path's host code on CPU
        limit_allocator_overhead()  # before any of the run's threads allocate
        self.ckpt, self.adapter, self.spec, self.hold_level, skeleton, self.plan = plan_run(checkpoint, options)
        ckpt = self.ckpt

        # --- build ---
        if options.lossless:  # the exact tier: coded reads decoded on CPU threads, transformers' expert math
            from d2moe.runtime.lossless import LosslessKernels, LosslessStore

            threads = options.threads or kernel_threads()
            self.store = LosslessStore(ckpt, options.io_threads, options.io_bandwidth, options.direct_io, threads)
            self.pool = None
        else:  # dropped cache entries hand their mapped buffers to the next read, within the plan's staging
            self.pool = BufferPool(limit=self._staging_room) if options.device == "cpu" else None
            self.store = ExpertStore(ckpt, io_threads=options.io_threads, bandwidth=options.io_bandwidth,
                                     direct=options.direct_io, pool=self.pool)
        hf_config = skeleton.config
        if options.activations not in ("auto", "int8", "int16"):
            raise UsageError(f"--activations {options.activations!r} is unknown: use auto, int8 or int16")
        self.kernels = LosslessKernels(threads) if options.lossless else ExpertKernels(
            options.kernels, threads=options.threads or kernel_threads(),
            activation_bits=None if options.activations == "auto" else int(options.activations[3:]), device=options.device)
        if self.kernels.lib is None and options.device == "cpu":  # the torch reference computes: it gets the compute threads
            torch.set_num_threads(self.kernels.splitter.threads)
        if options.dense_weights != "source" and (self.kernels.lib is None or options.device != "cpu"):
            raise UsageError(f"--dense-weights {options.dense_weights} runs on the native kernels, which are unavailable "
                             "here (no C compiler, or --kernels reference): use --dense-weights source")
        import d2moe.runtime.generate  # noqa: F401  (code, like the kernels above, loads before the RSS baseline)

        # start-up ends here: the meter's RSS baseline excludes code (imports, the compiled kernels),
        # not data (dense weights, caches, buffers and activations all come after)
        self.meter = MemoryMeter()
        self.transfer = None
        if options.device == "cuda":
            from d2moe.runtime.device import DeviceTransfer, EmulatedTransfer

            self.transfer = (DeviceTransfer("cuda", staging_slots(options), self.plan.expert_bytes) if on_gpu
                             else EmulatedTransfer())
        # the model first (its routers and activation are the pipeline's), then the pipeline, whole
        experts_modules: list[OffloadedExperts] = []
        activations: list = []

        def make_experts(layer: int, original):
            activations.append(expert_activation(original))
            experts_modules.append(OffloadedExperts(layer))
            return experts_modules[-1]

        # --dense-weights int8/int4: each layer converted as it is read, so loading holds one source layer at most
        converter = dense_converter(ckpt, self.adapter, skeleton, options)
        self.model = assemble(ckpt, self.adapter, make_experts, model=skeleton, converter=converter)
        if converter is not None:
            from d2moe.progress import note

            for message in converter.notes():
                note(message)
        if on_gpu:
            self.model.to("cuda")
        routers = {layer: self.model.get_parameter(self.adapter.router_key(layer)) for layer in ckpt.moe_layers}
        if options.device == "cpu" and not options.lossless:  # lossless: torch's own dense layers, as transformers
            patch_linears(self.model, self.kernels.lib, self.kernels.splitter, weights=options.dense_weights,
                          keep=routers.values(), converted=converter.converted if converter is not None else None)
            use_decode_attention(self.model, self.kernels.lib, self.kernels.splitter)
            if converter is None:  # weights as stored: a plan from the file's header may count a little more
                self.plan = self.plan.with_dense(nbytes_of(self.model, set()))
            # converted while read: the plan already gave the cache what conversion saves, and keeps the room one
            # conversion took while loading (prefill tiles and the allocator use it: handed to the cache as well,
            # RSS went past the budget by up to 11 MiB at Mixtral shapes with another process on the CPU)
        self.cache = ExpertCache(self.plan.expert_cache, policy=options.cache_policy, decay=options.cache_decay)
        if self.pool is not None:
            self.cache.on_drop, self.cache.alloc = self.pool.recycle, self.pool.take
        self.gate = self._load_gate(routers)
        if on_gpu and self.gate is not None:
            self.gate.to("cuda")  # it reads the hidden states where they are
        from d2moe.runtime import miss

        self.pipeline = ExpertPipeline(
            ckpt, self.store, self.cache, selector=self._make_selector(), spec=self.spec,
            act_fn=activations[0] if activations else F.silu, window=options.io_threads,
            routers={layer: w.detach() for layer, w in routers.items()},
            top_k=int(getattr(hf_config, "num_experts_per_tok", 2)), on_memory=self._sample_memory,
            kernels=self.kernels, transfer=self.transfer,
            exact=options.lossless,  # transformers' order and dtypes (d2moe.runtime.lossless)
            miss=miss.handler(ckpt, options.miss),
            staging_limit=self.plan.staging,
        )
        for module in experts_modules:
            module.bind(self.pipeline)
        if options.device == "cpu":
            self._warm_up()
        self._kv_bytes = 0
        self.meter.register("dense", "model", [*self.model.parameters(), *self.model.buffers()], static=True)
        self.meter.register("kv", "cache", lambda: self._kv_bytes)
        self.meter.register("expert_cache", "cache", self.cache if hasattr(self.cache, "held_objects")
                            else (lambda: self.cache.held_bytes))
        self.meter.register("expert_cache", "landing", lambda: self.pipeline.landing_bytes)
        self.meter.register("staging", "reads", lambda: self.pipeline.staging_bytes)
        if self.pool is not None:
            self.meter.register("staging", "free buffers", lambda: self.pool.free_bytes)
        self.meter.register("workspace", "kernels", lambda: self.kernels.workspace_bytes)
        self.meter.sample()

        # --- hold-* baselines read everything up front ---
        t0 = time.perf_counter()
        if self.hold_level is not None:
            self.pipeline.hold_all(self.hold_level)
            self.meter.sample()
        elif self.spec.hold_if_fits and options.reuse_aware and self._all_fit():  # reuse-aware: the budget holds every expert at the top
            self.pipeline.hold_all(self.pipeline.top_level)
            self.meter.sample()
        self.setup_bytes_read = self.store.bytes_read
        self.setup_seconds = time.perf_counter() - t0
        self.store.reset_stats()
        self._tokenizer = tokenizer  # loaded from the checkpoint on first use when None

    # ---- parts -------------------------------------------------------------------------
    def _warm_up(self) -> None:
        """Run the model's own code once (a prompt long enough for its GEMM path, then a decode step)
        with the experts returning zeros, so the library code a forward pass maps is start-up, not
        growth: no expert is read, cached or counted."""
        from d2moe.runtime.generate import SamplingOptions, decode

        prompt = list(range(min(17, int(getattr(self.model.config, "vocab_size", 17)))))
        self.pipeline.warming = True
        try:
            with self.meter.startup_code():
                decode(self.model, [prompt], SamplingOptions(max_new_tokens=2, temperature=0.0), eos_ids=[],
                       pad_id=0, prefill_threads=self._prefill_threads())
        finally:
            self.pipeline.warming = False

    def _prefill_threads(self) -> int:
        """torch's threads for the prompt's forward: the kernels' where its GEMMs are wide enough to pay for
        them (Mixtral shapes: 540 tokens at 190 tok/s on 2 threads, 101 on 1), one below PREFILL_THREADS_MIN_HIDDEN:
        a small model's many short ops each wait at torch's barrier for a thread whose core another process has
        (the embedded model's 464-token prefill: 550-1500 tok/s on 2 threads with one core busy, 6200 on 1)."""
        hidden = text_config(self.ckpt.config).get("hidden_size") or 0
        return self.kernels.splitter.threads if hidden >= PREFILL_THREADS_MIN_HIDDEN else 1

    def _all_fit(self) -> bool:
        ckpt = self.ckpt
        return len(ckpt.moe_layers) * ckpt.num_experts * ckpt.level_nbytes(self.pipeline.top_level) <= self.plan.expert_cache


    def _load_gate(self, routers: dict):
        from d2moe.runtime.gate import load_gate, model_fingerprint, model_probe

        o = self.options
        if (self.ckpt.gate_path is None or not o.use_gate or self.spec.levels != "gate" or o.lossless
                or o.level is not None or o.router_levels is not None):
            return None
        routers = [routers[layer].detach() for layer in self.ckpt.moe_layers]
        self.ckpt.verify_file("gate")  # its crc32 against the manifest, before any of it is trusted
        gate = load_gate(self.ckpt.gate_path, expect_fingerprint=model_fingerprint(self.ckpt.config, routers),
                         expect_levels=self.ckpt.cfg.bits, expect_probe=model_probe(self.ckpt.config, routers))
        check_gate_capacity(gate.meta["capacity"], self.ckpt.gate_capacity, self.ckpt.gate_path)
        return gate

    def _make_selector(self):
        from d2moe.runtime.policies import make_level_selector

        o = self.options
        level = self.ckpt.level if o.lossless else o.level  # the exact tier: one level, the source's bits
        return make_level_selector(self.spec, self.ckpt.cfg.bits, self.ckpt.num_experts, level=level,
                                   router_levels=o.router_levels, gate=self.gate,
                                   calibration_tokens=o.calibration_tokens)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.ckpt.tokenizer_dir)
        return self._tokenizer

    def describe_levels(self) -> str:
        return self.pipeline.selector.describe()

    def _sample_memory(self) -> None:
        self.meter.sample()

    # ---- generation --------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], chat_template: bool = True) -> list[list[int]]:
        return encode_prompts(self.tokenizer, prompts, chat_template)

    def _tokenizer_or_none(self):
        try:
            return self.tokenizer
        except InputError:
            return None

    def eos_ids(self) -> list[int]:
        ids = set()
        for v in (self.ckpt.config.get("eos_token_id"), getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, (list, tuple)):
                ids.update(int(x) for x in v)
        return sorted(ids)

    def generate(
        self,
        prompts: Sequence[str] | None = None,
        sampling=None,
        chat_template: bool = True,
        token_ids: Sequence[Sequence[int]] | None = None,
        on_text: Callable[[int, str], None] | None = None,
    ) -> GenerationReport:
        """Generate for `prompts` (or pre-tokenized `token_ids`) as one left-padded batch."""
        from d2moe.runtime.generate import SamplingOptions, context_length, decode, within_context

        sampling = sampling or SamplingOptions()
        batch = [list(t) for t in token_ids] if token_ids is not None else self.encode(prompts or [], chat_template)
        if not batch:
            raise UsageError("no prompts to generate for: give --prompt or --prompts-file")
        longest = max(len(t) for t in batch)
        allowed, message = within_context(longest, sampling.max_new_tokens, context_length(self.ckpt.config))
        if message:
            from dataclasses import replace

            from d2moe.progress import note

            note(message)
            sampling = replace(sampling, max_new_tokens=allowed)
        need = len(batch) * (longest + sampling.max_new_tokens)
        if need > self.options.max_tokens:
            raise BudgetError(f"this request needs {need} KV-cache tokens but the memory plan reserved "
                              f"{self.options.max_tokens}: raise max_tokens or shorten the prompts/--max-new-tokens")
        tok = self.tokenizer if token_ids is None else self._tokenizer_or_none()
        pad_id = getattr(tok, "pad_token_id", None) if tok is not None else None
        eos = self.eos_ids() if tok is not None else [int(x) for x in _as_list(self.ckpt.config.get("eos_token_id"))]
        pad_id = pad_id if pad_id is not None else (eos[0] if eos else 0)

        self.store.reset_stats()
        self.cache.reset_stats()
        self.pipeline.reset_stats()
        if self.pipeline.miss is not None:
            self.pipeline.miss.reset_stats()
        streamed = [""] * len(batch)
        sofar: list[list[int]] = [[] for _ in batch]

        def on_tokens(tokens: torch.Tensor, alive: torch.Tensor) -> None:
            if on_text is None or tok is None:
                return
            for row in range(len(batch)):
                if alive[row]:
                    sofar[row].append(int(tokens[row]))
                    text = tok.decode(sofar[row], skip_special_tokens=True)
                    if text.startswith(streamed[row]) and len(text) > len(streamed[row]):
                        on_text(row, text[len(streamed[row]):])
                        streamed[row] = text

        def on_step(kv_bytes: int) -> None:
            self._kv_bytes = kv_bytes
            self.meter.sample()

        chunk = self.options.forward_tokens // len(batch) if self.options.forward_tokens else None
        if chunk == 0:
            raise BudgetError(f"a batch of {len(batch)} prompts needs forward_tokens >= {len(batch)} (the plan has "
                              f"{self.options.forward_tokens}): run fewer prompts at once")
        result = decode(self.model, batch, sampling, eos, pad_id, on_tokens=on_tokens, on_step=on_step,
                        prefill_threads=self._prefill_threads(), prefill_chunk=chunk)
        self.pipeline.drain()
        self._kv_bytes = 0
        texts = [tok.decode(t, skip_special_tokens=True) for t in result.new_tokens] if tok is not None else []
        return GenerationReport(texts, result.new_tokens, self._stats(result))

    def _stats(self, result) -> dict:
        cache = self.cache.totals()
        io = self.store.stats()
        pipe = self.pipeline.stats
        decode_tokens = max(0, result.generated - len(result.new_tokens))
        memory = self.meter.report()
        return {
            "policy": self.spec.name,
            "levels": self.describe_levels(),
            "schedule": self.spec.order,
            "requests": len(result.new_tokens),
            "prompt_tokens": result.prompt_tokens,
            "generated_tokens": result.generated,
            "prefill_s": result.prefill_s,
            "prefill_tokens_per_s": result.prompt_tokens / result.prefill_s if result.prefill_s > 0 else 0.0,
            "decode_s": result.decode_s,
            # None: no decode step ran (one new token is the prefill's), not an infinitely slow one
            "decode_tokens_per_s": decode_tokens / result.decode_s if decode_tokens and result.decode_s > 0 else None,
            "time_to_first_token_s": result.ttft_s,
            "cache": {"hit_rate": cache.hit_rate, "hits": cache.hits, "misses": cache.misses,
                      "upgrades": cache.upgrades, "evictions": cache.evictions, "demotions": cache.demotions,
                      "rejected": cache.rejected, "capacity_bytes": self.cache.capacity_bytes,
                      "per_layer": {str(k): {"hit_rate": v.hit_rate, "hits": v.hits, "misses": v.misses,
                                             "upgrades": v.upgrades, "evictions": v.evictions}
                                    for k, v in self.cache.stats().items()}},
            "bytes_read": io.bytes_read,
            "bytes_read_per_token": io.bytes_read / result.generated if result.generated else 0.0,
            "reads": io.reads,
            "upgrade_reads": pipe.upgrade_loads,
            "preloads": pipe.preloads,
            "fetch_ahead_reads": pipe.fetch_ahead,
            "staged_reads": pipe.staged_loads,  # reads the cache could not reserve room for (through staging)
            "dropped_reads": pipe.dropped,  # of which computed and dropped (the cache full of pinned work)
            "misses": self._miss_report(),
            "lossless": ({"codec": self.ckpt.section["codec"], "dtype": self.ckpt.dtype_name,
                          "decode_s": self.store.decode_seconds, "raw_bytes_per_expert": self.ckpt.raw_nbytes}
                         if self.options.lossless else None),
            "setup_bytes_read": self.setup_bytes_read,
            "tokens_per_level": {str(k): v for k, v in sorted(pipe.pairs_per_level.items())},
            "schedule_efficiency": pipe.schedule_efficiency,
            "expert_step_s": pipe.makespan_s,
            "expert_load_s": pipe.load_s,
            "expert_compute_s": pipe.compute_s,
            "expert_layer_steps": pipe.steps,
            # per MoE layer step, what is neither expert compute nor waiting on a read: routing, grouping,
            # cache bookkeeping, ordering, summing (with everything resident, all of step - compute)
            "step_overhead_us": (1e6 * max(0.0, pipe.makespan_s - pipe.compute_s - pipe.load_wait_s) / pipe.steps
                                 if pipe.steps else 0.0),
            "kernels": self.kernels.name,
            "device": self.options.device,
            **self._device_stats(),
            "kernel_threads": self.kernels.splitter.threads,
            "memory": {"budget_bytes": self.options.memory_budget, "peak_bytes": memory["peak_bytes"],
                       "peak_by_category": memory["peak_by_category"], "plan": self.plan.summary(),
                       "rss_peak_delta_bytes": memory["rss_peak_delta_bytes"]},
        }

    def _miss_report(self) -> dict:
        from d2moe.runtime import miss

        return miss.report(self.pipeline, self.options.miss)

    def _device_stats(self) -> dict:
        """--device cuda: what went through staging and what the device really allocated."""
        if self.transfer is None:
            return {}
        out = {"device_bytes_copied": self.transfer.bytes_copied, "pinned_staging_bytes": self.transfer.host_bytes}
        if self.transfer.device.type == "cuda":
            out["cuda_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(self.transfer.device))
            out["staging_waits"] = self.transfer.ring.waits
        return out

    def _staging_room(self) -> int:
        """Staging bytes the plan leaves for free read buffers: its staging less the reads in flight."""
        pipeline = getattr(self, "pipeline", None)
        return self.plan.staging - (pipeline.staging_bytes if pipeline is not None else 0)

    def close(self) -> None:
        """Stop the I/O and kernel threads and let go of the held memory now: the session's parts refer to one
        another (callbacks, bound methods), so without this a closed session's cache and model would wait for
        the garbage collector's next pass, and a bench sweep making a session per run held several at once."""
        self.pipeline.drain()
        self.store.close()
        self.kernels.close()
        self.cache.clear()
        if self.pool is not None:
            self.pool.clear()
        self.model = None  # its modules hold the pipeline, the pipeline callbacks into this session: a cycle
        gc.collect()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_gate_capacity(in_file, in_manifest, path: Path) -> None:
    """The gate file's capacities are the ones the manifest declares (FormatError otherwise)."""
    from d2moe.errors import FormatError

    if in_manifest is None or len(in_file) != len(in_manifest) or any(
            abs(float(a) - float(b)) > 1e-6 for a, b in zip(in_file, in_manifest, strict=False)):
        raise FormatError(f"{path.name}: capacity {list(in_file)} differs from d2moe.json's {in_manifest} "
                          "(edited manifest or mixed-up gate: re-pack with the gate)")


def _as_list(v) -> list:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]
