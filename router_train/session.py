"""A loaded source model ready for gate training and evaluation.

`open_session` loads the HF checkpoint with transformers (float32; the whole model in memory: this
runs on the server), MWQ-quantizes every expert once and installs `MultiLevelExperts` in every MoE
layer. One session serves any number of gates (`session.use_gate(gate)`) and evaluation modes
("full", "gated", "uniform:<b>", "shuffled"), so sweeps quantize once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from d2moe.errors import InputError
from d2moe.quantize.types import MWQConfig
from d2moe.router_train.experts import MultiLevelExperts, install_multilevel_experts, set_mode
from d2moe.runtime.gate import BitWidthGate, model_fingerprint, model_probe


@dataclass
class Session:
    src: Path
    config: dict  # the source config.json
    model: torch.nn.Module  # frozen, eval mode, experts replaced
    tokenizer: object
    experts: dict[int, MultiLevelExperts]
    mwq: MWQConfig
    fingerprint: str
    probe: dict  # model_probe: the model recognised in another precision
    hidden_size: int
    num_experts: int
    expert_parameters: int  # parameters of one expert (gate + up + down)
    top_k: int  # experts per token
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self.experts)

    def new_gate(self, capacity, proj_dim: int = 32, expert_embedding: bool = True, capacity_scope: str = "model",
                 init: str = "zero") -> BitWidthGate:
        """A fresh gate for this model; init "router" starts it at the router-weight rule (heavier expert, more bits)."""
        gate = BitWidthGate(self.hidden_size, self.num_experts, self.moe_layers, self.mwq.bits, capacity,
                            proj_dim=proj_dim, expert_embedding=expert_embedding, capacity_scope=capacity_scope,
                            router_skip=init == "router")
        if init == "router":
            gate.init_router_rule()
        return gate.to(self.device)

    def use_gate(self, gate: BitWidthGate) -> None:
        for m in self.experts.values():
            m.gate[0] = gate

    def set_mode(self, mode: str) -> None:
        set_mode(self.experts, mode)

    def seed_noise(self, seed: int) -> None:
        """Seed the Gumbel / shuffle noise of every layer (distinct, reproducible streams)."""
        for layer, m in self.experts.items():
            m.generator = torch.Generator().manual_seed(seed * 7919 + layer)

    def layer_stats(self) -> list[dict]:
        return [self.experts[layer].stats for layer in self.moe_layers]

    def logits(self, input_ids: torch.Tensor, mode: str) -> torch.Tensor:
        self.set_mode(mode)
        return self.model(input_ids=input_ids.to(self.device), use_cache=False).logits


def read_config(src: Path) -> dict:
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"{src} has no config.json: pass a Hugging Face checkpoint directory")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{cfg_path} is not valid JSON: {exc}") from None


def router_weights(model: torch.nn.Module, config: dict, layers: list[int]) -> list[torch.Tensor]:
    """The model's own router weight [E, H] of each MoE layer, in layer order."""
    from d2moe.quantize.adapters import adapter_for

    adapter = adapter_for(config)
    state = dict(model.named_parameters())
    return [state[adapter.router_key(layer)].detach() for layer in layers]


def open_session(src: str | Path, mwq: MWQConfig, device: torch.device | str = "cpu", progress=None) -> Session:
    """Load `src` (float32), quantize its experts at every level of `mwq`, and wire them for gating."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from d2moe.quantize.adapters import adapter_for
    from d2moe.quantize.format.config_bounds import check_source_config

    src = Path(src)
    config = read_config(src)
    adapter = adapter_for(config)  # UnsupportedModelError before any heavy loading
    check_source_config(adapter, config, src)
    from d2moe.quantize.format.layout import blob_layout

    shapes = adapter.matrix_shapes(config)
    blob_layout(shapes, mwq)  # a group size that divides no width: pack's error, naming the sizes that do
    try:
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(src))
    except OSError as exc:
        raise InputError(f"could not load the model at {src}: {exc}") from None
    model.requires_grad_(False).eval()
    hf_config = adapter.hf_config(config)
    hidden, top_k = int(hf_config.hidden_size), int(hf_config.num_experts_per_tok)
    num_experts = adapter.num_experts(config)
    gate = BitWidthGate(hidden, num_experts, adapter.moe_layers(config), mwq.bits, [1.0] * len(mwq.bits))
    experts = install_multilevel_experts(model, config, gate, mwq, progress=progress)
    model.to(device)
    layers = sorted(experts)
    routers = router_weights(model, config, layers)
    fingerprint, probe = model_fingerprint(config, routers), model_probe(config, routers)
    return Session(
        src=src, config=config, model=model, tokenizer=tokenizer, experts=experts, mwq=mwq,
        fingerprint=fingerprint, probe=probe, hidden_size=hidden, num_experts=num_experts, top_k=top_k,
        expert_parameters=sum(r * c for r, c in shapes.values()), device=torch.device(device),
    )


@torch.no_grad()
def evaluate(session: Session, blocks: torch.Tensor, mode: str, batch_size: int = 4, seed: int = 0) -> dict:
    """Quality and bits of `mode` on `blocks` [N, S]: label NLL/ppl, KL to the full model, bits per layer."""
    levels = torch.tensor(session.mwq.bits)
    nll_sum = kl_sum = 0.0
    n_tok = 0
    hist = {layer: torch.zeros(len(levels), dtype=torch.long) for layer in session.moe_layers}
    session.seed_noise(seed)
    for m in session.experts.values():
        m.noise = False
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start:start + batch_size].to(session.device)
        teacher = session.logits(ids, "full")
        student = teacher if mode == "full" else session.logits(ids, mode)
        logp = torch.log_softmax(student[:, :-1].float(), -1)
        logq = torch.log_softmax(teacher[:, :-1].float(), -1)
        tokens = ids[:, 1:].numel()
        nll_sum += float(-logp.gather(-1, ids[:, 1:, None]).sum())
        kl_sum += float((logq.exp() * (logq - logp)).sum())
        n_tok += tokens
        if mode in ("gated", "shuffled"):
            for layer in session.moe_layers:
                hist[layer] += torch.bincount(session.experts[layer].stats["chosen"].flatten().cpu(), minlength=len(levels))
        elif mode.startswith("uniform:"):
            li = session.mwq.bits.index(int(mode.split(":")[1]))
            for layer in session.moe_layers:
                hist[layer][li] += ids.numel() * session.top_k
    nll = nll_sum / n_tok
    out = {"mode": mode, "tokens": n_tok, "nll": nll, "ppl": math.exp(min(nll, 50.0)), "kl": kl_sum / n_tok}
    if mode != "full":
        total = sum(hist.values())
        out["avg_bits"] = float((total.float() * levels).sum() / total.sum())
        out["bits_histogram"] = {str(layer): h.tolist() for layer, h in hist.items()}
        out["level_fractions"] = {str(layer): (h.float() / h.sum()).round(decimals=4).tolist() for layer, h in hist.items()}
    return out

