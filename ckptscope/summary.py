"""Study-level summaries of results: verdict counts and metric statistics over runs.

:func:`summarize` answers the paper's Table 1 question for a result with many runs (seeds,
conditions): per group, split and condition, how many runs end in each verdict and the mean,
standard deviation and median of the metrics behind it. :func:`summary_frame` gives the same
as a ``pandas.DataFrame`` (pandas is a requirement of xarray, so it is always there) and
:func:`format_summary` as text, Markdown or CSV.

The verdicts and metrics are recomputed from each result's loss curves with its recorded
tolerances (:func:`ckptscope.check.verified`), never read as stored. numpy / xarray only.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr

from ckptscope import shape as shapes
from ckptscope.check import verified
from ckptscope.errors import CkptscopeError
from ckptscope.results import SHAPES

# The metrics summarised over runs, per (group, split): the verdict's own, where the peak sits,
# how far the weights moved, and where the path ends.
SUMMARIZED = ("barrier_height", "chord_barrier", "peak_alpha", "distance", "acc_end", "loss_end")
STATISTICS = ("mean", "std", "median")
ENDPOINTS = ("loss_start", "loss_end", "acc_start", "acc_end")
# The run label before its last ":" (fig1a's "i-f:0" -> "i-f", merge's "1:seed_0" -> "1").
RUN_PREFIX = "run_prefix"
FORMATS = ("text", "markdown", "csv")
_LABELS = {"barrier_height": "barrier height", "chord_barrier": "chord barrier",
           "peak_alpha": "peak alpha", "distance": "distance", "acc_end": "acc(1)",
           "loss_end": "L(1)"}


# --- trusted inputs --------------------------------------------------------------------------
def trusted(ds: xr.Dataset, *, rtol: float | None = None, atol: float | None = None,
            plateau_alpha: float | None = None, source: str | None = None) -> xr.Dataset:
    """Return a result classified from its loss curves: with the recorded tolerances
    (:func:`ckptscope.check.verified`, which refuses stored verdicts its curves do not bear
    out), or, when a tolerance is given, re-classified with it (the unset ones recorded).

    Raises:
        CkptscopeError: the result is malformed, disagrees with its curves, or a tolerance is
            out of range.
    """
    if rtol is None and atol is None and plateau_alpha is None:
        return verified(ds, source=source)
    options = shapes.shape_options(ds, rtol=rtol, atol=atol, plateau_alpha=plateau_alpha,
                                   source=source or "the result")
    return shapes.classify(ds, **options)


def curve_metric(ds: xr.Dataset, metric: str) -> np.ndarray:
    """Return a metric of a classified result as a float array ``(run, group, split)``.

    Args:
        ds: a classified result (:func:`trusted`).
        metric: one of ``shape.METRICS``, ``distance`` (the same for every split) or an endpoint
            value ``loss_start``, ``loss_end``, ``acc_start``, ``acc_end`` (the first and last
            grid points in [0, 1]).
    """
    if metric == "distance":
        dist = ds["distance"].transpose("run", "group").values.astype(np.float64)
        return np.repeat(dist[:, :, None], ds.sizes["split"], axis=2)
    if metric in ENDPOINTS:
        name, end = metric.split("_")
        first, last = shapes.endpoint_indices(ds["alpha"].values)
        curve = ds["loss" if name == "loss" else "accuracy"]
        values = curve.transpose(*shapes.CURVE_DIMS, "alpha").values.astype(np.float64)
        return values[..., first if end == "start" else last]
    if metric in shapes.METRICS:
        return ds[metric].transpose(*shapes.CURVE_DIMS).values.astype(np.float64)
    known = (*shapes.METRICS, "distance", *ENDPOINTS)
    raise CkptscopeError(f"unknown metric {metric!r}; known: {', '.join(known)}.")


def as_results(results) -> list[tuple[str, xr.Dataset]]:
    """``(label, dataset)`` pairs from one result, a sequence or a mapping label -> result.

    A result read from a file is labelled by its file name, else by its position (``#0``).
    """
    if isinstance(results, xr.Dataset):
        return [(_source_name(results, 0), results)]
    if isinstance(results, Mapping):
        items = [(str(k), v) for k, v in results.items()]
    else:
        items = [(_source_name(ds, i), ds) for i, ds in enumerate(results)]
    if not items:
        raise CkptscopeError("no results given; pass at least one result dataset.")
    for label, ds in items:
        if not isinstance(ds, xr.Dataset):
            raise CkptscopeError(f"result {label!r} is a {type(ds).__name__}, not an "
                                 f"xarray.Dataset; open it with ckptscope.open_result(path).")
    return items


def _source_name(ds: xr.Dataset, i: int) -> str:
    path = ds.encoding.get("source")
    return str(path) if path else f"#{i}"


# --- conditions ------------------------------------------------------------------------------
def conditions(results: Sequence[tuple[str, xr.Dataset]], by: str | None
               ) -> list[tuple[str, list[tuple[int, int]]]]:
    """Split the runs of several results into conditions.

    Returns:
        ``(condition label, [(result index, run index), ...])`` in order of first appearance
        (numeric run coordinates sorted by value). Without ``by`` each result is a condition.

    Args:
        by: a coordinate over ``run`` (its values), ``run_prefix`` (each run label up to its
            last ``:``), or an attribute of the results (each result's value labels all its
            runs).

    Raises:
        CkptscopeError: ``by`` names nothing the results have (the known names are listed), or
            a run label has no ``:`` for ``run_prefix``.
    """
    found: dict[str, list[tuple[int, int]]] = {}
    numeric: dict[str, float] = {}
    for i, (label, ds) in enumerate(results):
        runs = [str(r) for r in ds["run"].values]
        if by is None:
            keys = [label] * len(runs)
        elif by == RUN_PREFIX:
            bare = [r for r in runs if ":" not in r]
            if bare:
                raise CkptscopeError(
                    f"run {bare[0]!r} of {label} has no ':', so {RUN_PREFIX} cannot group it; "
                    f"{RUN_PREFIX} groups runs labelled PREFIX:REST (reproduce fig1a's "
                    f"'i-f:0', merge's '1:seed_0'). Use a run coordinate instead."
                )
            keys = [r.rpartition(":")[0] for r in runs]
        elif by in ds.coords and ds[by].dims == ("run",):
            values = ds[by].values
            keys = [_condition_label(v) for v in values]
            if values.dtype.kind in "iuf":
                numeric.update({k: float(v) for k, v in zip(keys, values, strict=True)})
        elif by in ds.attrs:
            if "merged_from" in ds.attrs and by != "merged_from":
                # A merge keeps its first input's attributes: they describe that input, not
                # every run, and grouping by them would silently pool the conditions.
                raise CkptscopeError(
                    f"{label} is a merge of {ds.attrs['merged_from']}, and its attribute "
                    f"{by!r} is the first input's, not each run's; summarize the inputs "
                    f"themselves (summarize A.nc B.nc --by {by}) or use --by {RUN_PREFIX}."
                )
            keys = [_condition_label(ds.attrs[by])] * len(runs)
        else:
            coords = sorted(str(c) for c in ds.coords if ds[c].dims == ("run",))
            attrs = sorted(ds.attrs)
            raise CkptscopeError(
                f"{label} has no run coordinate or attribute {by!r}; group runs by "
                f"{RUN_PREFIX}, a run coordinate ({', '.join(coords)}) or an attribute "
                f"({', '.join(attrs) or 'none'})."
            )
        for r, key in enumerate(keys):
            found.setdefault(key, []).append((i, r))
    order = list(found)
    if numeric and len(numeric) == len(found):
        order.sort(key=lambda k: numeric[k])
    return [(key, found[key]) for key in order]


def _condition_label(value) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):g}"
    return str(value.item() if hasattr(value, "item") else value)


def _check_layout(results: Sequence[tuple[str, xr.Dataset]]) -> tuple[list[str], list[str]]:
    """The groups and splits every result shares (the first's order)."""
    label0, first = results[0]
    groups = [str(g) for g in first["group"].values]
    splits = [str(s) for s in first["split"].values]
    for label, ds in results[1:]:
        for dim, want in (("group", groups), ("split", splits)):
            have = [str(v) for v in ds[dim].values]
            if set(have) != set(want):
                raise CkptscopeError(
                    f"cannot summarize {label} with {label0}: {dim}s {have} against {want}; "
                    f"select the shared ones with ds.sel({dim}=[...]) first."
                )
    return groups, splits


# --- summarize -------------------------------------------------------------------------------
def summarize(results, by: str | None = None, *, rtol: float | None = None,
              atol: float | None = None, plateau_alpha: float | None = None) -> xr.Dataset:
    """Count verdicts and summarise metrics over runs, per (condition, group, split).

    Args:
        results: a result, or several (a sequence, or a mapping label -> result): the results
            of several recipes, say. Each is classified afresh from its loss curves
            (:func:`trusted`).
        by: what makes a condition: a coordinate over ``run``, ``run_prefix`` (the run label
            up to its last ``:``) or a result attribute such as ``recipe``. Without it each
            result is one condition, and a single result has no ``condition`` dim.
        rtol, atol, plateau_alpha: re-classify with these shape tolerances (default: each
            result's recorded ones, which must then agree between results).

    Returns:
        A dataset over ``(condition,) group, split`` with

        - ``n_run(condition)``: runs in the condition;
        - ``n_valid(condition, group, split)``: runs whose curve is valid (finite in [0, 1]);
        - ``count(..., shape)`` and ``fraction(..., shape)``: runs with each verdict of
          ``SHAPES``, and that over ``n_run`` (the fractions of a cell sum to 1);
        - for each of ``SUMMARIZED``, ``METRIC(..., statistic)`` with ``statistic`` = ``mean``,
          ``std`` (sample, ddof = 1; NaN for one value) and ``median``, over the valid runs'
          finite values;

        and the tolerances in ``attrs`` (``shape_rtol``, ``shape_atol``,
        ``shape_plateau_alpha``), with ``by`` and the results summarised.

    Raises:
        CkptscopeError: a result is malformed or disagrees with its own curves, the results
            differ in groups or splits, or in recorded tolerances (give them explicitly), or
            ``by`` names nothing the results have.

    Example:
        >>> s = summarize(ckptscope.open_result("result.nc"))               # doctest: +SKIP
        >>> s["count"].sel(group="all", split="test", shape="barrier").item()  # doctest: +SKIP
    """
    items = as_results(results)
    given = {"rtol": rtol, "atol": atol, "plateau_alpha": plateau_alpha}
    items = [(label, trusted(ds, **given, source=repr(label))) for label, ds in items]
    tolerances = _shared_tolerances(items)
    groups, splits = _check_layout(items)
    picked = [ds.sel(group=groups, split=splits) for _, ds in items]
    verdicts = [ds["shape"].transpose(*shapes.CURVE_DIMS).values.astype(str) for ds in picked]
    metrics = {m: [curve_metric(ds, m) for ds in picked] for m in SUMMARIZED}
    found = conditions(items, by)

    n_cond, cells = len(found), (len(groups), len(splits))
    n_run = np.zeros(n_cond, dtype=np.int32)
    n_valid = np.zeros((n_cond, *cells), dtype=np.int32)
    count = np.zeros((n_cond, *cells, len(SHAPES)), dtype=np.int32)
    stats = {m: np.full((n_cond, *cells, len(STATISTICS)), np.nan) for m in SUMMARIZED}
    for c, (_, members) in enumerate(found):
        rows = np.stack([verdicts[i][r] for i, r in members])          # (runs, group, split)
        n_run[c] = len(members)
        valid = rows != "invalid"
        n_valid[c] = valid.sum(axis=0)
        for k, name in enumerate(SHAPES):
            count[c, ..., k] = (rows == name).sum(axis=0)
        for m in SUMMARIZED:
            values = np.stack([metrics[m][i][r] for i, r in members])
            stats[m][c] = _statistics(np.where(valid, values, np.nan))

    lead = ("condition",) if by is not None or len(items) > 1 else ()
    squeeze = (lambda a: a) if lead else (lambda a: a[0])
    fraction = count / np.maximum(n_run, 1)[:, None, None, None]
    data = {
        "n_run": (lead, squeeze(n_run), {"description": "runs in the condition"}),
        "n_valid": ((*lead, "group", "split"), squeeze(n_valid),
                    {"description": "runs whose curve is valid (finite in [0, 1])"}),
        "count": ((*lead, "group", "split", "shape"), squeeze(count),
                  {"description": "runs with each verdict (recomputed from the loss curves)"}),
        "fraction": ((*lead, "group", "split", "shape"), squeeze(fraction),
                     {"description": "count / n_run"}),
    }
    for m in SUMMARIZED:
        data[m] = ((*lead, "group", "split", "statistic"), squeeze(stats[m]),
                   {"description": f"{m} over the valid runs' finite values: mean, sample std "
                                   f"(ddof=1; NaN for one value), median"})
    coords = {"group": groups, "split": splits, "shape": list(SHAPES),
              "statistic": list(STATISTICS), "pattern": ("group", picked[0]["pattern"].values)}
    if lead:
        coords["condition"] = [key for key, _ in found]
    return xr.Dataset(data, coords=coords, attrs={
        **tolerances, "by": by or "", "results": ", ".join(label for label, _ in items),
        "shape_variable": "loss"})


def _statistics(values: np.ndarray) -> np.ndarray:
    """Mean, sample std and median over axis 0 of finite values: ``(runs, ...)`` ->
    ``(..., 3)``; NaN where none is finite (std: fewer than two)."""
    finite = np.isfinite(values)
    n = finite.sum(axis=0)
    zeroed = np.where(finite, values, 0.0)
    mean = np.where(n > 0, zeroed.sum(axis=0) / np.maximum(n, 1), np.nan)
    sq = np.where(finite, (values - mean) ** 2, 0.0).sum(axis=0)
    std = np.where(n > 1, np.sqrt(sq / np.maximum(n - 1, 1)), np.nan)
    with np.errstate(all="ignore"):
        median = np.full(values.shape[1:], np.nan)
        some = n > 0
        if some.any():
            median[some] = np.nanmedian(np.where(finite, values, np.nan)[:, some], axis=0)
    return np.stack([mean, std, median], axis=-1)


def _shared_tolerances(items: Sequence[tuple[str, xr.Dataset]]) -> dict[str, float]:
    """The tolerances the (classified) results were judged with, which must agree."""
    keys = ("shape_rtol", "shape_atol", "shape_plateau_alpha")
    label0, first = items[0]
    want = {k: float(first.attrs[k]) for k in keys}
    for label, ds in items[1:]:
        have = {k: float(ds.attrs[k]) for k in keys}
        if have != want:
            differ = next(k for k in keys if have[k] != want[k])
            raise CkptscopeError(
                f"{label} was classified with {differ}={have[differ]:g}, {label0} with "
                f"{want[differ]:g}: verdicts under different tolerances do not count together; "
                f"give the tolerances explicitly (--tolerance rtol=..., atol=..., "
                f"plateau_alpha=...)."
            )
    return want


# --- tables ----------------------------------------------------------------------------------
def summary_rows(summary: xr.Dataset) -> list[dict]:
    """One flat dict per (condition, group, split) of a :func:`summarize` dataset: ``n_run``,
    ``n_valid``, ``count_<shape>``, ``fraction_<shape>`` and ``<metric>_<statistic>``."""
    has_condition = "condition" in summary.dims
    conditions_ = [str(c) for c in summary["condition"].values] if has_condition else [None]
    rows = []
    for condition in conditions_:
        sub = summary.sel(condition=condition) if has_condition else summary
        for group in sub["group"].values:
            for split in sub["split"].values:
                cell = sub.sel(group=group, split=split)
                row = {"condition": condition} if has_condition else {}
                row.update(group=str(group), split=str(split), n_run=int(cell["n_run"]),
                           n_valid=int(cell["n_valid"]))
                row.update({f"count_{s}": int(cell["count"].sel(shape=s)) for s in SHAPES})
                row.update({f"fraction_{s}": float(cell["fraction"].sel(shape=s))
                            for s in SHAPES})
                for m in SUMMARIZED:
                    row.update({f"{m}_{st}": float(cell[m].sel(statistic=st))
                                for st in STATISTICS})
                rows.append(row)
    return rows


def summary_frame(summary: xr.Dataset):
    """Return a :func:`summarize` dataset as a ``pandas.DataFrame``, one row per (condition,
    group, split) (:func:`summary_rows`' columns). pandas is a requirement of xarray."""
    import pandas as pd

    return pd.DataFrame(summary_rows(summary))


def format_summary(summary: xr.Dataset, fmt: str = "text") -> str:
    """Render a :func:`summarize` dataset as a ``text`` table, a ``markdown`` table (for a
    paper or a pull request) or ``csv`` (every column of :func:`summary_rows`).

    Text and Markdown show per row the runs, each verdict as ``count (percent)`` (``invalid``
    only when some run has it), and each metric as ``mean ± std (median)``.
    """
    if fmt not in FORMATS:
        raise CkptscopeError(f"format {fmt!r} is not one of {', '.join(FORMATS)}.")
    rows = summary_rows(summary)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: _csv_value(v) for k, v in row.items()} for row in rows)
        return out.getvalue()
    verdicts = [s for s in SHAPES if s != "invalid" or any(r["count_invalid"] for r in rows)]
    lead = ["condition"] if "condition" in rows[0] else []
    headers = [*lead, "group", "split", "runs", *verdicts, *(_LABELS[m] for m in SUMMARIZED)]
    cells = [[*(str(r[k]) for k in lead), r["group"], r["split"], str(r["n_run"]),
              *(f"{r[f'count_{s}']} ({100 * r[f'fraction_{s}']:.0f}%)" for s in verdicts),
              *(_spread(r, m) for m in SUMMARIZED)] for r in rows]
    note = (f"Verdicts: runs (percent). Metrics: mean ± std (median) over the valid runs. "
            f"Tolerances: rtol {summary.attrs['shape_rtol']:g}, atol "
            f"{summary.attrs['shape_atol']:g}, plateau_alpha "
            f"{summary.attrs['shape_plateau_alpha']:g}.")
    if fmt == "markdown":
        esc = [[c.replace("|", "\\|") for c in row] for row in [headers, *cells]]
        lines = ["| " + " | ".join(row) + " |" for row in esc]
        lines.insert(1, "|" + "---|" * len(headers))
        return "\n".join(lines) + "\n\n" + note + "\n"
    return _table(headers, cells) + "\n" + note + "\n"


def _table(headers: list[str], cells: list[list[str]]) -> str:
    """Left-aligned columns under a header and a rule of dashes."""
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = [headers, ["-" * w for w in widths], *cells]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def _spread(row: dict, metric: str) -> str:
    mean, std, median = (row[f"{metric}_{s}"] for s in STATISTICS)
    if math.isnan(mean):
        return "-"
    spread = "" if math.isnan(std) else f" ± {std:.2g}"
    return f"{mean:.4g}{spread} ({median:.4g})"


def _csv_value(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return value
