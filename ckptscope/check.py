"""Expectations held against a result, and comparisons of two results.

``check`` holds expectations (``GROUP[@SPLIT]:METRIC OP VALUE``, inline or from a TOML file: see
``ckptscope.expectations`` and ``docs/metrics.md``) against a result and returns one row per
(expectation, run, group, split); ``to_junit`` renders rows for CI; ``compare`` holds a new
result against a baseline. Both trust only the curves: the verdicts and metrics are recomputed
from the loss (``verified``), and a result whose stored ones disagree is refused. Nothing here
prints or exits.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import xarray as xr

from ckptscope import shape as shapes
from ckptscope.errors import CkptscopeError
from ckptscope.expectations import (
    DERIVED,
    METRICS,
    OPS,
    Expectation,
    as_expectations,
    load_expectations,
    parse_expectation,
)
from ckptscope.results import DIMS, validate_result

# The expectation names stay importable from here, where they were first defined.
__all__ = ["COMPARED", "METRICS", "CheckRow", "CompareRow", "Expectation", "check", "compare",
           "load_expectations", "parse_expectation", "to_junit", "verified"]

# Metrics whose drift compare() reports, averaged over runs.
COMPARED = ("barrier_height", "chord_barrier", "midpoint_barrier", "loss_start", "loss_end",
            "acc_end")
DEFAULT_COMPARE_RTOL = 0.05
DEFAULT_COMPARE_ATOL = 1e-3
_INVALID = "curve is invalid (NaN/Inf)"
# A stored metric may differ from its recomputation by float round-off only: a relative 1e-9 of
# the curve's scale (loss units) or of 1 (alpha units, 0/1 flags). The same code on the same
# float64 curve gives the same bits; the slack only spares a platform's last-ulp differences.
_ROUND_OFF = 1e-9
_LOSS_UNITS = ("barrier_height", "chord_barrier", "midpoint_barrier", "tolerance")


@dataclass(frozen=True)
class CheckRow:
    """One expectation held against one curve."""

    expectation: Expectation
    run: str
    group: str
    split: str
    actual: float | str
    passed: bool
    message: str

    @property
    def name(self) -> str:
        return f"{self.expectation} [run={self.run} group={self.group} split={self.split}]"


@dataclass(frozen=True)
class CompareRow:
    """One metric of one (group, split), baseline against new (means over runs)."""

    group: str
    split: str
    metric: str
    baseline: float | str
    new: float | str
    passed: bool
    message: str

    @property
    def name(self) -> str:
        return f"{self.group}@{self.split}:{self.metric}"


# --- trusting a result ------------------------------------------------------------------------
def verified(ds: xr.Dataset, *, source: str | None = None) -> xr.Dataset:
    """Return a result classified afresh from its loss curves with its recorded tolerances.

    The verdicts and metrics a result stores are claims, and CI gates on them, so they are never
    used as they are: ``shape`` and the ``shape.METRICS`` are recomputed from ``loss`` and the
    alpha grid with the tolerances in ``ds.attrs`` (``shape.shape_options``; the defaults where
    none are recorded), and every stored one must agree: the same verdict, the same metric up to
    float round-off (a relative 1e-9 of the curve's scale), NaN where the recomputation has NaN.

    Args:
        ds: a result, classified or not (an unclassified one is simply classified).
        source: how errors name the result (default: its file, if it was read from one).

    Raises:
        CkptscopeError: the result is malformed, a recorded tolerance is out of range, or a
            stored variable disagrees (the first one is named: run, group, split, variable,
            stored and recomputed values, and how to re-classify).
    """
    source = source or _source(ds, "the result")
    validate_result(ds, source=source)
    options = shapes.shape_options(ds, source=source)
    fresh = shapes.classify(ds, **options)
    stored = [name for name in ("shape", *shapes.METRICS) if name in ds.data_vars]
    if not stored:
        return fresh
    first, last = shapes.endpoint_indices(ds["alpha"].values)
    loss = fresh["loss"].transpose(*DIMS).values[..., first:last + 1].astype(np.float64)
    # Round-off in a loss-unit metric scales with the loss, not with the metric: the chord
    # barrier of a straight curve is 0 give or take an ulp of L.
    scale = np.where(np.isfinite(loss), np.abs(loss), 0.0).max(axis=-1)
    for name in stored:
        was = ds[name].transpose(*shapes.CURVE_DIMS).values
        now = fresh[name].transpose(*shapes.CURVE_DIMS).values
        bad = _disagree(name, was, now, scale if name in _LOSS_UNITS else 1.0)
        if bad.any():
            r, g, s = np.argwhere(bad)[0]
            show = (lambda v: repr(str(v))) if name == "shape" else (lambda v: repr(float(v)))
            raise CkptscopeError(
                f"{source} stores {name} = {show(was[r, g, s])} for run "
                f"{str(ds['run'].values[r])!r}, group {str(ds['group'].values[g])!r}, split "
                f"{str(ds['split'].values[s])!r}, but its loss curve gives "
                f"{show(now[r, g, s])} (shape_rtol {options['rtol']:g}, shape_atol "
                f"{options['atol']:g}, shape_plateau_alpha {options['plateau_alpha']:g}); "
                f"re-classify it from its curves with `ckptscope merge RESULT -o NEW.nc`, or "
                f"give the tolerances explicitly (check --tolerance)."
            )
    return fresh


def _disagree(name: str, was: np.ndarray, now: np.ndarray, scale) -> np.ndarray:
    """Where a stored (run, group, split) variable differs from its recomputation."""
    if name == "shape":
        return was.astype(str) != now.astype(str)
    was, now = was.astype(np.float64), now.astype(np.float64)
    with np.errstate(invalid="ignore"):  # inf - inf
        slack = _ROUND_OFF * np.maximum(np.maximum(np.abs(was), np.abs(now)), scale)
        same = (was == now) | (np.isnan(was) & np.isnan(now)) | (np.abs(was - now) <= slack)
    return ~same


def _source(ds: xr.Dataset, default: str) -> str:
    """The file a result was read from (xarray records it), else ``default``."""
    path = ds.encoding.get("source")
    return repr(str(path)) if path else default


# --- checking --------------------------------------------------------------------------------
def check(ds: xr.Dataset, expectations: Iterable[Expectation | str] | Expectation | str, *,
          rtol: float | None = None, atol: float | None = None,
          plateau_alpha: float | None = None) -> list[CheckRow]:
    """Hold expectations against a result; return one row per (expectation, run, group, split).

    The verdicts and metrics are recomputed from the loss curves, never read from ``ds``: with
    the recorded tolerances (``verified``, which refuses a result whose stored verdicts
    disagree), or, when a tolerance is given, with it (unset ones recorded, else the defaults)
    and the stored verdicts are replaced. Every claim about an invalid curve (NaN/Inf in
    [0, 1]) fails with ``curve is invalid (NaN/Inf)`` except ``shape=invalid``: ``shape!=barrier``
    and ``loss_end<0.5`` too, though its end may be finite. On a valid curve a NaN metric fails
    and says why it is undefined. Numbers compare exactly, except that ``=`` and ``!=`` allow a
    relative 1e-9.

    Raises:
        CkptscopeError: the result is malformed or its stored verdicts disagree with its curves
            (``verified``), a tolerance is out of range, or an expectation names a group or split
            the result does not have (the known ones are listed).
    """
    exps = as_expectations(expectations)
    if rtol is None and atol is None and plateau_alpha is None:
        ds = verified(ds)
    else:  # re-classified explicitly: the stored verdicts are replaced, not compared
        options = shapes.shape_options(ds, rtol=rtol, atol=atol, plateau_alpha=plateau_alpha,
                                       source=_source(ds, "the result"))
        ds = shapes.classify(ds, **options)
    groups = [str(g) for g in ds["group"].values]
    splits = [str(s) for s in ds["split"].values]
    runs = [str(r) for r in ds["run"].values]
    verdicts = _metric_values(ds, "shape")
    rows = []
    for exp in exps:
        gi = _select(exp, "group", exp.group, groups, wildcard="*")
        si = _select(exp, "split", exp.split, splits, wildcard=None)
        values = _metric_values(ds, exp.metric)
        for r, run in enumerate(runs):
            for g in gi:
                for s in si:
                    actual = values[r, g, s]
                    passed, message = _hold(exp, actual, verdicts[r, g, s], ds, (r, g, s))
                    actual = str(actual) if exp.metric == "shape" else float(actual)
                    rows.append(CheckRow(exp, run, groups[g], splits[s], actual, passed, message))
    return rows


def _select(exp: Expectation, dim: str, label: str | None, known: list[str], *,
            wildcard: str | None) -> list[int]:
    if label is None or label == wildcard:
        return list(range(len(known)))
    if label not in known:
        hint = " or '*'" if wildcard else ", or leave it out for every split"
        raise CkptscopeError(f"expectation '{exp}' names {dim} {label!r}; the result has "
                             f"{dim}s {known}. Use one of them{hint}.")
    return [known.index(label)]


def _metric_values(ds: xr.Dataset, metric: str) -> np.ndarray:
    """Return (run, group, split) values of a metric."""
    if metric == "distance":
        dist = ds["distance"].transpose("run", "group").values.astype(np.float64)
        return np.broadcast_to(dist[:, :, None], (*dist.shape, ds.sizes["split"]))
    if metric in DERIVED:
        name, end = metric.split("_")
        var = {"loss": "loss", "acc": "accuracy"}[name]
        i0, i1 = shapes.endpoint_indices(ds["alpha"].values)
        curve = ds[var].transpose(*shapes.CURVE_DIMS, "alpha").values.astype(np.float64)
        return curve[..., i0 if end == "start" else i1]
    return ds[metric].transpose(*shapes.CURVE_DIMS).values


def _hold(exp: Expectation, actual, verdict: str, ds: xr.Dataset, index) -> tuple[bool, str]:
    want = f"{exp.op} {exp.value}" if isinstance(exp.value, str) else f"{exp.op} {exp.value:g}"
    if verdict == "invalid":
        # Nothing measured on a NaN/Inf curve is trustworthy, a finite endpoint included: the
        # one claim it bears out is that it is invalid (shape!=barrier too is a claim that the
        # curve has some other, valid, shape).
        if exp.metric == "shape" and exp.op == "=" and exp.value == "invalid":
            return True, "shape = invalid"
        return False, _INVALID
    if exp.metric == "shape":
        passed = OPS[exp.op](str(actual), exp.value)
        r, g, s = index
        height = float(ds["barrier_height"].values[r, g, s])
        tol = float(ds["tolerance"].values[r, g, s])
        head = f"shape = {actual} (barrier_height {height:.4g}, tolerance {tol:.4g})"
        return passed, head if passed else f"{head}, expected {want}"
    actual = float(actual)
    if math.isnan(actual):
        why = " (the loss does not drop from L_0 to L_1)" if exp.metric == "half_drop_alpha" else ""
        return False, f"{exp.metric} is undefined (NaN){why}"
    if exp.op in ("=", "!="):
        same = math.isclose(actual, exp.value, rel_tol=1e-9, abs_tol=0.0)
        passed = same if exp.op == "=" else not same
    else:
        passed = OPS[exp.op](actual, exp.value)
    head = f"{exp.metric} = {actual:.6g}"
    return passed, f"{head} {want}" if passed else f"{head}, expected {want}"


def to_junit(rows: Sequence[CheckRow | CompareRow], *, suite: str = "ckptscope") -> str:
    """Render rows as JUnit XML: one testcase per row, a ``failure`` for each failed one."""
    failures = sum(not r.passed for r in rows)
    counts = {"tests": str(len(rows)), "failures": str(failures), "errors": "0", "skipped": "0"}
    root = ET.Element("testsuites", name=suite, tests=counts["tests"], failures=counts["failures"])
    node = ET.SubElement(root, "testsuite", name=suite, **counts)
    for row in rows:
        case = ET.SubElement(node, "testcase", classname=f"{suite}.{type(row).__name__}",
                             name=row.name)
        if row.passed:
            ET.SubElement(case, "system-out").text = row.message
        else:
            failure = ET.SubElement(case, "failure", message=row.message, type="ExpectationFailed")
            failure.text = row.message
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


# --- comparing two results -------------------------------------------------------------------
def compare(baseline: xr.Dataset, new: xr.Dataset, *, rtol: float = DEFAULT_COMPARE_RTOL,
            atol: float = DEFAULT_COMPARE_ATOL, shape_rtol: float | None = None,
            shape_atol: float | None = None,
            plateau_alpha: float | None = None) -> list[CompareRow]:
    """Hold a new result against a baseline, per (group, split).

    Both are classified afresh from their loss curves with the same shape tolerances: those
    given, else the ones recorded in ``baseline.attrs``, else the defaults. Unless tolerances are
    given, each result must first pass ``verified`` against its own recorded tolerances (a stored
    verdict that its curves do not bear out is refused). Per (group, split) one ``shape`` row
    (the most common verdict over runs, ties going to ``barrier``, any invalid run making it
    ``invalid``) passes when the verdict is unchanged; one row per metric in ``COMPARED`` (means
    over runs) passes when ``|new - baseline| <= atol + rtol * |baseline|``. Every row of a
    (group, split) with an invalid curve on either side fails. Runs need not match: the two
    results may hold different seeds and numbers of runs.

    Raises:
        CkptscopeError: either result is malformed or disagrees with its own curves, or the
            results differ in groups, splits or alpha grid.
    """
    names = (_source(baseline, "the baseline"), _source(new, "the new result"))
    validate_result(baseline, source=names[0])
    validate_result(new, source=names[1])
    if shape_rtol is None and shape_atol is None and plateau_alpha is None:
        verified(baseline, source=names[0])
        verified(new, source=names[1])
    for dim in ("group", "split"):
        a = [str(v) for v in baseline[dim].values]
        b = [str(v) for v in new[dim].values]
        if set(a) != set(b):
            raise CkptscopeError(
                f"cannot compare results with different {dim}s: missing in new "
                f"{sorted(set(a) - set(b))}, unexpected in new {sorted(set(b) - set(a))}; "
                f"select the shared ones with ds.sel({dim}=[...]) first."
            )
    a_alpha, b_alpha = baseline["alpha"].values, new["alpha"].values
    if a_alpha.shape != b_alpha.shape or not np.allclose(a_alpha, b_alpha, rtol=0, atol=1e-9):
        raise CkptscopeError(
            f"cannot compare results on different alpha grids (baseline {a_alpha.size} points "
            f"from {a_alpha[0]:g} to {a_alpha[-1]:g}, new {b_alpha.size} from {b_alpha[0]:g} to "
            f"{b_alpha[-1]:g}); evaluate both with the same --alphas."
        )
    options = shapes.shape_options(baseline, rtol=shape_rtol, atol=shape_atol,
                                   plateau_alpha=plateau_alpha, source=names[0])
    base, cand = shapes.classify(baseline, **options), shapes.classify(new, **options)
    base_values = {m: _metric_values(base, m) for m in ("shape", *COMPARED)}
    cand_values = {m: _metric_values(cand, m) for m in ("shape", *COMPARED)}
    base_groups = [str(g) for g in base["group"].values]
    cand_groups = [str(g) for g in cand["group"].values]
    base_splits = [str(s) for s in base["split"].values]
    cand_splits = [str(s) for s in cand["split"].values]

    rows = []
    for group in base_groups:
        for split in base_splits:
            ia = (base_groups.index(group), base_splits.index(split))
            ib = (cand_groups.index(group), cand_splits.index(split))
            was = shapes.majority(base_values["shape"][:, ia[0], ia[1]])
            now = shapes.majority(cand_values["shape"][:, ib[0], ib[1]])
            rows.append(_shape_row(group, split, was, now))
            invalid = "baseline" if was[0] == "invalid" else "new" if now[0] == "invalid" else ""
            for metric in COMPARED:
                b = float(np.mean(base_values[metric][:, ia[0], ia[1]]))
                n = float(np.mean(cand_values[metric][:, ib[0], ib[1]]))
                rows.append(_drift_row(group, split, metric, b, n, rtol=rtol, atol=atol,
                                       invalid=invalid))
    return rows


def _shape_row(group: str, split: str, was, now) -> CompareRow:
    def show(v):
        name, k, n = v
        return name if n == 1 else f"{name} ({k}/{n} runs)"

    if "invalid" in (was[0], now[0]):
        side = "baseline" if was[0] == "invalid" else "new"
        return CompareRow(group, split, "shape", was[0], now[0], False, f"{side} {_INVALID}")
    passed = was[0] == now[0]
    verb = "unchanged" if passed else "changed"
    return CompareRow(group, split, "shape", was[0], now[0], passed,
                      f"shape {verb}: {show(was)} -> {show(now)}")


def _drift_row(group: str, split: str, metric: str, b: float, n: float, *, rtol: float,
               atol: float, invalid: str = "") -> CompareRow:
    """``invalid``: the side ("baseline" or "new") with an invalid curve here, if any; its mean
    may be finite (an endpoint of a curve with NaN inside) but is not a measurement."""
    if invalid or math.isnan(b) or math.isnan(n):
        side = invalid or ("baseline" if math.isnan(b) else "new")
        return CompareRow(group, split, metric, b, n, False, f"{side} {_INVALID}")
    delta = n - b
    passed = abs(delta) <= atol + rtol * abs(b)
    message = f"{metric} {b:.4g} -> {n:.4g} ({delta:+.3g}"
    if not passed and metric == "barrier_height":
        message += "; higher barrier, H-LB" if delta > 0 else "; lower barrier, L-LB"
    message += ")" if passed else f"; beyond atol {atol:g} + rtol {rtol:g} x |baseline|)"
    return CompareRow(group, split, metric, b, n, passed, message)
