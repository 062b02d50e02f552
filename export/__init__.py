"""Deployment: deploy-time reparameterization (installed as ``zoo.export``).

Export code never special-cases a model by name: a model that needs help provides it
(a ``reparameterize()`` method).
"""
from zoo.export.reparam import reparameterize

__all__ = ["reparameterize"]
