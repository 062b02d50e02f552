"""Model definitions, one module per family; importing this registers them all.

Installed as ``zoo.models``. Shared building blocks live in `zoo.models.layers`.
"""
from zoo.models import efficientvit  # noqa: F401  (registers efficientvit_m0..m5)
from zoo.models.efficientvit import EfficientVit

__all__ = ["EfficientVit"]
