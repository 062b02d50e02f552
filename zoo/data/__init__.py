"""Datasets and data generators (imports core modules only).

- `zoo.data.images`: image folders (``<root>/<split>/<class>/<image>``), checked up front;
- `zoo.data.patterns`: a built-in synthetic image-folder dataset (stripes, checkers, rings);
- `zoo.data.pointclouds`: ShapeNetCore.v2.PC15k and the built-in procedural shapes;
- `zoo.data.pointcloud_io`: writing clouds as ``.npy``, ``.ply`` and a PNG grid of views.
"""
