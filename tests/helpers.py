"""Helpers shared by the test modules."""
from zoo.testing import randomize_, rel_err  # noqa: F401
