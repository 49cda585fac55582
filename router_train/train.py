"""The training loop of `d2moe train-router`: accelerate, deterministic batches, resumable state, a report.

Runs on CPU, one GPU, or many (`accelerate launch`): the model is frozen and copied to each
process; each takes its slice of every global batch and the gate's gradients are averaged across
processes before the optimizer step, so every process holds the same gate. Batches are a pure
function of (seed, step) — a per-epoch permutation of the blocks — which makes `--resume` exact:
6 steps == 3 steps + resume + 3 steps, bit for bit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from d2moe.errors import InputError, UsageError
from d2moe.quantize.adapters import adapter_for
from d2moe.quantize.types import MWQConfig
from d2moe.router_train.calibrate import calibrate_layer_capacity
from d2moe.router_train.data import load_texts, split_blocks, token_blocks
from d2moe.router_train.experts import ESTIMATORS
from d2moe.router_train.loss import TARGETS, gate_loss
from d2moe.router_train.session import Session, evaluate, open_session, read_config
from d2moe.runtime.gate import BitWidthGate, capacity_binds, save_gate, validate_capacity, validate_scope

STATE_FILE = "train_state.pt"
INITS = ("router", "zero")


@dataclass(frozen=True)
class TrainConfig:
    src: str  # HF checkpoint directory
    data: tuple[str, ...]  # calibration files or hub dataset names
    output: str = "gate.safetensors"
    bits: tuple[int, ...] = (2, 3, 4)
    capacity: tuple[float, ...] = (0.3, 0.4, 0.3)  # per-level fraction of a batch's (token, expert) pairs
    capacity_scope: str = "model"  # "model": c over all layers' pairs (per-layer caps calibrated); "layer": c in each layer
    recalibrate_every: int = 0  # scope model: steps between per-layer cap updates; 0 = no caps in training (α price), calibrate at end
    calibration_blocks: int = 16  # training blocks the per-layer caps are calibrated on
    init: str = "router"  # "router": start at the router-weight rule (measured best with the α price); "zero": small random start
    group_size: int = 64
    scheme: str = "residual"
    seq_len: int = 256
    batch_size: int = 4  # blocks per optimizer step (global, over all processes)
    max_steps: int = 200
    lr: float = 3e-3
    seed: int = 0
    bit_cost: float = 0.005  # α: weight of the expected-bits term (0.005 ≈ 3.0 bits unlimited on tiny-mixtral)
    target: str = "distill"  # "distill" (full-precision model's distribution) or "labels"
    estimator: str = "ste"  # "ste" (straight-through) or "gumbel" (Gumbel-softmax straight-through)
    proj_dim: int = 32  # gate head width; 0 = a linear head
    expert_embedding: bool = True  # a learned per-expert term in the gate
    eval_blocks: int = 8  # blocks held out for the before/after report
    max_blocks: int | None = None  # cap on calibration blocks (None: all)
    save_every: int = 50  # steps between resumable checkpoints
    state_dir: str | None = None  # where resumable state goes (default: <output>.state)
    resume: bool = False
    force: bool = False  # replace an existing output file

    def __post_init__(self) -> None:
        validate_capacity(self.capacity, self.bits)
        validate_scope(self.capacity_scope)
        if self.init not in INITS:
            raise UsageError(f"--init {self.init!r}: use one of {', '.join(INITS)}")
        if self.recalibrate_every < 0 or self.calibration_blocks < 1:
            raise UsageError("--recalibrate-every must be >= 0 and --calibration-blocks >= 1")
        if self.target not in TARGETS:
            raise UsageError(f"--target {self.target!r}: use one of {', '.join(TARGETS)}")
        if self.estimator not in ESTIMATORS:
            raise UsageError(f"--estimator {self.estimator!r}: use one of {', '.join(ESTIMATORS)}")
        for name in ("max_steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise UsageError(f"--lr {self.lr} must be a positive number")
        if not (math.isfinite(self.bit_cost) and self.bit_cost >= 0):
            raise UsageError(f"--bit-cost {self.bit_cost} must be a number >= 0")

    @property
    def mwq(self) -> MWQConfig:
        return MWQConfig(bits=self.bits, group_size=self.group_size, scheme=self.scheme)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir or f"{self.output}.state") / STATE_FILE

    @property
    def pooled(self) -> bool:
        """Whether per-layer caps are calibrated from a model-wide budget."""
        return self.capacity_scope == "model" and capacity_binds(self.capacity)

    def resume_key(self) -> dict:
        """Options that must match for `--resume` to continue the same run."""
        keep = ("bits", "capacity", "capacity_scope", "recalibrate_every", "calibration_blocks", "init", "group_size", "scheme", "seq_len", "batch_size", "seed", "proj_dim",
                "expert_embedding", "target", "estimator", "data", "eval_blocks", "max_blocks")
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k in keep}


@dataclass
class StepLog:
    step: int
    loss: float
    task: float  # KL (distill) or NLL (labels)
    ce: float
    expected_bits: float
    avg_bits: float  # after the capacity rule


@dataclass
class TrainResult:
    gate: BitWidthGate
    report: dict
    history: list[StepLog] = field(default_factory=list)
    main: bool = True  # False in every process of a multi-process run but the first: it prints and writes nothing


def batch_indices(step: int, batch_size: int, n_blocks: int, seed: int) -> torch.Tensor:
    """Global batch of `step`: positions step*B .. step*B+B-1 of a stream of per-epoch permutations."""
    pos = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs = (pos // n_blocks).tolist()
    perms = {e: torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 1_000_003 + e)) for e in set(epochs)}
    return torch.stack([perms[e][p % n_blocks] for e, p in zip(epochs, pos.tolist(), strict=True)])


def train_gate(
    session: Session,
    gate: BitWidthGate,
    train_blocks: torch.Tensor,
    cfg: TrainConfig,
    accelerator=None,
    on_step: Callable[[StepLog], None] | None = None,
    start_step: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    history: list[StepLog] | None = None,
    save_state: Callable[[int, torch.optim.Optimizer, list[StepLog]], None] | None = None,
) -> list[StepLog]:
    """Optimise `gate` on `train_blocks` [N, S] for steps start_step .. cfg.max_steps-1.

    Scope "model": every `recalibrate_every` steps the per-layer caps are recalibrated on the first
    `calibration_blocks` training blocks (a pure function of the gate, so `--resume` stays exact);
    with recalibrate_every = 0 the gate trains without caps (the α price alone) and the caller calibrates
    at the end (`finish_capacity`).
    """
    rank = accelerator.process_index if accelerator else 0
    world = accelerator.num_processes if accelerator else 1
    optimizer = optimizer or torch.optim.AdamW(gate.parameters(), lr=cfg.lr, weight_decay=0.0)
    history = history if history is not None else []
    levels = torch.tensor(cfg.bits, dtype=torch.float32, device=session.device)
    calib = train_blocks[: cfg.calibration_blocks]
    budget = tuple(cfg.capacity)
    if cfg.pooled and cfg.recalibrate_every == 0:
        gate.set_capacity((1.0,) * len(budget), "model")  # the α price alone while training
    session.use_gate(gate)
    for m in session.experts.values():
        m.estimator = cfg.estimator
    for step in range(start_step, cfg.max_steps):
        if cfg.pooled and cfg.recalibrate_every and (step % cfg.recalibrate_every == 0 or gate.layer_capacity is None):
            gate.eval()
            calibrate_layer_capacity(session, gate, calib, passes=1)
        gate.train()
        for m in session.experts.values():
            m.noise = True
        idx = batch_indices(step, cfg.batch_size, train_blocks.shape[0], cfg.seed)[rank::world]
        ids = train_blocks[idx].to(session.device)  # [B, S]
        session.seed_noise(cfg.seed * 100_003 + step)
        with torch.no_grad():
            teacher = session.logits(ids, "full") if cfg.target == "distill" else None
        student = session.logits(ids, "gated")
        parts = gate_loss(student, teacher, ids, session.layer_stats(), levels, cfg.bit_cost, cfg.target)
        optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        scalars = torch.tensor([float(parts.total.detach()), float(parts.task.detach()), float(parts.ce.detach()),
                                float(parts.expected_bits.detach()), float(parts.hard_bits)])
        if world > 1:  # each process's mean over its share, weighed by that share: the global batch's mean exactly
            share = len(idx) / cfg.batch_size
            for p in gate.parameters():
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad * share, reduction="sum")
            scalars = accelerator.reduce(scalars.to(session.device) * share, reduction="sum").cpu()
        optimizer.step()
        log = StepLog(step + 1, *scalars.tolist())
        history.append(log)
        if on_step:
            on_step(log)
        if save_state and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps):
            save_state(step + 1, optimizer, history)
    for m in session.experts.values():
        m.noise = False
    gate.eval()
    if cfg.pooled and cfg.recalibrate_every == 0:
        gate.set_capacity(budget, "model")
    return history


def finish_capacity(session: Session, gate: BitWidthGate, train_blocks: torch.Tensor, cfg: TrainConfig) -> None:
    """The final per-layer caps of a model-wide budget, calibrated on the trained gate (scope "model")."""
    if cfg.pooled:
        calibrate_layer_capacity(session, gate, train_blocks[: cfg.calibration_blocks], passes=2)


def _load_state(cfg: TrainConfig, gate: BitWidthGate, optimizer) -> tuple[int, list[StepLog]]:
    path = cfg.state_path
    if not path.is_file():
        raise InputError(f"--resume: no training state at {path}: run without --resume first (or pass --state-dir)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("resume_key") != cfg.resume_key():
        diff = sorted(k for k in cfg.resume_key() if state.get("resume_key", {}).get(k) != cfg.resume_key()[k])
        raise UsageError(f"--resume: {path} was written with other options ({', '.join(diff)}): use the same options")
    gate.load_state_dict(state["gate"])
    rows = state.get("layer_capacity")
    gate.set_capacity(cfg.capacity, gate.capacity_scope, None if rows is None else {int(k): v for k, v in rows.items()})
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), [StepLog(**h) for h in state["history"]]


def _state_saver(cfg: TrainConfig, gate: BitWidthGate, accelerator):
    def save(step: int, optimizer, history: list[StepLog]) -> None:
        if accelerator is not None and not accelerator.is_main_process:
            return
        path = cfg.state_path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"step": step, "gate": gate.state_dict(), "optimizer": optimizer.state_dict(),
                    "layer_capacity": gate.layer_capacity,
                    "history": [asdict(h) for h in history], "resume_key": cfg.resume_key()}, tmp)
        tmp.replace(path)

    return save


def check_outputs(cfg: TrainConfig) -> None:
    """The gate file and the state folder can be written, before any training (they were found out after it)."""
    out = Path(cfg.output)
    if out.is_dir():
        raise UsageError(f"-o {out} is a directory: name the gate file, e.g. -o {out / 'gate.safetensors'}")
    if out.exists() and not (cfg.force or cfg.resume):  # a resumed run replaces its own earlier gate
        raise UsageError(f"-o {out} exists: pass --force to replace it, or another -o")
    from d2moe.user_files import check_writable

    check_writable(out, "-o")
    check_writable(cfg.state_path, "--state-dir")


def train_router(cfg: TrainConfig, on_step=None, on_phase: Callable[[str], None] | None = None) -> TrainResult:
    """The whole `train-router` job: data, model, before-eval, training, after-eval, gate file, report."""
    from accelerate import Accelerator

    check_outputs(cfg)
    phase = on_phase or (lambda _msg: None)
    t0 = time.perf_counter()
    # cpu=True where there is no GPU: a multi-process launch (torchrun, accelerate launch --multi_gpu) is then one
    # gloo group, not N unaware copies that each train alone and write the same files
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    if accelerator.num_processes > cfg.batch_size:
        raise UsageError(f"--batch-size {cfg.batch_size} is the global batch and {accelerator.num_processes} processes "
                         f"share it: use --batch-size {accelerator.num_processes} or more, or fewer processes")
    if not main:  # one process speaks for the run
        on_step, phase = None, (lambda _msg: None)
    torch.manual_seed(cfg.seed)
    config = read_config(Path(cfg.src))
    n_moe = len(adapter_for(config).moe_layers(config))  # fail fast on a missing or unsupported model
    phase("reading calibration data")
    texts = load_texts(cfg.data)
    phase(f"loading and quantizing {cfg.src} (levels {list(cfg.bits)})")
    done = iter(range(1, n_moe + 1))
    session = open_session(cfg.src, cfg.mwq, device=accelerator.device,
                           progress=lambda layer: phase(f"quantized MoE layer {layer} ({next(done, n_moe)}/{n_moe})"))
    blocks = token_blocks(texts, session.tokenizer, cfg.seq_len, cfg.max_blocks)
    train_blocks, eval_blocks = split_blocks(blocks, cfg.eval_blocks)
    gate = session.new_gate(cfg.capacity, cfg.proj_dim, cfg.expert_embedding, cfg.capacity_scope, cfg.init)
    optimizer = torch.optim.AdamW(gate.parameters(), lr=cfg.lr, weight_decay=0.0)
    start, history = 0, []
    if cfg.resume:
        start, history = _load_state(cfg, gate, optimizer)
    session.use_gate(gate)
    eval_set = eval_blocks if eval_blocks.shape[0] else train_blocks[: max(1, cfg.batch_size)]
    if start == 0 and cfg.pooled:
        calibrate_layer_capacity(session, gate, train_blocks[: cfg.calibration_blocks], passes=2)
    phase("evaluating before training")
    before = evaluate(session, eval_set, "gated", cfg.batch_size, cfg.seed) if start == 0 else None
    phase("training")
    history = train_gate(session, gate, train_blocks, cfg, accelerator, on_step, start, optimizer, history,
                         _state_saver(cfg, gate, accelerator))
    phase("calibrating per-layer capacities")
    finish_capacity(session, gate, train_blocks, cfg)
    phase("evaluating after training")
    after = evaluate(session, eval_set, "gated", cfg.batch_size, cfg.seed)
    uniform = {str(b): evaluate(session, eval_set, f"uniform:{b}", cfg.batch_size) for b in cfg.bits}
    full = evaluate(session, eval_set, "full", cfg.batch_size)
    report = {
        "format": "d2moe-train-router-report",
        "model": str(cfg.src),
        "fingerprint": session.fingerprint,
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "levels": list(cfg.bits),
        "capacity": list(cfg.capacity),
        "capacity_scope": cfg.capacity_scope,
        "layer_capacity": None if gate.layer_capacity is None
        else {str(layer): [round(c, 6) for c in row] for layer, row in gate.layer_capacity.items()},
        "moe_layers": session.moe_layers,
        "gate_parameters": gate.num_parameters(),
        "expert_parameters": session.expert_parameters,
        "gate_architecture": gate.architecture,
        "calibration": {"train_blocks": int(train_blocks.shape[0]), "eval_blocks": int(eval_set.shape[0]),
                        "seq_len": cfg.seq_len},
        "steps": cfg.max_steps,
        "resumed_from_step": start,
        "train": {
            "first": asdict(history[0]) if history else None,
            "last": asdict(history[-1]) if history else None,
            "history": [asdict(h) for h in history[:: max(1, len(history) // 50)]],
        },
        "eval": {"before": before, "after": after, "uniform": uniform, "full": full},
        "avg_bits": after["avg_bits"],
        "bits_histogram": after["bits_histogram"],
        "capacity_use": {  # fraction of each level's capacity used, per layer, against that layer's caps
            layer: [round(f / c, 4) if c > 0 else None for f, c in zip(fr, gate.capacity_for(int(layer)), strict=True)]
            for layer, fr in after["level_fractions"].items()
        },
        "world_size": accelerator.num_processes,
        "device": str(accelerator.device),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if main:
        save_gate(gate, cfg.output, session.fingerprint,
                  {"source": str(cfg.src), "steps": cfg.max_steps, "bit_cost": cfg.bit_cost, "target": cfg.target,
                   "avg_bits": after["avg_bits"], "scheme": cfg.scheme, "group_size": cfg.group_size},
                  probe=session.probe)
    return TrainResult(gate=gate, report=report, history=history, main=main)
