"""zoo: an efficient vision and 3D generation model zoo on PyTorch.

    >>> import zoo
    >>> zoo.list_models("efficientvit_*")
    >>> model = zoo.create_model("efficientvit_m0", pretrained=False)
    >>> zoo.model_card("efficientvit_m0").paper.arxiv
"""
from zoo._version import __version__  # noqa: E402

from zoo.flops import complexity  # noqa: E402
from zoo.errors import (  # noqa: E402
    ConfigError,
    DataError,
    ExportError,
    UnknownModelError,
    WeightsError,
    ZooError,
)
from zoo.registry import create_model, list_families, list_models, model_card, set_loader  # noqa: E402


def _load_families() -> None:
    import zoo.models  # noqa: F401  (each family registers its cards on import)


set_loader(_load_families)

__all__ = [
    "__version__",
    "create_model",
    "list_models",
    "list_families",
    "model_card",
    "complexity",
    "ZooError",
    "UnknownModelError",
    "ConfigError",
    "WeightsError",
    "ExportError",
    "DataError",
]


def __getattr__(name: str):
    # `zoo.models`, `zoo.export` and `zoo.render` load on first use, keeping `import zoo` light.
    if name in ("models", "export", "render"):
        import importlib

        return importlib.import_module(f"zoo.{name}")
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")
