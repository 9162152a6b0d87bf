"""Results over many linear paths: trajectory matrices and instability tables.

Two layouts join the path result of :mod:`ckptscope.results` (see ``docs/results.md``):

- a **trajectory** (``ckptscope.trajectory``): the paths between a run's checkpoints, over the
  dims ``start``, ``end`` (checkpoint labels in training order), ``group``, ``split``, ``alpha``;
- an **instability** result (``ckptscope instability``): the paths between the finals of
  children spawned from one run at epochs ``spawn``, over ``spawn``, ``pair`` (two children),
  ``group``, ``split``, ``alpha``, with each child's final loss over (``spawn``, ``copy``,
  ``split``).

Both carry the curves ``loss`` and ``accuracy`` and, per path, the metrics of
:func:`path_metrics` and ``distance``. A path that was not evaluated (a pair against training
order) holds NaN. This module builds, validates, saves and opens them; it never imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from ckptscope import shape
from ckptscope.errors import CkptscopeError
from ckptscope.result_files import (
    SCHEMA_VERSION,
    check_accuracy,
    check_schema,
    check_unique,
    read_netcdf,
    write_netcdf,
)
from ckptscope.results import VAR_ATTRS

TRAJECTORY_DIMS = ("start", "end", "group", "split", "alpha")
INSTABILITY_DIMS = ("spawn", "pair", "group", "split", "alpha")
KINDS = ("trajectory", "instability")
METRICS = ("barrier_height", "chord_barrier", "midpoint_barrier", "midpoint_loss",
           "error_barrier", "error_chord_barrier")
METRIC_ATTRS = {
    "barrier_height": shape.DESCRIPTIONS["barrier_height"],
    "chord_barrier": shape.DESCRIPTIONS["chord_barrier"],
    "midpoint_barrier": shape.DESCRIPTIONS["midpoint_barrier"] + " (the loss barrier of "
                        "Frankle et al. 2020)",
    "midpoint_loss": "loss at alpha = 0.5 (linear between the grid points around it when 0.5 "
                     "is not on the grid)",
    "error_barrier": "max_i E_i - (E_0 + E_1) / 2 with E = 1 - accuracy: the error barrier "
                     "height of Frankle et al. 2020 (instability when > 0.02); positive on "
                     "any path whose ends differ in error, so compare it between similar ends",
    "error_chord_barrier": "max_i (E_i - ((1 - t_i) E_0 + t_i E_1)) with E = 1 - accuracy: the "
                           "error above the chord between the ends (0 on a path whose error "
                           "falls linearly), for ends that differ (a trajectory)",
}


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint of a trajectory: its label, training epoch and file."""

    label: str
    epoch: int
    path: str = ""
    sha256: str = ""


# --- metrics ---------------------------------------------------------------------------------
def midpoint_loss(loss: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Return the loss at alpha = 0.5, linear between the grid points around it.

    Args:
        loss: (..., k) curves.
        alpha: (k,) increasing grid covering 0.5.

    Returns:
        (...) values; NaN where a curve is NaN at the points used.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    loss = np.asarray(loss, dtype=np.float64)
    hi = int(np.searchsorted(alpha, 0.5))
    if hi < len(alpha) and abs(alpha[hi] - 0.5) < 1e-12:
        return loss[..., hi]
    if hi == 0 or hi == len(alpha):
        raise CkptscopeError(f"the alpha grid {alpha.tolist()[:6]} does not reach 0.5; "
                             f"evaluate on [0, 1].")
    w = (0.5 - alpha[hi - 1]) / (alpha[hi] - alpha[hi - 1])
    return (1 - w) * loss[..., hi - 1] + w * loss[..., hi]


def path_metrics(loss: np.ndarray, accuracy: np.ndarray, alpha: np.ndarray
                 ) -> dict[str, np.ndarray]:
    """Return each of :data:`METRICS` per curve.

    Args:
        loss, accuracy: (..., k) curves on the grid ``alpha`` (k,); rows of NaN (paths not
            evaluated) give NaN.

    Returns:
        name -> (...) array.
    """
    loss = np.asarray(loss, dtype=np.float64)
    error = 1.0 - np.asarray(accuracy, dtype=np.float64)
    return {
        "barrier_height": np.asarray(shape.barrier_height(loss, alpha)),
        "chord_barrier": np.asarray(shape.chord_barrier(loss, alpha)),
        "midpoint_barrier": np.asarray(shape.midpoint_barrier(loss, alpha)),
        "midpoint_loss": np.asarray(midpoint_loss(loss, alpha)),
        "error_barrier": np.asarray(shape.midpoint_barrier(error, alpha)),
        "error_chord_barrier": np.asarray(shape.chord_barrier(error, alpha)),
    }


# --- building --------------------------------------------------------------------------------
def _common(dims: tuple[str, ...], loss, accuracy, distance, alphas) -> dict:
    """The curves, their metrics and the distance as data variables over ``dims``."""
    metrics = path_metrics(loss, accuracy, alphas)
    data = {
        "loss": (dims, np.asarray(loss, dtype=np.float64), VAR_ATTRS["loss"]),
        "accuracy": (dims, np.asarray(accuracy, dtype=np.float64), VAR_ATTRS["accuracy"]),
        "distance": (dims[:3], np.asarray(distance, dtype=np.float64), VAR_ATTRS["distance"]),
    }
    for name in METRICS:
        data[name] = (dims[:4], metrics[name], {"description": METRIC_ATTRS[name]})
    return data


def _group_coords(groups, patterns, splits, n_examples, alphas) -> dict:
    return {
        "group": ("group", list(groups)),
        "pattern": ("group", list(patterns), VAR_ATTRS["pattern"]),
        "split": ("split", list(splits)),
        "n_examples": ("split", np.asarray(n_examples, dtype=np.int32), VAR_ATTRS["n_examples"]),
        "alpha": ("alpha", np.asarray(alphas, dtype=np.float64), VAR_ATTRS["alpha"]),
    }


def _check_attrs(attrs: Mapping[str, object]) -> None:
    for key, value in attrs.items():
        if not isinstance(value, (str, int, float, np.integer, np.floating)) or isinstance(
                value, bool):
            raise TypeError(f"result attribute {key!r} is a {type(value).__name__}; NetCDF "
                            f"stores strings and numbers only (encode it with json.dumps).")


def build_trajectory(*, loss: np.ndarray, accuracy: np.ndarray, distance: np.ndarray,
                     alphas: Sequence[float], starts: Sequence[CheckpointInfo],
                     ends: Sequence[CheckpointInfo], groups: Sequence[str],
                     patterns: Sequence[str], splits: Sequence[str], n_examples: Sequence[int],
                     attrs: Mapping[str, object]) -> xr.Dataset:
    """Return a trajectory result from plain arrays.

    Args:
        loss, accuracy: (start, end, group, split, alpha); NaN for paths not evaluated.
        distance: (start, end, group).
        starts, ends: the checkpoints along each dim, in training order.
        attrs: provenance (strings and numbers).
    """
    _check_attrs(attrs)
    dims = TRAJECTORY_DIMS
    coords = _group_coords(groups, patterns, splits, n_examples, alphas)
    for dim, infos in (("start", starts), ("end", ends)):
        coords[dim] = (dim, [c.label for c in infos])
        coords[f"{dim}_epoch"] = (dim, np.asarray([c.epoch for c in infos], dtype=np.int32),
                                  {"description": "training epoch of the checkpoint"})
        coords[f"{dim}_path"] = (dim, [c.path for c in infos])
        coords[f"{dim}_sha256"] = (dim, [c.sha256 for c in infos])
    ds = xr.Dataset(_common(dims, loss, accuracy, distance, alphas), coords=coords,
                    attrs={"ckptscope_schema": SCHEMA_VERSION, "ckptscope_kind": "trajectory",
                           **dict(attrs)})
    return validate_matrix(ds)


def build_instability(*, loss: np.ndarray, accuracy: np.ndarray, distance: np.ndarray,
                      alphas: Sequence[float], spawns: Sequence[int],
                      pairs: Sequence[tuple[int, int]], copies: Sequence[int],
                      final_loss: np.ndarray, final_accuracy: np.ndarray,
                      child_paths: Sequence[Sequence[str]], groups: Sequence[str],
                      patterns: Sequence[str], splits: Sequence[str],
                      n_examples: Sequence[int], attrs: Mapping[str, object]) -> xr.Dataset:
    """Return an instability result from plain arrays.

    Args:
        loss, accuracy: (spawn, pair, group, split, alpha): the path from child ``a`` to child
            ``b`` of each pair, both spawned at the same epoch.
        distance: (spawn, pair, group).
        spawns: the spawn epochs K; ``pairs``: (a, b) copy indices; ``copies``: 0..n-1.
        final_loss, final_accuracy: (spawn, copy, split), each child's final.
        child_paths: (spawn, copy) the children's final checkpoint files.
    """
    _check_attrs(attrs)
    dims = INSTABILITY_DIMS
    data = _common(dims, loss, accuracy, distance, alphas)
    data["final_loss"] = (("spawn", "copy", "split"), np.asarray(final_loss, dtype=np.float64),
                          {"description": "loss of each child's final checkpoint"})
    data["final_accuracy"] = (("spawn", "copy", "split"),
                              np.asarray(final_accuracy, dtype=np.float64),
                              {"description": "accuracy of each child's final checkpoint"})
    coords = _group_coords(groups, patterns, splits, n_examples, alphas)
    coords |= {
        "spawn": ("spawn", np.asarray(spawns, dtype=np.int32),
                  {"description": "epoch K the children were spawned at (0: the init)"}),
        "pair": ("pair", [f"{a}-{b}" for a, b in pairs]),
        "pair_a": ("pair", np.asarray([a for a, _ in pairs], dtype=np.int32)),
        "pair_b": ("pair", np.asarray([b for _, b in pairs], dtype=np.int32)),
        "copy": ("copy", np.asarray(copies, dtype=np.int32)),
        "child_path": (("spawn", "copy"), np.asarray(child_paths, dtype=str)),
    }
    ds = xr.Dataset(data, coords=coords,
                    attrs={"ckptscope_schema": SCHEMA_VERSION, "ckptscope_kind": "instability",
                           **dict(attrs)})
    return validate_matrix(ds)


# --- validating, saving, opening -------------------------------------------------------------
def validate_matrix(ds: xr.Dataset, *, source: str = "the result") -> xr.Dataset:
    """Raise unless ``ds`` is a trajectory or instability result; return it.

    Checks the kind, the curves' and metrics' dims, real floats, an increasing alpha grid,
    accuracies in [0, 1] (NaN allowed: paths not evaluated), unique labels, the schema.

    Raises:
        CkptscopeError: naming the first thing missing or malformed.
    """

    def fail(what: str):
        raise CkptscopeError(f"{source} is not a valid ckptscope {kind or 'matrix'} result: "
                             f"{what}; write it again with `ckptscope {kind or 'trajectory'}`.")

    kind = ds.attrs.get("ckptscope_kind")
    if kind not in KINDS:
        kind = None
        fail(f"attribute 'ckptscope_kind' is {str(ds.attrs.get('ckptscope_kind'))[:40]!r}, "
             f"expected one of {KINDS}")
    dims = TRAJECTORY_DIMS if kind == "trajectory" else INSTABILITY_DIMS
    expected = {"loss": dims, "accuracy": dims, "distance": dims[:3],
                **dict.fromkeys(METRICS, dims[:4])}
    if kind == "instability":
        expected |= dict.fromkeys(("final_loss", "final_accuracy"), ("spawn", "copy", "split"))
    for name, want in expected.items():
        if name not in ds.data_vars:
            fail(f"variable {name!r} is missing")
        if tuple(ds[name].dims) != want:
            fail(f"{name!r} has dims {tuple(ds[name].dims)}, expected {want}")
        if ds[name].dtype.kind != "f":
            fail(f"{name!r} holds {ds[name].dtype.name} values, expected real floats")
    for dim in dims:
        if dim not in ds.coords or ds.sizes[dim] == 0:
            fail(f"coordinate {dim!r} is missing or empty")
    alpha = ds["alpha"].values
    if alpha.dtype.kind != "f" or not np.all(np.isfinite(alpha)) or np.any(np.diff(alpha) <= 0):
        fail("'alpha' is not a finite, strictly increasing grid")
    check_accuracy(ds, fail)
    check_unique(ds, (*dims[:4], *(("copy",) if kind == "instability" else ())), fail)
    check_schema(ds, fail, source=source)
    return ds


def save_matrix(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write a trajectory or instability result as NetCDF atomically."""
    validate_matrix(ds)
    return write_netcdf(ds, path)


def open_matrix(path: str | os.PathLike) -> xr.Dataset:
    """Read a trajectory or instability result into memory and validate it.

    Raises:
        CkptscopeError: the file is missing, not NetCDF, or not such a result.
    """
    return validate_matrix(read_netcdf(path, writer="`ckptscope trajectory --out`"),
                           source=repr(str(path)))
