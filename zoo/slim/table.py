"""Latency tables: per-block latency of one family on one backend, with where it came from.

A table maps block keys (`zoo.slim.space`: ``kind.c<width>.r<grid>.e<ratio>...``) to the
median and p90 latency of that block alone, in milliseconds, and the backend's call overhead
(``overhead_ms``: an empty call, which every block's time includes and a network pays once, so
a prediction subtracts it from all blocks but one), and keeps its provenance: the
device, OS and runtime it was measured on, the backend, threads, input size and batch, and
whether zoo measured it or it was imported from a device's file. An optional calibration
``a * sum + b`` (fitted by the additivity report, `zoo.slim.additivity`) turns the sum of a
network's blocks into a whole-network prediction.

Files are JSON (``format: zoo-latency-table/1``), never pickle. A device's measurements import
from a CSV of this form (the docs page ``docs/slim.md`` has an example)::

    device,iPhone 12
    os,iOS 17.5
    runtime,CoreML 7 (compute units ALL)
    family,efficientformer
    img_size,224
    overhead_ms,0.004
    key,median_ms,p90_ms,n
    stem.i3.c48.r56,0.031,0.035,200
    ...

or from a JSON object with the same fields (``device``, ``os``, ``runtime``, ``family``,
optional ``img_size`` and ``overhead_ms``, and ``entries``: a list of ``{key, median_ms, p90_ms, n}``), which is
what the manifest of `zoo.slim.coreml_blocks` asks a device app to return.
"""
from __future__ import annotations

import csv
import datetime
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from zoo.errors import ConfigError, DataError
from zoo.io import atomic_write_json

__all__ = ["Entry", "LatencyTable", "FORMAT", "PROVENANCE_FIELDS"]

FORMAT = "zoo-latency-table/1"
PROVENANCE_FIELDS = ("device", "os", "runtime")


@dataclass(frozen=True)
class Entry:
    """One block's latency: median and 90th percentile over ``n`` timed calls, in ms."""

    median_ms: float
    p90_ms: float
    n: int

    def to_json(self) -> dict:
        return {"median_ms": self.median_ms, "p90_ms": self.p90_ms, "n": self.n}


@dataclass
class LatencyTable:
    """Block latencies of one family. ``provenance`` holds at least ``device``, ``os``,
    ``runtime``, ``backend`` and ``source`` (``measured`` or ``imported from FILE``)."""

    family: str
    entries: dict[str, Entry]
    provenance: dict = field(default_factory=dict)
    calibration: dict | None = None  # {"a", "b", "fitted_on"} from the additivity report
    path: str = ""  # where it was read from, for messages
    overhead_ms: float = 0.0  # one empty call on the backend: in every block's time, once in a network's

    def __post_init__(self) -> None:
        from zoo.slim.space import family_space

        if not isinstance(self.overhead_ms, (int, float)) or not math.isfinite(self.overhead_ms) or self.overhead_ms < 0:
            raise DataError(f"{self.where}: overhead_ms = {self.overhead_ms!r}; it is an empty call's time, >= 0 ms.")
        space = family_space(self.family, where=self.where)
        for key, e in self.entries.items():
            space.parse_key(key, where=self.where)
            for name in ("median_ms", "p90_ms"):
                v = getattr(e, name)
                if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                    raise DataError(f"{self.where}: {key} has {name} = {v!r}; latencies are finite and >= 0 ms. "
                                    "Re-measure that block or drop the row.")
            if not isinstance(e.n, int) or e.n < 1:
                raise DataError(f"{self.where}: {key} has n = {e.n!r}; n is the number of timed calls (>= 1).")

    @property
    def where(self) -> str:
        return f"latency table {self.path}" if self.path else "latency table"

    # -- lookup ---------------------------------------------------------------------------

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def ms(self, key: str) -> float:
        """Median latency of one block; a missing key is a `DataError` saying how to fix it."""
        try:
            return self.entries[key].median_ms
        except KeyError:
            raise DataError(self._missing_message([key])) from None

    def check_covers(self, keys: Iterable[str]) -> None:
        missing = sorted({k for k in keys if k not in self.entries})
        if missing:
            raise DataError(self._missing_message(missing))

    def _missing_message(self, missing: list[str]) -> str:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        size = self.provenance.get("img_size")
        return (f"{self.where} has no entry for {shown}: it covers {len(self.entries)} {self.family} blocks"
                f"{f' at img_size {size}' if size else ''}. Build one that covers the search "
                f"(zoo latency-table --family {self.family} --img-size N ...) or add the rows to the device file.")

    def predict(self, keys: Iterable[str], calibrated: bool = True) -> float:
        """Sum of the blocks' medians less the call overhead each of them carries (a network
        pays it once), then ``a * sum + b`` when calibrated and a fit exists."""
        keys = list(keys)
        total = sum(self.ms(k) for k in keys) - max(len(keys) - 1, 0) * self.overhead_ms
        if calibrated and self.calibration:
            return self.calibration["a"] * total + self.calibration["b"]
        return total

    def describe(self) -> str:
        """One line for model cards and reports: backend, device, runtime, source."""
        p = self.provenance
        parts = [p.get("backend", "?"), p.get("device", "?"), p.get("os", "?"), p.get("runtime", "?")]
        if p.get("threads"):
            parts.append(f"{p['threads']} threads")
        src = p.get("source", "")
        return ", ".join(str(x) for x in parts) + (f" ({src})" if src else "")

    # -- files ----------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {"format": FORMAT, "family": self.family, "provenance": self.provenance,
                "calibration": self.calibration, "overhead_ms": self.overhead_ms,
                "entries": {k: self.entries[k].to_json() for k in sorted(self.entries)}}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix != ".json":
            raise ConfigError(f"latency tables are JSON files (.json); got {path}.")
        atomic_write_json(path, self.to_json())
        self.path = str(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        """A table written by `save` (or `zoo latency-table`)."""
        path = Path(path)
        obj = _read_json(path)
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise DataError(f"{path} is not a zoo latency table (no \"format\": \"{FORMAT}\"). A device's "
                            "measurements are imported first: zoo latency-table --import FILE --out lut.json.")
        try:
            entries = {k: Entry(v["median_ms"], v["p90_ms"], v["n"]) for k, v in obj["entries"].items()}
            return cls(obj["family"], entries, dict(obj.get("provenance") or {}), obj.get("calibration"), str(path),
                       obj.get("overhead_ms", 0.0))
        except (KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{path}: malformed latency table ({type(e).__name__}: {e}).") from None

    @classmethod
    def import_device_file(cls, path: str | Path, family: str | None = None) -> "LatencyTable":
        """A device's measurements from the CSV or JSON of the module docstring."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: no such file.")
        if path.suffix.lower() == ".json":
            header, rows = _device_json(path)
        elif path.suffix.lower() == ".csv":
            header, rows = _device_csv(path)
        else:
            raise ConfigError(f"{path}: device tables are .csv or .json files (docs/slim.md shows the format).")
        missing = [f for f in (*PROVENANCE_FIELDS, "family") if not header.get(f)]
        if family and not header.get("family"):
            header["family"] = family
            missing.remove("family")
        if missing:
            raise DataError(f"{path} does not say its {', '.join(missing)}: a device table starts with the device, "
                            "OS, runtime and family it was measured for (docs/slim.md).")
        if family and header["family"] != family:
            raise DataError(f"{path} holds {header['family']} blocks, not {family}.")
        if not rows:
            raise DataError(f"{path} has no rows of latencies (key, median_ms, p90_ms, n).")
        entries: dict[str, Entry] = {}
        for i, row in enumerate(rows):
            try:
                key = str(row["key"]).strip()
                entry = Entry(float(row["median_ms"]), float(row["p90_ms"]), int(float(row["n"])))
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"{path}: row {i + 1} ({row}) is not key, median_ms, p90_ms, n: {e}.") from None
            if key in entries:
                raise DataError(f"{path}: {key} appears twice.")
            entries[key] = entry
        prov = {k: header[k] for k in PROVENANCE_FIELDS}
        prov.update(backend=header.get("backend", "device"), source=f"imported from {path.name}",
                    imported=datetime.date.today().isoformat())
        if isinstance(header.get("space"), dict):  # as the CoreML manifest gives it back
            prov["space"] = header["space"]
        for k in ("img_size", "batch_size", "threads", "compute_units", "date"):
            if header.get(k):
                prov[k] = int(header[k]) if k in ("img_size", "batch_size", "threads") else header[k]
        try:
            overhead = float(header.get("overhead_ms", 0.0))
        except ValueError:
            raise DataError(f"{path}: overhead_ms {header['overhead_ms']!r} is not a number.") from None
        return cls(header["family"], entries, prov, None, str(path), overhead)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no such file.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not JSON ({e}); latency tables are JSON, never pickle.") from None


def _device_json(path: Path) -> tuple[dict, list[dict]]:
    obj = _read_json(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("entries"), list):
        raise DataError(f"{path}: a device JSON is an object with device, os, runtime, family and a list "
                        "\"entries\" of {key, median_ms, p90_ms, n}.")
    header = {k: (v if k == "space" and isinstance(v, dict) else str(v)) for k, v in obj.items()
              if k != "entries" and v is not None}
    return header, obj["entries"]


def _device_csv(path: Path) -> tuple[dict, list[dict]]:
    header: dict[str, str] = {}
    rows: list[dict] = []
    columns = None
    with open(path, newline="") as f:
        for line in csv.reader(f):
            if not line or not "".join(line).strip() or line[0].startswith("#"):
                continue
            cells = [c.strip() for c in line]
            if columns is None:
                if cells[0] == "key":
                    columns = cells
                    if columns[:4] != ["key", "median_ms", "p90_ms", "n"]:
                        raise DataError(f"{path}: the columns must be key, median_ms, p90_ms, n (got {cells}).")
                elif len(cells) >= 2:
                    header[cells[0].lower()] = ",".join(cells[1:]).strip()
                continue
            rows.append(dict(zip(columns, cells)))
    if columns is None:
        raise DataError(f"{path} has no header row key,median_ms,p90_ms,n.")
    return header, rows
