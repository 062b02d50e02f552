"""Sampling layered-surface humans: the CLI's files, the GLB's skin, bad requests."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from zoo.data.humans_io import axis_angle_to_quaternion, split_uv_seams, write_skinned_glb
from zoo.models.lsv import SMPL_JOINTS, LayeredSurfaceVolumes, ShellConfig, standard_pose, template_from_mannequin
from zoo.models.lsv.body import axis_angle_to_matrix
from zoo.models.lsv.generator import GeneratorConfig

G = pytest.importorskip("pygltflib")

def tiny_model():
    torch.manual_seed(0)
    gen = GeneratorConfig(num_layers=5, resolution=16, z_dim=16, w_dim=16, mapping_layers=2, channel_base=128,
                          channel_max=16)
    return LayeredSurfaceVolumes(template_from_mannequin(), ShellConfig(), gen, render_resolution=48).eval()


def _accessor(gltf, blob, i):
    acc = gltf.accessors[i]
    view = gltf.bufferViews[acc.bufferView]
    dtype = {G.FLOAT: np.float32, G.UNSIGNED_SHORT: np.uint16, G.UNSIGNED_INT: np.uint32}[acc.componentType]
    width = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT4": 16}[acc.type]
    data = np.frombuffer(blob, dtype, acc.count * width, view.byteOffset + (acc.byteOffset or 0))
    return data.reshape(acc.count, width) if width > 1 else data


def _quat_to_matrix(q):
    x, y, z, w = q
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def test_glb_reloads_with_layers_textures_skeleton_and_reposes_like_the_model(tmp_path):
    """Pose the GLB's meshes the way a glTF viewer does (node transforms, inverse bind matrices,
    blended joint matrices) and compare with the model's own posed shells."""
    from PIL import Image
    import io

    model = tiny_model()
    pose = standard_pose("walk")
    with torch.no_grad():
        tex = model(model.noise(1, seed=3))[0]
        out = model.pose(pose[None])
    body = model.body
    path = write_skinned_glb(tmp_path / "s.glb", out["rest"][0].numpy(), body.faces.numpy(), model.uv.numpy(),
                             model.uv_faces.numpy(), tex.numpy(), model.shells.skin_weights.numpy(),
                             body.rest(None)[1][0].numpy(), body.parents, SMPL_JOINTS, pose.numpy())
    gltf = G.GLTF2().load(str(path))
    blob = gltf.binary_blob()
    assert len(gltf.meshes) == 5 and len(gltf.images) == 5 and len(gltf.skins) == 1
    skin = gltf.skins[0]
    assert len(skin.joints) == 24 and [gltf.nodes[j].name for j in skin.joints] == list(SMPL_JOINTS)
    for s, img in enumerate(gltf.images):
        view = gltf.bufferViews[img.bufferView]
        png = Image.open(io.BytesIO(blob[view.byteOffset:view.byteOffset + view.byteLength]))
        assert png.mode == "RGBA" and png.size == (16, 16)
        want = (np.moveaxis(tex[s].numpy(), 0, -1) * 255 + 0.5).astype(np.uint8)
        assert np.array_equal(np.asarray(png), want)
        assert gltf.materials[s].alphaMode == "BLEND"
    # world matrices of the joint nodes
    world = {}
    for j, node in enumerate(gltf.nodes[:24]):
        local = np.eye(4)
        local[:3, :3] = _quat_to_matrix(node.rotation)
        local[:3, 3] = node.translation
        parent = body.parents[j]
        world[j] = local if parent < 0 else world[parent] @ local
    ibm = _accessor(gltf, blob, skin.inverseBindMatrices).reshape(24, 4, 4).transpose(0, 2, 1)
    joint_m = np.stack([world[j] @ ibm[j] for j in range(24)])
    for s, mesh in enumerate(gltf.meshes):
        prim = mesh.primitives[0]
        a = prim.attributes
        pos = _accessor(gltf, blob, a.POSITION).astype(np.float64)
        joints = np.concatenate([_accessor(gltf, blob, a.JOINTS_0), _accessor(gltf, blob, a.JOINTS_1)], 1)
        weights = np.concatenate([_accessor(gltf, blob, a.WEIGHTS_0), _accessor(gltf, blob, a.WEIGHTS_1)], 1)
        np.testing.assert_allclose(weights.sum(1), 1, atol=1e-6)
        m = (weights[..., None, None] * joint_m[joints]).sum(1)  # [V', 4, 4]
        posed = (m[:, :3, :3] @ pos[..., None])[..., 0] + m[:, :3, 3]
        vert, _, _ = split_uv_seams(body.faces.numpy(), model.uv_faces.numpy())
        # eight influences hold every nonzero weight of the mannequin's shells: exact up to float32
        np.testing.assert_allclose(posed, out["shells"][0, s].numpy()[vert], atol=1e-5)
        idx = _accessor(gltf, blob, prim.indices)
        assert idx.max() < len(pos) and len(idx) == 3 * len(body.faces)


def test_axis_angle_quaternion_matches_rodrigues():
    v = np.random.default_rng(0).normal(size=(6, 3))
    want = axis_angle_to_matrix(torch.from_numpy(v)).numpy()
    got = np.stack([_quat_to_matrix(q) for q in axis_angle_to_quaternion(v)])
    np.testing.assert_allclose(got, want, atol=1e-12)


def run_zoo(*args, env=None):
    return subprocess.run([sys.executable, "-m", "zoo", *args], capture_output=True, text=True, env=env)


def test_zoo_sample_writes_grid_gif_and_glbs_with_the_same_textures_in_every_pose(tmp_path):
    from PIL import Image

    pose_file = tmp_path / "poses.npy"
    np.save(pose_file, torch.stack([standard_pose("rest"), standard_pose("walk")]).numpy())
    r = run_zoo("sample", "lsv_mannequin", "--random", "--num", "2", "--views", "3", "--pose", str(pose_file),
                "--resolution", "32", "--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    a = tmp_path / "a"
    grid = Image.open(a / "views.png")
    assert grid.size == (3 * 32 + 2 * 2, 4 * 32 + 3 * 2)  # rows: 2 poses x 2 samples; columns: views
    gif = Image.open(a / "turntable.gif")
    assert gif.n_frames == 24
    names = sorted(p.name for p in a.glob("*.glb"))
    assert names == [f"sample_{s:03d}_pose_{k}.glb" for s in range(2) for k in range(2)]
    r = run_zoo("sample", "lsv_mannequin", "--random", "--num", "2", "--views", "1", "--pose", "walk",
                "--resolution", "32", "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    ta, tb = np.load(a / "textures.npy"), np.load(tmp_path / "b" / "textures.npy")
    assert np.array_equal(ta, tb) and ta.shape == (2, 5, 4, 128, 128)
    assert not np.array_equal(ta[0], ta[1])
    img = np.asarray(Image.open(tmp_path / "b" / "views.png"))
    assert (img < 250).any(axis=-1).mean() > 0.1  # the body covers the view; the rest is white


@pytest.mark.parametrize("args, match", [
    (["--views", "0"], "--views"),
    (["--pose", "BAD"], "pose"),
    (["--pose", "WRONG_SHAPE"], r"\[24, 3\]"),
    ([], "--random"),
])
def test_zoo_sample_refuses_bad_requests_and_writes_nothing(tmp_path, args, match):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((23, 3), dtype=np.float32))
    args = [str(bad) if a == "WRONG_SHAPE" else str(tmp_path / "nope.npy") if a == "BAD" else a for a in args]
    # lsv_smpl has no weights: without --random it is refused (lsv_mannequin ships trained ones)
    name, extra = ("lsv_smpl", []) if match == "--random" else ("lsv_mannequin", ["--random"])
    r = run_zoo("sample", name, *extra, *args, "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and re.search(match, r.stderr), r.stderr
    assert not (tmp_path / "out").exists()


def test_lsv_smpl_without_the_file_says_where_to_put_it(tmp_path):
    import os

    import zoo
    from zoo.errors import MissingAssetError

    env = {**os.environ, "ZOO_HOME": str(tmp_path)}
    env.pop("ZOO_SMPL_MODEL", None)
    r = run_zoo("info", "lsv_smpl", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["complexity"]["params"] is None
    assert "smpl.is.tue.mpg.de" in json.loads(r.stdout)["complexity"]["skipped"]
    r = run_zoo("sample", "lsv_smpl", "--random", "--out", str(tmp_path / "o"), env=env)
    assert r.returncode == 2 and str(tmp_path / "smpl") in r.stderr and not (tmp_path / "o").exists()
    os.environ["ZOO_SMPL_MODEL"] = str(tmp_path / "missing.pkl")
    try:
        with pytest.raises(MissingAssetError, match="missing.pkl"):
            zoo.create_model("lsv_smpl")
    finally:
        del os.environ["ZOO_SMPL_MODEL"]


def _smpl_format_files(tmp_path):
    """The mannequin written as an SMPL-format model (SMPL's keys, its own sizes) with its UVs."""
    t = template_from_mannequin()
    b = t.body
    v = b.v_template.numpy()
    # a regressor that averages each joint's 4 nearest vertices, as SMPL's regresses from the surface
    d = ((v[None] - b.rest_joints.numpy()[:, None]) ** 2).sum(-1)
    jr = np.zeros((24, len(v)))
    np.put_along_axis(jr, np.argsort(d, 1)[:, :4], 0.25, 1)
    kin = np.stack([np.array([4294967295, *b.parents[1:]], dtype=np.int64), np.arange(24)])
    arrays = {"v_template": v, "f": b.faces.numpy().astype(np.uint32), "weights": b.weights.numpy(),
              "J_regressor": jr, "kintree_table": kin, "shapedirs": np.zeros((len(v), 3, 10)),
              "posedirs": np.zeros((len(v), 3, 207))}
    np.savez(tmp_path / "with_uv.npz", **arrays, vt=t.uv.numpy(), ft=t.uv_faces.numpy())
    (tmp_path / "obj").mkdir()
    np.savez(tmp_path / "obj" / "SMPL_NEUTRAL.npz", **arrays)
    lines = [f"v {x} {y} {z}" for x, y, z in v] + [f"vt {a} {1 - c}" for a, c in t.uv.numpy()]
    lines += ["f " + " ".join(f"{i + 1}/{j + 1}" for i, j in zip(fv, ft))
              for fv, ft in zip(b.faces.numpy(), t.uv_faces.numpy())]
    (tmp_path / "obj" / "smpl_uv.obj").write_text("\n".join(lines))
    return t


def test_lsv_smpl_builds_from_an_smpl_format_file_with_uvs_in_the_npz_or_an_obj(tmp_path, monkeypatch):
    import zoo
    from zoo.errors import MissingAssetError, WeightsError

    t = _smpl_format_files(tmp_path)
    small = dict(texture_size=16, z_dim=16, w_dim=16, mapping_layers=2, channel_base=128, channel_max=16)
    a = zoo.create_model("lsv_smpl", smpl_path=str(tmp_path / "with_uv.npz"), **small)
    monkeypatch.setenv("ZOO_SMPL_MODEL", str(tmp_path / "obj" / "SMPL_NEUTRAL.npz"))
    b = zoo.create_model("lsv_smpl", **small)
    assert torch.allclose(a.uv, t.uv, atol=1e-6) and torch.allclose(b.uv, t.uv, atol=1e-6)
    assert torch.equal(a.uv_faces, t.uv_faces) and torch.equal(b.uv_faces, t.uv_faces)
    out = b.sample(1, seed=0, pose=standard_pose("walk")[None], views=2, resolution=32)
    assert out["images"].shape == (1, 1, 2, 32, 32, 4) and (out["images"][..., 3] > 0.5).any()
    (tmp_path / "obj" / "smpl_uv.obj").write_text("vt 0 0\nf 1/1 2/1 3/1\n")
    with pytest.raises(WeightsError, match="faces do not match"):
        zoo.create_model("lsv_smpl", **small)
    (tmp_path / "obj" / "smpl_uv.obj").unlink()
    with pytest.raises(MissingAssetError, match="smpl_uv.obj"):
        zoo.create_model("lsv_smpl", **small)
