"""The gate's training loss (slides, "Token-Adaptive Bit-Width Selection").

    Loss = 1/T Σ_x [ CE(p(x), q(x)) + α/L Σ_l Σ_k p_k^l(x) b_k ]

p: the quantized model's next-token distribution under the gate's levels; q: the full-precision
model's (distillation) or the one-hot label. For distillation CE(p, q) = H(q) + KL(q || p) and
H(q) does not depend on the gate, so we minimise KL (same gradient, and a loss whose floor is 0
makes "it decreased" meaningful) and report both. The bit term averages, over the L MoE layers
and the K experts each token visits, the gate's expected bits Σ_k p_k b_k.

Shape letters: B blocks, S positions, V vocabulary, T = B*S tokens, K top-k, L levels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TARGETS = ("distill", "labels")


@dataclass(frozen=True)
class LossParts:
    total: torch.Tensor  # what is minimised
    task: torch.Tensor  # KL(q || p) per token (distill) or label NLL per token (labels)
    ce: torch.Tensor  # CE(p, q) per token: the slide's term (distill: H(q) + KL; labels: NLL)
    expected_bits: torch.Tensor  # gate's expected bits per (token, expert), averaged over layers
    hard_bits: float  # bits actually used (after the capacity rule), averaged the same way


def task_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, input_ids: torch.Tensor, target: str):
    """(task, ce): per-token means over next-token positions.

    student_logits / teacher_logits [B, S, V]; input_ids [B, S]; position s predicts token s+1.
    """
    logp = F.log_softmax(student_logits[:, :-1].float(), dim=-1)  # [B, S-1, V]
    if target == "labels":
        nll = F.nll_loss(logp.flatten(0, 1), input_ids[:, 1:].flatten())
        return nll, nll
    if teacher_logits is None:
        raise ValueError("distillation needs the teacher's logits")
    logq = F.log_softmax(teacher_logits[:, :-1].float(), dim=-1)
    q = logq.exp()
    ce = -(q * logp).sum(-1).mean()
    kl = (q * (logq - logp)).sum(-1).mean()
    return kl, ce


def bit_cost(layer_stats: list[dict], levels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(expected bits under the gate's probabilities [differentiable], hard bits after capacity)."""
    expected = torch.stack([(s["probs"] * levels.to(s["probs"].device)).sum(-1).mean() for s in layer_stats]).mean()
    hard = torch.stack([levels.to(s["chosen"].device)[s["chosen"]].float().mean() for s in layer_stats]).mean()
    return expected, float(hard)


def gate_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    input_ids: torch.Tensor,
    layer_stats: list[dict],
    levels: torch.Tensor,
    alpha: float,
    target: str = "distill",
) -> LossParts:
    task, ce = task_loss(student_logits, teacher_logits, input_ids, target)
    expected, hard = bit_cost(layer_stats, levels)
    return LossParts(total=task + alpha * expected, task=task, ce=ce, expected_bits=expected, hard_bits=hard)
