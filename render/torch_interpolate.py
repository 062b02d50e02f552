"""Pure-PyTorch attribute interpolation (nvdiffrast's ``interpolate``), differentiable."""
from __future__ import annotations

import torch

__all__ = ["interpolate_torch"]


def interpolate_torch(attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor,
                      rast_db: torch.Tensor | None, diff_attrs: list[int] | None):
    """``out = u*a[v0] + v*a[v1] + (1-u-v)*a[v2]`` per covered pixel, zero elsewhere.

    attr ``[V,A]`` or ``[B or 1,V,A]``; rast ``[B,H,W,4]``; returns ``(out [B,H,W,A],
    out_da [B,H,W,2*len(diff_attrs)])`` where ``out_da[..., 2k:2k+2] = (d a_k/dX, d a_k/dY)``.
    Gradients flow to ``attr``, to ``rast[..., :2]`` and to ``rast_db``.
    """
    batch, height, width, _ = rast.shape
    num_attr = attr.shape[-1]
    flat = rast.reshape(-1, 4)
    ids = flat[:, 3].detach().long()
    pidx = (ids > 0).nonzero().squeeze(1)
    t = ids[pidx] - 1
    vi = tri.long()[t]  # [N,3]
    if attr.dim() == 3 and attr.shape[0] > 1:
        a = attr[(pidx // (height * width))[:, None], vi]  # [N,3,A]
    else:
        a = attr.reshape(-1, num_attr)[vi]
    u = flat[pidx, 0:1]
    v = flat[pidx, 1:2]
    vals = u * a[:, 0] + v * a[:, 1] + (1 - u - v) * a[:, 2]
    out = torch.zeros(flat.shape[0], num_attr, dtype=vals.dtype, device=vals.device)
    out = out.index_copy(0, pidx, vals).view(batch, height, width, num_attr)
    if diff_attrs is None:
        return out, torch.zeros(batch, height, width, 0, dtype=out.dtype, device=out.device)
    sel = torch.tensor(diff_attrs, dtype=torch.long, device=attr.device)
    dsdu = a[:, 0, sel] - a[:, 2, sel]
    dsdv = a[:, 1, sel] - a[:, 2, sel]
    db = rast_db.reshape(-1, 4)[pidx]
    dx = db[:, 0:1] * dsdu + db[:, 2:3] * dsdv
    dy = db[:, 1:2] * dsdu + db[:, 3:4] * dsdv
    dvals = torch.stack([dx, dy], dim=2).reshape(pidx.shape[0], 2 * len(diff_attrs))
    out_da = torch.zeros(flat.shape[0], dvals.shape[1], dtype=dvals.dtype, device=dvals.device)
    out_da = out_da.index_copy(0, pidx, dvals).view(batch, height, width, -1)
    return out, out_da
