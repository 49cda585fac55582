"""`pack`: a Hugging Face MoE checkpoint -> a packed d2moe checkpoint (layout: d2moe.quantize.format).

Streams one matrix at a time: an I/O thread reads the next expert matrix (a positioned read of its
bytes, in its stored dtype) while the quantizer fits the current one on every worker (rows split,
native C fit; the torch fit where no compiler is found, or for the residual scheme). Resident memory
is about two source matrices plus one expert's blob, whatever the model's size or expert count; with
--calib, also one matrix's calibration statistics (the layer's wait in a scratch file in the staging folder, as
the calibration's hidden states do; the pass runs layer by layer between the layers' fits).
Parts are written into a staging folder (d2moe.quantize.convert.staging) and made durable one by one,
so an interrupted pack can be resumed (`--resume`) to byte-identical output. Deterministic: same
input and options give byte-identical files (no timestamps, sorted keys, fixed order; the worker count
does not change a byte).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from d2moe.errors import InputError, UsageError
from d2moe.quantize import MWQConfig, dequantize, native, quantize_mwq
from d2moe.quantize import format as fmt
from d2moe.quantize.adapters import adapter_for
from d2moe.quantize.calib import LayerCalibration, calibrated_fit
from d2moe.quantize.convert.lossless_pack import lossless_layer, lossless_section
from d2moe.quantize.convert.progress import PackProgress
from d2moe.quantize.convert.source import ExpertSource, SourceCheckpoint, model_dir_name
from d2moe.quantize.convert.source_check import check_dense_weights
from d2moe.quantize.convert.staging import Staging, verify_experts_file, verify_whole_file
from d2moe.quantize.format.config_bounds import check_source_config
from d2moe.quantize.format.safetensors_io import DTYPE_SIZES, TORCH_TO_ST
from d2moe.quantize.similarity import SimilarityCollector

SQNR_CAP_DB = 999.0  # a lossless level (all-zero matrix) is recorded as this, JSON has no infinity
DEFAULT_REFITS = 1  # least-squares refits of each grid after the clip search (BENCHMARKS.md: cost and gain)
KILL_ENV = "D2MOE_TEST_KILL_AT"  # tests only: "dense" | "layer:N" | "expert:N:E" -> SIGKILL there


def pack_checkpoint(
    src: Path,
    out: Path,
    cfg: MWQConfig,
    dtype: str | None = None,
    router: Path | None = None,
    progress: bool = True,
    force: bool = False,
    workers: int | None = None,
    resume: bool = False,
    refits: int | None = None,
    calib: LayerCalibration | None = None,
    similarity: bool = True,
    lossless: str | None = None,
    weighting: str | None = None,
) -> dict:
    """Pack HF checkpoint `src` into `out`; returns a report (bytes and SQNR per level, seconds, sizes).

    `workers` threads fit each matrix (default: the CPU count); `refits` least-squares refits per
    grid and `weighting` the fit's error weighting (defaults: DEFAULT_REFITS and native.DEFAULT_WEIGHTING
    where the native sliced fit runs, none where the torch fit does); `calib`: the calibration statistics
    (d2moe.router_train.activations.CalibrationPass), asked for layer by layer as each is fitted (its calib_id is
    in --resume's key; layers a resumed pack keeps are never calibrated). `similarity`: store each expert's
    nearest neighbours (d2moe.quantize.similarity, for `--on-miss substitute`); `lossless`: also store
    the exact source experts coded with that codec (d2moe.quantize.convert.lossless_pack).
    """
    t0 = time.perf_counter()
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise UsageError(f"--workers {workers} must be at least 1")
    if refits is not None and refits < 0:
        raise UsageError(f"--refits {refits} must be 0 or more")
    if weighting is not None and weighting not in native.WEIGHTINGS:
        raise UsageError(f"--weighting {weighting!r} is unknown: use {', '.join(native.WEIGHTINGS)}")
    if lossless is not None and lossless not in fmt.LOSSLESS_CODECS:
        raise UsageError(f"--lossless-codec {lossless!r} is unknown: use one of {', '.join(fmt.LOSSLESS_CODECS)}")
    src, out = Path(src), Path(out)
    if dtype is not None and dtype not in fmt.DENSE_DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not one of {', '.join(fmt.DENSE_DTYPES)}")
    source = SourceCheckpoint(src)
    adapter = adapter_for(source.config)
    source.index_weights()
    _check_out(src, out, force)
    config = source.config
    moe_layers, num_experts = adapter.moe_layers(config), adapter.num_experts(config)
    shapes = adapter.matrix_shapes(config)
    if not moe_layers:
        raise InputError(f"{src}/config.json describes no MoE layer: nothing to pack")
    check_source_config(adapter, config, src)
    layout = fmt.blob_layout(shapes, cfg)
    experts = ExpertSource(source, adapter, moe_layers, num_experts, shapes)
    check_dense_weights(src, source, adapter, experts.dense, moe_layers)
    gate_capacity = None if router is None else _check_gate(Path(router), source, experts, adapter, moe_layers, cfg)
    lib = native.load() if cfg.scheme in native.NATIVE_SCHEMES else None
    if refits is None:
        refits = DEFAULT_REFITS if lib is not None else 0
    if weighting is None:
        weighting = native.DEFAULT_WEIGHTING if lib is not None else "mse"
    fit = _Fitter(lib, cfg, refits, workers, calib, weighting)
    key_fields = _key_fields(source, cfg, dtype, router, refits, None if calib is None else calib.calib_id,
                             fit.name + ("+sim" if similarity else "") + ("" if fit.weighting == "mse" else "+" + fit.weighting))
    sim = SimilarityCollector(str(config.get("hidden_act", "silu"))) if similarity else None
    sim_rows: dict[int, list] = {}
    ll_entries, ll_dtype = [], None
    staging = Staging(out, key_fields, resume)
    total = sum(experts.matrix_nbytes(layer, m) * num_experts for layer in moe_layers for m in fmt.MATRICES)
    try:
        with PackProgress(progress, total, len(moe_layers)) as bar, fit:
            dense_info, dense_dtype = _dense_part(source, experts.dense, staging, dtype)
            _maybe_kill("dense")
            entries = []
            for i, layer in enumerate(moe_layers):
                bar.layer(i)
                entries += _layer_part(experts, i, layer, num_experts, layout, fit, staging, bar, sim, sim_rows, calib)
                if lossless is not None:
                    part, ll_dtype = lossless_layer(experts, layer, num_experts, staging, lossless)
                    ll_entries += part
                _maybe_kill(f"layer:{i}")
        try:  # again: OUT may have been made (another pack, a user) while the layers were fitted
            _check_out(src, out, force)
        except UsageError as exc:
            raise _PartsKept(f"{exc} (it was made while this pack ran; the finished parts are kept in {staging.path}: "
                             "move OUT away and re-run the same command with --resume)") from None
        tmp = staging.path
        gate_info = None if router is None else _copy_gate(Path(router), gate_capacity, cfg, tmp)
        for name in fmt.COPIED_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        if not any((src / name).is_file() for name in fmt.TOKENIZER_FILES):
            print(f"pack: note: {src} has no tokenizer ({', '.join(fmt.TOKENIZER_FILES[:2])}, ...): run and eval need one; "
                  f"copy the source model's tokenizer files into {out}", file=sys.stderr, flush=True)
        manifest = fmt.build_manifest(
            source={"path": model_dir_name(src.resolve()), "sha256": source.fingerprint()}, arch=adapter.model_type,
            cfg=cfg, dtype=dense_dtype, matrix_shapes=shapes, moe_layers=moe_layers, num_experts=num_experts,
            dense=dense_info, experts=entries, gate=gate_info,
            similarity=sim.section(sim_rows) if sim is not None else None,
            lossless=lossless_section(lossless, ll_dtype, ll_entries) if lossless is not None else None,
            calibration=calib.manifest_section() if calib is not None else None,
        )
        staging.clean_records()
        _write_file(tmp / fmt.MANIFEST_NAME, fmt.manifest_bytes(manifest))
        fmt.open_checkpoint(tmp)  # the reader must accept what we wrote, or nothing is renamed
        _swap_into_place(tmp, out, force)
    except KeyboardInterrupt:
        print(f"pack: interrupted; finished parts are kept in {staging.path}: "
              "re-run the same command with --resume to continue", file=sys.stderr)
        raise
    except _PartsKept:
        raise
    except BaseException:
        staging.remove()
        raise
    return _report(out, manifest, layout, cfg, source.nbytes(), time.perf_counter() - t0)


def _key_fields(source: SourceCheckpoint, cfg: MWQConfig, dtype: str | None, router: Path | None, refits: int,
                calib_id: str | None, fitter: str) -> dict:
    """What every part is a deterministic function of: a resumed pack only keeps parts of these (their hash is the
    staging key; the fields name what differs when it does not match)."""
    router_crc = fmt.file_crc32(Path(router)) if router is not None else None
    return {"source": source.fingerprint(), "bits": list(cfg.bits), "group": cfg.group_size, "scheme": cfg.scheme,
            "dtype": dtype, "router": router_crc, "refits": refits, "calib": calib_id, "fitter": fitter,
            "format": fmt.FORMAT_VERSION}


def _maybe_kill(point: str) -> None:
    if os.environ.get(KILL_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


class _PartsKept(UsageError):
    """OUT cannot be replaced after all; the staging folder stays for --resume."""


def _check_out(src: Path, out: Path, force: bool) -> None:
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise UsageError(f"OUT {out} must not be SRC or inside it: pick another directory")
    here = Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:  # `pack SRC ""` is `.`, which cannot be replaced
        raise UsageError(f"OUT {str(out)!r} is the current directory or holds it: name a new directory, e.g. packed")
    if out.resolve() in src.resolve().parents:  # --force would replace OUT, and SRC with it
        raise UsageError(f"OUT {out} holds SRC {src}: replacing it would delete the source; pick another directory")
    if out.exists() and not out.is_dir():
        raise UsageError(f"OUT {out} is a file: pick a directory path")
    if _empty_dir(out):
        return  # made for it: nothing to lose
    if out.exists() or out.is_symlink():
        if not force:
            raise UsageError(f"OUT {out} already exists: pass --force to replace it, or pick another directory")
        if not out.is_dir() or (any(out.iterdir()) and not (out / fmt.MANIFEST_NAME).is_file()):
            raise UsageError(f"OUT {out} exists and is not a packed checkpoint: --force only replaces those; remove it yourself")


def _empty_dir(path: Path) -> bool:
    """An empty directory itself (not a link to one): OUT made for the pack, replaced without --force."""
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _swap_into_place(tmp: Path, out: Path, force: bool) -> None:
    old = None
    if _empty_dir(out):
        out.rmdir()  # nothing to lose
    if (out.exists() or out.is_symlink()) and not force:  # made in the moments since the last look
        raise UsageError(f"OUT {out} was made while this pack ran: pass --force to replace it, or pick another directory")
    if out.exists():
        old = out.parent / f".{out.name}.d2moe-old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:  # a link given as OUT goes, not what it points to
        old.unlink() if old.is_symlink() else shutil.rmtree(old, ignore_errors=True)
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


# ----------------------------------------------------------------------------- dense


def _dense_part(source: SourceCheckpoint, dense: list[tuple[str, str]], staging: Staging,
                dtype: str | None) -> tuple[dict, str]:
    """Every dense tensor into dense.safetensors (model keys; cast to `dtype` if given), one tensor in memory."""
    record = staging.done(fmt.DENSE_NAME, verify_whole_file)
    if record is not None:
        return record["entry"], record["dtype"]
    plan = []
    for src_key, model_key in dense:
        info = source.info(src_key)
        out_dtype = TORCH_TO_ST[dtype] if (dtype and info.dtype in fmt.FLOAT_ST_DTYPES) else info.dtype
        plan.append((src_key, model_key, out_dtype, info.shape))
    plan.sort(key=lambda p: (-DTYPE_SIZES.get(p[2], 1), p[1]))  # widest first keeps every tensor aligned
    main = fmt.main_float_dtype((d, shape) for _, _, d, shape in plan) or "F32"
    dense_dtype = dtype or {v: k for k, v in TORCH_TO_ST.items()}.get(main, main)
    if dense_dtype not in fmt.DENSE_DTYPES:
        raise InputError(f"{source.path}: dense weights are {dense_dtype}; pass --dtype float16|bfloat16|float32")
    part = staging.part_path(fmt.DENSE_NAME)
    with fmt.dense_file_writer(part, [(m, d, s) for _, m, d, s in plan]) as w:
        for src_key, model_key, _, _ in plan:
            t = source.get(src_key)
            if dtype and t.is_floating_point():
                t = t.to(getattr(torch, dtype))
            w.write(model_key, t.contiguous().view(torch.uint8).reshape(-1).numpy())
            del t
    entry = fmt.file_entry(part, name=fmt.DENSE_NAME)
    staging.finish(fmt.DENSE_NAME, {"entry": entry, "dtype": dense_dtype})
    return entry, dense_dtype


# ----------------------------------------------------------------------------- experts


class _Fitter:
    """Fits one matrix: the native C fit (rows on `workers` threads) or the torch fit."""

    def __init__(self, lib, cfg: MWQConfig, refits: int, workers: int, calib: LayerCalibration | None,
                 weighting: str = "mse"):
        self.lib, self.cfg, self.refits, self.workers = lib, cfg, refits, workers
        self.stats: Mapping = {}  # the statistics of the layer being fitted, by (layer, expert, matrix)
        self.weighting = weighting
        if lib is None and (refits or calib is not None or weighting != "mse"):
            if cfg.scheme not in native.NATIVE_SCHEMES:
                raise UsageError(f"--refits, --calib and --weighting apply to the sliced and subblock schemes, not {cfg.scheme!r}")
            raise UsageError("--refits, --calib and --weighting other than mse need the native quantizer, which could not "
                             "be built (no C compiler?)")
        self.name = ("native-1" if lib is not None else "torch-1") + ("+rows+gptq" if calib is not None else "")

    def __enter__(self) -> _Fitter:
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="d2moe-fit") if self.lib is not None else None
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="d2moe-read")
        self._threads = torch.get_num_threads()
        if self.lib is None:
            torch.set_num_threads(self.workers)
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        self.reader.shutdown(cancel_futures=True)
        torch.set_num_threads(self._threads)

    def fit(self, w: torch.Tensor, where: tuple[int, int, str]) -> tuple[object, list[float], float]:
        """(MWQTensor, squared error per level, signal) of one matrix."""
        try:
            if self.lib is not None:
                stats = self.stats.get(where)
                if stats is not None:
                    return calibrated_fit(self.lib, w, self.cfg, stats, self.refits, self._pool, self.weighting)
                f = native.fit_sliced(self.lib, w, self.cfg, None, self.refits, self._pool, weighting=self.weighting)
                return f.tensor, f.sq_error, f.signal
            w32 = w.float()
            t = quantize_mwq(w32, self.cfg)
            w64 = w32.double()
            errs = [(w64 - dequantize(t, b).double()).square().sum().item() for b in self.cfg.bits]
            return t, errs, w64.square().sum().item()
        except UsageError as exc:
            layer, expert, matrix = where
            raise InputError(f"layer {layer} expert {expert} matrix {matrix}: {exc}") from None


def _layer_part(experts: ExpertSource, index: int, layer: int, num_experts: int, layout: fmt.BlobLayout,
                fit: _Fitter, staging: Staging, bar: PackProgress, sim=None, sim_rows=None,
                calib: LayerCalibration | None = None) -> list[dict]:
    """One layer's experts file: matrices read one ahead on the I/O thread, fitted (with the layer's calibration
    statistics, gathered now and dropped after), blobs written in order."""
    name = fmt.experts_file_name(layer)
    record = staging.done(name, verify_experts_file)
    if record is not None:
        if sim is not None:
            sim_rows[layer] = record["similarity"]
        if calib is not None:
            calib.starved.extend(record["starved"])
        bar.advance(sum(experts.matrix_nbytes(layer, m) for m in fmt.MATRICES) * num_experts)
        return record["entries"]
    if calib is not None:
        with bar.stage(f"calibrating layer {index + 1}/{bar.layers}"):
            fit.stats = calib.layer_stats(layer, staging.path)
        bar.layer(index)
    order = [(e, m) for e in range(num_experts) for m in fmt.MATRICES]
    entries = []
    part = staging.part_path(name)
    with fmt.ExpertsFileWriter(part, layer, num_experts, layout) as w:
        pending = fit.reader.submit(experts.matrix, layer, *order[0])
        fitted: dict[str, tuple] = {}
        for k, (e, m) in enumerate(order):
            weight = pending.result()
            if k + 1 < len(order):
                pending = fit.reader.submit(experts.matrix, layer, *order[k + 1])
            fitted[m] = fit.fit(weight, (layer, e, m))
            if sim is not None:
                sim.observe(layer, e, m, weight)
            bar.advance(weight.numel() * weight.element_size())
            del weight
            if len(fitted) == len(fmt.MATRICES):
                blob = fmt.encode_expert({mm: f[0] for mm, f in fitted.items()}, layout, fit.cfg)
                entries.append(w.add(e, blob, _sqnr(fitted.values(), len(fit.cfg.bits))))
                fitted.clear()
                _maybe_kill(f"expert:{index}:{e}")
        size = w.file_size
    if hasattr(fit.stats, "close"):  # the layer's spilled statistics
        fit.stats.close()
    fit.stats = {}
    record = {"entries": entries, "size": size}
    if calib is not None:  # the report names them on --resume too
        record["starved"] = [s for s in calib.starved if s[0] == layer]
    if sim is not None:
        record["similarity"] = sim_rows[layer] = sim.neighbors(layer)
    staging.finish(name, record)
    return entries


def _sqnr(fits, n_levels: int) -> list[float]:
    """SQNR in dB per level over an expert's three matrices together, rounded for a stable manifest."""
    fits = list(fits)
    power = sum(f[2] for f in fits)
    out = []
    for i in range(n_levels):
        noise = sum(f[1][i] for f in fits)
        if noise == 0.0:
            out.append(SQNR_CAP_DB)
        elif power == 0.0:
            out.append(-SQNR_CAP_DB)
        else:
            out.append(round(min(10.0 * math.log10(power / noise), SQNR_CAP_DB), 4))
    return out


# ----------------------------------------------------------------------------- gate, report


def _check_gate(router: Path, source: SourceCheckpoint, experts: ExpertSource, adapter, moe_layers: list[int],
                cfg: MWQConfig) -> list[float]:
    """Validate the trained bit-width gate against this model's routers and these levels; its capacities."""
    from d2moe.runtime.gate import load_gate, model_fingerprint, model_probe

    if not router.is_file():
        raise InputError(f"--router {router} does not exist: train one with `d2moe train-router`")
    by_model_key = {model_key: src_key for src_key, model_key in experts.dense}
    weights = []
    for layer in moe_layers:
        key = adapter.router_key(layer)
        if key not in by_model_key:
            raise InputError(f"{source.path}: router weight {key} is missing from the checkpoint")
        weights.append(source.get(by_model_key[key]))
    gate = load_gate(router, expect_fingerprint=model_fingerprint(source.config, weights), expect_levels=cfg.bits,
                     expect_probe=model_probe(source.config, weights))
    extra = gate.meta.get("extra") or {}
    trained = (extra.get("scheme"), extra.get("group_size"))  # absent from gates of older releases: nothing to say
    if None not in trained and trained != (cfg.scheme, cfg.group_size):
        print(f"pack: note: --router {router.name} was trained on --scheme {trained[0]} --group-size {trained[1]}, "
              f"this pack is {cfg.scheme} {cfg.group_size}: its bit choices answer another quantization's errors; "
              "train it with this pack's options for the best choices", file=sys.stderr, flush=True)
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
