"""OpenPCDet's CenterHead (CenterPoint's heatmap head): targets, losses and decoding.

Names are OpenPCDet's (``shared_conv``, ``heads_list.i.<hm|center|center_z|dim|rot>``), so its
``dense_head.*`` weights load. Targets: one Gaussian peak per object on its class heatmap
(radius from CenterNet's formula at ``gaussian_overlap``, at least ``min_radius`` cells) and, at
the peak cell, ``[dx, dy]`` sub-cell offset, centre z, ``log(l, w, h)``, ``cos, sin`` of the
yaw. Losses: CornerNet's focal loss on the clamped sigmoid and a masked L1 on those 8 values.

Decoding differs from OpenPCDet's in one documented choice: a `peak_kernel` max-pool keeps
only local maxima before the top-k (CenterNet's peak extraction; OpenPCDet's CenterHead takes
the raw top-k and relies on NMS alone; ``peak_kernel: 0`` restores that), then boxes outside
``post_center_limit_range`` or under ``score_thresh`` are dropped and a rotated BEV NMS (exact
IoU, `zoo.boxes.nms`) runs per head, class-agnostic, as OpenPCDet's does.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.boxes import nms

__all__ = ["CenterHead", "SeparateHead", "gaussian_radius", "focal_loss"]


class SeparateHead(nn.Module):
    """One small conv tower per output (``hm``, ``center``, ...), each a module of that name."""

    def __init__(self, input_channels: int, head_dict: dict, init_bias: float = -2.19, use_bias: bool = False,
                 norm=nn.BatchNorm2d):
        super().__init__()
        self.head_dict = head_dict
        for name, spec in head_dict.items():
            layers = []
            for _ in range(spec["num_conv"] - 1):
                layers.append(nn.Sequential(nn.Conv2d(input_channels, input_channels, 3, padding=1, bias=use_bias),
                                            norm(input_channels), nn.ReLU()))
            layers.append(nn.Conv2d(input_channels, spec["out_channels"], 3, padding=1, bias=True))
            fc = nn.Sequential(*layers)
            if "hm" in name:
                fc[-1].bias.data.fill_(init_bias)
            else:
                for m in fc.modules():
                    if isinstance(m, nn.Conv2d):
                        nn.init.kaiming_normal_(m.weight)
                        if m.bias is not None:
                            nn.init.zeros_(m.bias)
            setattr(self, name, fc)

    def forward(self, x: torch.Tensor) -> dict:
        return {name: getattr(self, name)(x) for name in self.head_dict}


def gaussian_radius(height: torch.Tensor, width: torch.Tensor, min_overlap: float = 0.5) -> torch.Tensor:
    """CenterNet's radius (as OpenPCDet computes it) so that a box shifted by it keeps
    `min_overlap` IoU."""
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + (b1 ** 2 - 4 * c1).sqrt()) / 2
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + (b2 ** 2 - 16 * c2).sqrt()) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + (b3 ** 2 - 4 * a3 * c3).sqrt()) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


def _draw_gaussian(heatmap: torch.Tensor, cx: int, cy: int, radius: int) -> None:
    """Max a Gaussian of sigma (2r+1)/6 into ``heatmap [H, W]`` around cell (cx, cy), in place."""
    d = 2 * radius + 1
    sigma = d / 6
    r = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-(r[None, :] ** 2 + r[:, None] ** 2) / (2 * sigma * sigma))
    g[g < torch.finfo(torch.float64).eps * g.max()] = 0
    h, w = heatmap.shape
    left, right = min(cx, radius), min(w - cx, radius + 1)
    top, bottom = min(cy, radius), min(h - cy, radius + 1)
    if left + right <= 0 or top + bottom <= 0:
        return
    patch = heatmap[cy - top:cy + bottom, cx - left:cx + right]
    gp = g[radius - top:radius + bottom, radius - left:radius + right].to(heatmap)
    torch.maximum(patch, gp, out=patch)


def focal_loss(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """CornerNet's penalty-reduced focal loss (alpha 2, beta 4) over ``[B, C, H, W]``."""
    pos = gt.eq(1).float()
    neg = gt.lt(1).float()
    pos_loss = (torch.log(pred) * (1 - pred) ** 2 * pos).sum()
    neg_loss = (torch.log(1 - pred) * pred ** 2 * (1 - gt) ** 4 * neg).sum()
    num_pos = pos.sum()
    return -neg_loss if num_pos == 0 else -(pos_loss + neg_loss) / num_pos


def _gather(feat: torch.Tensor, ind: torch.Tensor) -> torch.Tensor:
    """``feat [B, C, H, W]`` at flat cells ``ind [B, K]`` -> ``[B, K, C]``."""
    b, c = feat.shape[:2]
    flat = feat.reshape(b, c, -1).permute(0, 2, 1)
    return flat.gather(1, ind.unsqueeze(-1).expand(-1, -1, c))


class CenterHead(nn.Module):
    """In ``spatial_features_2d [B, C, H, W]``. Training (with ``gt_boxes [B, M, 8]``: LiDAR box
    and 1-based class): ``batch["losses"]`` with ``hm_loss``, ``loc_loss`` and ``loss``. Eval:
    ``batch["final_box_dicts"]``, per sample ``pred_boxes [K, 7]``, ``pred_scores [K]``,
    ``pred_labels [K]`` (1-based, in `class_names` order)."""

    def __init__(self, input_channels: int, class_names: Sequence[str], point_cloud_range: Sequence[float],
                 voxel_size: Sequence[float], class_names_each_head: Sequence[Sequence[str]] | None = None,
                 feature_map_stride: int = 8, shared_conv_channel: int = 64, use_bias_before_norm: bool = True,
                 num_hm_conv: int = 2, head_dict: dict | None = None, head_order: Sequence[str] | None = None,
                 bn_eps: float = 1e-5, bn_mom: float = 0.1, num_max_objs: int = 500, gaussian_overlap: float = 0.1,
                 min_radius: int = 2, cls_weight: float = 1.0, loc_weight: float = 2.0,
                 code_weights: Sequence[float] = (1.0,) * 8, score_thresh: float = 0.1,
                 post_center_limit_range: Sequence[float] | None = None, max_obj_per_sample: int = 500,
                 nms_thresh: float = 0.1, nms_pre_maxsize: int = 4096, nms_post_maxsize: int = 500,
                 peak_kernel: int = 3):
        super().__init__()
        self.class_names = list(class_names)
        heads = [list(h) for h in (class_names_each_head or [self.class_names])]
        if sorted(c for h in heads for c in h) != sorted(self.class_names):
            raise ValueError(f"CLASS_NAMES_EACH_HEAD {heads} must cover CLASS_NAMES {self.class_names} once each")
        self.class_names_each_head = heads
        self.point_cloud_range = [float(v) for v in point_cloud_range]
        self.voxel_size = [float(v) for v in voxel_size]
        self.feature_map_stride = feature_map_stride
        self.head_order = list(head_order or ["center", "center_z", "dim", "rot"])
        head_dict = head_dict or {"center": {"out_channels": 2, "num_conv": 2},
                                  "center_z": {"out_channels": 1, "num_conv": 2},
                                  "dim": {"out_channels": 3, "num_conv": 2}, "rot": {"out_channels": 2, "num_conv": 2}}
        norm = lambda c: nn.BatchNorm2d(c, eps=bn_eps, momentum=bn_mom)  # noqa: E731
        self.shared_conv = nn.Sequential(
            nn.Conv2d(input_channels, shared_conv_channel, 3, padding=1, bias=use_bias_before_norm),
            norm(shared_conv_channel), nn.ReLU())
        self.heads_list = nn.ModuleList()
        for names in heads:
            d = copy.deepcopy(head_dict)
            d["hm"] = {"out_channels": len(names), "num_conv": num_hm_conv}
            self.heads_list.append(SeparateHead(shared_conv_channel, d, -2.19, use_bias_before_norm, norm))
        self.target_cfg = dict(num_max_objs=num_max_objs, gaussian_overlap=gaussian_overlap, min_radius=min_radius)
        self.cls_weight, self.loc_weight = cls_weight, loc_weight
        self.register_buffer("code_weights", torch.tensor(code_weights, dtype=torch.float32), persistent=False)
        self.score_thresh = score_thresh
        self.post_center_limit_range = list(post_center_limit_range or self.point_cloud_range)
        self.max_obj_per_sample = max_obj_per_sample
        self.nms_cfg = dict(threshold=nms_thresh, pre_max=nms_pre_maxsize, post_max=nms_post_maxsize)
        self.peak_kernel = peak_kernel

    # ------------------------------------------------------------------ targets and losses

    def assign_targets(self, gt_boxes: torch.Tensor, size_hw: tuple[int, int]) -> list[dict]:
        """Per head: heatmaps ``[B, C_h, H, W]``, target boxes ``[B, N, 8]``, cells ``[B, N]``
        and a mask ``[B, N]`` (N = num_max_objs)."""
        h, w = size_hw
        n = self.target_cfg["num_max_objs"]
        out = []
        boxes_all = gt_boxes.detach().cpu().double()
        for names in self.class_names_each_head:
            ids = [self.class_names.index(c) + 1 for c in names]
            b = boxes_all.shape[0]
            heat = torch.zeros(b, len(names), h, w, dtype=torch.float64)
            target = torch.zeros(b, n, 8, dtype=torch.float64)
            inds = torch.zeros(b, n, dtype=torch.long)
            mask = torch.zeros(b, n, dtype=torch.long)
            for s in range(b):
                boxes = boxes_all[s]
                keep = torch.isin(boxes[:, 7].long(), torch.tensor(ids)) & (boxes[:, 3] > 0) & (boxes[:, 4] > 0)
                boxes = boxes[keep][:n]
                if len(boxes) == 0:
                    continue
                stride = self.feature_map_stride
                cx = ((boxes[:, 0] - self.point_cloud_range[0]) / self.voxel_size[0] / stride).clamp(0, w - 0.5)
                cy = ((boxes[:, 1] - self.point_cloud_range[1]) / self.voxel_size[1] / stride).clamp(0, h - 0.5)
                dx = boxes[:, 3] / self.voxel_size[0] / stride
                dy = boxes[:, 4] / self.voxel_size[1] / stride
                radius = gaussian_radius(dx, dy, self.target_cfg["gaussian_overlap"]).int().clamp_min(
                    self.target_cfg["min_radius"])
                ix, iy = cx.int(), cy.int()
                for k in range(len(boxes)):
                    cls = ids.index(int(boxes[k, 7]))
                    _draw_gaussian(heat[s, cls], int(ix[k]), int(iy[k]), int(radius[k]))
                    inds[s, k] = iy[k] * w + ix[k]
                    mask[s, k] = 1
                    target[s, k, 0] = cx[k] - ix[k]
                    target[s, k, 1] = cy[k] - iy[k]
                    target[s, k, 2] = boxes[k, 2]
                    target[s, k, 3:6] = boxes[k, 3:6].log()
                    target[s, k, 6] = torch.cos(boxes[k, 6])
                    target[s, k, 7] = torch.sin(boxes[k, 6])
            dev, dt = gt_boxes.device, torch.float32
            out.append({"heatmap": heat.to(dev, dt), "target": target.to(dev, dt), "inds": inds.to(dev),
                        "mask": mask.to(dev)})
        return out

    def losses(self, preds: list[dict], targets: list[dict]) -> dict:
        hm_total, loc_total = 0.0, 0.0
        for p, t in zip(preds, targets):
            hm = torch.clamp(p["hm"].sigmoid(), 1e-4, 1 - 1e-4)
            hm_total = hm_total + focal_loss(hm, t["heatmap"]) * self.cls_weight
            box = torch.cat([p[name] for name in self.head_order], dim=1)
            pred = _gather(box, t["inds"])
            m = t["mask"].unsqueeze(-1).float()
            l1 = (torch.abs(pred * m - t["target"] * m)).sum(dim=(0, 1)) / t["mask"].sum().clamp_min(1)
            loc_total = loc_total + (l1 * self.code_weights).sum() * self.loc_weight
        return {"loss": hm_total + loc_total, "hm_loss": hm_total, "loc_loss": loc_total}

    # ------------------------------------------------------------------ decoding

    @torch.no_grad()
    def decode(self, preds: list[dict]) -> list[dict]:
        b = preds[0]["hm"].shape[0]
        out = [{"pred_boxes": [], "pred_scores": [], "pred_labels": []} for _ in range(b)]
        lim = torch.tensor(self.post_center_limit_range, device=preds[0]["hm"].device)
        stride = self.feature_map_stride
        for names, p in zip(self.class_names_each_head, preds):
            hm = p["hm"].sigmoid()
            if self.peak_kernel:
                pad = (self.peak_kernel - 1) // 2
                hm = hm * (F.max_pool2d(hm, self.peak_kernel, stride=1, padding=pad) == hm)
            _, c, h, w = hm.shape
            k = min(self.max_obj_per_sample, c * h * w)
            scores, flat = hm.reshape(b, -1).topk(k)
            cls, cell = flat // (h * w), flat % (h * w)
            ys, xs = (cell // w).float(), (cell % w).float()
            centre = _gather(p["center"], cell)
            z = _gather(p["center_z"], cell)
            dim = _gather(p["dim"], cell).exp()
            rot = _gather(p["rot"], cell)
            angle = torch.atan2(rot[..., 1:2], rot[..., 0:1])
            x = (xs.unsqueeze(-1) + centre[..., 0:1]) * stride * self.voxel_size[0] + self.point_cloud_range[0]
            y = (ys.unsqueeze(-1) + centre[..., 1:2]) * stride * self.voxel_size[1] + self.point_cloud_range[1]
            boxes = torch.cat([x, y, z, dim, angle], dim=-1)
            keep = (boxes[..., :3] >= lim[:3]).all(-1) & (boxes[..., :3] <= lim[3:]).all(-1) & (scores > self.score_thresh)
            label_map = torch.tensor([self.class_names.index(n) + 1 for n in names], device=hm.device)
            for s in range(b):
                bx, sc, lb = boxes[s][keep[s]], scores[s][keep[s]], label_map[cls[s][keep[s]]]
                sel = nms(bx, sc, **self.nms_cfg)
                out[s]["pred_boxes"].append(bx[sel])
                out[s]["pred_scores"].append(sc[sel])
                out[s]["pred_labels"].append(lb[sel])
        return [{k: torch.cat(v) for k, v in d.items()} for d in out]

    def forward(self, batch: dict) -> dict:
        x = self.shared_conv(batch["spatial_features_2d"])
        preds = [head(x) for head in self.heads_list]
        batch["pred_dicts"] = preds
        if "gt_boxes" in batch and self.training:
            targets = self.assign_targets(batch["gt_boxes"], tuple(x.shape[2:]))
            batch["losses"] = self.losses(preds, targets)
        if not self.training:
            batch["final_box_dicts"] = self.decode(preds)
        return batch

