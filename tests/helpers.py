"""Helpers the test files share: writers of the official release layouts (so the converters
are tested against an independent construction), the timm-file round trip, a tiny PVCNN2."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

import zoo
from zoo.models.layers import bias_index
from zoo.models.psf.pvcnn import PVCNN2Config

EFFICIENTFORMER_V1 = ["efficientformer_l1", "efficientformer_l3", "efficientformer_l7"]


def official_index(res: int) -> torch.Tensor:
    """The official code's bias index, computed here independently of the model module."""
    pts = [(i, j) for i in range(res) for j in range(res)]
    seen: dict = {}
    return torch.tensor(
        [[seen.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(seen)) for b in pts] for a in pts]
    )


def efficientvit_to_official(sd: dict) -> dict:
    """Write a timm-layout state dict in the official release's layout (checkpoint['model'])."""
    out = {}
    for key, v in sd.items():
        parts = key.split(".")
        if parts[0] == "patch_embed":  # patch_embed.convN -> patch_embed.{0,2,4,6}
            parts[1] = str((int(parts[1][len("conv"):]) - 1) * 2)
        elif parts[0] == "stages":
            s = int(parts[1])
            if parts[2] == "downsample":
                idx = {"res1": 0, "patchmerge": 1, "res2": 2}[parts[3]]
            else:
                idx = int(parts[3]) + (3 if s > 0 else 0)
            parts = [f"blocks{s + 1}", str(idx)] + parts[4:]
        parts = ["c" if p == "conv" else "l" if p == "linear" else p for p in parts]
        out[".".join(parts)] = v.clone()
    for k in [k for k in out if k.endswith("attention_biases")]:
        res = round(out[k].shape[1] ** 0.5)
        out[k.replace("attention_biases", "attention_bias_idxs")] = official_index(res)
    return {"model": out}


def official_downsample_index(res: int) -> torch.Tensor:
    """``Attention4DDownsample``'s index as the official code builds it (dict of first appearance)."""
    res2 = math.ceil(res / 2)
    step = math.ceil(res / res2)
    seen: dict = {}
    return torch.tensor([
        [seen.setdefault((abs(p[0] * step - q[0]), abs(p[1] * step - q[1])), len(seen))
         for q in itertools.product(range(res), range(res))]
        for p in itertools.product(range(res2), range(res2))
    ])


def v1_to_official(sd: dict) -> dict:
    """Write a timm-layout EfficientFormer (V1) state dict as the official release does."""
    stem = {"conv1": "0", "norm1": "1", "conv2": "3", "norm2": "4"}
    out = {}
    for key, v in sd.items():
        p = key.split(".")
        if p[0] == "stem":
            p = ["patch_embed", stem[p[1]], p[2]]
        elif p[0] == "stages":
            i = int(p[1])
            if p[2] == "downsample":
                p = ["network", str(2 * i - 1), {"conv": "proj", "norm": "norm"}[p[3]], p[4]]
            else:
                p = ["network", str(2 * i)] + p[3:]
            if p[-1] == "gamma":
                p = p[:-2] + [f"layer_scale_{p[-2][-1]}"]
        elif p[0] == "head_dist":
            p[0] = "dist_head"
        out[".".join(p)] = v.clone()
    return {"model": out}


def v2_to_official(sd: dict) -> dict:
    """Write a timm-layout EfficientFormerV2 state dict as the official release does."""
    stem = {("conv1", "conv"): "0", ("conv1", "bn"): "1", ("conv2", "conv"): "3", ("conv2", "bn"): "4"}
    seq = {"conv": "0", "bn": "1"}
    mlp = {("fc1", "conv"): "fc1", ("fc1", "bn"): "norm1", ("mid", "conv"): "mid", ("mid", "bn"): "mid_norm",
           ("fc2", "conv"): "fc2", ("fc2", "bn"): "norm2"}

    def attention(p: list[str]) -> list[str]:
        if p[0] == "q" and p[1] == "local":
            return ["q", "local", "0", p[-1]]
        if p[0] == "q" and p[1] == "proj":
            return ["q", "proj", seq[p[2]], p[-1]]
        if p[0] == "proj":
            return ["proj", {"conv": "1", "bn": "2"}[p[1]], p[-1]]
        if p[0] in ("q", "k", "v", "v_local", "stride_conv"):
            return [p[0], seq[p[1]], p[-1]]
        return p

    out = {}
    for key, v in sd.items():
        p = key.split(".")
        v = v.clone()
        if p[0] == "stem":
            p = ["patch_embed", stem[(p[1], p[2])], p[3]]
        elif p[0] == "stages":
            i = int(p[1])
            if p[2] == "downsample":
                net = ["network", str(2 * i - 1)]
                if p[3] == "conv":
                    names = ("conv", "bn") if i == 3 else ("proj", "norm")
                    p = net + [names[p[4] == "bn"], p[5]]
                else:
                    p = net + ["attn"] + attention(p[4:])
            else:
                net = ["network", str(2 * i), p[3]]
                rest = p[4:]
                if rest[-1] == "gamma":
                    p, v = net + [f"layer_scale_{rest[0][-1]}"], v.view(-1, 1, 1)
                elif rest[0] == "mlp":
                    p = net + ["mlp", mlp[(rest[1], rest[2])], rest[-1]]
                else:
                    p = net + ["token_mixer"] + attention(rest[1:])
        elif p[0] == "head_dist":
            p[0] = "dist_head"
        out[".".join(p)] = v
    # the official modules keep their bias index as a persistent buffer
    for k in [k for k in out if k.endswith("attention_biases")]:
        n = out[k].shape[1]
        res = round(n**0.5)
        idx = official_downsample_index(res) if ".attn." in k else bias_index(res)
        out[k.replace("attention_biases", "attention_bias_idxs")] = idx
    return {"model": out}


def to_official(name: str, sd: dict) -> dict:
    """A timm-layout state dict of model `name` written as its official release does."""
    if name.startswith("efficientvit_"):
        return efficientvit_to_official(sd)
    return v1_to_official(sd) if name in EFFICIENTFORMER_V1 else v2_to_official(sd)


def load_in_both_layouts(name: str, ref: torch.nn.Module, folder: Path) -> list[tuple[Path, torch.nn.Module]]:
    """`ref`'s weights saved in timm's layout (safetensors) and the official one (a torch file
    with ``["model"]``), each loaded by ``zoo.create_model(name, pretrained=<file>)``."""
    timm_file = folder / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, timm_file)
    official_file = folder / "official.pth"
    torch.save(to_official(name, ref.state_dict()), official_file)
    return [(path, zoo.create_model(name, pretrained=str(path))) for path in (timm_file, official_file)]


def tiny_config():
    return PVCNN2Config(num_points=128, embed_dim=16, width_multiplier=0.25,
                        voxel_resolution_multiplier=0.25,
                        sa_blocks=(((32, 2, 32), (64, 0.2, 16, (32, 64))), ((64, 3, 16), (16, 0.4, 16, (64, 128))),
                                   (None, (4, 0.8, 8, (128, 128, 256)))),
                        fp_blocks=(((128, 128), (128, 1, 8)), ((128, 64), (64, 1, 16)), ((64, 64, 32), (32, 1, 32))))
