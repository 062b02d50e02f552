"""Latency-table keys: ``kind`` then ``<letter><int>`` fields joined by dots (``mb4d.c96.r28.e4``)."""
from __future__ import annotations

import re

from zoo.errors import DataError

__all__ = ["parse_key"]

_FIELD = re.compile(r"^([a-z])(\d+)$")


def parse_key(key: str, kinds: dict[str, tuple[str, ...]], where: str = "") -> tuple[str, dict[str, int]]:
    """``"mb4d.c96.r28.e4"`` -> ``("mb4d", {"c": 96, "r": 28, "e": 4})``, checked against `kinds`
    (kind -> its field letters in order); anything else is a `DataError` naming the family's keys."""
    kind, *rest = str(key).split(".")
    fields = {}
    for part in rest:
        m = _FIELD.match(part)
        if not m:
            break
        fields[m.group(1)] = int(m.group(2))
    else:
        if kind in kinds and tuple(fields) == kinds[kind]:
            return kind, fields
    known = ", ".join(f"{k}." + ".".join(f"{f}N" for f in v) for k, v in kinds.items())
    raise DataError(f"{where + ': ' if where else ''}{key!r} is not a block of this family (its keys are {known}); "
                    "a table measured for another family cannot be used here.")
