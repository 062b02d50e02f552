"""An articulated body in plain PyTorch: SMPL's 24-joint kinematic tree, linear blend skinning,
axis-angle pose, shape and pose blend shapes where the model file has them.

`BodyModel` holds a template ``v_template [V, 3]``, ``faces [F, 3]``, skinning ``weights
[V, 24]``, a joint regressor ``[24, V]`` (or, for a rig such as the mannequin, fixed rest joints
``[24, 3]``) and optionally ``shapedirs [V, 3, S]`` and
``posedirs [V, 3, 207]`` (SMPL's names and layouts). Pose is axis-angle per joint ``[B, 24, 3]``
(joint 0, the pelvis, is the global orientation) plus a root translation ``[B, 3]``.

Skinning is written as a displacement from the unposed surface: a vertex moves by
``sum_k w_k ((R_k - I)(v - J_k) + d_k)``, with ``R_k`` joint k's world rotation and ``d_k`` how
far the joint itself moved. With weights summing to one this is exactly linear blend skinning
(``sum_k w_k (R_k v + t_k)``), and the rest pose returns the template bit for bit (no rounding
from composing identity transforms), and a joint's rotation moves exactly nothing that is not
skinned to it or to its descendants.

SMPL itself is not shipped (its licence is non-commercial; so is smplx's): `load_smpl` reads
the user's own file (from https://smpl.is.tue.mpg.de), ``.npz`` or the original ``.pkl``
through an unpickler that admits only numpy arrays, scipy sparse matrices and chumpy objects
(read as their arrays), never a blind unpickle, and without chumpy or smplx installed.
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from zoo.errors import ConfigError, WeightsError

__all__ = ["SMPL_JOINTS", "SMPL_PARENTS", "BodyModel", "axis_angle_to_matrix", "load_smpl", "bone_end_weights",
           "bone_segments", "closest_on_segments"]

SMPL_JOINTS = ("pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2", "left_ankle",
               "right_ankle", "spine3", "left_foot", "right_foot", "neck", "left_collar", "right_collar", "head",
               "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
               "left_hand", "right_hand")
SMPL_PARENTS = (-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21)


def axis_angle_to_matrix(v: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``[..., 3, 3]`` of axis-angle vectors ``[..., 3]`` (Rodrigues:
    ``I + sin(t)/t K + (1 - cos(t))/t^2 K^2`` with ``K`` the cross-product matrix of ``v``; the
    coefficients' series near zero, so a zero vector gives the identity exactly and the
    gradient there is finite)."""
    t2 = (v * v).sum(-1, keepdim=True)[..., None]  # [..., 1, 1]
    small = t2 < 1e-8
    t2_safe = torch.where(small, torch.ones_like(t2), t2)
    t = t2_safe.sqrt()
    a = torch.where(small, 1 - t2 / 6, torch.sin(t) / t)
    b = torch.where(small, 0.5 - t2 / 24, (1 - torch.cos(t)) / t2_safe)
    x, y, z = v.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*v.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=v.dtype, device=v.device).expand_as(k)
    return eye + a * k + b * (k @ k)


def bone_end_weights(parents=SMPL_PARENTS, tips: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each joint's bone ends, as ``end = weights @ joints + offset``: ``weights [K, K]``
    average a joint's children; a leaf ends at its ``tips`` entry (a fixed point, in ``offset
    [K, 3]``), or at itself (a point bone) without one."""
    k = len(parents)
    weights, offset = torch.zeros(k, k), torch.zeros(k, 3)
    for j in range(k):
        children = [i for i, p in enumerate(parents) if p == j]
        if children:
            weights[j, children] = 1.0 / len(children)
        elif tips and j in tips:
            offset[j] = torch.as_tensor(tips[j], dtype=torch.float32)
        else:
            weights[j, j] = 1.0
    return weights, offset


def bone_segments(joints: torch.Tensor, parents=SMPL_PARENTS, tips: dict | None = None,
                  ends: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Bones ``[..., K, 2, 3]`` (joint, end) of joints ``[..., K, 3]``; ``ends``: `bone_end_weights`
    precomputed (else built from ``parents`` and ``tips``)."""
    weights, offset = bone_end_weights(parents, tips) if ends is None else ends
    end = weights.to(joints) @ joints + offset.to(joints)
    return torch.stack([joints, end], -2)


def closest_on_segments(points: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Closest points ``[..., P, S, 3]`` of points ``[..., P, 3]`` on segments ``[..., S, 2, 3]``."""
    a, b = segments[..., None, :, 0, :], segments[..., None, :, 1, :]
    ab = b - a
    p = points[..., :, None, :]
    t = (((p - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-12)).clamp(0, 1)
    return a + t[..., None] * ab


class BodyModel(nn.Module):
    """A skinned body on SMPL's tree (see the module docstring); `forward` returns posed
    ``vertices [B, V, 3]``, ``joints [B, 24, 3]`` and the joints' world ``rotations
    [B, 24, 3, 3]``."""

    def __init__(self, v_template, faces, weights, j_regressor=None, shapedirs=None, posedirs=None,
                 parents=SMPL_PARENTS, joints=None):
        super().__init__()
        v = torch.as_tensor(np.asarray(v_template), dtype=torch.float32)
        n = v.shape[0]
        parents = tuple(int(p) for p in parents)
        k = len(parents)
        if v.dim() != 2 or v.shape[1] != 3:
            raise ConfigError(f"v_template must be [V, 3], not {tuple(v.shape)}")
        if parents[0] != -1 or any(not 0 <= p < i for i, p in enumerate(parents[1:], 1)):
            raise ConfigError("parents must start with -1 and list each joint after its parent")
        w = torch.as_tensor(np.asarray(weights), dtype=torch.float32)
        if (j_regressor is None) == (joints is None):
            raise ConfigError("give the joints either as a regressor [24, V] (SMPL) or as fixed rest positions [24, 3]")
        jr = None if j_regressor is None else torch.as_tensor(np.asarray(j_regressor), dtype=torch.float32)
        fixed = None if joints is None else torch.as_tensor(np.asarray(joints), dtype=torch.float32)
        if tuple(w.shape) != (n, k) or (jr is not None and tuple(jr.shape) != (k, n)) \
                or (fixed is not None and tuple(fixed.shape) != (k, 3)):
            got = tuple(jr.shape) if jr is not None else tuple(fixed.shape)
            raise ConfigError(f"weights must be [V, {k}] and the joint regressor [{k}, V] (or joints [{k}, 3]) for "
                              f"V = {n}; got {tuple(w.shape)} and {got}")
        self.parents = parents
        self.register_buffer("v_template", v, persistent=False)
        self.register_buffer("faces", torch.as_tensor(np.asarray(faces).astype(np.int64)), persistent=False)
        self.register_buffer("weights", w, persistent=False)
        self.register_buffer("j_regressor", jr, persistent=False)
        self.register_buffer("rest_joints", fixed, persistent=False)
        self.register_buffer("shapedirs", None if shapedirs is None else
                             torch.as_tensor(np.asarray(shapedirs), dtype=torch.float32), persistent=False)
        if posedirs is not None and tuple(np.shape(posedirs)) != (n, 3, 9 * (k - 1)):
            raise ConfigError(f"posedirs must be [V, 3, {9 * (k - 1)}], not {tuple(np.shape(posedirs))}")
        self.register_buffer("posedirs", None if posedirs is None else
                             torch.as_tensor(np.asarray(posedirs), dtype=torch.float32), persistent=False)

    @property
    def num_betas(self) -> int:
        return 0 if self.shapedirs is None else int(self.shapedirs.shape[-1])

    def rest(self, betas: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The shaped, unposed surface ``[B, V, 3]`` and its joints ``[B, 24, 3]``."""
        v = self.v_template[None]
        if betas is not None and self.shapedirs is not None:
            v = v + torch.einsum("vcs,bs->bvc", self.shapedirs[..., : betas.shape[-1]], betas)
        if self.j_regressor is None:  # a rig with fixed joints (the mannequin): shape does not move them
            return v, self.rest_joints[None].expand(v.shape[0], -1, -1)
        return v, torch.einsum("kv,bvc->bkc", self.j_regressor, v)

    def transforms(self, pose: torch.Tensor, betas: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """What skinning needs for ``pose [B, 24, 3]``: the unposed surface with pose blend shapes
        ``vertices [B, V, 3]``, the rest ``joints [B, 24, 3]``, each joint's world ``rotations
        [B, 24, 3, 3]`` and how far each joint moved, ``moved [B, 24, 3]``."""
        k = len(self.parents)
        if pose.dim() != 3 or tuple(pose.shape[1:]) != (k, 3):
            raise ConfigError(f"pose must be axis-angle [B, {k}, 3], not {tuple(pose.shape)}")
        b = pose.shape[0]
        v, joints = self.rest(betas)
        v, joints = v.expand(b, -1, -1), joints.expand(b, -1, -1)
        local = axis_angle_to_matrix(pose)  # [B, K, 3, 3]
        eye = torch.eye(3, dtype=pose.dtype, device=pose.device)
        if self.posedirs is not None:
            feature = (local[:, 1:] - eye).reshape(b, -1)  # SMPL's pose blend-shape input
            v = v + torch.einsum("vcp,bp->bvc", self.posedirs, feature)
        world, moved = [local[:, 0]], [torch.zeros_like(joints[:, 0])]
        for i in range(1, k):
            p = self.parents[i]
            world.append(world[p] @ local[:, i])
            # how far joint i moved: its parent's move plus the parent's turn of the bone
            moved.append(moved[p] + ((world[p] - eye) @ (joints[:, i] - joints[:, p])[..., None])[..., 0])
        return {"vertices": v, "joints": joints, "rotations": torch.stack(world, 1), "moved": torch.stack(moved, 1)}

    @staticmethod
    def skin(points: torch.Tensor, weights: torch.Tensor, tf: dict[str, torch.Tensor],
             transl: torch.Tensor | None = None) -> torch.Tensor:
        """Linear blend skinning of rest ``points [B, P, 3]`` with ``weights [P, 24]`` by the
        `transforms` ``tf`` (the displacement form of the module docstring); ``[B, P, 3]``."""
        eye = torch.eye(3, dtype=points.dtype, device=points.device)
        rel = points[:, :, None, :] - tf["joints"][:, None, :, :]  # [B, P, K, 3]
        disp = torch.einsum("bkij,bpkj->bpki", tf["rotations"] - eye, rel) + tf["moved"][:, None]
        out = points + torch.einsum("pk,bpki->bpi", weights, disp)
        return out if transl is None else out + transl[:, None]

    def forward(self, pose: torch.Tensor, betas: torch.Tensor | None = None,
                transl: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        tf = self.transforms(pose, betas)
        out_v = self.skin(tf["vertices"], self.weights, tf, transl)
        out_j = tf["joints"] + tf["moved"]
        if transl is not None:
            out_j = out_j + transl[:, None]
        return {"vertices": out_v, "joints": out_j, "rotations": tf["rotations"]}


# ----------------------------------------------------------------------------- SMPL files

class _ChumpyArray:
    """Stands in for a pickled chumpy object: keeps its state, whose ``x`` is the array."""

    def __setstate__(self, state):
        self.state = state


_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("copyreg", "_reconstructor"), ("builtins", "object"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 rebuild an array's bytes
    ("scipy.sparse.csc", "csc_matrix"), ("scipy.sparse._csc", "csc_matrix"), ("scipy.sparse.csr", "csr_matrix"),
    ("scipy.sparse._csr", "csr_matrix"),
}


class _Refused(pickle.UnpicklingError):
    """A pickled global outside the allowed set."""


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module.split(".")[0] == "chumpy":
            return _ChumpyArray
        if (module, name) in _ALLOWED:
            import importlib

            return getattr(importlib.import_module(module), name)
        raise _Refused(f"{module}.{name}")


def _as_array(value, key: str, path) -> np.ndarray:
    if isinstance(value, _ChumpyArray):
        if "x" not in value.state:
            raise WeightsError(f"{path}: {key} is a chumpy object without its array")
        value = value.state["x"]
    if hasattr(value, "toarray"):  # a scipy sparse matrix (SMPL's J_regressor)
        value = value.toarray()
    return np.asarray(value)


def load_smpl(path: str | os.PathLike) -> BodyModel:
    """A `BodyModel` from the user's SMPL model file (``.npz``, or the original ``.pkl``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"{path}: no such SMPL model file. Download SMPL from https://smpl.is.tue.mpg.de "
                           "(it is under a non-commercial licence, so zoo cannot ship it) and give its .pkl or .npz.")
    raw = path.read_bytes()
    try:
        if raw[:4] == b"PK\x03\x04":
            with np.load(io.BytesIO(raw), allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        else:
            data = _SafeUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except _Refused as e:
        raise WeightsError(f"{path}: refused to unpickle {e}: an SMPL .pkl holds only numpy arrays, scipy sparse "
                           "matrices and chumpy arrays. Convert it to .npz with SMPL's keys if it is genuine.") from None
    except (pickle.UnpicklingError, ValueError, EOFError, OSError, ImportError) as e:
        raise WeightsError(f"{path}: not an SMPL model file ({type(e).__name__}: {e}).") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: an SMPL model file holds a dict of arrays, not a {type(data).__name__}.")
    need = ("v_template", "f", "weights", "J_regressor", "kintree_table")
    missing = [k for k in need if k not in data]
    if missing:
        raise WeightsError(f"{path}: not an SMPL model file: {', '.join(missing)} missing (SMPL files hold "
                           f"{', '.join(need)}, shapedirs and posedirs).")
    arr = {k: _as_array(v, k, path) for k, v in data.items() if k in (*need, "shapedirs", "posedirs")}
    kin = arr["kintree_table"].astype(np.int64)
    parents = [-1] + [int(p) for p in kin[0, 1:]]
    try:
        return BodyModel(arr["v_template"], arr["f"], arr["weights"], arr["J_regressor"], arr.get("shapedirs"),
                         arr.get("posedirs"), parents)
    except ConfigError as e:
        raise WeightsError(f"{path}: {e}") from None
