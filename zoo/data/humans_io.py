"""Files for generated humans: view grids (PNG), turntables (GIF) and skinned, textured GLB.

The GLB (glTF 2.0, written with pygltflib) holds one mesh per shell layer in the rest pose, each
with its own RGBA texture (PNG, alpha blending, double-sided, unlit) and the same skin: one node
per joint of the kinematic tree (SMPL's names), inverse bind matrices of the rest joints, and the
pose as the joints' local rotations, so a viewer shows the posed body and a DCC tool can re-pose
it. glTF's texture coordinate (0, 0) is the image's top-left corner, as in `zoo.render`. Skin
influences are the ``influences`` (default 8: ``JOINTS_0/1``, ``WEIGHTS_0/1``) largest weights
per vertex, renormalised to sum to 1. Vertices on UV seams are split (glTF has one index per
vertex for every attribute).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from zoo.errors import ConfigError, MissingExtraError
from zoo.io import atomic_write

__all__ = ["image_grid", "save_png", "save_gif", "write_skinned_glb", "split_uv_seams", "axis_angle_to_quaternion"]


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(rgb, dtype=np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)


def image_grid(images: np.ndarray, pad: int = 2, background: float = 1.0) -> np.ndarray:
    """Tile ``images [R, C, H, W, ch]`` (floats in [0, 1]) into one ``uint8`` image with ``pad`` pixels
    between tiles."""
    r, c, h, w, ch = images.shape
    out = np.full((r * h + (r - 1) * pad, c * w + (c - 1) * pad, ch), background, dtype=np.float32)
    for i in range(r):
        for j in range(c):
            out[i * (h + pad):i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = images[i, j]
    return _to_uint8(out)


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def save_png(path: str | Path, array: np.ndarray) -> Path:
    """Write a ``uint8`` ``[H, W, 3|4]`` image atomically."""
    with atomic_write(Path(path), "wb") as f:
        f.write(_png_bytes(array))
    return Path(path)


def save_gif(path: str | Path, frames: list[np.ndarray], duration_ms: int = 80) -> Path:
    """Write ``uint8`` ``[H, W, 3]`` frames as a looping GIF, atomically."""
    from PIL import Image

    imgs = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:], duration=duration_ms, loop=0)
    with atomic_write(Path(path), "wb") as f:
        f.write(buf.getvalue())
    return Path(path)


def split_uv_seams(faces: np.ndarray, uv_faces: np.ndarray):
    """Vertices for one index per attribute: ``(vertex [V'], uv [V'], faces [F, 3])``, where new
    vertex ``i`` is position ``vertex[i]`` with texture coordinate ``uv[i]``."""
    pairs = np.stack([faces.reshape(-1), uv_faces.reshape(-1)], 1)
    unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
    return unique[:, 0], unique[:, 1], inverse.reshape(faces.shape)


def axis_angle_to_quaternion(v: np.ndarray) -> np.ndarray:
    """Unit quaternions ``[..., 4]`` as glTF orders them, ``(x, y, z, w)``, of axis-angles ``[..., 3]``."""
    v = np.asarray(v, dtype=np.float64)
    angle = np.linalg.norm(v, axis=-1, keepdims=True)
    safe = np.where(angle > 1e-12, angle, 1.0)
    axis = np.where(angle > 1e-12, v / safe, 0.0)
    return np.concatenate([axis * np.sin(angle / 2), np.cos(angle / 2)], -1)


def write_skinned_glb(path: str | Path, rest_layers: np.ndarray, faces: np.ndarray, uv: np.ndarray,
                      uv_faces: np.ndarray, textures: np.ndarray, skin_weights: np.ndarray, rest_joints: np.ndarray,
                      parents, joint_names, pose: np.ndarray, transl=None, influences: int = 8) -> Path:
    """Write the shells as one skinned GLB (module docstring).

    ``rest_layers [N, V, 3]`` unposed shells, ``faces [F, 3]``, ``uv [Vt, 2]``, ``uv_faces [F, 3]``,
    ``textures [N, 4, T, T]`` straight RGBA in [0, 1], ``skin_weights [N, V, K]``, ``rest_joints
    [K, 3]``, ``parents`` (-1 for the root), ``pose [K, 3]`` axis-angles, ``transl [3]``."""
    try:
        import pygltflib as G
    except ImportError:
        raise MissingExtraError("writing GLB files needs pygltflib: pip install 'zoo[3d]'") from None
    if influences not in (4, 8):
        raise ConfigError(f"influences must be 4 or 8 (one or two glTF weight sets), not {influences}")
    n, v, _ = rest_layers.shape
    k = len(parents)
    vert, uvi, new_faces = split_uv_seams(np.asarray(faces), np.asarray(uv_faces))
    blob = bytearray()
    views, accessors = [], []

    def add(data: np.ndarray, kind: str, component: int, target=None, minmax=False) -> int:
        data = np.ascontiguousarray(data)
        while len(blob) % 4:
            blob.append(0)
        views.append(G.BufferView(buffer=0, byteOffset=len(blob), byteLength=data.nbytes, target=target))
        blob.extend(data.tobytes())
        acc = G.Accessor(bufferView=len(views) - 1, componentType=component, count=len(data), type=kind)
        if minmax:
            acc.min, acc.max = data.min(0).tolist(), data.max(0).tolist()
        accessors.append(acc)
        return len(accessors) - 1

    def add_image(png: bytes) -> int:
        while len(blob) % 4:
            blob.append(0)
        views.append(G.BufferView(buffer=0, byteOffset=len(blob), byteLength=len(png)))
        blob.extend(png)
        return len(views) - 1

    indices = add(new_faces.astype(np.uint32).reshape(-1), G.SCALAR, G.UNSIGNED_INT, G.ELEMENT_ARRAY_BUFFER)
    texcoord = add(np.asarray(uv, dtype=np.float32)[uvi], G.VEC2, G.FLOAT, G.ARRAY_BUFFER)
    meshes, images, gl_textures, materials = [], [], [], []
    for s in range(n):
        w = np.asarray(skin_weights[s], dtype=np.float64)[vert]
        top = np.argsort(-w, axis=1, kind="stable")[:, :influences]
        tw = np.take_along_axis(w, top, 1)
        tw = tw / tw.sum(1, keepdims=True)
        attrs = G.Attributes(POSITION=add(np.asarray(rest_layers[s], dtype=np.float32)[vert], G.VEC3, G.FLOAT,
                                          G.ARRAY_BUFFER, minmax=True), TEXCOORD_0=texcoord)
        attrs.JOINTS_0 = add(top[:, :4].astype(np.uint16), G.VEC4, G.UNSIGNED_SHORT, G.ARRAY_BUFFER)
        attrs.WEIGHTS_0 = add(tw[:, :4].astype(np.float32), G.VEC4, G.FLOAT, G.ARRAY_BUFFER)
        if influences == 8:
            attrs.JOINTS_1 = add(top[:, 4:].astype(np.uint16), G.VEC4, G.UNSIGNED_SHORT, G.ARRAY_BUFFER)
            attrs.WEIGHTS_1 = add(tw[:, 4:].astype(np.float32), G.VEC4, G.FLOAT, G.ARRAY_BUFFER)
        meshes.append(G.Mesh(name=f"shell_{s}", primitives=[G.Primitive(attributes=attrs, indices=indices,
                                                                         material=s)]))
        rgba = _to_uint8(np.moveaxis(np.asarray(textures[s]), 0, -1))
        images.append(G.Image(bufferView=add_image(_png_bytes(rgba)), mimeType="image/png", name=f"shell_{s}"))
        gl_textures.append(G.Texture(source=s, sampler=0))
        materials.append(G.Material(
            name=f"shell_{s}", alphaMode=G.BLEND, doubleSided=True, extensions={"KHR_materials_unlit": {}},
            pbrMetallicRoughness=G.PbrMetallicRoughness(baseColorTexture=G.TextureInfo(index=s),
                                                        metallicFactor=0.0, roughnessFactor=1.0)))
    rest_joints = np.asarray(rest_joints, dtype=np.float64)
    quats = axis_angle_to_quaternion(pose)
    root_t = rest_joints[0] + (np.zeros(3) if transl is None else np.asarray(transl, dtype=np.float64))
    nodes = []
    for j in range(k):
        t = root_t if parents[j] < 0 else rest_joints[j] - rest_joints[parents[j]]
        nodes.append(G.Node(name=str(joint_names[j]), translation=t.tolist(), rotation=quats[j].tolist(),
                            children=[i for i in range(k) if parents[i] == j]))
    ibm = np.tile(np.eye(4), (k, 1, 1))
    ibm[:, :3, 3] = -rest_joints
    ibm_acc = add(ibm.transpose(0, 2, 1).reshape(k, 16).astype(np.float32), G.MAT4, G.FLOAT)  # column-major
    nodes += [G.Node(name=f"shell_{s}", mesh=s, skin=0) for s in range(n)]
    gltf = G.GLTF2(
        asset=G.Asset(generator="zoo", version="2.0"), scene=0,
        scenes=[G.Scene(nodes=[0] + [k + s for s in range(n)])], nodes=nodes, meshes=meshes,
        skins=[G.Skin(joints=list(range(k)), inverseBindMatrices=ibm_acc, skeleton=0)],
        materials=materials, textures=gl_textures, images=images,
        samplers=[G.Sampler(magFilter=G.LINEAR, minFilter=G.LINEAR, wrapS=G.CLAMP_TO_EDGE, wrapT=G.CLAMP_TO_EDGE)],
        accessors=accessors, bufferViews=views, buffers=[G.Buffer(byteLength=len(blob))],
        extensionsUsed=["KHR_materials_unlit"])
    gltf.set_binary_blob(bytes(blob))
    data = b"".join(gltf.save_to_bytes())
    with atomic_write(Path(path), "wb") as f:
        f.write(data)
    return Path(path)
