"""Quality figures for quantized weights."""

from __future__ import annotations

import math

import torch


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10*log10(sum ref^2 / sum (ref - approx)^2), in dB.

    +inf for an exact copy. Summed in float64 so large matrices do not lose the small error.
    """
    ref64 = ref.detach().to(torch.float64)
    err = (ref64 - approx.detach().to(torch.float64)).square().sum().item()
    signal = ref64.square().sum().item()
    if err == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / err)
