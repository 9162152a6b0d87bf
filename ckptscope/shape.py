"""Shape verdicts for loss curves along a linear path: monotonic, barrier, plateau.

Every metric is a module-level function over curves ``loss: (..., k)`` on an alpha grid
``alpha: (k,)`` and returns one value per curve (a ``float`` for a single curve). Only the points
with alpha in [0, 1] count: a grid may extend beyond for extrapolation, and ``L_0`` / ``L_1`` are
the loss at the first and last grid point inside [0, 1] (alpha = 0 and 1 on the default grid).
A curve holding NaN or Inf in [0, 1] is invalid: every metric is NaN and its shape ``invalid``.

``classify`` applies them to a result dataset; ``aggregate`` summarises the verdicts over runs.
Formulas, the tolerance rule and the mapping to the paper's Table 1 are in ``docs/metrics.md``.

This module is numpy / xarray only: it never imports torch.
"""

from __future__ import annotations

import numbers
from collections import Counter

import numpy as np
import xarray as xr

from ckptscope import results
from ckptscope.errors import CkptscopeError
from ckptscope.results import CURVE_VARS, DIMS, validate_result

# The verdicts and their metrics are part of the result contract, which names them.
SHAPES = results.SHAPES
DEFAULT_RTOL = 0.02
DEFAULT_ATOL = 1e-2
DEFAULT_PLATEAU_ALPHA = 0.75

CURVE_DIMS = ("run", "group", "split")
# Grid points within this of 0 or 1 count as inside [0, 1] (np.arange and friends land at
# 1.0000000000000002).
_ALPHA_SLACK = 1e-9

DESCRIPTIONS = {
    "shape": "monotonic | barrier | plateau | invalid: invalid if NaN/Inf in [0, 1]; barrier if "
             "barrier_height > tolerance; plateau if L_0 - L_1 > tolerance and "
             "half_drop_alpha >= shape_plateau_alpha; else monotonic (a flat curve included)",
    "barrier_height": "max_i (L_i - min_{j<=i} L_j): largest rise above the running minimum",
    "chord_barrier": "max_i (L_i - ((1 - t_i) L_0 + t_i L_1)), t = alpha rescaled so the first "
                     "and last alpha in [0, 1] map to 0 and 1",
    "midpoint_barrier": "max_i L_i - (L_0 + L_1) / 2",
    "peak_alpha": "alpha of the largest loss in [0, 1] (the first, if tied)",
    "above_start": "1 if max_i L_i - L_0 > tolerance (rises above the loss at the start), else 0",
    "half_drop_alpha": "first alpha where the loss reaches (L_0 + L_1) / 2, linear between grid "
                       "points; NaN if L_1 >= L_0",
    "tolerance": "max(shape_rtol * (max_i L_i - min_i L_i), shape_atol), in loss units",
}
METRICS = results.SHAPE_METRICS


# --- the grid --------------------------------------------------------------------------------
def unit_interval(alpha: np.ndarray) -> np.ndarray:
    """Return a boolean mask ``(k,)`` of the grid points with alpha in [0, 1]."""
    alpha = np.asarray(alpha, dtype=np.float64)
    return (alpha >= -_ALPHA_SLACK) & (alpha <= 1 + _ALPHA_SLACK)


def endpoint_indices(alpha: np.ndarray) -> tuple[int, int]:
    """Return the grid indices of ``L_0`` and ``L_1``: the first and last alpha in [0, 1].

    Raises:
        CkptscopeError: fewer than two grid points lie in [0, 1].
    """
    inside = np.flatnonzero(unit_interval(alpha))
    if inside.size < 2:
        raise CkptscopeError(
            f"the alpha grid has {inside.size} point(s) in [0, 1] ({_preview(alpha)}); shape "
            f"metrics need at least two: evaluate with alphas that include 0 and 1."
        )
    return int(inside[0]), int(inside[-1])


def _preview(alpha) -> str:
    alpha = np.asarray(alpha, dtype=np.float64).ravel()
    text = ", ".join(f"{a:g}" for a in alpha[:6])
    return f"alpha = [{text}{', ...' if alpha.size > 6 else ''}]"


def _curves(loss, alpha) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Restrict curves to [0, 1]; return (loss (..., m) with invalid rows zeroed, alpha (m,),
    valid (...))."""
    loss = np.asarray(loss, dtype=np.float64)
    if loss.ndim == 0 or loss.shape[-1] == 0:
        raise CkptscopeError(f"a loss curve needs an alpha axis, got an array of shape "
                             f"{loss.shape}; pass loss values as (..., alpha).")
    if alpha is None:
        alpha = np.linspace(0.0, 1.0, loss.shape[-1])
    alpha = np.asarray(alpha, dtype=np.float64)
    if alpha.ndim != 1 or alpha.shape[0] != loss.shape[-1]:
        raise CkptscopeError(f"alpha has shape {alpha.shape} but the loss has {loss.shape[-1]} "
                             f"points on its last axis; pass one alpha per loss value.")
    if not np.all(np.isfinite(alpha)) or np.any(np.diff(alpha) <= 0):
        raise CkptscopeError(f"alpha is not a finite, strictly increasing grid ({_preview(alpha)})"
                             f"; sort it and drop repeats.")
    first, last = endpoint_indices(alpha)
    loss, alpha = loss[..., first:last + 1], alpha[first:last + 1]
    valid = np.all(np.isfinite(loss), axis=-1)
    # Zero the invalid rows so the arithmetic below raises no warnings; _finish NaNs them.
    return np.where(valid[..., None], loss, 0.0), alpha, valid


def _finish(value: np.ndarray, valid: np.ndarray) -> float | np.ndarray:
    value = np.where(valid, value, np.nan)
    return float(value) if value.ndim == 0 else value


# --- metrics ---------------------------------------------------------------------------------
def tolerance(loss: np.ndarray, alpha: np.ndarray | None = None, *, rtol: float = DEFAULT_RTOL,
              atol: float = DEFAULT_ATOL) -> float | np.ndarray:
    """Return the height a rise must exceed to count: ``max(rtol * range, atol)``.

    Args:
        loss: (..., k) curves.
        alpha: (k,) grid; default evenly spaced on [0, 1].
        rtol: fraction of the curve's range (max - min over [0, 1]).
        atol: floor in loss units, so float noise on a flat curve never counts.
    """
    curve, a, valid = _curves(loss, alpha)
    return _finish(_tolerance(curve, a, rtol=rtol, atol=atol), valid)


def barrier_height(loss: np.ndarray, alpha: np.ndarray | None = None) -> float | np.ndarray:
    """Return the largest rise above the running minimum: ``max_i (L_i - min_{j<=i} L_j)``.

    Zero for a non-increasing curve. This is the bump of Lucas et al. (2021): any increase on the
    way from start to end, whether or not it climbs above ``L_0``.

    Args:
        loss: (..., k) curves.
        alpha: (k,) grid; default evenly spaced on [0, 1].

    Example:
        >>> barrier_height([1.0, 0.5, 0.8, 0.2])
        0.30000000000000004
    """
    curve, a, valid = _curves(loss, alpha)
    return _finish(_barrier_height(curve, a), valid)


def chord_barrier(loss: np.ndarray, alpha: np.ndarray | None = None) -> float | np.ndarray:
    """Return the largest height above the straight chord from ``L_0`` to ``L_1``.

    ``max_i (L_i - ((1 - t_i) L_0 + t_i L_1))`` with ``t_i = alpha_i`` on a grid holding 0 and 1
    (in general alpha rescaled so the first and last points in [0, 1] map to 0 and 1). Never
    negative: the chord meets the curve at both ends.
    """
    curve, a, valid = _curves(loss, alpha)
    return _finish(_chord_barrier(curve, a), valid)


def midpoint_barrier(loss: np.ndarray, alpha: np.ndarray | None = None) -> float | np.ndarray:
    """Return ``max_i L_i - (L_0 + L_1) / 2``: the peak over the mean of the endpoints."""
    curve, a, valid = _curves(loss, alpha)
    return _finish(_midpoint_barrier(curve, a), valid)


def peak_alpha(loss: np.ndarray, alpha: np.ndarray | None = None) -> float | np.ndarray:
    """Return the alpha of the largest loss in [0, 1] (the first one, if tied)."""
    curve, a, valid = _curves(loss, alpha)
    return _finish(_peak_alpha(curve, a), valid)


def above_start(loss: np.ndarray, alpha: np.ndarray | None = None, *,
                tol: float | np.ndarray = 0.0) -> float | np.ndarray:
    """Return 1.0 where the curve rises above ``L_0`` by more than ``tol``, else 0.0.

    The paper's "rising above the level of loss at initialization" (section 3.2).

    Args:
        tol: one height, or one per curve (shape ``loss.shape[:-1]``).
    """
    curve, a, valid = _curves(loss, alpha)
    return _finish(_above_start(curve, a, tol=tol), valid)


def half_drop_alpha(loss: np.ndarray, alpha: np.ndarray | None = None) -> float | np.ndarray:
    """Return the first alpha at which the loss has covered half of ``L_0 - L_1``.

    The crossing of ``(L_0 + L_1) / 2`` is interpolated linearly between the grid points around
    it. NaN where ``L_1 >= L_0`` (nothing to cover). A plateau keeps this late (near 1); a
    convex decay makes it early.
    """
    curve, a, valid = _curves(loss, alpha)
    return _finish(_half_drop_alpha(curve, a), valid)


# The metrics on curves that _curves has checked and restricted to [0, 1] (invalid rows
# zeroed): shape_variables checks once and computes each metric once.
def _tolerance(curve, a, *, rtol, atol):
    return np.maximum(rtol * (curve.max(axis=-1) - curve.min(axis=-1)), atol)


def _barrier_height(curve, a):
    return (curve - np.minimum.accumulate(curve, axis=-1)).max(axis=-1)


def _chord_barrier(curve, a):
    t = (a - a[0]) / (a[-1] - a[0])
    start, end = curve[..., :1], curve[..., -1:]
    # Lerp from the nearer end: exact at both ends and on a flat curve, so a flat or straight
    # curve scores 0 rather than a rounding error.
    chord = np.where(t < 0.5, start + t * (end - start), end - (1 - t) * (end - start))
    return (curve - chord).max(axis=-1)


def _midpoint_barrier(curve, a):
    return curve.max(axis=-1) - (curve[..., 0] + curve[..., -1]) / 2


def _peak_alpha(curve, a):
    return a[np.argmax(curve, axis=-1)]


def _above_start(curve, a, *, tol):
    above = (curve.max(axis=-1) - curve[..., 0]) > np.asarray(tol, dtype=np.float64)
    return above.astype(np.float64)


def _half_drop_alpha(curve, a):
    target = (curve[..., 0] + curve[..., -1]) / 2
    drops = curve[..., -1] < curve[..., 0]
    # First index after the start at or below the target (L_1 is, wherever L_1 < L_0; the
    # start itself can be, when the halved sum rounds onto L_0 for subnormal losses).
    i = (np.argmax(curve[..., 1:] <= target[..., None], axis=-1) + 1)[..., None]
    before = np.take_along_axis(curve, i - 1, axis=-1)[..., 0]
    after = np.take_along_axis(curve, i, axis=-1)[..., 0]
    gap = np.where(drops, before - after, 1.0)
    frac = np.clip((before - target) / np.where(gap > 0, gap, 1.0), 0.0, 1.0)
    crossing = a[i[..., 0] - 1] + frac * (a[i[..., 0]] - a[i[..., 0] - 1])
    return np.where(drops, crossing, np.nan)


def verdict(loss: np.ndarray, alpha: np.ndarray | None = None, *, rtol: float = DEFAULT_RTOL,
            atol: float = DEFAULT_ATOL,
            plateau_alpha: float = DEFAULT_PLATEAU_ALPHA) -> str | np.ndarray:
    """Return the shape of each curve: ``monotonic``, ``barrier``, ``plateau`` or ``invalid``.

    - ``invalid``: NaN or Inf in [0, 1];
    - ``barrier``: ``barrier_height > tolerance(rtol, atol)``;
    - ``plateau``: not a barrier, the loss drops by more than the tolerance
      (``L_0 - L_1 > tolerance``), and it stays near ``L_0`` until late:
      ``half_drop_alpha >= plateau_alpha``;
    - ``monotonic``: the rest (no barrier: an early enough drop, or a flat curve).

    Returns:
        a ``str`` for one curve, else a string array of shape ``loss.shape[:-1]``.
    """
    _check_options(rtol=rtol, atol=atol, plateau_alpha=plateau_alpha)
    curve, a, valid = _curves(loss, alpha)
    tol = _tolerance(curve, a, rtol=rtol, atol=atol)
    names = _verdicts(curve, valid, tol=tol, height=_barrier_height(curve, a),
                      half_drop=_half_drop_alpha(curve, a), plateau_alpha=plateau_alpha)
    return str(names) if names.ndim == 0 else names


def _verdicts(curve, valid, *, tol, height, half_drop, plateau_alpha) -> np.ndarray:
    """The verdicts from the metrics they rest on (of checked curves)."""
    barrier = height > tol
    # A flat curve has no barrier: it is "monotonic", the paper's NB, not a plateau, which is
    # a loss that stays high and then falls late. "Falls" means by more than the tolerance: a
    # flat curve whose end jitters 1e-7 below its start is as flat as one that jitters above.
    drops = curve[..., 0] - curve[..., -1] > tol
    late = np.nan_to_num(half_drop, nan=-1.0) >= plateau_alpha
    plateau = ~barrier & drops & late
    names = np.where(barrier, "barrier", np.where(plateau, "plateau", "monotonic"))
    return np.where(valid, names, "invalid")


def majority(verdicts) -> tuple[str, int, int]:
    """Return (verdict, runs with it, runs) over runs' verdicts.

    Any invalid run makes the verdict ``invalid``; a tie goes to ``barrier``, then ``plateau``,
    so a split vote never hides a barrier.
    """
    counts = Counter(str(v) for v in np.asarray(verdicts).ravel())
    total = sum(counts.values())
    if counts["invalid"]:
        return "invalid", counts["invalid"], total
    order = ("barrier", "plateau", "monotonic")
    best = max(order, key=lambda s: (counts[s], -order.index(s)))
    return best, counts[best], total


def check_tolerances(*, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL,
                     plateau_alpha: float = DEFAULT_PLATEAU_ALPHA) -> None:
    """Raise a one-line error unless the shape tolerances are in range."""
    _check_options(rtol=rtol, atol=atol, plateau_alpha=plateau_alpha)


def shape_options(ds: xr.Dataset, *, rtol: float | None = None, atol: float | None = None,
                  plateau_alpha: float | None = None,
                  source: str = "the result") -> dict[str, float]:
    """Return the ``classify`` tolerances for a result: those given, else the ones recorded in
    ``ds.attrs`` (``shape_rtol``, ``shape_atol``, ``shape_plateau_alpha``), else the defaults.

    Args:
        source: how errors name the result.

    Raises:
        CkptscopeError: a given or recorded tolerance is not a finite number in range; a
            recorded one is named as the result's.
    """
    given = {"rtol": rtol, "atol": atol, "plateau_alpha": plateau_alpha}
    defaults = {"rtol": DEFAULT_RTOL, "atol": DEFAULT_ATOL, "plateau_alpha": DEFAULT_PLATEAU_ALPHA}
    options = {}
    for key, value in given.items():
        if value is None:
            value = ds.attrs.get(f"shape_{key}", defaults[key])
            try:
                _check_options(**{**defaults, key: value})
            except CkptscopeError:
                want = "a number in (0, 1]" if key == "plateau_alpha" else "a finite number >= 0"
                raise CkptscopeError(
                    f"{source} records shape_{key}={str(value)[:40]!r}, not {want}; give the "
                    f"tolerance explicitly (check --tolerance {key}=VALUE) or write the result "
                    f"again with `ckptscope path`."
                ) from None
        options[key] = value
    _check_options(**options)
    return {key: float(value) for key, value in options.items()}


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_options(*, rtol: float, atol: float, plateau_alpha: float) -> None:
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not (_is_number(value) and np.isfinite(value) and value >= 0):
            raise CkptscopeError(f"shape {name} must be a finite number >= 0, got {value!r}; "
                                 f"the defaults are rtol={DEFAULT_RTOL}, atol={DEFAULT_ATOL}.")
    if not (_is_number(plateau_alpha) and 0 < plateau_alpha <= 1):
        raise CkptscopeError(f"plateau_alpha must be in (0, 1], got {plateau_alpha!r}; the default "
                             f"is {DEFAULT_PLATEAU_ALPHA}.")


# --- datasets --------------------------------------------------------------------------------
def classify(ds: xr.Dataset, *, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL,
             plateau_alpha: float = DEFAULT_PLATEAU_ALPHA, variable: str = "loss") -> xr.Dataset:
    """Return a copy of a result with a shape verdict and its metrics for every curve.

    Adds ``shape(run, group, split)`` (strings) and the float variables in ``METRICS``, each with
    its formula in ``attrs["description"]``, and records ``shape_rtol``, ``shape_atol``,
    ``shape_plateau_alpha`` and ``shape_variable`` in ``ds.attrs``. Variables from an earlier
    classification are replaced. The curve is read as lower-is-better (a loss).

    Args:
        ds: a result dataset (``ckptscope.results``).
        rtol, atol: the tolerance ``max(rtol * range, atol)`` a rise must exceed.
        plateau_alpha: a curve that has covered less than half its drop before this alpha is a
            plateau.
        variable: the curve variable to classify.

    Raises:
        CkptscopeError: ``ds`` is not a result, ``variable`` is not one of its curves, the
            options are out of range, or fewer than two alphas lie in [0, 1].

    Example:
        >>> ds = classify(result)                                           # doctest: +SKIP
        >>> ds["shape"].sel(group="all", split="test").values               # doctest: +SKIP
    """
    validate_result(ds)
    curves = [name for name, v in ds.data_vars.items() if set(v.dims) == set(DIMS)]
    if variable not in curves:
        raise CkptscopeError(f"cannot classify {variable!r}: the result's curves are "
                             f"{sorted(curves) or list(CURVE_VARS)}; pass one of them.")
    # One assign, not one __setitem__ per variable: each of those is a full xarray merge.
    out = ds.assign(shape_variables(ds[variable].transpose(*DIMS).values, ds["alpha"].values,
                                    rtol=rtol, atol=atol, plateau_alpha=plateau_alpha))
    out.attrs = {**ds.attrs, **shape_attrs(rtol=rtol, atol=atol, plateau_alpha=plateau_alpha,
                                           variable=variable)}
    return out


def shape_variables(curves: np.ndarray, alpha: np.ndarray, *, rtol: float = DEFAULT_RTOL,
                    atol: float = DEFAULT_ATOL,
                    plateau_alpha: float = DEFAULT_PLATEAU_ALPHA) -> dict[str, xr.Variable]:
    """The verdict ``shape`` and the ``METRICS`` of (run, group, split, alpha) loss curves, as
    variables over (run, group, split) ready for a result dataset (what :func:`classify` adds;
    :func:`ckptscope.linear_path` builds its result with them in one step)."""
    _check_options(rtol=rtol, atol=atol, plateau_alpha=plateau_alpha)
    curve, a, valid = _curves(curves, alpha)  # checked once, each metric computed once
    tol = _tolerance(curve, a, rtol=rtol, atol=atol)
    height, half_drop = _barrier_height(curve, a), _half_drop_alpha(curve, a)
    values = {
        "shape": _verdicts(curve, valid, tol=tol, height=height, half_drop=half_drop,
                           plateau_alpha=plateau_alpha),
        "barrier_height": height,
        "chord_barrier": _chord_barrier(curve, a),
        "midpoint_barrier": _midpoint_barrier(curve, a),
        "peak_alpha": _peak_alpha(curve, a),
        "above_start": _above_start(curve, a, tol=tol),
        "half_drop_alpha": half_drop,
        "tolerance": tol,
    }
    return {
        name: xr.Variable(CURVE_DIMS,
                          np.where(valid, value, "invalid" if name == "shape" else np.nan),
                          {"description": DESCRIPTIONS[name]})
        for name, value in values.items()
    }


def shape_attrs(*, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL,
                plateau_alpha: float = DEFAULT_PLATEAU_ALPHA,
                variable: str = "loss") -> dict[str, object]:
    """The result attributes that record how the verdicts were made."""
    return {"shape_rtol": float(rtol), "shape_atol": float(atol),
            "shape_plateau_alpha": float(plateau_alpha), "shape_variable": variable}


def aggregate(ds: xr.Dataset, **options) -> xr.Dataset:
    """Summarise a result over its runs, per (group, split).

    Returns a dataset with ``barrier_fraction(group, split)`` (the fraction of runs with a valid
    curve whose shape is ``barrier``; NaN if none is valid), ``n_valid(group, split)``,
    ``loss_mean(group, split, alpha)`` and ``loss_std(group, split, alpha)`` (sample standard
    deviation over runs, ddof=1; NaN for a single run).

    Args:
        ds: a result, classified or not; an unclassified one is classified with ``options``.
        options: ``classify`` keywords, used only when ``ds`` has no ``shape`` yet.
    """
    if "shape" not in ds.data_vars:
        ds = classify(ds, **options)
    shapes = ds["shape"].transpose(*CURVE_DIMS).values
    n_valid = (shapes != "invalid").sum(axis=0)
    n_barrier = (shapes == "barrier").sum(axis=0)
    fraction = np.where(n_valid > 0, n_barrier / np.maximum(n_valid, 1), np.nan)

    loss = ds["loss"].transpose(*DIMS).values
    n_run = loss.shape[0]
    std = loss.std(axis=0, ddof=1) if n_run > 1 else np.full(loss.shape[1:], np.nan)
    return xr.Dataset(
        data_vars={
            "barrier_fraction": (("group", "split"), fraction,
                                 {"description": "runs with shape == barrier / runs with a "
                                                 "valid curve"}),
            "n_valid": (("group", "split"), n_valid.astype(np.int32),
                        {"description": "runs whose curve is valid (finite in [0, 1])"}),
            "loss_mean": (("group", "split", "alpha"), loss.mean(axis=0),
                          {"description": "mean loss over runs"}),
            "loss_std": (("group", "split", "alpha"), std,
                         {"description": "sample standard deviation of the loss over runs "
                                         "(ddof=1); NaN for one run"}),
        },
        coords={name: coord for name, coord in ds.coords.items()
                if set(coord.dims) <= {"group", "split", "alpha"}},
        attrs={"n_run": int(n_run),
               **{k: v for k, v in ds.attrs.items() if k.startswith("shape_")}},
    )


def summary(ds: xr.Dataset, **options) -> list[dict]:
    """Return one row per (run, group, split) for tables: the loss at alpha 0, its maximum on
    [0, 1] and where, the loss at alpha 1, the accuracy at both ends, the distance, the shape
    and the barrier height.

    "alpha 0" and "alpha 1" are the first and last grid points in [0, 1] (see
    :func:`endpoint_indices`). An unclassified result is classified with ``options``.
    """
    if "shape" not in ds.data_vars:
        ds = classify(ds, **options)
    first, last = endpoint_indices(ds["alpha"].values)
    inside = ds.isel(alpha=slice(first, last + 1))
    alpha = inside["alpha"].values
    rows = []
    for run in ds["run"].values:
        for group in ds["group"].values:
            for split in ds["split"].values:
                at = {"run": run, "group": group, "split": split}
                loss = inside["loss"].sel(at).values
                acc = inside["accuracy"].sel(at).values
                finite = np.isfinite(loss)
                peak = int(np.argmax(np.where(finite, loss, -np.inf))) if finite.any() else 0
                rows.append({
                    "run": str(run), "group": str(group), "split": str(split),
                    "loss_start": float(loss[0]), "loss_end": float(loss[-1]),
                    "loss_max": float(loss[peak]) if finite.any() else float("nan"),
                    "alpha_max": float(alpha[peak]),
                    "acc_start": float(acc[0]), "acc_end": float(acc[-1]),
                    "distance": float(ds["distance"].sel(run=run, group=group)),
                    "shape": str(ds["shape"].sel(at).values),
                    "barrier_height": float(ds["barrier_height"].sel(at).values),
                })
    return rows
