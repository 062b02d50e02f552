"""The layered surface volumes model: texture generator + shells + renderer (arXiv 2307.05462).

``LayeredSurfaceVolumes.forward(z [B, z_dim])`` returns the RGBA textures ``[B, N, 4, T, T]``
(what export traces); `pose`, `render` and `sample` pose the shells and draw them. A body is a
`Template`: a `BodyModel`, its UV atlas and the camera framing it (`template_from_mannequin`,
`template_from_smpl`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from zoo.errors import ConfigError, MissingAssetError, WeightsError

from .body import BodyModel, load_smpl
from .generator import GeneratorConfig, TextureGenerator
from .mannequin import MANNEQUIN_TIPS, build_mannequin
from .render import layer_triangles, orbit_cameras, render_shells
from .shells import ShellConfig, Shells

__all__ = ["Template", "LayeredSurfaceVolumes", "template_from_mannequin", "template_from_smpl",
           "smpl_search_paths", "standard_pose", "load_pose", "POSES"]


@dataclass
class Template:
    """A body with a UV atlas: ``uv [Vt, 2]``, ``uv_faces [F, 3]`` (per face of ``body.faces``),
    and the leaf-bone ``tips`` the skeleton shrink uses."""

    body: BodyModel
    uv: torch.Tensor
    uv_faces: torch.Tensor
    tips: dict
    name: str


def template_from_mannequin(**kw) -> Template:
    m = build_mannequin(**kw)
    return Template(m.body, m.uv, m.uv_faces, MANNEQUIN_TIPS, "mannequin")


def smpl_search_paths() -> list[Path]:
    """Where `lsv_smpl` looks for the user's SMPL file: ``$ZOO_SMPL_MODEL``, then
    ``$ZOO_HOME/smpl/SMPL_NEUTRAL.{npz,pkl}``."""
    from zoo.hub import zoo_home

    paths = [Path(os.environ["ZOO_SMPL_MODEL"]).expanduser()] if os.environ.get("ZOO_SMPL_MODEL") else []
    return paths + [zoo_home() / "smpl" / f"SMPL_NEUTRAL.{ext}" for ext in ("npz", "pkl")]


def _read_obj_uv(path: Path, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vt, ft, fv = [], [], []
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "vt":
            vt.append((float(parts[1]), 1.0 - float(parts[2])))  # OBJ's v runs up the image
        elif parts[0] == "f":
            corners = [p.split("/") for p in parts[1:4]]
            if len(corners) < 3 or any(len(c) < 2 or not c[1] for c in corners):
                raise WeightsError(f"{path}: a face without texture coordinates; a UV file has 'f v/vt ...' faces.")
            fv.append([int(c[0]) - 1 for c in corners])
            ft.append([int(c[1]) - 1 for c in corners])
    if not vt or len(ft) != len(faces) or not np.array_equal(np.asarray(fv), faces):
        raise WeightsError(f"{path}: its faces do not match the SMPL model's {len(faces)} faces; use the UV file "
                           "made for this SMPL topology (SMPL's website offers it with the model).")
    return np.asarray(vt, dtype=np.float32), np.asarray(ft, dtype=np.int64)


def template_from_smpl(path: str | os.PathLike | None = None, uv_path: str | os.PathLike | None = None) -> Template:
    """The user's SMPL model with its UV map: ``vt``/``ft`` arrays in an ``.npz`` model file, or an
    OBJ (``uv_path``, default ``smpl_uv.obj`` beside the model) whose faces are SMPL's."""
    candidates = [Path(path).expanduser()] if path else smpl_search_paths()
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise MissingAssetError(
            "lsv_smpl needs your SMPL model file, which zoo cannot ship (its licence is non-commercial): download "
            "SMPL from https://smpl.is.tue.mpg.de and put SMPL_NEUTRAL.pkl (or .npz) at "
            f"{candidates[-1].parent}/, set ZOO_SMPL_MODEL, or pass smpl_path=...; looked at "
            f"{', '.join(map(str, candidates))}. Use lsv_mannequin to run without it.")
    body = load_smpl(found)
    faces = body.faces.numpy()
    uv = None
    if found.suffix == ".npz":
        with np.load(found, allow_pickle=False) as z:
            if "vt" in z.files and "ft" in z.files:
                uv = z["vt"].astype(np.float32), z["ft"].astype(np.int64)
    if uv is None:
        obj = Path(uv_path).expanduser() if uv_path else found.parent / "smpl_uv.obj"
        if not obj.is_file():
            raise MissingAssetError(f"SMPL's UV map is missing: put smpl_uv.obj (SMPL's UV file) at {obj}, or save "
                                    "vt and ft arrays in the .npz model file.")
        uv = _read_obj_uv(obj, faces)
    vt, ft = uv
    if ft.shape != faces.shape or ft.min() < 0 or ft.max() >= len(vt):
        raise WeightsError(f"{found}: the UV faces must be [{len(faces)}, 3] indices into vt.")
    return Template(body, torch.from_numpy(vt), torch.from_numpy(ft), {}, "smpl")


# ----------------------------------------------------------------------------- poses

POSES = ("rest", "walk")


def standard_pose(name: str) -> torch.Tensor:
    """A named pose ``[24, 3]`` (axis-angle per joint): ``rest`` (the T-pose) or ``walk`` (arms down,
    mid-stride, knees and elbows bent)."""
    pose = torch.zeros(24, 3)
    if name == "rest":
        return pose
    if name != "walk":
        raise ConfigError(f"pose must be one of {POSES} or a .npy file, not {name!r}")
    pose[16, 2], pose[17, 2] = -1.25, 1.25  # shoulders: arms down to the sides
    pose[16, 0], pose[17, 0] = 0.35, -0.35  # and swinging against the legs
    pose[18, 1], pose[19, 1] = -0.4, 0.4  # elbows bend forward
    pose[1, 0], pose[2, 0] = -0.45, 0.35  # left leg forward, right leg back
    pose[4, 0], pose[5, 0] = 0.25, 0.6  # knees
    pose[7, 0], pose[8, 0] = 0.1, -0.2
    return pose


def load_pose(spec: str) -> torch.Tensor:
    """``rest``, ``walk`` or a ``.npy`` of ``[24, 3]``, ``[72]`` or ``[P, 24, 3]`` axis-angles; returns
    ``[P, 24, 3]``."""
    if spec in POSES:
        return standard_pose(spec)[None]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"--pose is {POSES[0]}, {POSES[1]} or a .npy file of axis-angles; {spec} is none of these.")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{path}: not a .npy array ({e}).") from None
    if arr.shape == (72,) or arr.shape == (24, 3):
        arr = arr.reshape(1, 24, 3)
    if arr.ndim != 3 or arr.shape[1:] != (24, 3) or not np.issubdtype(arr.dtype, np.floating) \
            or not np.isfinite(arr).all():
        raise ConfigError(f"{path}: a pose is finite axis-angles [24, 3] (or [72], or [P, 24, 3] for P poses), "
                          f"not {arr.dtype} {arr.shape}.")
    return torch.from_numpy(arr.astype(np.float32))


# ----------------------------------------------------------------------------- the model

class _TextureExport(nn.Module):
    """latent -> textures with the non-fused modulated convolution and the fixed noise."""

    def __init__(self, generator: TextureGenerator, psi: float):
        super().__init__()
        self.generator, self.psi = generator, psi

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        ws = self.generator.mapping(z, self.psi)
        return self.generator.synthesize(ws, noise_mode="const", fused=False)


class LayeredSurfaceVolumes(nn.Module):
    """Textured shells around an articulated body (module docstring).

    ``render_resolution``: default image size; ``num_peel_layers``: fragments composited per
    pixel (None: all of them on the torch backend, four per shell with nvdiffrast).

    The template's geometry (body, shells, UVs) lives in non-persistent buffers, rebuilt from the
    template: a state dict holds the texture generator only, so weights trained on SMPL carry
    none of SMPL's data.
    """

    def __init__(self, template: Template, shells: ShellConfig = ShellConfig(),
                 generator: GeneratorConfig = GeneratorConfig(), render_resolution: int = 256,
                 num_peel_layers: int | None = None, fov: float = 40.0):
        super().__init__()
        if generator.num_layers != shells.num_shells:
            raise ConfigError(f"the generator makes {generator.num_layers} textures but there are "
                              f"{shells.num_shells} shells; they must match")
        self.template_name = template.name
        self.shells = Shells(template.body, shells, template.tips)
        self.generator = TextureGenerator(generator)
        self.register_buffer("uv", template.uv.float(), persistent=False)
        self.register_buffer("uv_faces", template.uv_faces.long(), persistent=False)
        self.render_resolution, self.num_peel_layers, self.fov = render_resolution, num_peel_layers, fov
        v = template.body.v_template
        lo, hi = v.min(0).values, v.max(0).values
        self.camera_target = tuple(((lo + hi) / 2).tolist())
        extent = float((hi - lo)[:2].max())
        self.camera_distance = 0.62 * extent / math.tan(math.radians(fov) / 2)
        self._topology = None

    @property
    def body(self) -> BodyModel:
        return self.shells.body

    @property
    def num_layers(self) -> int:
        return self.shells.num_shells

    @property
    def texture_size(self) -> int:
        return self.generator.config.resolution

    @property
    def device(self) -> torch.device:
        return self.uv.device

    def noise(self, num: int, seed: int | None = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        return torch.randn(num, self.generator.config.z_dim, generator=g).to(self.device)

    def forward(self, z: torch.Tensor, psi: float = 1.0) -> torch.Tensor:
        """RGBA textures ``[B, N, 4, T, T]`` for latents ``z [B, z_dim]``."""
        return self.generator(z, psi)

    def pose(self, pose: torch.Tensor, betas: torch.Tensor | None = None,
             transl: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Posed shells ``[B, N, V, 3]`` and joints for axis-angle ``pose [B, 24, 3]``."""
        return self.shells(pose, betas, transl)

    def cameras(self, num_views: int, elevation: float = 5.0, start: float = 0.0) -> torch.Tensor:
        """``[C, 4, 4]`` world-to-clip matrices orbiting the body (`orbit_cameras` framed on it)."""
        return orbit_cameras(num_views, self.camera_distance, elevation, self.fov, self.camera_target, start)

    def render(self, textures: torch.Tensor, shells: torch.Tensor, mvp: torch.Tensor, resolution=None,
               background: torch.Tensor | None = None, antialias: bool = True, backend: str = "auto") -> torch.Tensor:
        """Images ``[B, C, H, W, 4]`` of ``shells [B, N, V, 3]`` with ``textures`` from ``mvp [B, C, 4, 4]``
        (see `zoo.models.lsv.render` for the conventions)."""
        res = self.render_resolution if resolution is None else resolution
        res = (res, res) if isinstance(res, int) else tuple(res)
        faces = self.body.faces
        if self._topology is None or self._topology[0] != (shells.shape[1], shells.device):
            from zoo.render import antialias_construct_topology_hash

            tri = layer_triangles(faces, shells.shape[1], shells.shape[2])
            self._topology = ((shells.shape[1], shells.device), antialias_construct_topology_hash(tri))
        return render_shells(shells, faces, self.uv, self.uv_faces, textures, mvp, res, self.num_peel_layers,
                             background, antialias, backend,
                             topology_hash=self._topology[1] if backend != "nvdiffrast" and not shells.is_cuda else None)

    @torch.no_grad()
    def sample(self, num: int = 1, seed: int | None = 0, pose: torch.Tensor | None = None, views: int = 4,
               resolution=None, psi: float = 1.0, background=(1.0, 1.0, 1.0), start: float = 0.0) -> dict:
        """``num`` samples in each pose of ``pose [P, 24, 3]`` (default the rest pose) from ``views``
        cameras: ``textures [num, N, 4, T, T]`` (a seed gives the same textures in every pose) and
        ``images [P, num, views, H, W, 4]``."""
        if num < 1 or views < 1:
            raise ConfigError(f"num and views must be at least 1, got {num} and {views}")
        pose = torch.zeros(1, 24, 3) if pose is None else pose
        if pose.dim() != 3 or tuple(pose.shape[1:]) != (24, 3):
            raise ConfigError(f"pose must be [P, 24, 3] axis-angles, not {tuple(pose.shape)}")
        textures = self(self.noise(num, seed), psi)
        mvp = self.cameras(views, start=start).to(self.device)[None].expand(num, -1, -1, -1)
        bg = None if background is None else torch.tensor(background, dtype=torch.float32, device=self.device)
        images = []
        for p in pose.to(self.device):
            shells = self.pose(p[None].expand(num, -1, -1))["shells"]
            images.append(self.render(textures, shells, mvp, resolution, background=bg))
        return {"textures": textures, "images": torch.stack(images)}

    def export_wrapper(self, input_shape=None, psi: float = 1.0):
        """The texture generator (latent -> ``[B, N, 4, T, T]``) with the non-fused modulated
        convolution and fixed noise, as the fields of a `zoo.export.ExportTarget`.
        ``input_shape``: ``(z_dim,)`` or ``(B, z_dim)``; default ``(1, z_dim)``."""
        zdim = self.generator.config.z_dim
        shape = tuple(input_shape) if input_shape is not None else (zdim,)
        shape = (1, *shape) if len(shape) == 1 else shape
        if len(shape) != 2 or shape[1] != zdim:
            raise ConfigError(f"the texture generator takes latents of shape ({zdim},) or (B, {zdim}), "
                              f"not {tuple(input_shape)}.")
        g = torch.Generator().manual_seed(0)
        return dict(module=_TextureExport(self.generator, psi).eval(), inputs=(torch.randn(shape, generator=g),),
                    input_names=["z"], output_names=["textures"],
                    metadata={"num_layers": self.num_layers, "texture_size": self.texture_size,
                              "layout": "[B, N, 4, T, T] straight RGBA in [0, 1]",
                              "template": self.template_name, "truncation_psi": psi})
