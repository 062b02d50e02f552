"""Layered surface volumes (LSV-GAN, arXiv 2307.05462): an articulated body, textured shells
around it, their renderer and the texture generator. In progress: `body` (the 24-joint
kinematic tree, linear blend skinning, SMPL-format model files read safely) is built; the
shells, the renderer, the generator and the registered models are not yet.
"""
from .body import SMPL_JOINTS, SMPL_PARENTS, BodyModel, axis_angle_to_matrix, load_smpl

__all__ = ["SMPL_JOINTS", "SMPL_PARENTS", "BodyModel", "axis_angle_to_matrix", "load_smpl"]
