"""The articulated body: skinning against a per-vertex loop, the rest pose, locality of a joint's
rotation, axis-angle, and SMPL-format files (made here with random values)."""
from __future__ import annotations

import pickle
import sys
import types

import numpy as np
import pytest
import torch

from zoo.errors import ConfigError, WeightsError
from zoo.models.lsv import SMPL_PARENTS, BodyModel, axis_angle_to_matrix, load_smpl


def random_body(n=300, betas=4, pose_blend=True, seed=0):
    g = np.random.default_rng(seed)
    w = g.random((n, 24)) ** 4
    w /= w.sum(1, keepdims=True)
    jr = g.random((24, n))
    jr /= jr.sum(1, keepdims=True)
    return BodyModel(g.normal(size=(n, 3)), g.integers(0, n, (2 * n, 3)), w, jr, g.normal(size=(n, 3, betas)) * 0.01,
                     g.normal(size=(n, 3, 207)) * 0.001 if pose_blend else None)


def loop_lbs(body: BodyModel, pose, betas, transl):
    """Textbook LBS, one vertex at a time with 4x4 transforms (float64)."""
    v = body.v_template.double().numpy() + np.einsum("vcs,s->vc", body.shapedirs.double().numpy(), betas)
    j = body.j_regressor.double().numpy() @ v
    r = [axis_angle_to_matrix(torch.from_numpy(p)).numpy() for p in pose]
    feat = np.concatenate([(r[i] - np.eye(3)).reshape(-1) for i in range(1, 24)])
    v = v + np.einsum("vcp,p->vc", body.posedirs.double().numpy(), feat)
    g = []
    for i, p in enumerate(SMPL_PARENTS):
        local = np.eye(4)
        local[:3, :3] = r[i]
        local[:3, 3] = j[i] - (j[p] if p >= 0 else 0)
        g.append(local if p < 0 else g[p] @ local)
    out = np.zeros_like(v)
    for n in range(len(v)):
        t = np.zeros((4, 4))
        for k in range(24):
            a = g[k].copy()
            a[:3, 3] -= g[k][:3, :3] @ j[k]
            t += body.weights[n, k].item() * a
        out[n] = (t @ np.append(v[n], 1.0))[:3] + transl
    joints = np.stack([gk[:3, 3] for gk in g]) + transl
    return out, joints


def test_batched_skinning_equals_a_per_vertex_loop():
    body = random_body().double()
    body.weights.div_(body.weights.sum(1, keepdim=True))  # sum to one in float64 too, as LBS assumes
    g = np.random.default_rng(1)
    pose, betas, transl = g.normal(size=(2, 24, 3)) * 0.5, g.normal(size=(2, 4)), g.normal(size=(2, 3))
    out = body(torch.from_numpy(pose), torch.from_numpy(betas), torch.from_numpy(transl))
    for b in range(2):
        ref_v, ref_j = loop_lbs(body, pose[b], betas[b], transl[b])
        assert np.abs(out["vertices"][b].numpy() - ref_v).max() < 1e-9
        assert np.abs(out["joints"][b].numpy() - ref_j).max() < 1e-9


def test_rest_pose_returns_the_template_exactly():
    body = random_body()
    out = body(torch.zeros(3, 24, 3))
    assert torch.equal(out["vertices"], body.v_template.expand(3, -1, -1))
    assert torch.equal(out["joints"], body.rest()[1].expand(3, -1, -1))


def test_a_joint_moves_only_what_is_skinned_to_it_or_its_descendants():
    body = random_body(pose_blend=False)
    w = body.weights.clone()
    w[w < 0.02] = 0  # sparse weights, as a real body's
    body.weights.copy_(w / w.sum(1, keepdim=True))
    elbow = 18  # left_elbow: its subtree is the left wrist and hand
    subtree = {18, 20, 22}
    pose = torch.zeros(1, 24, 3)
    pose[0, elbow] = torch.tensor([0.0, 0.8, 0.3])
    moved = (body(pose)["vertices"][0] - body.v_template).abs().sum(1) > 0
    skinned = body.weights[:, sorted(subtree)].sum(1) > 0
    assert moved.any() and torch.equal(moved, skinned)


def test_axis_angle_is_rodrigues_and_smooth_at_zero():
    v = torch.tensor([[0.0, 0.0, np.pi / 2], [1e-6, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    r = axis_angle_to_matrix(v)
    assert torch.allclose(r[0], torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64), atol=1e-12)
    assert torch.equal(r[2], torch.eye(3, dtype=torch.float64))
    assert torch.allclose(r[1] @ r[1].T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    r.sum().backward()
    assert torch.isfinite(v.grad).all()
    assert torch.autograd.gradcheck(axis_angle_to_matrix, (torch.randn(4, 3, dtype=torch.float64, requires_grad=True),))


def smpl_arrays(seed=0):
    """Random values with SMPL's keys and shapes."""
    g = np.random.default_rng(seed)
    w = g.random((6890, 24))
    kin = np.stack([np.array([4294967295, *SMPL_PARENTS[1:]], dtype=np.int64), np.arange(24)])
    return {"v_template": g.normal(size=(6890, 3)), "f": g.integers(0, 6890, (13776, 3)).astype(np.uint32),
            "weights": w / w.sum(1, keepdims=True), "J_regressor": g.random((24, 6890)) / 6890,
            "kintree_table": kin, "shapedirs": g.normal(size=(6890, 3, 10)) * 0.01,
            "posedirs": g.normal(size=(6890, 3, 207)) * 0.001}


def test_an_smpl_npz_and_pkl_load_and_pose(tmp_path, monkeypatch):
    import scipy.sparse

    arrays = smpl_arrays()
    np.savez(tmp_path / "smpl.npz", **arrays)
    body = load_smpl(tmp_path / "smpl.npz")
    out = body(torch.full((1, 24, 3), 0.1), torch.ones(1, 10))
    assert out["vertices"].shape == (1, 6890, 3) and body.num_betas == 10 and body.parents == SMPL_PARENTS

    # the original format: a pickle with chumpy arrays and a sparse regressor, made without chumpy
    chumpy = types.ModuleType("chumpy")
    ch = types.ModuleType("chumpy.ch")

    class Ch:
        def __init__(self, x):
            self.x = x

        def __getstate__(self):
            return {"x": self.x, "dterms": {}}

    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    ch.Ch = Ch
    monkeypatch.setitem(sys.modules, "chumpy", chumpy)
    monkeypatch.setitem(sys.modules, "chumpy.ch", ch)
    pkl = dict(arrays, shapedirs=Ch(arrays["shapedirs"]), J_regressor=scipy.sparse.csc_matrix(arrays["J_regressor"]))
    (tmp_path / "smpl.pkl").write_bytes(pickle.dumps(pkl, protocol=2))
    monkeypatch.delitem(sys.modules, "chumpy.ch")
    monkeypatch.delitem(sys.modules, "chumpy")
    from_pkl = load_smpl(tmp_path / "smpl.pkl")
    again = from_pkl(torch.full((1, 24, 3), 0.1), torch.ones(1, 10))
    assert torch.allclose(again["vertices"], out["vertices"], atol=1e-5)


def test_bad_smpl_files_and_poses_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"v_template": Evil()}))
    with pytest.raises(WeightsError, match="refused to unpickle builtins.print"):
        load_smpl(tmp_path / "evil.pkl")
    np.savez(tmp_path / "partial.npz", v_template=np.zeros((5, 3)))
    with pytest.raises(WeightsError, match="J_regressor"):
        load_smpl(tmp_path / "partial.npz")
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(WeightsError, match="not an SMPL model file"):
        load_smpl(tmp_path / "junk.pkl")
    with pytest.raises(WeightsError, match="smpl.is.tue.mpg.de"):
        load_smpl(tmp_path / "missing.pkl")
    with pytest.raises(ConfigError, match=r"\[B, 24, 3\]"):
        random_body()(torch.zeros(1, 23, 3))
