"""Result datasets: the one place that builds, validates, saves and opens them.

The contract (see ``docs/results.md``):

- dims ``run``, ``group``, ``split``, ``alpha``;
- ``loss(run, group, split, alpha)``: mean loss over the split's examples;
  ``accuracy(run, group, split, alpha)``: fraction correct in [0, 1];
  ``distance(run, group)``: eq. 4 over the group's parameters;
- coords ``alpha``, ``group`` (``all`` is the whole model), ``pattern(group)``,
  ``n_tensors(group)``, ``n_params(group)``, ``split``, ``n_examples(split)``, ``run`` and per run
  ``start_path``, ``end_path``, ``start_sha256``, ``end_sha256``;
- provenance in ``ds.attrs``.

Files are NetCDF (version 3, written with scipy, so no extra library is needed), written to a
temporary name in the target folder and renamed, so a crash never leaves a half-written result.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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

DIMS = ("run", "group", "split", "alpha")
CURVE_VARS = ("loss", "accuracy")
# The classification a result may carry over (run, group, split): ckptscope.shape computes it.
SHAPES = ("monotonic", "barrier", "plateau", "invalid")
SHAPE_METRICS = ("barrier_height", "chord_barrier", "midpoint_barrier", "peak_alpha",
                 "above_start", "half_drop_alpha", "tolerance")
# What each variable and coordinate holds: "float" (real floating point, any width), "int",
# "number" (int or float), "text" (str). Checked on every open: a forged or foreign file whose
# values would be coerced (strings parsed as numbers, int8 losses) is refused, not guessed at.
KINDS = {
    "loss": "float", "accuracy": "float", "distance": "float", "alpha": "float",
    "run": "text", "group": "text", "split": "text", "pattern": "text",
    "start_path": "text", "end_path": "text", "start_sha256": "text", "end_sha256": "text",
    "n_tensors": "int", "n_params": "number", "n_examples": "int",
    "shape": "text", **dict.fromkeys(SHAPE_METRICS, "float"),
}
# How a curve was measured: results that differ in these are not runs of one experiment.
MERGE_SETTINGS = ("adapter", "adapter_options", "hold", "bn_policy", "bn_batches", "dtype",
                  "loss_function", "data_seed")
# Settings that change the curves only under some BatchNorm policies: batch statistics
# (bn=batch, and the re-estimation of bn=recompute) depend on how the examples are batched.
BATCH_DEPENDENT = ("batch", "recompute")
# Provenance that may differ between merged runs without changing what was measured; where it
# does, the merged result lists every value instead of claiming the first one's.
MERGE_PROVENANCE = ("device", "strategy", "batch_size", "world_size", "torch_version",
                    "ckptscope_version", "created")

VAR_ATTRS = {
    "loss": {"long_name": "loss", "description": "sum of per-example losses over the split / N"},
    "accuracy": {
        "long_name": "accuracy",
        "units": "1",
        "description": "fraction of the split's examples classified correctly",
    },
    "distance": {
        "long_name": "relative distance",
        "description": "||theta_end - theta_start||_F / ||theta_start||_F over the "
        "group's parameters (paper, appendix E, eq. 4); buffers excluded",
    },
    "alpha": {
        "long_name": "interpolation coefficient",
        "description": "theta(alpha) = (1 - alpha) theta_start + alpha theta_end",
    },
    "pattern": {"description": "regex matched (re.match) against state-dict keys"},
    "n_tensors": {"description": "state-dict entries in the group"},
    "n_params": {"description": "scalar parameters in the group (tied tensors once)"},
    "n_examples": {"description": "examples in the split"},
}


@dataclass(frozen=True)
class RunInfo:
    """One checkpoint pair: a label and where the endpoints came from."""

    name: str
    start_path: str = ""
    end_path: str = ""
    start_sha256: str = ""
    end_sha256: str = ""


def build_result(
    *,
    loss: np.ndarray,
    accuracy: np.ndarray,
    distance: np.ndarray,
    alphas: Sequence[float],
    groups: Sequence[str],
    patterns: Sequence[str],
    n_tensors: Sequence[int],
    n_params: Sequence[int],
    splits: Sequence[str],
    n_examples: Sequence[int],
    runs: Sequence[RunInfo],
    attrs: Mapping[str, object],
    extra: Mapping[str, xr.Variable] | None = None,
) -> xr.Dataset:
    """Return a result dataset from plain arrays.

    Args:
        loss, accuracy: (run, group, split, alpha).
        distance: (run, group).
        attrs: provenance; values must be strings or numbers.
        extra: more variables over the result's dims (the shape verdicts of
            :func:`ckptscope.shape.shape_variables`): one dataset is built, not one per step.
    """
    for key, value in attrs.items():
        if not isinstance(value, (str, int, float, np.integer, np.floating)) or isinstance(
            value, bool
        ):
            raise TypeError(
                f"result attribute {key!r} is a {type(value).__name__}; NetCDF stores strings "
                f"and numbers only (encode it with json.dumps)."
            )
    dims = DIMS
    ds = xr.Dataset(
        data_vars={
            "loss": (dims, np.asarray(loss, dtype=np.float64), VAR_ATTRS["loss"]),
            "accuracy": (dims, np.asarray(accuracy, dtype=np.float64), VAR_ATTRS["accuracy"]),
            "distance": (
                ("run", "group"),
                np.asarray(distance, dtype=np.float64),
                VAR_ATTRS["distance"],
            ),
            **dict(extra or {}),
        },
        coords={
            "run": ("run", [str(r.name) for r in runs]),
            "group": ("group", list(groups)),
            "split": ("split", list(splits)),
            "alpha": ("alpha", np.asarray(alphas, dtype=np.float64), VAR_ATTRS["alpha"]),
            "pattern": ("group", list(patterns), VAR_ATTRS["pattern"]),
            "n_tensors": ("group", np.asarray(n_tensors, dtype=np.int32), VAR_ATTRS["n_tensors"]),
            # float64: NetCDF3 has no int64 and parameter counts can pass 2**31.
            "n_params": ("group", np.asarray(n_params, dtype=np.float64), VAR_ATTRS["n_params"]),
            "n_examples": (
                "split",
                np.asarray(n_examples, dtype=np.int32),
                VAR_ATTRS["n_examples"],
            ),
            "start_path": ("run", [r.start_path for r in runs]),
            "end_path": ("run", [r.end_path for r in runs]),
            "start_sha256": ("run", [r.start_sha256 for r in runs]),
            "end_sha256": ("run", [r.end_sha256 for r in runs]),
        },
        attrs={"ckptscope_schema": SCHEMA_VERSION, **dict(attrs)},
    )
    validate_result(ds)
    return ds


def validate_result(ds: xr.Dataset, *, source: str = "the result") -> xr.Dataset:
    """Raise unless ``ds`` follows the result contract; return it.

    Checks the variables and coordinates with their dims, that no dim is empty, what each holds
    (``KINDS``: loss, accuracy, distance and alpha are real floats, labels are strings; the
    shape verdicts, if present, are names from ``SHAPES`` and their metrics floats), a finite
    increasing alpha grid, accuracies in [0, 1], unique labels and the schema version.

    Raises:
        CkptscopeError: naming the first thing missing or malformed.
    """

    def fail(what: str):
        raise CkptscopeError(
            f"{source} is not a valid ckptscope result: {what}; write it again with "
            f"`ckptscope path` (or ckptscope.save_result)."
        )

    if "x" in ds.dims and "y" in ds.dims and "alpha" not in ds.dims:  # ckptscope.grids
        raise CkptscopeError(
            f"{source} is a {str(ds.attrs.get('grid_kind', 'plane or surface'))[:20]} grid "
            f"result, not a path result: draw it with `ckptscope plot` (Python: "
            f"ckptscope.open_grid)."
        )
    kind = str(ds.attrs.get("ckptscope_kind", ""))[:20]
    if kind in ("trajectory", "instability"):  # ckptscope.matrix_results
        raise CkptscopeError(
            f"{source} is {'a' if kind[0] == 't' else 'an'} {kind} result, not a path result: "
            f"it holds many paths over (start, end) or (spawn, pair); its figures come from "
            f"`ckptscope {kind} --plot` (Python: ckptscope.open_matrix)."
        )
    variables = ds.variables  # Variables, not DataArrays: no coordinate gathering per lookup
    for name in ("loss", "accuracy", "distance"):
        if name not in ds.data_vars:
            fail(f"variable {name!r} is missing")
    for name in CURVE_VARS:
        if tuple(variables[name].dims) != DIMS:
            fail(f"{name!r} has dims {tuple(variables[name].dims)}, expected {DIMS}")
    if tuple(variables["distance"].dims) != ("run", "group"):
        fail(f"'distance' has dims {tuple(variables['distance'].dims)}, expected ('run', 'group')")
    for name in ("run", "group", "split", "alpha", "pattern"):
        if name not in ds.coords:
            fail(f"coordinate {name!r} is missing")
    for name, dims in (("pattern", ("group",)), ("n_examples", ("split",))):
        if name in ds.coords and tuple(variables[name].dims) != dims:
            fail(f"{name!r} has dims {tuple(variables[name].dims)}, expected {dims}")
    for name in ("shape", *SHAPE_METRICS):
        if name in variables and tuple(variables[name].dims) != DIMS[:3]:
            fail(f"{name!r} has dims {tuple(variables[name].dims)}, expected {DIMS[:3]}")
    for dim in DIMS:
        if ds.sizes[dim] == 0:
            fail(f"it has no {dim}s (the {dim!r} dim is empty)")
    check_kinds(ds, KINDS, fail)
    alpha = variables["alpha"].values
    if not np.all(np.isfinite(alpha)) or np.any(np.diff(alpha) <= 0):
        fail("'alpha' is not a finite, strictly increasing grid")
    check_accuracy(ds, fail)
    check_unique(ds, ("run", "group", "split"), fail)
    if "shape" in variables:
        unknown = sorted(set(np.unique(variables["shape"].values).tolist()) - set(SHAPES))
        if unknown:
            fail(f"'shape' holds {unknown[0][:40]!r}, not one of {', '.join(SHAPES)}")
    check_schema(ds, fail, source=source)
    return ds


def save_result(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write a result as NetCDF atomically (temporary name in the same folder, then rename)."""
    validate_result(ds)
    return write_netcdf(ds, path)


def open_result(path: str | os.PathLike) -> xr.Dataset:
    """Read a result file into memory and validate it.

    Raises:
        CkptscopeError: the file is missing, not NetCDF, or not a ckptscope result.
    """
    return validate_result(read_netcdf(path, writer="`ckptscope path --out`"),
                           source=repr(str(path)))


def merge_results(datasets: Sequence[xr.Dataset], *, sources: Sequence[str] | None = None
                  ) -> xr.Dataset:
    """Join results along ``run``.

    The groups (and their patterns), splits and alpha grids must agree. Run labels that repeat
    across inputs are made unique by prefixing each with its input's position (``"1:0"``).
    Shape variables are dropped: classify the merged result again (``ckptscope.classify``).
    Attributes are the first input's, with ``merged_from`` listing the sources.

    Raises:
        CkptscopeError: fewer than one input, or inputs that disagree.
    """
    if not datasets:
        raise CkptscopeError("nothing to merge: give at least one result.")
    names = list(sources) if sources is not None else [f"#{i}" for i in range(len(datasets))]
    first = datasets[0]
    for name, ds in zip(names[1:], datasets[1:], strict=True):
        for coord in ("group", "split", "pattern"):
            if [str(v) for v in ds[coord].values] != [str(v) for v in first[coord].values]:
                raise CkptscopeError(
                    f"cannot merge {name}: its {coord}s {[str(v) for v in ds[coord].values]} "
                    f"differ from {names[0]}'s {[str(v) for v in first[coord].values]}; "
                    f"evaluate both with the same groups and splits."
                )
        if ds["n_examples"].values.tolist() != first["n_examples"].values.tolist() or ds.attrs.get(
            "data"
        ) != first.attrs.get("data"):
            raise CkptscopeError(
                f"cannot merge {name}: it was evaluated on other data ({ds.attrs.get('data')}, "
                f"{ds['n_examples'].values.tolist()} examples) than {names[0]} "
                f"({first.attrs.get('data')}, {first['n_examples'].values.tolist()}); evaluate "
                f"both on the same data."
            )
        settings = MERGE_SETTINGS + (
            ("batch_size",) if first.attrs.get("bn_policy") in BATCH_DEPENDENT else ())
        # The model's and loss's code (results of older versions do not record it).
        if "model_identity" in ds.attrs and "model_identity" in first.attrs:
            settings += ("model_identity",)
        for setting in settings:
            if ds.attrs.get(setting) != first.attrs.get(setting):
                raise CkptscopeError(
                    f"cannot merge {name}: it was evaluated with {setting}="
                    f"{ds.attrs.get(setting)!r}, {names[0]} with {first.attrs.get(setting)!r}; "
                    f"runs in one result must be measured the same way."
                )
        if ds.sizes["alpha"] != first.sizes["alpha"] or not np.allclose(
            ds["alpha"].values, first["alpha"].values, rtol=0, atol=1e-12
        ):
            raise CkptscopeError(
                f"cannot merge {name}: its alpha grid differs from {names[0]}'s; evaluate both "
                f"on the same grid (--alphas / --alpha-range)."
            )
    keep = [v for v in first.data_vars if v in ("loss", "accuracy", "distance")]
    parts = [ds[keep] for ds in datasets]
    labels = [[str(r) for r in ds["run"].values] for ds in datasets]
    flat = [label for group in labels for label in group]
    if len(set(flat)) != len(flat):
        parts = [
            part.assign_coords(run=[f"{i}:{label}" for label in group])
            for i, (part, group) in enumerate(zip(parts, labels, strict=True))
        ]
    merged = xr.concat(parts, dim="run", data_vars="all", coords="different", compat="equals",
                       combine_attrs="override")
    merged.attrs = {
        k: v for k, v in first.attrs.items() if not k.startswith("shape_")
    } | _differing_provenance(datasets) | {"merged_from": ", ".join(names)}
    return validate_result(merged, source="the merged result")


def _differing_provenance(datasets: Sequence[xr.Dataset]) -> dict[str, str]:
    """Provenance attributes whose values differ between inputs: each distinct value, in
    order, joined with ``", "`` (a merged result does not claim the first input's for all)."""
    out = {}
    for key in MERGE_PROVENANCE:
        values = [str(ds.attrs[key]) for ds in datasets if key in ds.attrs]
        distinct = list(dict.fromkeys(values))
        if len(distinct) > 1:
            out[key] = ", ".join(distinct)
    notes = list(dict.fromkeys(str(ds.attrs["notes"]) for ds in datasets
                               if ds.attrs.get("notes")))
    if len(notes) > 1:
        out["notes"] = "; ".join(notes)
    return out


def build_distances(*, groups: Sequence[str], patterns: Sequence[str], relative: Sequence[float],
                    l2: Sequence[float], cosine: Sequence[float], n_tensors: Sequence[int],
                    n_params: Sequence[int], attrs: Mapping[str, object]) -> xr.Dataset:
    """Return a distance dataset: ``relative``, ``l2``, ``cosine`` over ``group``."""
    return xr.Dataset(
        data_vars={
            "relative": ("group", np.asarray(relative, dtype=np.float64), VAR_ATTRS["distance"]),
            "l2": ("group", np.asarray(l2, dtype=np.float64),
                   {"description": "||theta_end - theta_start||_F over the group's parameters"}),
            "cosine": ("group", np.asarray(cosine, dtype=np.float64),
                       {"description": "<theta_start, theta_end> / (||theta_start|| "
                                       "||theta_end||) over the group's parameters"}),
        },
        coords={
            "group": ("group", list(groups)),
            "pattern": ("group", list(patterns), VAR_ATTRS["pattern"]),
            "n_tensors": ("group", np.asarray(n_tensors, dtype=np.int32), VAR_ATTRS["n_tensors"]),
            "n_params": ("group", np.asarray(n_params, dtype=np.float64), VAR_ATTRS["n_params"]),
        },
        attrs=dict(attrs),
    )
