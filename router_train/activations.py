"""Per-expert input statistics for calibration-aware packing (`d2moe pack --calib`), imatrix-style.

The source model runs over calibration text one decoder layer at a time (GPTQ's "catcher"): the
embeddings run once, the first layer's inputs are caught, then each layer is given its dense weights,
run over the calibration sequences CHUNK_TOKENS at a time (attention and the experts' intermediates stay that
size, whatever --calib-tokens asks), and dropped. Its experts module is replaced by one that
reads each expert's matrices from the source on demand (one expert in memory at a time), computes
the exact output, and accumulates, per expert, the mean square of every input column of
`gate`/`up` (the routed hidden states) and of `down` (act(gate x) * up x), keeps up to SAMPLE_TOKENS of
those inputs (evenly spaced over all of the layer's calls, chosen after its last), and sums their second
moment x x^T (whole, or its diagonal blocks where the layer's experts' whole moments would pass HESSIAN_BYTES)
for GPTQ's codes (d2moe.quantize.calib and .gptq say how pack uses them). `pack` asks for the statistics layer by
layer (CalibrationPass) and fits that layer's experts before the pass goes on.
Layers and experts multiply in calib.product_dtype of the source's (bfloat16 where the CPU has it natively,
else float32); sums and moments are float32 or wider; the hidden states between layers keep the source's dtype.
Resident memory: one layer's dense weights, one expert matrix, the calibration activations and one expert's
second moment; never the model, its embeddings only while they run. The layer's inputs to its experts (from which
the samples are drawn), its moments between calls, and then its statistics wait in scratch files on disk (pack's
fits read one matrix's at a time).

Experts that see fewer than MIN_TOKENS calibration tokens get no statistics (pack then fits them
unweighted) and are listed in the report; weights are normalised to mean 1 with a floor, so a column
no token touched still counts a little and nothing is ever NaN.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from d2moe.errors import InputError, UnsupportedModelError
from d2moe.quantize import gptq
from d2moe.quantize.adapters import adapter_for
from d2moe.quantize.calib import SAMPLE_TOKENS, ColumnStats, product_dtype
from d2moe.quantize.convert.source import ExpertSource, SourceCheckpoint
from d2moe.runtime.memory import tight_allocator
from d2moe.runtime.model import build_skeleton, expert_activation, materialise_buffers, swap_experts

MIN_TOKENS = 8  # fewer routed tokens than this: the statistics are noise, fit that expert unweighted
FLOOR = 1e-3  # of the mean: a column no calibration token touched still weighs a little
SEQ_LEN = 512
CHUNK_TOKENS = 8192  # calibration tokens per layer call; each call reads the routed experts again
STAT_TOKENS = 512  # routed inputs per step of the statistics' sums (float32 temporaries of a few MiB)
SAMPLE_BYTES = 512 << 20  # one layer's experts' kept inputs together (bfloat16): about the calibration activations' size
HESSIAN_BYTES = 1 << 30  # one layer's experts' second moments together (float32): whole matrices where they fit, else blocks
CALIB_METHOD = b"column-weights+row-choice-on-both-halves+nested-gptq-in-c+judged-span+chunked-layers+product-dtype+per-layer-budgets+stat-steps/"  # in --resume's id with the dtype: other calibrations are not reused


def sample_tokens(n_experts: int, input_columns: int) -> int:
    """Inputs kept per expert: SAMPLE_TOKENS, fewer where one layer's `n_experts` samples would pass SAMPLE_BYTES
    (>= 32)."""
    return max(32, min(SAMPLE_TOKENS, SAMPLE_BYTES // max(1, 2 * n_experts * input_columns)))


class _Stop(Exception):
    pass


@contextlib.contextmanager
def _model_runs(src: Path, what: str):
    """transformers' own forward failing on the source (a config its modelling code cannot run, e.g. DeepSeek-V2
    attention whose num_key_value_heads differs from num_attention_heads) as one line naming the part that failed."""
    try:
        yield
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UnsupportedModelError(
            f"{src}: transformers cannot run {what} of this model over the calibration text ({type(exc).__name__}: "
            f"{first}); check its config.json against the architecture, or pack without --calib") from None


def _cast(x, dtype: torch.dtype):
    """x with its floating tensors (in tuples, lists and dicts too) in `dtype`, the dtype the layers multiply in
    (calib.product_dtype: a bfloat16 GEMM is software on CPUs without AVX512-BF16, a third of the pass there)."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_cast(v, dtype) for v in x)
    if isinstance(x, dict):
        return {k: _cast(v, dtype) for k, v in x.items()}
    return x


class _ScratchFile:
    """An unlinked file in `folder` (None: the system's temporary folder), written and read at offsets with
    pwrite/pread: what it holds waits in the page cache, which the kernel may write out, instead of the process's
    memory. Nothing is left by a kill."""

    def __init__(self, folder: Path | None):
        self.file = tempfile.TemporaryFile(dir=folder)

    def write_at(self, offset: int, t: torch.Tensor) -> int:
        """t's bytes at `offset`; returns how many."""
        data = memoryview(t.detach().contiguous().view(torch.uint8).numpy().reshape(-1))
        done = 0
        while done < len(data):  # one pwrite stops at 2 GiB on Linux
            done += os.pwrite(self.file.fileno(), data[done:], offset + done)
        return len(data)

    def read_at(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A new tensor of the bytes at `offset` (torch's allocation and alignment, as the tensor that was written
        had: a BLAS may take another path, and round otherwise, for a buffer aligned otherwise)."""
        out = torch.empty(shape, dtype=dtype)
        buf = out.view(-1).view(torch.uint8).numpy()
        if os.preadv(self.file.fileno(), [memoryview(buf)], offset) != buf.nbytes:
            raise OSError(f"calibration scratch file {self.file.name}: short read")
        return out

    def close(self) -> None:
        self.file.close()


class _ScratchRows(_ScratchFile):
    """Rows of one dtype and shape in a scratch file: what the pass keeps between calls (a layer's hidden states,
    its experts' inputs)."""

    def __init__(self, folder: Path | None, dtype: torch.dtype, row_shape: tuple[int, ...]):
        super().__init__(folder)
        self.dtype, self.row_shape = dtype, tuple(row_shape)
        self.row_bytes = math.prod(self.row_shape) * torch.empty((), dtype=dtype).element_size()
        self.rows = 0  # rows written so far (the end of the file)

    def write(self, r0: int, rows: torch.Tensor) -> None:
        self.write_at(r0 * self.row_bytes, rows.to(self.dtype))
        self.rows = max(self.rows, r0 + rows.shape[0])

    def append(self, rows: torch.Tensor) -> None:
        self.write(self.rows, rows)

    def read(self, r0: int, r1: int) -> torch.Tensor:
        return self.read_at(r0 * self.row_bytes, self.dtype, (r1 - r0, *self.row_shape))

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` (ascending), one read per run of consecutive rows."""
        idx = index.tolist()
        out = torch.empty((len(idx), *self.row_shape), dtype=self.dtype)
        start = 0
        for k in range(1, len(idx) + 1):
            if k == len(idx) or idx[k] != idx[k - 1] + 1:
                out[start:k] = self.read(idx[start], idx[k - 1] + 1)
                start = k
        return out


class _ScratchTensors(_ScratchFile):
    """Tensors by key in a scratch file: a key's first `put` gives it a place at the end of the file, later ones
    rewrite that place (same dtype and shape)."""

    def __init__(self, folder: Path | None):
        super().__init__(folder)
        self.places: dict = {}  # key -> (offset, dtype, shape)
        self.end = 0

    def put(self, key, t: torch.Tensor) -> None:
        place = self.places.get(key)
        if place is None:
            place = self.places[key] = (self.end, t.dtype, tuple(t.shape))
            self.end += t.numel() * t.element_size()
        elif place[1:] != (t.dtype, tuple(t.shape)):
            raise ValueError(f"scratch tensor {key}: {t.dtype} {tuple(t.shape)} where {place[1:]} was written")
        self.write_at(place[0], t)

    def get(self, key) -> torch.Tensor:
        return self.read_at(*self.places[key])

    def __contains__(self, key) -> bool:
        return key in self.places


class SpilledStats(Mapping):
    """One layer's statistics, {(layer, expert, matrix): ColumnStats}, each sample and second moment in a scratch
    file until a fit asks for it: pack fits one matrix at a time, and the layer's moments and samples together were
    what its fits held besides (288 MiB of moments at Mixtral's shape, 576 MiB from 64 experts up). Read back
    byte for byte; the entry last read is kept, so gate and up (one input, one ColumnStats) share a read."""

    def __init__(self, folder: Path | None):
        self.scratch = _ScratchTensors(folder)
        self.entries: dict[tuple[int, int, str], tuple] = {}  # key -> (weight, the key its tensors are under)
        self._last: tuple = (None, None)  # (entry, its ColumnStats)

    def put(self, key: tuple[int, int, str], stats: ColumnStats) -> None:
        self.scratch.put((key, "sample"), stats.sample)
        if stats.hessian is not None:
            self.scratch.put((key, "hessian"), stats.hessian)
        self.entries[key] = (stats.weight, key)

    def alias(self, key: tuple[int, int, str], same: tuple[int, int, str]) -> None:
        """`key` reads `same`'s statistics (up reads gate's input)."""
        self.entries[key] = self.entries[same]

    def __getitem__(self, key: tuple[int, int, str]) -> ColumnStats:
        entry = self.entries[key]
        if self._last[0] is not entry:
            weight, under = entry
            hessian = self.scratch.get((under, "hessian")) if (under, "hessian") in self.scratch else None
            self._last = (entry, ColumnStats(weight, self.scratch.get((under, "sample")), hessian))
        return self._last[1]

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def close(self) -> None:
        self._last = (None, None)
        self.scratch.close()


class _Catcher(nn.Module):
    """Stands in for decoder layer 0: records what it is called with, then stops the forward."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[tuple, dict]] = []

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        raise _Stop


class _StatsExperts(nn.Module):
    """An experts module computing from source weights read on demand; while `collect`, it accumulates its experts'
    input statistics (sums, counts, moments keyed by expert and matrix, and the calls for `sample`)."""

    def __init__(self, layer: int, original: nn.Module, experts: ExpertSource, keep_tokens: int, blocks: dict[str, int],
                 dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype  # the products' (calib.product_dtype); sums and moments are float32 or wider
        self.layer, self.experts, self.keep_tokens, self.blocks = layer, experts, keep_tokens, blocks
        self.act = expert_activation(original)
        self.collect = False
        self.scratch: Path | None = None  # where the layer's inputs and moments wait (None: the system's temporary folder)
        self.release()

    def release(self) -> None:
        """Forget what was gathered."""
        self.sums: dict = {}
        self.counts: dict = {}
        self.routes: list[torch.Tensor] = []  # this layer's routes, call by call (its inputs are in self.spill)
        self._index: torch.Tensor | None = None  # the routes joined, once the samples are drawn
        for name in ("spill", "moments"):
            if getattr(self, name, None) is not None:
                getattr(self, name).close()
        self.spill: _ScratchRows | None = None
        self.moments: _ScratchTensors | None = None  # by (expert, matrix), read, added to and written back per call

    def moment(self, e: int, m: str) -> torch.Tensor | None:
        """Expert e's input `m` second moment summed so far (None: no blocks)."""
        return self.moments.get((e, m)) if self.moments is not None and (e, m) in self.moments else None

    def _matrix(self, e: int, name: str) -> torch.Tensor:
        return self.experts.matrix(self.layer, e, name).to(self.dtype)

    def _down_input(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """act(gate x) * up x of expert e, one converted matrix alive at a time (235 MB in float32 at Mixtral's shape)."""
        h = self.act(x @ self._matrix(e, "gate").T)
        h *= x @ self._matrix(e, "up").T
        return h

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        x_all = hidden_states.to(self.dtype)
        out = torch.zeros(x_all.shape, dtype=torch.float32)  # top-k outputs summed in float32
        for e in torch.unique(top_k_index).tolist():
            tok, slot = (top_k_index == e).nonzero(as_tuple=True)
            x = x_all[tok]
            h = self._down_input(e, x)
            out.index_add_(0, tok, (h @ self._matrix(e, "down").T).float() * top_k_weights[tok, slot].float().unsqueeze(-1))
            if not self.collect:
                continue
            for m, v in (("gate", x), ("down", h)):
                self._accumulate((e, m), v, self.blocks[m])
            self.counts[e] = self.counts.get(e, 0) + len(tok)
        if self.collect:  # for `sample`: the inputs on disk in the samples' own bfloat16, the routes in memory
            self._spill_inputs(hidden_states)
            self.routes.append(top_k_index.clone())
        return out.to(hidden_states.dtype)

    def _spill_inputs(self, hidden_states: torch.Tensor) -> None:
        """Append this call's inputs to the layer's scratch file: held in memory, a layer's inputs (256 MiB at
        32768 tokens of Mixtral) and a copy of them for the samples were a quarter of the calibrated pack's peak."""
        if self.spill is None:
            self.spill = _ScratchRows(self.scratch, torch.bfloat16, hidden_states.shape[-1:])
        self.spill.append(hidden_states.reshape(-1, hidden_states.shape[-1]))

    def _accumulate(self, key: tuple[int, str], v: torch.Tensor, block: int) -> None:
        """Add inputs v [T, I]'s column sums of squares (float64) and second moment (float32 blocks) to `key`'s,
        STAT_TOKENS rows at a time: float32 copies of one expert's whole call (117 MB each at Mixtral's down
        input, three at once) were a fifth of the pass's peak. The moments wait in a scratch file between calls:
        every expert's together were 288 MiB at Mixtral's shape."""
        sums = self.sums.get(key)
        first = sums is None
        if first:
            sums = self.sums[key] = torch.zeros(v.shape[1], dtype=torch.float64)
        moment = None
        if block:
            if self.moments is None:
                self.moments = _ScratchTensors(self.scratch)
            moment = torch.zeros(v.shape[1] // block, block, block) if first else self.moments.get(key)
        for t0 in range(0, v.shape[0], STAT_TOKENS):
            part = v[t0:t0 + STAT_TOKENS].float()
            sums += part.square().sum(0, dtype=torch.float64)
            if moment is not None:
                gptq.add_second_moment(moment, part)
        if moment is not None:
            self.moments.put(key, moment)

    def sample(self, e: int) -> dict[str, torch.Tensor]:
        """After the layer's last call, expert e's kept inputs ({"gate": x, "down": its down input}, bfloat16): an
        evenly spaced subset of its routed inputs over all the calls (so it spans the text), the down inputs
        recomputed from them."""
        if self._index is None:
            self._index = torch.cat(self.routes)
        tok = (self._index == e).nonzero(as_tuple=True)[0]
        x = self.spill.gather(tok[torch.linspace(0, len(tok) - 1, min(len(tok), self.keep_tokens)).round().long()])
        x = x.to(self.dtype)
        return {"gate": x.bfloat16(), "down": self._down_input(e, x).bfloat16()}


def hessian_blocks(n_experts: int, gate_columns: int, down_columns: int) -> dict[str, int]:
    """Per input ("gate": the hidden state, "down": the expert's activation), the block of its second moment that
    one layer's `n_experts` fit HESSIAN_BYTES together (shared in proportion to columns; 0: none, pack rounds to
    nearest)."""
    total = gate_columns + down_columns
    return {m: gptq.block_size(c, n_experts, HESSIAN_BYTES * c // total)
            for m, c in (("gate", gate_columns), ("down", down_columns))}


class CalibrationPass:
    """The source model run over calibration text one decoder layer at a time, each MoE layer's statistics handed
    out when `layer_stats(layer)` asks for them (pack fits that layer's experts before the pass goes on).

    Construction only tokenises the text (for `calib_id`); the model starts running at the first request. Layers are
    asked for in order; those skipped (dense layers, layers a resumed pack kept) run without statistics, as the
    hidden states need them. Budgets (HESSIAN_BYTES, SAMPLE_BYTES) hold per layer, so a deep model keeps the blocks
    and samples a shallow one gets; one expert's moment is resident at a time, and one matrix's statistics."""

    def __init__(self, src: Path, specs: list[str], max_tokens: int, progress: bool = True):
        from transformers import AutoTokenizer

        from d2moe.router_train.data import load_texts, token_blocks

        self.src, self.progress, self._t0 = src, progress, time.perf_counter()
        self.texts = [Path(spec).name if Path(spec).expanduser().is_file() else spec for spec in specs]
        source = SourceCheckpoint(src)
        self.adapter = adapter_for(source.config)
        source.index_weights()
        self.source, config = source, source.config
        self.moe_layers, num_experts = self.adapter.moe_layers(config), self.adapter.num_experts(config)
        self.num_experts, shapes = num_experts, self.adapter.matrix_shapes(config)
        self.experts = ExpertSource(source, self.adapter, self.moe_layers, num_experts, shapes)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(src))
        except Exception as exc:
            raise InputError(f"--calib needs the source's tokenizer, which {src} does not load ({type(exc).__name__}); "
                             "copy the tokenizer files next to config.json") from None
        texts = load_texts(specs, option="--calib")
        self.ids = token_blocks(texts, tokenizer, SEQ_LEN, max_blocks=max(1, max_tokens // SEQ_LEN), data_option="--calib",
                                seq_option=None)
        self.dtype = product_dtype(self.experts.matrix_dtype(self.moe_layers[0], "gate"))
        self.calib_id = hashlib.sha256(CALIB_METHOD + str(self.dtype).encode() + self.ids.numpy().tobytes()).hexdigest()
        self.keep = sample_tokens(num_experts, shapes["gate"][1] + shapes["down"][1])
        self.blocks = hessian_blocks(num_experts, shapes["gate"][1], shapes["down"][1])
        self.starved: list[list[int]] = []
        self._next = None  # index of the next decoder layer to run; None: the model has not started
        self._closed = False
        self._seconds = 0.0

    def layer_stats(self, layer: int, scratch: Path | None = None) -> SpilledStats:
        """{(layer, expert, matrix): its ColumnStats} of MoE layer `layer`, its experts that saw too few tokens
        left out (and listed in the report); the layer's expert inputs wait in an unlinked file in `scratch` (pack's
        staging folder; None: the system's temporary folder) until its samples are drawn, and the statistics in
        another until each is read."""
        if self._closed:
            raise RuntimeError("the calibration pass was closed")
        t0 = time.perf_counter()
        with tight_allocator(), torch.no_grad():
            if self._next is None:
                self._start(scratch)
            if layer < self._next:
                raise ValueError(f"calibration layer {layer} was asked for after layer {self._next - 1}")
            while self._next < layer:
                self._run_layer(collect=False)
            if layer in self.modules:
                self.modules[layer].scratch = scratch
            module = self._run_layer(collect=True)
            stats = self._finish(layer, module, scratch)
        self._seconds += time.perf_counter() - t0
        if layer == self.moe_layers[-1]:
            self.close()  # nothing later needs the hidden states
        return stats

    def report(self) -> dict:
        """What the calibration did (the pack report's "calib"); `starved`: experts fitted unweighted in layers a
        resumed pack kept (their own calibration's)."""
        return {"tokens": int(self.ids.numel()), "sequences": int(self.ids.shape[0]),
                "experts": len(self.moe_layers) * self.num_experts,
                "experts_without_enough_tokens": sorted(self.starved), "hessian_block": self.blocks,
                "products": {"forward": str(self.dtype).removeprefix("torch."),  # the row choice's: its bfloat16 sample's
                             "judge": str(product_dtype(torch.bfloat16)).removeprefix("torch.")},
                "seconds": round(self._seconds, 1)}

    def manifest_section(self) -> dict:
        """The checkpoint's record of this calibration (quantize.format.sections' `calibration`): the texts by name
        (files without their folders), tokens, id, and how many experts were fitted unweighted."""
        from d2moe.quantize.format.sections import MAX_CALIB_NAME, MAX_CALIB_TEXTS

        return {"texts": [t[:MAX_CALIB_NAME] for t in self.texts[:MAX_CALIB_TEXTS]], "tokens": int(self.ids.numel()),
                "sha256": self.calib_id, "experts_without_enough_tokens": len(self.starved)}

    def close(self) -> None:
        """Drop the model, its layers' experts modules and the hidden states: the pass cannot go on."""
        if "hidden" in self.__dict__:
            self.hidden.close()
        for name in ("model", "layers", "modules", "hidden", "call_args"):
            self.__dict__.pop(name, None)
        self._closed = True

    def _start(self, scratch: Path | None) -> None:
        """The skeleton with each MoE layer's experts computing from the source, the embeddings run chunk by chunk
        and caught at layer 0 (then dropped: nothing later reads them); the hidden states wait in `scratch`."""
        src, adapter, source, dtype = self.src, self.adapter, self.source, self.dtype
        model = build_skeleton(adapter, source.config)
        self.modules: dict[int, _StatsExperts] = {}

        def stats_experts(layer: int, orig: nn.Module) -> _StatsExperts:
            self.modules[layer] = _StatsExperts(layer, orig, self.experts, self.keep, self.blocks, dtype)
            return self.modules[layer]

        swap_experts(model, adapter, self.moe_layers, stats_experts)
        layers_path = adapter.experts_path(0).split(".0.")[0]  # "model.layers"
        inner = layers_path.rpartition(".")[0]  # "model": embeddings and rotary run before the first layer
        layers = model.get_submodule(layers_path)
        self.dense = {model_key: src_key for src_key, model_key in self.experts.dense}
        self.prefixes = [f"{layers_path}.{i}." for i in range(len(layers))]
        # the inner model's own weights only: the LM head (as large as the embeddings) never runs here
        outside = {k: source.get(v) for k, v in self.dense.items()
                   if k.startswith(f"{inner}.") and not k.startswith(f"{layers_path}.")}
        model.load_state_dict(outside, strict=False, assign=True)
        materialise_buffers(model, skip=layers_path)  # each layer's own, persistent ones included, once it is loaded

        # The embeddings run chunk by chunk, each caught at layer 0 with what the layers are called with. Those
        # arguments (positions, masks) depend only on the chunk's shape, so one set per chunk size serves every layer.
        ids = self.ids
        batch, step = ids.shape[0], max(1, CHUNK_TOKENS // ids.shape[1])
        self.chunks = [(c0, min(batch, c0 + step)) for c0 in range(0, batch, step)]
        hidden, self.call_args = None, {}
        first = layers[0]
        for c0, c1 in self.chunks:
            catcher = _Catcher()
            layers[0] = catcher
            try:
                with _model_runs(src, "the embeddings"):
                    model.get_submodule(inner)(input_ids=ids[c0:c1], use_cache=False)
            except _Stop:
                pass
            (args, kwargs), = catcher.calls
            h = args[0] if args else kwargs.pop("hidden_states")
            kwargs.pop("hidden_states", None)
            self.call_args.setdefault(c1 - c0, (_cast(args[1:], dtype), _cast(kwargs, dtype)))
            if hidden is None:
                hidden = _ScratchRows(scratch, h.dtype, h.shape[1:])
            hidden.write(c0, h)
        layers[0] = first
        for key in outside:  # the embeddings (vocabulary x hidden) are not needed again
            owner, _, name = key.rpartition(".")
            model.get_submodule(owner).register_parameter(name, None)
        self.model, self.layers, self.hidden, self._next = model, layers, hidden, 0

    def _run_layer(self, collect: bool) -> _StatsExperts | None:
        """Run decoder layer self._next over every chunk (its output replaces the hidden states), then drop it."""
        i, dtype, layers, t0 = self._next, self.dtype, self.layers, time.perf_counter()
        prefix = self.prefixes[i]
        layer = layers[i]
        module = self.modules.get(i)
        if module is not None:
            module.collect = collect
        state = {k[len(prefix):]: _cast(self.source.get(v), dtype) for k, v in self.dense.items() if k.startswith(prefix)}
        layer.load_state_dict(state, strict=False, assign=True)
        materialise_buffers(layer)
        for c0, c1 in self.chunks:  # each chunk's output replaces its input, which no later chunk reads
            args, kwargs = self.call_args[c1 - c0]
            with _model_runs(self.src, f"decoder layer {i}"):
                out = layer(self.hidden.read(c0, c1).to(dtype), *args, **kwargs)
            self.hidden.write(c0, out[0] if isinstance(out, tuple) else out)
        layers[i] = nn.Identity()  # its weights are no longer needed
        del layer, state, out  # (in float32 products, twice the source's bytes) not held while the next layer's are read
        self._next = i + 1
        if self.progress:
            print(f"pack --calib: decoder layer {i + 1}/{len(self.prefixes)} run in {time.perf_counter() - t0:.0f} s "
                  f"({time.perf_counter() - self._t0:.0f} s since the calibration began"
                  f"{'' if collect else ', no statistics needed'})", file=sys.stderr, flush=True)
        return module if collect else None

    def _finish(self, layer: int, module: _StatsExperts | None, scratch: Path | None) -> SpilledStats:
        """The layer's statistics, normalised, expert by expert into a scratch file in `scratch` (the module's sums
        released and its moments read as they go)."""
        stats = SpilledStats(scratch)
        if module is None:  # not an MoE layer of this model
            return stats
        for e in range(self.num_experts):
            n = module.counts.get(e, 0)
            if n < MIN_TOKENS:
                self.starved.append([layer, e, n])
                continue
            sample = module.sample(e)
            for m in ("gate", "down"):
                w = (module.sums.pop((e, m)) / n).float()
                w = w / w.mean().clamp_min(1e-30)
                moment = module.moment(e, m)
                stats.put((layer, e, m), ColumnStats(w.clamp_min(FLOOR), sample[m],
                                                     None if moment is None else moment.div_(n)))
                if m == "gate":  # gate and up read the same input (and are fitted one after the other)
                    stats.alias((layer, e, "up"), (layer, e, "gate"))
            del sample, moment
        module.release()
        return stats


def expert_column_stats(src: Path, specs: list[str], max_tokens: int, progress: bool = True
                        ) -> tuple[dict[tuple[int, int, str], ColumnStats], str, dict]:
    """Every MoE layer's statistics at once ({(layer, expert, matrix): its ColumnStats}), an id of the calibration
    for --resume, and a report: the pass run whole (studies and tests; pack asks layer by layer)."""
    calib = CalibrationPass(src, specs, max_tokens, progress)
    weights = {}
    for layer in calib.moe_layers:
        weights.update(calib.layer_stats(layer))  # read back whole; the last one closes the pass
    return weights, calib.calib_id, calib.report()
