"""Grid results: the 2-D result datasets of planes and surfaces, built, validated, saved and
opened here (the path results' contract is :mod:`ckptscope.results`).

The contract (see ``docs/results.md``):

- dims ``run``, ``group``, ``split``, ``y``, ``x`` and ``anchor``;
- ``loss(run, group, split, y, x)``, ``accuracy(run, group, split, y, x)`` as on paths;
- ``anchor_x(run, group, anchor)``, ``anchor_y(run, group, anchor)``: where each checkpoint
  sits in the group's coordinates;
- per kind, variables over (run, group): a plane's ``c``, ``ab_norm``, ``v_norm``; a
  surface's ``x_norm``, ``y_norm``, ``cosine``;
- coords ``x``, ``y`` (finite, increasing), ``group``, ``pattern(group)``, ``n_tensors``,
  ``n_params``, ``split``, ``n_examples``, ``run``, ``anchor`` and per run and anchor
  ``anchor_path``, ``anchor_sha256``;
- ``ds.attrs["grid_kind"]`` is ``plane`` or ``surface``; provenance as on paths.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from ckptscope.errors import CkptscopeError
from ckptscope.result_files import (
    SCHEMA_VERSION,
    check_accuracy,
    check_kinds,
    check_schema,
    check_unique,
    read_netcdf,
    write_netcdf,
)
from ckptscope.results import VAR_ATTRS

GRID_DIMS = ("run", "group", "split", "y", "x")
GRID_KINDS = ("plane", "surface")
# Variables over (run, group) that each kind records.
KIND_VARIABLES = {"plane": ("c", "ab_norm", "v_norm"), "surface": ("x_norm", "y_norm", "cosine")}
GRID_KINDS_OF = {
    "loss": "float", "accuracy": "float", "x": "float", "y": "float",
    "anchor_x": "float", "anchor_y": "float",
    "run": "text", "group": "text", "split": "text", "pattern": "text", "anchor": "text",
    "anchor_path": "text", "anchor_sha256": "text",
    "n_tensors": "int", "n_params": "number", "n_examples": "int",
    **{name: "float" for names in KIND_VARIABLES.values() for name in names},
}

GRID_ATTRS = {
    "x": {"long_name": "x", "description": "the first coordinate of the grid (see grid_kind)"},
    "y": {"long_name": "y", "description": "the second coordinate of the grid"},
    "anchor_x": {"description": "x of each checkpoint in the group's coordinates"},
    "anchor_y": {"description": "y of each checkpoint in the group's coordinates"},
    "anchor_path": {"description": "the checkpoint file (empty for an in-memory state)"},
    "anchor_sha256": {"description": "sha256 of the checkpoint file's bytes"},
    "c": {"description": "<C - A, B - A> / ||B - A||^2 over the group's parameters: C sits "
                         "at (c, 1)"},
    "ab_norm": {"description": "||B - A||_F over the group's parameters (the length of x = 1)"},
    "v_norm": {"description": "||V||_F, V = (C - A) - c (B - A), over the group's parameters "
                              "(the length of y = 1)"},
    "x_norm": {"description": "||d_x||_F over the group's moving tensors"},
    "y_norm": {"description": "||d_y||_F over the group's moving tensors"},
    "cosine": {"description": "<d_x, d_y> / (||d_x|| ||d_y||) over the group's moving tensors"},
}


def build_grid(
    *,
    kind: str,
    loss: np.ndarray,
    accuracy: np.ndarray,
    x: Sequence[float],
    y: Sequence[float],
    groups: Sequence[str],
    patterns: Sequence[str],
    n_tensors: Sequence[int],
    n_params: Sequence[float],
    splits: Sequence[str],
    n_examples: Sequence[int],
    runs: Sequence[str],
    anchors: Sequence[str],
    anchor_paths: np.ndarray,
    anchor_sha256: np.ndarray,
    anchor_x: np.ndarray,
    anchor_y: np.ndarray,
    geometry: Mapping[str, np.ndarray],
    attrs: Mapping[str, object],
) -> xr.Dataset:
    """Return a grid result from plain arrays.

    Args:
        kind: ``plane`` or ``surface``.
        loss, accuracy: (run, group, split, y, x).
        anchor_paths, anchor_sha256: (run, anchor) strings.
        anchor_x, anchor_y: (run, group, anchor).
        geometry: the kind's variables (``KIND_VARIABLES``), each (run, group).
        attrs: provenance; strings and numbers only.
    """
    for key, value in attrs.items():
        if not isinstance(value, (str, int, float, np.integer, np.floating)) or isinstance(
                value, bool):
            raise TypeError(f"grid attribute {key!r} is a {type(value).__name__}; NetCDF stores "
                            f"strings and numbers only.")
    placed = ("run", "group", "anchor")
    ds = xr.Dataset(
        data_vars={
            "loss": (GRID_DIMS, np.asarray(loss, np.float64), VAR_ATTRS["loss"]),
            "accuracy": (GRID_DIMS, np.asarray(accuracy, np.float64), VAR_ATTRS["accuracy"]),
            "anchor_x": (placed, np.asarray(anchor_x, np.float64), GRID_ATTRS["anchor_x"]),
            "anchor_y": (placed, np.asarray(anchor_y, np.float64), GRID_ATTRS["anchor_y"]),
            **{name: (("run", "group"), np.asarray(values, np.float64), GRID_ATTRS[name])
               for name, values in geometry.items()},
        },
        coords={
            "run": ("run", [str(r) for r in runs]),
            "group": ("group", list(groups)),
            "split": ("split", list(splits)),
            "y": ("y", np.asarray(y, np.float64), GRID_ATTRS["y"]),
            "x": ("x", np.asarray(x, np.float64), GRID_ATTRS["x"]),
            "anchor": ("anchor", list(anchors)),
            "pattern": ("group", list(patterns), VAR_ATTRS["pattern"]),
            "n_tensors": ("group", np.asarray(n_tensors, np.int32), VAR_ATTRS["n_tensors"]),
            "n_params": ("group", np.asarray(n_params, np.float64), VAR_ATTRS["n_params"]),
            "n_examples": ("split", np.asarray(n_examples, np.int32), VAR_ATTRS["n_examples"]),
            "anchor_path": (("run", "anchor"), np.asarray(anchor_paths, dtype=str),
                            GRID_ATTRS["anchor_path"]),
            "anchor_sha256": (("run", "anchor"), np.asarray(anchor_sha256, dtype=str),
                              GRID_ATTRS["anchor_sha256"]),
        },
        attrs={"ckptscope_schema": SCHEMA_VERSION, "grid_kind": kind, **dict(attrs)},
    )
    return validate_grid(ds)


def is_grid(ds: xr.Dataset) -> bool:
    """Whether ``ds`` looks like a grid result (x and y dims, no alpha): which validator to
    call."""
    return "x" in ds.dims and "y" in ds.dims and "alpha" not in ds.dims


def validate_grid(ds: xr.Dataset, *, source: str = "the result") -> xr.Dataset:
    """Raise unless ``ds`` follows the grid contract; return it.

    Checks the kind, the variables and coordinates with their dims, that no dim is empty, what
    each holds (floats, integers, strings: nothing is coerced), finite increasing ``x`` and
    ``y``, accuracies in [0, 1], unique labels and the schema version.

    Raises:
        CkptscopeError: naming the first thing missing or malformed.
    """

    def fail(what: str):
        raise CkptscopeError(
            f"{source} is not a valid ckptscope grid result: {what}; write it again with "
            f"`ckptscope plane` or `ckptscope surface`."
        )

    kind = ds.attrs.get("grid_kind")
    if kind not in GRID_KINDS:
        fail(f"attribute 'grid_kind' is {str(kind)[:40]!r}, not one of {', '.join(GRID_KINDS)}")
    variables = ds.variables
    wanted = {"loss": GRID_DIMS, "accuracy": GRID_DIMS,
              "anchor_x": ("run", "group", "anchor"), "anchor_y": ("run", "group", "anchor"),
              **dict.fromkeys(KIND_VARIABLES[kind], ("run", "group"))}
    for name, dims in wanted.items():
        if name not in ds.data_vars:
            fail(f"variable {name!r} is missing")
        if tuple(variables[name].dims) != dims:
            fail(f"{name!r} has dims {tuple(variables[name].dims)}, expected {dims}")
    coords = {"run": ("run",), "group": ("group",), "split": ("split",), "x": ("x",),
              "y": ("y",), "anchor": ("anchor",), "pattern": ("group",),
              "anchor_path": ("run", "anchor"), "anchor_sha256": ("run", "anchor")}
    for name, dims in coords.items():
        if name not in ds.coords:
            fail(f"coordinate {name!r} is missing")
        if tuple(variables[name].dims) != dims:
            fail(f"{name!r} has dims {tuple(variables[name].dims)}, expected {dims}")
    for dim in (*GRID_DIMS, "anchor"):
        if ds.sizes[dim] == 0:
            fail(f"it has no {dim}s (the {dim!r} dim is empty)")
    check_kinds(ds, GRID_KINDS_OF, fail)
    for axis in ("x", "y"):
        values = variables[axis].values
        if not np.all(np.isfinite(values)) or np.any(np.diff(values) <= 0):
            fail(f"{axis!r} is not a finite, strictly increasing grid")
    check_accuracy(ds, fail)
    check_unique(ds, ("run", "group", "split", "anchor"), fail)
    check_schema(ds, fail, source=source)
    return ds


def save_grid(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write a grid result as NetCDF atomically (temporary name beside it, then rename)."""
    validate_grid(ds)
    return write_netcdf(ds, path)


def open_grid(path: str | os.PathLike) -> xr.Dataset:
    """Read a grid result (``ckptscope plane`` / ``surface --out``) into memory, validated.

    Raises:
        CkptscopeError: the file is missing, not NetCDF, or not a grid result.
    """
    ds = read_netcdf(path, writer="`ckptscope plane --out` or `ckptscope surface --out`")
    if "alpha" in ds.dims:
        raise CkptscopeError(
            f"{str(path)!r} is a path result (it has an alpha dim), not a plane or surface; "
            f"open it with ckptscope.open_result."
        )
    return validate_grid(ds, source=repr(str(path)))
