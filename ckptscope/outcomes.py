"""Per-run values to pair with a shape metric: a metric of the result itself, a field of each
run's end checkpoint's metadata, or a table keyed by run.

:func:`outcome` reads any of them as one float per run of a result (NaN where a run has none);
:func:`ckptscope.correlation.correlate` pairs them with a metric. Checkpoint metadata and CSV
files are untrusted input: bounded, parsed as data only (:mod:`ckptscope.metadata`), and each
end checkpoint must still have the sha256 the result recorded. numpy / xarray only.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from ckptscope.errors import CkptscopeError
from ckptscope.metadata import parse_json, read_metadata
from ckptscope.summary import ENDPOINTS, curve_metric

METRIC_NAMES = ("barrier_height", "chord_barrier", "midpoint_barrier", "peak_alpha",
                "above_start", "half_drop_alpha", "tolerance", "distance", *ENDPOINTS)
MAX_TABLE_BYTES = 16 << 20
_MAX_HEADER_BYTES = 100 << 20  # what checkpoints._sniff accepts as a safetensors header
_MISSING = ("", "nan", "na", "n/a", "null", "none")


@dataclass(frozen=True)
class MetricRef:
    """One curve metric of a result: ``GROUP[@SPLIT]:METRIC``."""

    group: str
    split: str
    metric: str

    def __str__(self) -> str:
        return f"{self.group}@{self.split}:{self.metric}"


def parse_metric(text: str, ds: xr.Dataset, *, like: MetricRef | None = None) -> MetricRef:
    """Read ``GROUP[@SPLIT]:METRIC`` (or a bare ``METRIC`` with ``like``'s group and split).

    The split may be left out when the result has one, and the group is split off at the
    last ``:`` (group names may hold colons).

    Raises:
        CkptscopeError: an unknown metric (``shape`` is a verdict, not a number), group or
            split, or a split left out of a result with several.
    """
    target, sep, metric = text.rpartition(":")
    metric = metric.strip()
    if metric not in METRIC_NAMES:
        why = (" (shape is a verdict; correlate above_start or barrier_height instead)"
               if metric == "shape" else "")
        raise CkptscopeError(f"unknown metric {metric!r} in {text!r}{why}; known: "
                             f"{', '.join(METRIC_NAMES)}.")
    if not sep:
        if like is None:
            raise CkptscopeError(f"metric {text!r} names no group; write GROUP[@SPLIT]:METRIC, "
                                 f"e.g. all:barrier_height.")
        return MetricRef(like.group, like.split, metric)
    group, at, split = target.rpartition("@") if "@" in target else (target, "", "")
    group = group.strip()
    groups = [str(g) for g in ds["group"].values]
    splits = [str(s) for s in ds["split"].values]
    if group not in groups:
        raise CkptscopeError(f"metric {text!r} names group {group!r}; the result has groups "
                             f"{groups}.")
    if not at:
        if len(splits) > 1:
            raise CkptscopeError(f"the result has splits {splits}; name one: "
                                 f"{group}@{splits[0]}:{metric}.")
        split = splits[0]
    split = split.strip()
    if split not in splits:
        raise CkptscopeError(f"metric {text!r} names split {split!r}; the result has splits "
                             f"{splits}.")
    return MetricRef(group, split, metric)


def metric_values(ds: xr.Dataset, ref: MetricRef) -> np.ndarray:
    """Return ``(run,)`` values of a metric of a classified result."""
    values = curve_metric(ds, ref.metric)
    g = [str(v) for v in ds["group"].values].index(ref.group)
    s = [str(v) for v in ds["split"].values].index(ref.split)
    return values[:, g, s]


# --- checkpoint metadata ---------------------------------------------------------------------
def checkpoint_metadata(path: str | os.PathLike, *, sha256: str = "") -> dict[str, str]:
    """Return the ``ckptscope.*`` metadata of a safetensors file, read from its header alone.

    Args:
        path: the file.
        sha256: the digest the file must have (empty: not checked).

    Raises:
        CkptscopeError: the file is missing, not safetensors, has a malformed or oversized
            header or metadata, or its digest differs.
    """
    path = Path(path)
    if not path.is_file():
        raise CkptscopeError(f"checkpoint {str(path)!r} does not exist; run from the folder the "
                             f"result was made in, or pass root= (--root DIR) to resolve its "
                             f"relative paths.")
    with open(path, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        text = f.read(size) if 0 < size <= _MAX_HEADER_BYTES else b""
    try:
        header = json.loads(text) if len(text) == size and text[:1] == b"{" else None
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict):
        raise CkptscopeError(f"{str(path)!r} is not a safetensors file, so it carries no "
                             f"metadata; give the values as a CSV keyed by run instead.")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise CkptscopeError(f"{str(path)!r} has a malformed safetensors header (its "
                             f"__metadata__ is not an object); save the file again.")
    fields = read_metadata(meta, source=str(path))
    if sha256:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != sha256:
            raise CkptscopeError(
                f"checkpoint {str(path)!r} has changed since the result was made (sha256 "
                f"{digest.hexdigest()[:12]}..., the result recorded {sha256[:12]}...); its "
                f"metadata may describe another run: evaluate it again."
            )
    return fields


def metadata_values(ds: xr.Dataset, name: str, *, root: str | os.PathLike | None = None
                    ) -> np.ndarray:
    """Return ``(run,)`` values of a metadata field of each run's end checkpoint.

    Args:
        name: a field (``epoch``) or a path into a JSON field (``final_metrics.test_accuracy``:
            what ``ckptscope train`` records).
        root: the folder relative checkpoint paths are resolved against (default: the current
            folder, as the result recorded them).

    Raises:
        CkptscopeError: a run has no end checkpoint file, the field is missing (the fields
            present are listed) or not a number, or a checkpoint changed since the result.
    """
    field, *keys = name.split(".")
    out = np.full(ds.sizes["run"], np.nan)
    for r, run in enumerate(str(v) for v in ds["run"].values):
        recorded = str(ds["end_path"].values[r])
        if not recorded:
            raise CkptscopeError(f"run {run!r} was evaluated from an in-memory state, so it has "
                                 f"no checkpoint metadata; give the values as a CSV keyed by "
                                 f"run.")
        path = Path(root) / recorded if root is not None and not Path(recorded).is_absolute() \
            else Path(recorded)
        meta = checkpoint_metadata(path, sha256=str(ds["end_sha256"].values[r]))
        if field not in meta:
            raise CkptscopeError(f"checkpoint {str(path)!r} (run {run!r}) has no metadata field "
                                 f"{field!r}; it has {', '.join(sorted(meta)) or 'none'}. "
                                 f"Select the runs that have it (runs=, --runs).")
        if keys:
            value = parse_json(meta[field], source=str(path), field=field)
        else:  # a plain field: a JSON number, or a string stored as it is ("role": "final")
            value = _plain(meta[field], source=str(path), field=field)
        for depth, key in enumerate(keys):
            if not isinstance(value, dict) or key not in value:
                at = ".".join([field, *keys[:depth]])
                have = sorted(value) if isinstance(value, dict) else type(value).__name__
                raise CkptscopeError(f"checkpoint {str(path)!r} (run {run!r}): {at} has no "
                                     f"{key!r}; it holds {have}.")
            value = value[key]
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CkptscopeError(f"checkpoint {str(path)!r} (run {run!r}): {name} is "
                                 f"{str(value)[:40]!r}, not a number.")
        out[r] = float(value)
    return out


def _plain(text: str, *, source: str, field: str):
    """A top-level metadata field: JSON where it parses (numbers are stored as JSON), else the
    string itself."""
    try:
        return parse_json(text, source=source, field=field)
    except CkptscopeError:
        return text


# --- a table keyed by run --------------------------------------------------------------------
def table_values(ds: xr.Dataset, table: str | os.PathLike | Mapping[str, float], *,
                 column: str | None = None) -> np.ndarray:
    """Return ``(run,)`` values from a CSV file or a mapping run -> value.

    The CSV has a header; its ``run`` column (else its first) holds run labels and ``column``
    (default: the only other one) the values. An empty cell, ``nan``, ``NA`` or ``null`` is a
    missing value.

    Raises:
        CkptscopeError: the file is missing, too large or not such a table, a value is not a
            number, a run repeats, or a run of the result is missing from it.
    """
    if isinstance(table, Mapping) or hasattr(table, "to_dict"):
        mapping = dict(table.to_dict() if hasattr(table, "to_dict") else table)
        values = {str(k): v for k, v in mapping.items()}
        source = "the table"
    else:
        values, source = _read_table(Path(table), column), repr(str(table))
    runs = [str(r) for r in ds["run"].values]
    missing = [r for r in runs if r not in values]
    if missing:
        raise CkptscopeError(f"{source} has no value for run(s) {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}; it has runs "
                             f"{sorted(values)[:5]}. Key it by the result's run labels.")
    out = np.empty(len(runs))
    for i, run in enumerate(runs):
        value = values[run]
        if value is None or (isinstance(value, str) and value.strip().lower() in _MISSING):
            out[i] = np.nan
            continue
        try:
            if isinstance(value, bool):
                raise TypeError
            out[i] = float(value)
        except (TypeError, ValueError):
            raise CkptscopeError(f"{source}: the value for run {run!r} is "
                                 f"{str(value)[:40]!r}, not a number.") from None
    return out


def _read_table(path: Path, column: str | None) -> dict[str, str]:
    if not path.is_file():
        raise CkptscopeError(f"table {str(path)!r} does not exist; check the path.")
    if path.stat().st_size > MAX_TABLE_BYTES:
        raise CkptscopeError(f"table {str(path)!r} is over {MAX_TABLE_BYTES >> 20} MiB; a table "
                             f"of runs is far smaller: check the file.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise CkptscopeError(f"table {str(path)!r} is not UTF-8 text; save it as UTF-8 "
                             f"CSV.") from None
    rows = list(csv.reader(io.StringIO(text)))
    if len(rows) < 2 or len(rows[0]) < 2:
        raise CkptscopeError(f"table {str(path)!r} needs a header and rows of at least two "
                             f"columns (run, value).")
    header = [h.strip() for h in rows[0]]
    key = header.index("run") if "run" in header else 0
    others = [h for i, h in enumerate(header) if i != key]
    if column is None:
        if len(others) != 1:
            raise CkptscopeError(f"table {str(path)!r} has columns {others} besides "
                                 f"{header[key]!r}; name one: {path}:{others[0]}.")
        column = others[0]
    if column not in others:
        raise CkptscopeError(f"table {str(path)!r} has no column {column!r}; it has {others}.")
    at = header.index(column)
    values: dict[str, str] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise CkptscopeError(f"table {str(path)!r} line {line} has {len(row)} cells, the "
                                 f"header {len(header)}.")
        run = row[key].strip()
        if run in values:
            raise CkptscopeError(f"table {str(path)!r} line {line}: run {run!r} repeats.")
        values[run] = row[at].strip()
    return values


# --- any of them -----------------------------------------------------------------------------
def outcome(ds: xr.Dataset, spec, *, like: MetricRef,
            root: str | os.PathLike | None = None) -> tuple[str, np.ndarray]:
    """Return ``(label, (run,) values)`` for what ``spec`` names.

    Args:
        ds: a classified result.
        spec: a metric (``acc_end``; ``GROUP[@SPLIT]:METRIC``), a ``.csv`` file
            (``FILE.csv[:COLUMN]``), a mapping or pandas Series run -> value, or else a
            metadata field of the end checkpoints (``final_metrics.test_accuracy``).
        like: the group and split a bare metric name is read at.
        root: resolves the result's relative checkpoint paths (metadata fields).
    """
    if not isinstance(spec, (str, os.PathLike)):
        return "the given values", table_values(ds, spec)
    text = str(spec)
    stem, sep, column = text.rpartition(":")
    if text.lower().endswith(".csv"):
        return Path(text).name, table_values(ds, text)
    if sep and stem.lower().endswith(".csv"):
        return f"{Path(stem).name}:{column}", table_values(ds, stem, column=column)
    if text.rpartition(":")[2].strip() in METRIC_NAMES:
        ref = parse_metric(text, ds, like=like)
        return str(ref), metric_values(ds, ref)
    if ":" in text or not text.strip():
        raise CkptscopeError(f"{text!r} is neither a metric ({', '.join(METRIC_NAMES)}), a "
                             f"FILE.csv[:COLUMN] nor a checkpoint metadata field such as "
                             f"final_metrics.test_accuracy.")
    return text, metadata_values(ds, text, root=root)

