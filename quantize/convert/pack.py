"""`pack`: a Hugging Face MoE checkpoint -> a packed d2moe checkpoint (layout: d2moe.quantize.format).

Streams: tensors are read lazily one at a time (safetensors `safe_open`), experts are quantized
and written one expert at a time, so memory stays at a few expert matrices plus one dense tensor,
never the model. Writes into a temporary directory beside OUT and renames it at the end (a crash
never leaves a half checkpoint that looks whole). Deterministic: same input and options give
byte-identical files (no timestamps, sorted keys, fixed order).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import statistics
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from d2moe.errors import D2MoEError, InputError, UsageError
from d2moe.quantize import MWQConfig, dequantize, quantize_mwq
from d2moe.quantize import format as fmt
from d2moe.quantize.adapters import ExpertKey, FusedExpertKey, adapter_for
from d2moe.quantize.format.safetensors_io import (
    DTYPE_SIZES,
    TORCH_TO_ST,
    strict_json,
)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SQNR_CAP_DB = 999.0  # a lossless level (all-zero matrix) is recorded as this, JSON has no infinity


# ----------------------------------------------------------------------------- the source


class SourceCheckpoint:
    """A HF checkpoint directory on disk: config + safetensors (single file or sharded with an index)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"SRC {self.path} does not exist: pass a Hugging Face checkpoint directory")
        if not self.path.is_dir():
            raise InputError(f"SRC {self.path} is not a directory: pass the folder holding config.json and *.safetensors")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise InputError(f"SRC {self.path} is not a Hugging Face checkpoint: it has no config.json")
        self.config_bytes = config_path.read_bytes()
        try:
            self.config = strict_json(self.config_bytes, str(config_path))
        except D2MoEError as exc:
            raise InputError(str(exc)) from None
        self.weight_map: dict[str, str] = {}
        self.files: list[str] = []
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}

    def index_weights(self) -> None:
        """Find every tensor's file (index or single file); call once the architecture is known to be supported."""
        self.weight_map = self._weight_map()
        self.files = sorted(set(self.weight_map.values()))

    def _weight_map(self) -> dict[str, str]:
        index, single = self.path / INDEX_NAME, self.path / SINGLE_NAME
        if index.is_file():
            try:
                data = strict_json(index.read_bytes(), str(index))
            except D2MoEError as exc:
                raise InputError(str(exc)) from None
            wmap = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(wmap, dict) or not wmap or not all(isinstance(v, str) for v in wmap.values()):
                raise InputError(f"{index}: has no weight_map of tensor names to shard files")
            for shard in set(wmap.values()):
                if "/" in shard or "\\" in shard or shard.startswith("."):
                    raise InputError(f"{index}: shard name {shard!r} must be a plain file name")
                if not (self.path / shard).is_file():
                    raise InputError(f"{index} names shard {shard} which is missing: finish the download")
            return dict(wmap)
        if single.is_file():
            from safetensors import safe_open

            try:
                with safe_open(str(single), framework="pt") as f:
                    return {k: SINGLE_NAME for k in f.keys()}
            except Exception as exc:
                raise InputError(f"{single} is not a readable safetensors file ({exc})") from None
        if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")):
            raise InputError(f"SRC {self.path} holds PyTorch pickles, not safetensors: d2moe never unpickles; "
                             "convert with `model.save_pretrained(dir, safe_serialization=True)`")
        raise InputError(f"SRC {self.path} has no {SINGLE_NAME} or {INDEX_NAME}")

    def handle(self, key: str):
        from safetensors import safe_open

        fname = self.weight_map[key]
        if fname not in self._handles:
            try:
                self._handles[fname] = self._stack.enter_context(safe_open(str(self.path / fname), framework="pt"))
            except Exception as exc:
                raise InputError(f"{self.path / fname} is not a readable safetensors file ({exc})") from None
        return self._handles[fname]

    def slice(self, key: str):
        return self.handle(key).get_slice(key)

    def get(self, key: str) -> torch.Tensor:
        try:
            return self.handle(key).get_tensor(key)
        except D2MoEError:
            raise
        except Exception as exc:
            raise InputError(f"{self.weight_map[key]}: tensor {key} cannot be read ({exc})") from None

    def fingerprint(self) -> str:
        """sha256 of config.json and the safetensors file names + sizes (cheap: no weights hashed)."""
        h = hashlib.sha256(self.config_bytes)
        for name in self.files:
            h.update(f"\n{name}\t{(self.path / name).stat().st_size}".encode())
        return h.hexdigest()

    def nbytes(self) -> int:
        return sum((self.path / name).stat().st_size for name in self.files)

    def release(self) -> None:
        """Close every open shard: drops their memory maps, so resident memory stays at one layer's worth."""
        self._stack.close()
        self._stack = ExitStack()
        self._handles.clear()

    def close(self) -> None:
        self.release()


def _dtype_name(st_dtype: str) -> str:
    names = {v: k for k, v in TORCH_TO_ST.items()}
    return names.get(st_dtype, st_dtype)


# ----------------------------------------------------------------------------- the plan


class ExpertSource:
    """Where each (layer, expert, matrix) lives in the source: per-expert keys or fused [E, ...] tensors."""

    def __init__(self, src: SourceCheckpoint, adapter, moe_layers: list[int], num_experts: int,
                 shapes: dict[str, tuple[int, int]]):
        self.src, self.shapes = src, shapes
        self.legacy: dict[tuple[int, int, str], str] = {}
        self.fused: dict[tuple[int, str], tuple[str, int]] = {}  # (layer, matrix) -> (key, row start)
        self.dense: list[tuple[str, str]] = []  # (source key, model key)
        moe = set(moe_layers)
        for key in sorted(src.weight_map):
            if adapter.is_ignored(key, src.config):
                continue
            ref = adapter.expert_key(key)
            if ref is None:
                self.dense.append((key, adapter.dense_key(key)))
                continue
            if ref.layer not in moe:
                raise InputError(f"{src.path}: tensor {key} is an expert of layer {ref.layer}, which config.json "
                                 "says is not a MoE layer (config and weights disagree)")
            if isinstance(ref, ExpertKey):
                if ref.expert >= num_experts:
                    raise InputError(f"{src.path}: tensor {key} names expert {ref.expert} but config.json has {num_experts}")
                self.legacy[(ref.layer, ref.expert, ref.matrix)] = key
            else:
                self._add_fused(key, ref, num_experts)
        model_keys = [k for _, k in self.dense]
        if len(set(model_keys)) != len(model_keys):
            raise InputError(f"{src.path}: two source tensors map to the same model key (mixed legacy and fused names?)")
        for layer in moe_layers:
            for e in range(num_experts):
                for m in fmt.MATRICES:
                    have_legacy, have_fused = (layer, e, m) in self.legacy, (layer, m) in self.fused
                    if have_legacy == have_fused:
                        what = "is missing" if not have_legacy else "is stored twice (per-expert and fused)"
                        raise InputError(f"{src.path}: layer {layer} expert {e} matrix {m} {what}")
        for (_, _, m), key in self.legacy.items():
            shape = tuple(src.slice(key).get_shape())
            if shape != shapes[m]:
                raise InputError(f"{src.path}: tensor {key} is {list(shape)}, config.json implies {list(shapes[m])}")

    def _add_fused(self, key: str, ref: FusedExpertKey, num_experts: int) -> None:
        shape = tuple(self.src.slice(key).get_shape())
        rows = sum(self.shapes[m][0] for m in ref.matrices)
        want = (num_experts, rows, self.shapes[ref.matrices[0]][1])
        if shape != want:
            raise InputError(f"{self.src.path}: fused tensor {key} is {list(shape)}, config.json implies {list(want)}")
        start = 0
        for m in ref.matrices:
            self.fused[(ref.layer, m)] = (key, start)
            start += self.shapes[m][0]

    def matrix(self, layer: int, expert: int, matrix: str) -> torch.Tensor:
        """One expert matrix as float32 [O, I] (reads only that expert's bytes)."""
        key = self.legacy.get((layer, expert, matrix))
        if key is not None:
            w = self.src.get(key)
        else:
            key, start = self.fused[(layer, matrix)]
            rows = self.shapes[matrix][0]
            w = self.src.slice(key)[expert: expert + 1, start: start + rows][0]
        if not w.is_floating_point():
            raise InputError(f"{self.src.weight_map[key]}: tensor {key} is {w.dtype}; d2moe packs float weights only")
        return w.to(torch.float32)


# ----------------------------------------------------------------------------- pack


def pack_checkpoint(
    src: Path,
    out: Path,
    cfg: MWQConfig,
    dtype: str | None = None,
    router: Path | None = None,
    progress: bool = True,
    force: bool = False,
    workers: int | None = None,
) -> dict:
    """Pack HF checkpoint `src` into `out`; returns a report (bytes and SQNR per level, seconds, sizes).

    `workers` experts are quantized at once (default: the CPU count), each on ONE torch thread:
    the quantizer's many small ops lose to thread synchronisation when torch splits them (measured:
    2 intra-op threads 3-5x slower than 1 on a 2-core machine with one other busy process).
    The output does not depend on `workers`.
    """
    t0 = time.perf_counter()
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise UsageError(f"--workers {workers} must be at least 1")
    src, out = Path(src), Path(out)
    if dtype is not None and dtype not in fmt.DENSE_DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not one of {', '.join(fmt.DENSE_DTYPES)}")
    source = SourceCheckpoint(src)
    try:
        adapter = adapter_for(source.config)
        source.index_weights()
        _check_out(src, out, force)
        config = source.config
        moe_layers, num_experts = adapter.moe_layers(config), adapter.num_experts(config)
        shapes = adapter.matrix_shapes(config)
        if not moe_layers:
            raise InputError(f"{src}/config.json describes no MoE layer: nothing to pack")
        layout = fmt.blob_layout(shapes, cfg)
        experts = ExpertSource(source, adapter, moe_layers, num_experts, shapes)
        gate_capacity = None if router is None else _check_gate(Path(router), source, experts, adapter, moe_layers, cfg)
        tmp = out.parent / f".{out.name}.d2moe-tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            dense_info, dense_dtype = _write_dense(source, experts.dense, tmp, dtype)
            source.release()
            with _Progress(progress, len(moe_layers) * num_experts) as bar, _one_torch_thread(), \
                    ThreadPoolExecutor(workers, thread_name_prefix="d2moe-pack") as pool:
                entries = []
                for layer in moe_layers:
                    entries += _write_layer(experts, layer, num_experts, layout, cfg, tmp, bar, pool, workers)
                    source.release()
            gate_info = None if router is None else _copy_gate(Path(router), gate_capacity, cfg, tmp)
            for name in fmt.COPIED_FILES:
                if (src / name).is_file():
                    shutil.copyfile(src / name, tmp / name)
            manifest = fmt.build_manifest(
                source={"path": src.resolve().name, "sha256": source.fingerprint()}, arch=adapter.model_type,
                cfg=cfg, dtype=dense_dtype, matrix_shapes=shapes, moe_layers=moe_layers, num_experts=num_experts,
                dense=dense_info, experts=entries, gate=gate_info,
            )
            _write_file(tmp / fmt.MANIFEST_NAME, fmt.manifest_bytes(manifest))
            fmt.open_checkpoint(tmp)  # the reader must accept what we wrote, or nothing is renamed
            _swap_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        source.close()
    return _report(out, manifest, layout, cfg, source.nbytes(), time.perf_counter() - t0)


def _check_out(src: Path, out: Path, force: bool) -> None:
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise UsageError(f"OUT {out} must not be SRC or inside it: pick another directory")
    if out.exists() or out.is_symlink():
        if not force:
            raise UsageError(f"OUT {out} already exists: pass --force to replace it, or pick another directory")
        if not out.is_dir() or (any(out.iterdir()) and not (out / fmt.MANIFEST_NAME).is_file()):
            raise UsageError(f"OUT {out} exists and is not a packed checkpoint: --force only replaces those; remove it yourself")


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.d2moe-old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    try:  # persist the rename
        fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_dense(source: SourceCheckpoint, dense: list[tuple[str, str]], tmp: Path, dtype: str | None) -> tuple[dict, str]:
    """Stream every dense tensor into dense.safetensors (model keys; cast to `dtype` if given)."""
    plan, counts = [], {}
    for src_key, model_key in dense:
        sl = source.slice(src_key)
        st_dtype = sl.get_dtype()
        is_float = st_dtype in ("F16", "BF16", "F32", "F64")
        out_dtype = TORCH_TO_ST[dtype] if (dtype and is_float) else st_dtype
        if is_float:
            counts[out_dtype] = counts.get(out_dtype, 0) + math.prod(sl.get_shape())
        plan.append((src_key, model_key, out_dtype, tuple(sl.get_shape())))
    plan.sort(key=lambda p: (-DTYPE_SIZES.get(p[2], 1), p[1]))  # widest first keeps every tensor aligned
    main = max(sorted(counts), key=lambda d: counts[d]) if counts else "F32"
    dense_dtype = dtype or _dtype_name(main)
    if dense_dtype not in fmt.DENSE_DTYPES:
        raise InputError(f"{source.path}: dense weights are {dense_dtype}; pass --dtype float16|bfloat16|float32")
    path = tmp / fmt.DENSE_NAME
    with fmt.dense_file_writer(path, [(m, d, s) for _, m, d, s in plan]) as w:
        for src_key, model_key, _, _ in plan:
            t = source.get(src_key)
            if dtype and t.is_floating_point():
                t = t.to(getattr(torch, dtype))
            w.write(model_key, t.contiguous().view(torch.uint8).reshape(-1).numpy())
    return fmt.file_entry(path), dense_dtype


def _write_layer(experts: ExpertSource, layer: int, num_experts: int, layout: fmt.BlobLayout, cfg: MWQConfig,
                 tmp: Path, bar, pool: ThreadPoolExecutor, workers: int) -> list[dict]:
    """Quantize a layer's experts on `pool` (reads stay on this thread), writing blobs in expert order."""
    entries = []
    pending: deque = deque()  # at most workers + 1 experts in memory at once
    with fmt.ExpertsFileWriter(tmp, layer, num_experts, layout) as w:

        def finish_oldest() -> None:
            e, future = pending.popleft()
            try:
                quantized, sqnr = future.result()
            except UsageError as exc:
                raise InputError(f"layer {layer} expert {e}: {exc}") from None
            entries.append(w.add(e, fmt.encode_expert(quantized, layout, cfg), sqnr))
            bar.advance()

        for e in range(num_experts):
            weights = {m: experts.matrix(layer, e, m) for m in fmt.MATRICES}
            pending.append((e, pool.submit(_quantize_expert, weights, cfg)))
            if len(pending) > workers:
                finish_oldest()
        while pending:
            finish_oldest()
    return entries


def _quantize_expert(weights: dict[str, torch.Tensor], cfg: MWQConfig) -> tuple[dict, list[float]]:
    quantized = {m: quantize_mwq(w_, cfg) for m, w_ in weights.items()}
    return quantized, [_expert_sqnr(weights, quantized, b) for b in cfg.bits]


@contextmanager
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _expert_sqnr(weights: dict[str, torch.Tensor], quantized: dict, level: int) -> float:
    """SQNR in dB over the expert's three matrices together, rounded for a stable manifest."""
    signal = noise = 0.0
    for m, w in weights.items():
        w64 = w.to(torch.float64)
        signal += w64.square().sum().item()
        noise += (w64 - dequantize(quantized[m], level).to(torch.float64)).square().sum().item()
    if noise == 0.0:
        return SQNR_CAP_DB
    if signal == 0.0:
        return -SQNR_CAP_DB
    return round(min(10.0 * math.log10(signal / noise), SQNR_CAP_DB), 4)


def _check_gate(router: Path, source: SourceCheckpoint, experts: ExpertSource, adapter, moe_layers: list[int],
                cfg: MWQConfig) -> list[float]:
    """Validate the trained bit-width gate against this model's routers and these levels; its capacities."""
    from d2moe.runtime.gate import load_gate, model_fingerprint

    if not router.is_file():
        raise InputError(f"--router {router} does not exist: train one with `d2moe train-router`")
    by_model_key = {model_key: src_key for src_key, model_key in experts.dense}
    weights = []
    for layer in moe_layers:
        key = adapter.router_key(layer)
        if key not in by_model_key:
            raise InputError(f"{source.path}: router weight {key} is missing from the checkpoint")
        weights.append(source.get(by_model_key[key]))
    gate = load_gate(router, expect_fingerprint=model_fingerprint(source.config, weights), expect_levels=cfg.bits)
    return [float(c) for c in gate.capacity]


def _copy_gate(router: Path, capacity: list[float], cfg: MWQConfig, tmp: Path) -> dict:
    dest = tmp / fmt.GATE_NAME
    shutil.copyfile(router, dest)
    return fmt.file_entry(dest, levels=list(cfg.bits), capacity=capacity)


def _report(out: Path, manifest: dict, layout: fmt.BlobLayout, cfg: MWQConfig, source_bytes: int, seconds: float) -> dict:
    n = len(manifest["experts"])
    per_level, sqnr = {}, {}
    for i, b in enumerate(cfg.bits):
        per_level[str(b)] = layout.level_ends[i] * n
        values = [e["sqnr_db"][i] for e in manifest["experts"] if e["sqnr_db"][i] is not None]
        sqnr[str(b)] = {"min": min(values), "median": statistics.median(values)} if values else None
    packed = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return {
        "out": str(out), "arch": manifest["arch"], "moe_layers": len(manifest["moe_layers"]),
        "experts_per_layer": manifest["num_experts"], "levels": list(cfg.bits), "group_size": cfg.group_size,
        "scheme": cfg.scheme, "dtype": manifest["dtype"], "bytes_per_level": per_level, "sqnr_db": sqnr,
        "dense_bytes": manifest["dense"]["nbytes"], "packed_bytes": packed, "source_bytes": source_bytes,
        "seconds": round(seconds, 3), "gate": manifest["gate"] is not None,
    }


class _Progress:
    """A rich progress bar over experts, shown only when stderr is a terminal."""

    def __init__(self, enabled: bool, total: int):
        self.enabled = enabled and sys.stderr.isatty()
        self.total = total

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._p = Progress(TextColumn("packing experts"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                               transient=True)
            self._p.__enter__()
            self._task = self._p.add_task("pack", total=self.total)
        return self

    def advance(self) -> None:
        if self.enabled:
            self._p.advance(self._task)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._p.__exit__(*exc)
