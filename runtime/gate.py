"""The bit-width gate of dual routing: its model, the capacity rule, and the gate file.

The model's own router picks which experts a token visits; this gate picks, for each
(token, selected expert) pair, at how many bits that expert runs. One small head per MoE layer
scores the L levels from the hidden state entering the MoE block, the router's weight for the
expert (unimportant experts can take fewer bits) and the expert's identity (a learned bias).

Capacity: at most ceil(c_k * N) of the N pairs of a batch take level k; a pair refused by a full
level falls to its next choice. Rounds, not a per-pair loop: in round r every unassigned pair asks
for its r-th choice and each level accepts the most confident askers first (ties: lower pair
index). Deterministic and vectorized; it needs at most L rounds because the caps cover N.

Capacity scope. "layer": every MoE layer applies c to its own pairs (every layer gets the same
level histogram). "model": c is a budget over all (token, expert) pairs of the model. Layers run in
sequence at inference, so the model budget is enforced per layer with per-layer capacities c^l,
calibrated after training (`pooled_layer_capacity`): the rule is applied once to every layer's pairs
pooled together, and c^l_k = the fraction of layer l's pairs that took level k (only for levels the
budget limits, c_k < 1; a level without a limit keeps 1.0). Pooled usage then equals c on the
calibration data, and each layer keeps the bit mix the gate wants (sensitive layers more bits).

Gate file (`gate.safetensors`): a safetensors file whose tensors are the heads' parameters
(`layers.<layer>.<param>`) and whose metadata holds `format` = "d2moe-gate", `format_version`
and `gate` = JSON of levels, capacity, capacity_scope, layer_capacity ({layer: [c^l_k]} or null),
moe_layers, hidden size, number of experts, the source model's fingerprint and the head architecture.
Files without capacity_scope (written before it existed) read as scope "layer".

Shape letters: T = tokens, H = hidden size, K = experts per token (top-k), E = experts,
L = levels, D = the head's projection width, N = (token, expert) pairs.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from d2moe.errors import FormatError, GateMismatchError, UsageError
from d2moe.runtime.gate_fast import SMALL, assign_small

GATE_FORMAT = "d2moe-gate"
GATE_FORMAT_VERSION = 1
RETRAIN_HINT = "retrain with `d2moe train-router SRC --data TEXT... --bits ... --capacity ...`"

# config fields that decide whether a gate fits a model (whichever the architecture uses)
FINGERPRINT_CONFIG_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "num_experts_per_tok",
    "intermediate_size",
    "moe_intermediate_size",
    "vocab_size",
)


# ----------------------------------------------------------------------------- capacity


def validate_capacity(capacity: Sequence[float], levels: Sequence[int]) -> tuple[float, ...]:
    """Check one fraction in [0, 1] per level and that the fractions cover every pair (sum >= 1).

    Fractions summing to exactly 1 fix the level histogram of a batch; fractions of 1.0 each mean
    "no limit" (the gate alone decides).
    """
    cap = tuple(float(c) for c in capacity)
    if len(cap) != len(levels):
        raise UsageError(
            f"capacity {list(cap)} has {len(cap)} fractions but there are {len(levels)} levels {list(levels)}: "
            "give one fraction per level (e.g. --capacity 0.3,0.4,0.3)"
        )
    if any(not math.isfinite(c) or c < 0 or c > 1 for c in cap):
        raise UsageError(f"capacity {list(cap)}: every fraction must lie in [0, 1]")
    if sum(cap) < 1 - 1e-6:
        raise UsageError(f"capacity {list(cap)} sums to {sum(cap):.4g} < 1: the fractions must cover every pair (sum to 1)")
    return cap


def capacity_caps(capacity: Sequence[float], n: int) -> list[int]:
    """Per-level caps ceil(c_k * n), raised if rounding left them short of n."""
    caps = [min(n, math.ceil(c * n - 1e-9)) for c in capacity]
    short = n - sum(caps)
    k = len(caps) - 1
    while short > 0:  # only when the fractions sum to 1 within float error
        if caps[k] < n:
            caps[k] += 1
            short -= 1
        k = (k - 1) % len(caps)
    return caps


def assign_with_capacity(logits: torch.Tensor, capacity: Sequence[float]) -> torch.Tensor:
    """Level index per pair [N] from logits [N, L] under the capacity rule (see module docstring).

    Priority: the pair's top softmax probability (its confidence), ties broken by pair index.
    """
    if logits.dim() != 2:
        raise UsageError(f"assign_with_capacity wants logits [N, L], got shape {tuple(logits.shape)}")
    n, num_levels = logits.shape
    if len(capacity) != num_levels:
        raise UsageError(f"capacity has {len(capacity)} fractions for {num_levels} levels")
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=logits.device)
    scores = logits.detach().to(torch.float64)
    if n <= SMALL and scores.device.type == "cpu":  # a decode step's few pairs: the same rule in plain Python
        return assign_small(scores, capacity_caps(capacity, n))
    prefs = torch.argsort(-scores, dim=1, stable=True)  # [N, L] levels, best first (ties: lower level)
    confidence = torch.softmax(scores, dim=1).amax(dim=1)  # [N]
    priority = torch.argsort(-confidence, stable=True)  # [N] pair ids, most confident first
    rank = torch.empty(n, dtype=torch.long, device=logits.device)
    rank[priority] = torch.arange(n, device=logits.device)  # rank of each pair in that order

    remaining = torch.tensor(capacity_caps(capacity, n), dtype=torch.long, device=logits.device)  # [L]
    assigned = torch.full((n,), -1, dtype=torch.long, device=logits.device)
    for r in range(num_levels):
        open_pairs = (assigned < 0).nonzero().squeeze(1)  # [M]
        if open_pairs.numel() == 0:
            break
        wanted = prefs[open_pairs, r]  # [M]
        # order askers by (level, priority rank), then count each asker's place within its level
        order = torch.argsort(wanted * n + rank[open_pairs], stable=True)
        asked_sorted = wanted[order]
        counts = torch.bincount(asked_sorted, minlength=num_levels)  # [L]
        starts = torch.cumsum(counts, 0) - counts
        place = torch.arange(order.numel(), device=logits.device) - starts[asked_sorted]
        accepted = place < remaining[asked_sorted]
        winners = open_pairs[order[accepted]]
        assigned[winners] = asked_sorted[accepted]
        remaining -= torch.bincount(asked_sorted[accepted], minlength=num_levels)
    if (assigned < 0).any():  # impossible when caps cover n; kept as a loud guard
        raise RuntimeError("capacity rule left pairs unassigned: caps do not cover the batch")
    return assigned



CAPACITY_SCOPES = ("model", "layer")


def validate_scope(scope: str) -> str:
    if scope not in CAPACITY_SCOPES:
        raise UsageError(f"--capacity-scope {scope!r}: use one of {', '.join(CAPACITY_SCOPES)}")
    return scope


def capacity_binds(capacity: Sequence[float]) -> bool:
    """Whether any level is limited (c_k < 1); with every c_k = 1 the gate alone decides."""
    return any(c < 1 for c in capacity)


def pooled_layer_capacity(layer_logits: dict[int, torch.Tensor], capacity: Sequence[float]) -> dict[int, tuple[float, ...]]:
    """Per-layer capacities {layer: c^l} from the model-wide rule over every layer's pair logits pooled.

    layer_logits {layer: [N_l, L]}; the rule runs once on the concatenation [Σ N_l, L] with
    `capacity`, then c^l_k is the fraction of layer l's pairs given level k where c_k < 1 (and 1.0,
    no limit, where c_k = 1). Each row is a valid capacity (fractions in [0, 1] covering every pair).
    """
    if not layer_logits:
        raise UsageError("pooled_layer_capacity needs the pair logits of at least one layer")
    layers = sorted(layer_logits)
    pooled = torch.cat([layer_logits[layer].reshape(-1, len(capacity)) for layer in layers])  # [ΣN, L]
    chosen = assign_with_capacity(pooled, capacity)  # [ΣN]
    out, start = {}, 0
    for layer in layers:
        n = layer_logits[layer].reshape(-1, len(capacity)).shape[0]
        counts = torch.bincount(chosen[start:start + n], minlength=len(capacity)).tolist()
        start += n
        out[layer] = tuple(1.0 if c >= 1 else counts[k] / max(n, 1) for k, c in enumerate(capacity))
    return out


# ----------------------------------------------------------------------------- the model


class LayerGateHead(nn.Module):
    """Scores the levels of one MoE layer's (token, expert) pairs.

    proj_dim > 0: logits = out(silu(proj(h) + expert_emb[e] + w * router_dir)), a two-layer MLP.
    proj_dim = 0: logits = lin(h) + expert_emb[e] + w * router_dir, a linear head.
    router_skip (MLP only): + w * router_out, a direct router-weight term on the logits (lets the head
    start exactly at the router-weight rule, `BitWidthGate.init_router_rule`).
    """

    def __init__(self, hidden_size: int, num_experts: int, num_levels: int, proj_dim: int, expert_embedding: bool,
                 router_skip: bool = False):
        super().__init__()
        width = proj_dim if proj_dim > 0 else num_levels
        self.proj = nn.Linear(hidden_size, width)
        self.router_dir = nn.Parameter(torch.zeros(width))
        self.expert_emb = nn.Parameter(torch.zeros(num_experts, width)) if expert_embedding else None
        self.out = nn.Linear(proj_dim, num_levels) if proj_dim > 0 else None
        self.router_out = nn.Parameter(torch.zeros(num_levels)) if (router_skip and proj_dim > 0) else None
        nn.init.normal_(self.proj.weight, std=hidden_size**-0.5 * 0.1)
        nn.init.zeros_(self.proj.bias)
        if self.out is not None:
            nn.init.normal_(self.out.weight, std=proj_dim**-0.5 * 0.1)
            nn.init.zeros_(self.out.bias)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        dtype = self.proj.weight.dtype
        z = self.proj(hidden.to(dtype)).unsqueeze(1)  # [T, 1, D]
        z = z + top_k_weights.to(dtype).unsqueeze(-1) * self.router_dir  # [T, K, D]
        if self.expert_emb is not None:
            z = z + self.expert_emb[top_k_index]
        if self.out is None:
            return z  # [T, K, L]
        logits = self.out(F.silu(z))  # [T, K, L]
        if self.router_out is not None:
            logits = logits + top_k_weights.to(dtype).unsqueeze(-1) * self.router_out
        return logits


class BitWidthGate(nn.Module):
    """One `LayerGateHead` per MoE layer, plus the levels (bit values) and capacities it serves."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        moe_layers: Sequence[int],
        levels: Sequence[int] = (2, 3, 4),
        capacity: Sequence[float] = (0.3, 0.4, 0.3),
        proj_dim: int = 32,
        expert_embedding: bool = True,
        capacity_scope: str = "model",
        layer_capacity: dict[int, Sequence[float]] | None = None,
        router_skip: bool = False,
    ):
        super().__init__()
        self.levels = tuple(int(b) for b in levels)
        if not self.levels or list(self.levels) != sorted(set(self.levels)):
            raise UsageError(f"gate levels {list(self.levels)} must be distinct and ascending")
        self.moe_layers = tuple(int(i) for i in moe_layers)
        self.set_capacity(capacity, capacity_scope, layer_capacity)
        self.hidden_size = int(hidden_size)
        self.num_experts = int(num_experts)
        self.proj_dim = int(proj_dim)
        self.expert_embedding = bool(expert_embedding)
        self.router_skip = bool(router_skip) and self.proj_dim > 0  # the linear head has this term already
        self.heads = nn.ModuleDict(
            {
                str(layer): LayerGateHead(hidden_size, num_experts, len(self.levels), self.proj_dim, expert_embedding,
                                          self.router_skip)
                for layer in self.moe_layers
            }
        )
        self.register_buffer("level_bits", torch.tensor(self.levels, dtype=torch.float32), persistent=False)

    def set_capacity(
        self, capacity: Sequence[float], scope: str = "model", layer_capacity: dict[int, Sequence[float]] | None = None
    ) -> None:
        """Set the budget c, its scope and (scope "model") the calibrated per-layer capacities c^l."""
        self.capacity = validate_capacity(capacity, self.levels)
        self.capacity_scope = validate_scope(scope)
        self.layer_capacity: dict[int, tuple[float, ...]] | None = None
        if layer_capacity is not None:
            if self.capacity_scope != "model":
                raise UsageError("per-layer capacities belong to --capacity-scope model (scope 'layer' uses c in every layer)")
            rows = {int(k): v for k, v in layer_capacity.items()}
            if sorted(rows) != sorted(self.moe_layers):
                raise UsageError(f"per-layer capacities are for layers {sorted(rows)}; the gate's MoE layers are "
                                 f"{list(self.moe_layers)}: give one row per MoE layer")
            self.layer_capacity = {layer: validate_capacity(rows[layer], self.levels) for layer in self.moe_layers}

    def capacity_for(self, layer: int) -> tuple[float, ...]:
        """The capacity layer `layer` applies to its pairs: c^l when calibrated (scope "model"), else c."""
        if self.layer_capacity is not None:
            return self.layer_capacity[int(layer)]
        return self.capacity

    @property
    def architecture(self) -> dict:
        return {"kind": "mlp" if self.proj_dim > 0 else "linear", "proj_dim": self.proj_dim,
                "expert_embedding": self.expert_embedding, "router_skip": self.router_skip,
                "inputs": ["hidden", "router_weight", "expert_id"]}

    @torch.no_grad()
    def init_router_rule(self, strength: float = 4.0) -> None:
        """Start at the router-weight rule: logits = strength * (w - 1/2) * ramp, ramp from -1 (fewest bits) to +1.

        A pair whose router weight is above 1/2 prefers the top level, below 1/2 the bottom one, and the
        further from 1/2 the more confident (so it wins a full level first). The learned terms start at 0,
        except the MLP's hidden projection (kept small and random so it can learn).
        """
        ramp = torch.linspace(-1.0, 1.0, len(self.levels))  # [L]
        for head in self.heads.values():
            if head.out is None:  # linear head: router_dir and proj.bias are level logits
                head.proj.weight.zero_()
                head.router_dir.copy_(strength * ramp)
                head.proj.bias.copy_(-0.5 * strength * ramp)
            else:
                if head.router_out is None:
                    raise UsageError("the router-weight start needs router_skip=True on an MLP gate head")
                head.out.weight.zero_()  # the MLP path starts silent; its gradient flows through out.weight
                head.router_out.copy_(strength * ramp)
                head.out.bias.copy_(-0.5 * strength * ramp)
            if head.expert_emb is not None:
                head.expert_emb.zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def head(self, layer: int) -> LayerGateHead:
        key = str(int(layer))
        if key not in self.heads:
            raise UsageError(f"the gate has no head for layer {layer}: its MoE layers are {list(self.moe_layers)}")
        return self.heads[key]

    def logits(
        self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Level logits [T, K, L] for hidden [T, H], top_k_index [T, K], top_k_weights [T, K]."""
        return self.head(layer)(hidden, top_k_index, top_k_weights)

    @torch.no_grad()
    def select_level_indices(
        self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Level indices [T, K] (into `levels`) after this layer's capacity rule over the batch's T*K pairs."""
        logits = self.logits(layer, hidden, top_k_index, top_k_weights)  # [T, K, L]
        t, k, num_levels = logits.shape
        return assign_with_capacity(logits.reshape(t * k, num_levels), self.capacity_for(layer)).reshape(t, k)

    @torch.no_grad()
    def select_levels(
        self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Bit values [T, K] (LongTensor) chosen for each (token, selected expert) under the capacity rule."""
        idx = self.select_level_indices(layer, hidden, top_k_index, top_k_weights)
        return torch.tensor(self.levels, dtype=torch.long, device=idx.device)[idx]


# ----------------------------------------------------------------------------- fingerprint


def model_fingerprint(config: dict, router_weights: Sequence[torch.Tensor]) -> str:
    """sha256 over the config fields that shape the MoE and the router weights (layer order, float32 bytes)."""
    h = hashlib.sha256()
    h.update(json.dumps(_fingerprint_dims(config), sort_keys=True).encode())
    for w in router_weights:
        w32 = w.detach().to("cpu", torch.float32).contiguous()
        h.update(json.dumps(list(w32.shape)).encode())
        h.update(w32.numpy().tobytes())
    return h.hexdigest()


PROBE_DIRECTIONS = 4  # numbers per MoE layer in a gate file's router probe
PROBE_TOLERANCE = 0.01  # of a layer's probe norm: float32 / bfloat16 / float16 storage of one router stays within it


def model_probe(config: dict, routers: Sequence[torch.Tensor]) -> dict:
    """The model a gate belongs to, whatever precision its routers are stored or run in: the fingerprint's config
    fields, and per MoE layer PROBE_DIRECTIONS numbers, its router applied to a fixed input and projected on fixed
    directions (float64). The fingerprint, a hash of exact bytes, changes when a float32 router runs in bfloat16
    (`pack --dtype`, or a checkpoint that stores its routers in float32 beside bfloat16 weights)."""
    numbers = []
    for w in routers:
        w64 = w.detach().to("cpu", torch.float64)
        g = torch.Generator().manual_seed(w64.shape[1])
        x = torch.randn(w64.shape[1], generator=g, dtype=torch.float64)
        directions = torch.randn(w64.shape[0], PROBE_DIRECTIONS, generator=g, dtype=torch.float64)
        numbers.append([float(v) for v in (w64 @ x) @ directions])
    return {"dims": _fingerprint_dims(config), "routers": numbers}


def _fingerprint_dims(config: dict) -> dict:
    """The config fields that decide whether a gate fits a model (those this architecture sets)."""
    return {k: config[k] for k in FINGERPRINT_CONFIG_KEYS if config.get(k) is not None}


def same_model_probe(stored: dict | None, here: dict | None) -> bool:
    """The two probes describe one model: equal config fields, every layer's numbers within PROBE_TOLERANCE."""
    if stored is None or here is None or stored["dims"] != here["dims"] or len(stored["routers"]) != len(here["routers"]):
        return False
    for a, b in zip(stored["routers"], here["routers"], strict=True):
        a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        if a.shape != b.shape or float((a - b).norm()) > PROBE_TOLERANCE * max(float(b.norm()), 1e-30):
            return False
    return True


# ----------------------------------------------------------------------------- the gate file


def save_gate(gate: BitWidthGate, path: str | Path, fingerprint: str, extra_meta: dict | None = None,
              probe: dict | None = None) -> Path:
    """Write the gate to `path` (safetensors + JSON metadata), atomically (temp file then rename); `probe`
    (model_probe of the model it was trained on) lets the model be recognised in another precision."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {
        "levels": list(gate.levels),
        "capacity": list(gate.capacity),
        "capacity_scope": gate.capacity_scope,
        "layer_capacity": None if gate.layer_capacity is None
        else {str(layer): list(row) for layer, row in gate.layer_capacity.items()},
        "moe_layers": list(gate.moe_layers),
        "hidden_size": gate.hidden_size,
        "num_experts": gate.num_experts,
        "fingerprint": fingerprint,
        **({"model_probe": probe} if probe is not None else {}),
        "architecture": gate.architecture,
        "extra": extra_meta or {},
    }
    tensors = {f"layers.{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in gate.heads.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(
        tensors,
        str(tmp),
        metadata={"format": GATE_FORMAT, "format_version": str(GATE_FORMAT_VERSION), "gate": json.dumps(meta)},
    )
    tmp.chmod(0o644)  # safetensors creates files owner-only; a gate is meant to be shared and packed
    tmp.replace(path)
    return path


def read_gate_meta(path: str | Path) -> dict:
    """The gate file's validated JSON metadata (no tensors loaded); FormatError if foreign or corrupt."""
    meta, _ = _read_gate_file(Path(path), load_tensors=False)
    return meta


def load_gate(
    path: str | Path,
    expect_fingerprint: str | None = None,
    expect_levels: Sequence[int] | None = None,
    expect_probe: dict | None = None,
) -> BitWidthGate:
    """Read and validate a gate file; GateMismatchError when it was trained for another model or levels. The model
    is this one where the fingerprint is, or where both probes are given and agree (model_probe)."""
    path = Path(path)
    meta, tensors = _read_gate_file(path, load_tensors=True)
    if (expect_fingerprint is not None and meta["fingerprint"] != expect_fingerprint
            and not same_model_probe(meta.get("model_probe"), expect_probe)):
        raise GateMismatchError(
            f"{path.name} was trained for another model (fingerprint {meta['fingerprint'][:12]}…, "
            f"this model is {expect_fingerprint[:12]}…): {RETRAIN_HINT}"
        )
    if expect_levels is not None and list(meta["levels"]) != [int(b) for b in expect_levels]:
        raise GateMismatchError(
            f"{path.name} was trained for levels {meta['levels']} but the checkpoint has {[int(b) for b in expect_levels]}: "
            f"{RETRAIN_HINT}"
        )
    arch = meta["architecture"]
    try:
        gate = BitWidthGate(
            meta["hidden_size"], meta["num_experts"], meta["moe_layers"], meta["levels"], meta["capacity"],
            proj_dim=int(arch["proj_dim"]), expert_embedding=bool(arch["expert_embedding"]),
            capacity_scope=meta["capacity_scope"], layer_capacity=meta["layer_capacity"],
            router_skip=bool(arch.get("router_skip", False)),
        )
    except UsageError as exc:
        raise FormatError(f"{path}: gate metadata is inconsistent ({exc}): {RETRAIN_HINT}") from None
    expected = {f"layers.{k}": v for k, v in gate.heads.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise FormatError(f"{path}: gate tensors do not match its metadata (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, ref in expected.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(ref.shape) or got.dtype != torch.float32:
            raise FormatError(f"{path}: tensor {name} is {got.dtype} {tuple(got.shape)}, expected float32 {tuple(ref.shape)}")
        if not torch.isfinite(got).all():
            raise FormatError(f"{path}: tensor {name} holds NaN/inf values (corrupt file): {RETRAIN_HINT}")
    gate.heads.load_state_dict({k[len("layers."):]: v for k, v in tensors.items()})
    gate.fingerprint = meta["fingerprint"]
    gate.meta = meta
    return gate.eval()


def _read_gate_file(path: Path, load_tensors: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    if not path.is_file():
        raise FormatError(f"gate file {path} does not exist: train one with `d2moe train-router`")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if load_tensors else {}
    except Exception as exc:  # safetensors raises its own errors for truncated / foreign bytes
        raise FormatError(f"{path} is not a readable gate file (safetensors: {exc})") from None
    if header.get("format") != GATE_FORMAT:
        raise FormatError(f"{path} is not a d2moe gate file (format {header.get('format')!r}, expected {GATE_FORMAT!r})")
    version = header.get("format_version")
    if version != str(GATE_FORMAT_VERSION):
        raise FormatError(
            f"{path} has gate format version {version!r}; this d2moe reads version {GATE_FORMAT_VERSION}: {RETRAIN_HINT}"
        )
    try:
        meta = json.loads(header["gate"])
        levels = [int(b) for b in meta["levels"]]
        capacity = [float(c) for c in meta["capacity"]]
        moe_layers = [int(i) for i in meta["moe_layers"]]
        hidden, experts = int(meta["hidden_size"]), int(meta["num_experts"])
        fingerprint = str(meta["fingerprint"])
        arch = dict(meta["architecture"])
        int(arch["proj_dim"])
        bool(arch["expert_embedding"])
        scope = str(meta.get("capacity_scope", "layer"))  # files from before scopes: per-layer capacity
        layer_capacity = meta.get("layer_capacity")
        if layer_capacity is not None:
            layer_capacity = {int(k): [float(c) for c in row] for k, row in dict(layer_capacity).items()}
        probe = meta.get("model_probe")
        if probe is not None:  # from an untrusted file: plain numbers only, finite, one row per MoE layer
            probe = {"dims": {str(k): v for k, v in dict(probe["dims"]).items() if isinstance(v, str | int)},
                     "routers": [[float(v) for v in row] for row in probe["routers"]]}
            if len(probe["routers"]) != len(moe_layers) or not all(
                    len(row) == PROBE_DIRECTIONS and all(math.isfinite(v) for v in row) for row in probe["routers"]):
                raise ValueError("model_probe does not hold finite numbers per MoE layer")
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: gate metadata is missing or malformed ({exc!r}): {RETRAIN_HINT}") from None
    if hidden <= 0 or experts <= 0 or not moe_layers:
        raise FormatError(f"{path}: gate metadata has hidden size {hidden}, {experts} experts, layers {moe_layers}")
    _check_layer_capacity(path, scope, layer_capacity, moe_layers, levels)
    meta.update(levels=levels, capacity=capacity, moe_layers=moe_layers, hidden_size=hidden, num_experts=experts,
                fingerprint=fingerprint, architecture=arch, capacity_scope=scope, layer_capacity=layer_capacity,
                model_probe=probe)
    return meta, tensors


def _check_layer_capacity(path: Path, scope: str, rows: dict | None, moe_layers: list[int], levels: list[int]) -> None:
    """Per-layer capacities: scope "model" only, one row per MoE layer, each a capacity over the levels."""
    if scope not in CAPACITY_SCOPES:
        raise FormatError(f"{path}: gate capacity_scope {scope!r} is not one of {list(CAPACITY_SCOPES)}: {RETRAIN_HINT}")
    if rows is None:
        return
    if scope != "model":
        raise FormatError(f"{path}: gate has per-layer capacities but capacity_scope {scope!r} (only 'model' has them)")
    if sorted(rows) != sorted(moe_layers):
        raise FormatError(f"{path}: gate per-layer capacities are for layers {sorted(rows)}, its MoE layers are "
                          f"{moe_layers}: {RETRAIN_HINT}")
    for layer, row in rows.items():
        try:
            validate_capacity(row, levels)
        except (UsageError, TypeError, ValueError):
            raise FormatError(f"{path}: gate capacity of layer {layer} {row} is not a capacity over levels {levels} "
                              f"(one fraction in [0, 1] per level, summing to at least 1): {RETRAIN_HINT}") from None
