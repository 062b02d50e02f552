"""Differentiable rasterization (installed as ``zoo.render``).

Planned API, after nvdiffrast: ``rasterize``, ``interpolate``, ``texture``, ``antialias``, with
a pure-PyTorch backend and an nvdiffrast backend. Nothing is implemented yet; the package
exists so the install layout is fixed.
"""
__all__: list[str] = []
