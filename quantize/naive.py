"""The naive greedy residual MWQ, kept only to reproduce DESIGN.md's warning: it saturates.

Base: the dedicated (clip-searched) b1-bit grid. Each further plane stores the sign of the
residual and a per-group alpha = mean|residual|. Every plane is L2-optimal given the one before
(greedy), yet the total saturates: the weights the base grid clipped lie further out than the
shrinking alphas can ever reach (sum_j alpha_j is bounded), so their error stays. Not used by `pack`.
"""

from __future__ import annotations

import torch

from d2moe.quantize.bitplanes import pack_bits, pack_plane
from d2moe.quantize.grid import check_shape, rtn_codes
from d2moe.quantize.types import MWQConfig, MWQTensor


def quantize_naive_residual(w: torch.Tensor, bits: tuple[int, ...], group_size: int) -> MWQTensor:
    """Greedy sign-plane residual quantization as a "residual"-scheme MWQTensor (dequantize reads it)."""
    cfg = MWQConfig(bits=bits, group_size=group_size, scheme="residual")
    rows, cols = check_shape(tuple(w.shape), group_size)
    b1, depth = cfg.b1, cfg.bk - cfg.b1
    x = w.detach().float().reshape(-1, group_size)  # [O*G, S]
    codes, step16, offset16 = rtn_codes(w, b1, group_size)  # w ~ offset + step * (codes + 0.5)
    step, offset = step16.float().view(-1, 1), offset16.float().view(-1, 1)
    codes = codes.view(-1, group_size)
    resid = x - (offset + step * (codes.float() + 0.5))
    signs, alphas = [], []
    for _ in range(depth):
        sign = resid >= 0
        a16 = resid.abs().mean(-1).half()  # the L2-optimal magnitude for a sign plane
        resid -= torch.where(sign, 1.0, -1.0) * a16.float().unsqueeze(-1)
        signs.append(pack_plane(sign.view(rows, cols)))
        alphas.append(a16.view(rows, cols // group_size))
    base_planes = pack_bits(codes.view(rows, cols), b1)
    planes = torch.cat([base_planes, torch.stack(signs)]) if signs else base_planes
    n_g = cols // group_size
    return MWQTensor(
        shape=(rows, cols), cfg=cfg, level=cfg.bk,
        scale=step16.view(rows, n_g), offset=offset16.view(rows, n_g), planes=planes,
        alpha=torch.stack(alphas) if alphas else torch.empty(0, rows, n_g, dtype=torch.float16),
    )
