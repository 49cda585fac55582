"""The experts module used while training the gate: every expert at every MWQ level, mixed by the gate.

`MultiLevelExperts` replaces a model's fused experts module (same call:
`forward(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]`). Its weights
are the real MWQ reconstructions (`quantize_mwq` once, `dequantize` at each level), so training
sees exactly the outputs the packed checkpoint will give. Modes:
- "full": the original full-precision experts (the distillation teacher, same model, no copy);
- "gated": the gate's hard level choice after the capacity rule, with a differentiable path to
  the gate's probabilities (straight-through, or Gumbel-softmax straight-through);
- "uniform:<b>": every pair at level b (baseline);
- "shuffled": the gate's choices randomly permuted among the batch's pairs: the same level
  histogram, no token-adaptivity (the "random assignment" baseline).

Shape letters: T tokens, H hidden, I expert intermediate, K top-k, E experts, L levels, n pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from d2moe.quantize.mwq import dequantize, quantize_mwq
from d2moe.quantize.types import MWQConfig
from d2moe.runtime.gate import BitWidthGate, assign_with_capacity

ESTIMATORS = ("ste", "gumbel")


def quantized_levels(gate_up: torch.Tensor, down: torch.Tensor, cfg: MWQConfig, dtype=torch.float32):
    """Dequantized expert weights at every level: gate_up [L, E, 2I, H], down [L, E, H, I].

    gate, up and down are quantized separately as [O, I] matrices (groups along their inputs),
    exactly as `pack` stores them.
    """
    num_experts, two_i, _ = gate_up.shape
    inter = two_i // 2
    gu_levels, down_levels = [], []
    for e in range(num_experts):
        mats = {"gate": gate_up[e, :inter], "up": gate_up[e, inter:], "down": down[e]}
        q = {name: quantize_mwq(w.detach().float().contiguous(), cfg) for name, w in mats.items()}
        gu_levels.append([torch.cat([dequantize(q["gate"], b), dequantize(q["up"], b)]).to(dtype) for b in cfg.bits])
        down_levels.append([dequantize(q["down"], b).to(dtype) for b in cfg.bits])
    gu = torch.stack([torch.stack([gu_levels[e][li] for e in range(num_experts)]) for li in range(len(cfg.bits))])
    dn = torch.stack([torch.stack([down_levels[e][li] for e in range(num_experts)]) for li in range(len(cfg.bits))])
    return gu, dn


class MultiLevelExperts(nn.Module):
    """Drop-in experts module holding every level; see the module docstring for the modes."""

    def __init__(self, original: nn.Module, layer: int, gate: BitWidthGate, cfg: MWQConfig, estimator: str = "ste"):
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator {estimator!r}: use one of {ESTIMATORS}")
        self.layer = layer
        self.levels = tuple(cfg.bits)
        self.num_experts = int(original.gate_up_proj.shape[0])
        self.act_fn = original.act_fn
        self.original = original  # full-precision weights for the teacher; frozen
        for p in original.parameters():
            p.requires_grad_(False)
        gu, dn = quantized_levels(original.gate_up_proj.data, original.down_proj.data, cfg)
        self.register_buffer("gate_up_levels", gu, persistent=False)  # [L, E, 2I, H]
        self.register_buffer("down_levels", dn, persistent=False)  # [L, E, H, I]
        self.gate = [gate]  # a list: the gate is owned (and saved) elsewhere, not a submodule here
        self.estimator = estimator
        self.gumbel_tau = 1.0
        self.noise = False  # Gumbel noise on (training) or off (evaluation)
        self.mode = "gated"
        self.generator: torch.Generator | None = None  # Gumbel / shuffle noise source (seeded by the caller)
        self.stats: dict | None = None  # filled by each gated forward for the loss and the report

    def _mix_weights(self, hidden, top_k_index, top_k_weights) -> torch.Tensor:
        """[T, K, L] level weights: one-hot choice in value, gate probabilities in gradient."""
        t, k = top_k_index.shape
        num_levels = len(self.levels)
        if self.mode == "full":
            raise RuntimeError("no level mixing in full mode")
        if self.mode.startswith("uniform:"):
            idx = torch.full((t, k), self.levels.index(int(self.mode.split(":")[1])), dtype=torch.long)
            return F.one_hot(idx.to(hidden.device), num_levels).to(hidden.dtype)
        gate = self.gate[0]
        logits = gate.logits(self.layer, hidden, top_k_index, top_k_weights)  # [T, K, L]
        probs = torch.softmax(logits.float(), dim=-1)
        choice_logits, soft = logits, probs
        if self.estimator == "gumbel" and self.noise:
            u = torch.rand(logits.shape, generator=self.generator, device="cpu").to(logits.device)
            noisy = logits - torch.log(-torch.log(u.clamp(1e-9, 1 - 1e-9)))
            choice_logits, soft = noisy, torch.softmax(noisy.float() / self.gumbel_tau, dim=-1)
        cap = gate.capacity_for(self.layer)
        chosen = assign_with_capacity(choice_logits.reshape(t * k, num_levels), cap).reshape(t, k)
        if self.mode == "shuffled":
            perm = torch.randperm(t * k, generator=self.generator).to(chosen.device)
            chosen = chosen.reshape(-1)[perm].reshape(t, k)
        hard = F.one_hot(chosen, num_levels).to(probs.dtype)
        self.stats = {"probs": probs, "chosen": chosen.detach(), "logits": choice_logits.detach()}
        return (hard + soft - soft.detach()).to(hidden.dtype)  # straight-through

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if self.mode == "full":
            return self.original(hidden_states, top_k_index, top_k_weights)
        mix = self._mix_weights(hidden_states, top_k_index, top_k_weights)  # [T, K, L]
        out = torch.zeros_like(hidden_states)
        inter = self.down_levels.shape[-1]
        for e in torch.unique(top_k_index).tolist():
            token_idx, pos = torch.where(top_k_index == e)  # [n], [n]
            x = hidden_states[token_idx]  # [n, H]
            gu = torch.einsum("nh,loh->lno", x, self.gate_up_levels[:, e])  # [L, n, 2I]
            act = self.act_fn(gu[..., :inter]) * gu[..., inter:]  # [L, n, I]
            y = torch.einsum("lni,lhi->lnh", act, self.down_levels[:, e])  # [L, n, H]
            w = mix[token_idx, pos].transpose(0, 1).unsqueeze(-1)  # [L, n, 1]
            y = (w * y).sum(0) * top_k_weights[token_idx, pos, None].to(y.dtype)  # [n, H]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def find_experts_modules(model: nn.Module, config: dict) -> dict[int, tuple[nn.Module, str, nn.Module]]:
    """{layer: (parent module, attribute name, experts module)} for each MoE layer of `model`.

    The adapter names the module (`experts_path(layer)`); it must be a fused experts module
    (gate_up_proj [E, 2I, H], down_proj [E, H, I], the 3-argument forward) to be trained here.
    """
    from d2moe.errors import UnsupportedModelError
    from d2moe.quantize.adapters import adapter_for

    adapter = adapter_for(config)
    found = {}
    for layer in adapter.moe_layers(config):
        path = adapter.experts_path(layer)
        parent_path, _, attr = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path)
            module = getattr(parent, attr)
        except AttributeError:
            raise UnsupportedModelError(f"{config.get('model_type')} model has no module {path}: cannot train a gate for it") from None
        gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if not (isinstance(gu, torch.Tensor) and gu.dim() == 3 and isinstance(dn, torch.Tensor) and dn.dim() == 3):
            raise UnsupportedModelError(
                f"{path} ({type(module).__name__}) is not a fused experts module (gate_up_proj [E,2I,H], down_proj [E,H,I])"
            )
        found[layer] = (parent, attr, module)
    if not found:
        raise UnsupportedModelError(f"{config.get('model_type')} config has no MoE layers: nothing to gate")
    return found


def install_multilevel_experts(
    model: nn.Module, config: dict, gate: BitWidthGate, cfg: MWQConfig, estimator: str = "ste", progress=None
) -> dict[int, MultiLevelExperts]:
    """Replace every MoE layer's experts module by a `MultiLevelExperts`; return them by layer."""
    installed = {}
    for layer, (parent, attr, module) in find_experts_modules(model, config).items():
        wrapped = MultiLevelExperts(module, layer, gate, cfg, estimator)
        setattr(parent, attr, wrapped)
        installed[layer] = wrapped
        if progress is not None:
            progress(layer)
    return installed


def set_mode(experts: dict[int, MultiLevelExperts], mode: str) -> None:
    for m in experts.values():
        m.mode = mode
