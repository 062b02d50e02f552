"""The procedural mannequin and the shells around a body."""
from __future__ import annotations

import torch

from zoo.models.lsv import (SMPL_PARENTS, ShellConfig, Shells, build_mannequin, standard_pose,
                            template_from_mannequin, vertex_normals)
from zoo.models.lsv.body import bone_segments
from zoo.models.lsv.mannequin import MANNEQUIN_TIPS
from zoo.models.lsv.shells import _closest_on_bones


def descendants(j):
    out = {j}
    for i, p in enumerate(SMPL_PARENTS):
        if p in out:
            out.add(i)
    return out


def test_mannequin_is_closed_outward_skinned_and_its_charts_do_not_overlap():
    m = build_mannequin()
    body = m.body
    v, f = body.v_template, body.faces
    assert 2000 < len(f) < 10000 and body.weights.shape == (len(v), 24)
    torch.testing.assert_close(body.weights.sum(1), torch.ones(len(v)))
    edges = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    # closed and consistently wound: each directed edge once, its reverse once
    assert len(torch.unique(edges, dim=0)) == len(edges)
    assert torch.equal(torch.unique(edges, dim=0), torch.unique(edges.flip(1), dim=0))
    for k in range(len(m.part_names)):  # every capsule has positive volume: its normals point out
        fk = f[m.part == k]
        a, b, c = v[fk[:, 0]], v[fk[:, 1]], v[fk[:, 2]]
        assert (a * torch.linalg.cross(b, c)).sum() > 0
    uv = m.uv[m.uv_faces]  # [F, 3, 2]
    assert m.uv_faces.shape == f.shape and uv.min() >= 0 and uv.max() <= 1
    boxes = torch.stack([torch.cat([uv[m.part == k].reshape(-1, 2).min(0).values,
                                    uv[m.part == k].reshape(-1, 2).max(0).values]) for k in range(len(m.part_names))])
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            apart = (boxes[i, 2] <= boxes[j, 0]) | (boxes[j, 2] <= boxes[i, 0]) | \
                    (boxes[i, 3] <= boxes[j, 1]) | (boxes[j, 3] <= boxes[i, 1])
            assert apart, (m.part_names[i], m.part_names[j])
    # the body looks like one: feet on the ground, head on top, arms out along x
    assert abs(float(v[:, 1].min())) < 0.02 and 1.7 < float(v[:, 1].max()) < 1.8
    assert float(v[:, 0].max()) > 0.8 and float(v[:, 0].min()) < -0.8


def test_a_mannequin_joint_moves_only_its_subtree():
    body = build_mannequin().body
    pose = torch.zeros(1, 24, 3)
    pose[0, 18] = torch.tensor([0.0, 0.0, 1.2])  # left elbow
    out = body(pose)["vertices"][0]
    moved = (out - body.v_template).norm(dim=1) > 1e-7
    skinned = body.weights[:, sorted(descendants(18))].sum(1) > 0
    assert moved.any() and not (moved & ~skinned).any()
    assert torch.equal(body(torch.zeros(2, 24, 3))["vertices"][1], body.v_template)


def test_shells_sit_at_their_offsets_at_rest():
    t = template_from_mannequin()
    cfg = ShellConfig(outer_offsets=(0.05, 0.025, 0.0), inner_fractions=(0.5, 1.0), shrink_scale=0.5)
    shells = Shells(t.body, cfg, t.tips)
    out = shells(torch.zeros(1, 24, 3))
    rest, posed = out["rest"][0], out["shells"][0]
    assert torch.equal(rest, posed)
    v = t.body.v_template
    n = vertex_normals(v[None], t.body.faces)[0]
    for s, o in enumerate(cfg.outer_offsets):
        torch.testing.assert_close(rest[s], v + o * n, atol=1e-5, rtol=0)
        along = ((rest[s] - v) * n).sum(1)
        torch.testing.assert_close(along, torch.full_like(along, o), atol=1e-5, rtol=0)
    torch.testing.assert_close(rest[2], v, atol=0, rtol=0)
    axis = _closest_on_bones(v[None], bone_segments(t.body.rest_joints, tips=MANNEQUIN_TIPS)[None], n[None])[0]
    for s, frac in zip((3, 4), cfg.inner_fractions):
        depth = (rest[s] - v).norm(dim=1)
        torch.testing.assert_close(depth, frac * 0.5 * (v - axis).norm(dim=1), atol=1e-5, rtol=0)
        assert ((rest[s] - v) * n).sum(1).max() < 1e-6  # inward
    normal = Shells(t.body, ShellConfig(shrink="normal", shrink_offset=0.02), t.tips)
    r = normal(torch.zeros(1, 24, 3))["rest"][0]
    torch.testing.assert_close(r[4], v - 0.02 * n, atol=1e-5, rtol=0)
    torch.testing.assert_close(r[3], v - 0.01 * n, atol=1e-5, rtol=0)


def test_posed_shells_follow_the_body_and_keep_their_topology():
    t = template_from_mannequin()
    shells = Shells(t.body, ShellConfig(), t.tips)
    torch.testing.assert_close(shells.skin_weights.sum(-1), torch.ones(5, len(t.body.v_template)))
    pose = standard_pose("walk")[None]
    out = shells(pose, transl=torch.tensor([[0.1, 0.0, -0.2]]))
    body = t.body(pose, transl=torch.tensor([[0.1, 0.0, -0.2]]))["vertices"][0]
    posed, rest = out["shells"][0], out["rest"][0]
    assert posed.shape == rest.shape == (5, len(t.body.v_template), 3)
    # the body shell (offset 0) is the posed body: its IDW weights are its own vertex's
    torch.testing.assert_close(posed[2], body, atol=1e-4, rtol=0)
    # every shell stays about its offset away from the posed body, and its edges keep their length
    for s, off in enumerate((0.05, 0.025, 0.0)):
        gap = (posed[s] - body).norm(dim=1)
        assert (gap - off).abs().quantile(0.95) < 0.01
    f = t.body.faces
    for s in range(5):
        e_rest = (rest[s][f[:, 0]] - rest[s][f[:, 1]]).norm(dim=1)
        e_pose = (posed[s][f[:, 0]] - posed[s][f[:, 1]]).norm(dim=1)
        assert ((e_pose / e_rest.clamp_min(1e-6)) - 1).abs().median() < 0.02
    # one joint's rotation moves only shell vertices skinned to its subtree
    pose = torch.zeros(1, 24, 3)
    pose[0, 5, 0] = 0.8  # right knee
    moved = (shells(pose)["shells"][0] - rest).norm(dim=-1) > 1e-7
    skinned = shells.skin_weights[..., sorted(descendants(5))].sum(-1) > 0
    assert moved.any() and not (moved & ~skinned).any()


def test_baked_values_read_back_at_their_texture_coordinates():
    """Bake each vertex's rest position into a texture; a lookup at a face centre's uv returns the
    face centre's position (a linear function inside each triangle), up to texel resolution."""
    from zoo.models.lsv import sample_layer_textures
    from zoo.models.lsv.clothing import bake_vertex_values, procedural_outfit

    m = build_mannequin()
    v, f = m.body.v_template, m.body.faces
    tex = bake_vertex_values(v, f, m.uv, m.uv_faces, 256)
    centre_uv = m.uv[m.uv_faces].mean(1)
    got = sample_layer_textures(tex[None, None], torch.zeros(len(f), dtype=torch.long),
                                torch.zeros(len(f), dtype=torch.long), centre_uv)
    err = (got[:, :3] - v[f].mean(1)).norm(dim=1)
    assert err.median() < 2e-3 and err.quantile(0.99) < 0.02
    outfit = procedural_outfit(template_from_mannequin(), 64, seed=0)
    assert outfit.shape == (5, 4, 64, 64) and outfit.min() >= 0 and outfit.max() <= 1
    assert float(outfit[2, 3].max()) == 1 and float(outfit[3:].abs().max()) == 0
