"""Expectations held against a classified result, and comparisons of two results.

An expectation is ``GROUP[@SPLIT]:METRIC OP VALUE``, e.g. ``all:shape=plateau`` or
``layer3@test:barrier_height<=0.5``; ``*`` as GROUP means every group, and no ``@SPLIT`` means
every split. They come inline or from a TOML file (``docs/metrics.md`` has the schema). ``check``
returns one row per (expectation, run, group, split); ``to_junit`` renders rows for CI;
``compare`` holds a new result against a baseline. Nothing here prints or exits.
"""

from __future__ import annotations

import math
import operator
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from ckptscope import shape as shapes
from ckptscope.errors import CkptscopeError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport is a dependency there
    import tomli as tomllib

OPS = {"=": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
       ">": operator.gt, ">=": operator.ge}
DERIVED = ("loss_start", "loss_end", "acc_start", "acc_end", "distance")
METRICS = ("shape", *shapes.METRICS, *DERIVED)
TABLE_KEYS = ("group", "split", "metric", "op", "value")
# Metrics whose drift compare() reports, averaged over runs.
COMPARED = ("barrier_height", "chord_barrier", "midpoint_barrier", "loss_start", "loss_end",
            "acc_end")
DEFAULT_COMPARE_RTOL = 0.05
DEFAULT_COMPARE_ATOL = 1e-3

_INLINE = re.compile(
    r"^(?P<target>.+):\s*(?P<metric>[A-Za-z_]\w*)\s*(?P<op><=|>=|!=|==|=|<|>)\s*"
    r"(?P<value>[^:<>=!\s]+)\s*$"
)
_EXAMPLE = "e.g. 'all:shape=plateau' or 'layer3@test:barrier_height<=0.5'"
_INVALID = "curve is invalid (NaN/Inf)"


@dataclass(frozen=True)
class Expectation:
    """One claim about a metric: ``GROUP[@SPLIT]:METRIC OP VALUE``.

    Attributes:
        group: a group label, or ``*`` for every group.
        metric: one of ``METRICS``.
        op: one of ``=``, ``!=``, ``<``, ``<=``, ``>``, ``>=`` (``==`` is read as ``=``).
        value: a shape name for ``shape``, else a number (``true``/``false`` read as 1/0).
        split: a split label, or ``None`` for every split.
    """

    group: str
    metric: str
    op: str
    value: float | str
    split: str | None = None

    def __post_init__(self):
        if not isinstance(self.group, str) or not self.group.strip():
            raise CkptscopeError(f"expectation group must be a non-empty string (or '*'), got "
                                 f"{self.group!r}; {_EXAMPLE}.")
        if self.split is not None and (not isinstance(self.split, str) or not self.split.strip()):
            raise CkptscopeError(f"expectation split must be a non-empty string, got "
                                 f"{self.split!r}; leave it out to check every split.")
        if self.metric not in METRICS:
            raise CkptscopeError(f"unknown metric {self.metric!r}; known metrics: "
                                 f"{', '.join(METRICS)}.")
        op = "=" if self.op == "==" else self.op
        if op not in OPS:
            raise CkptscopeError(f"unknown comparison {self.op!r} in {self.metric} expectation; "
                                 f"use one of {' '.join(OPS)}.")
        object.__setattr__(self, "op", op)
        if self.metric == "shape":
            if self.value not in shapes.SHAPES:
                raise CkptscopeError(f"shape value {self.value!r} is not a shape; use one of "
                                     f"{', '.join(shapes.SHAPES)}.")
            if op not in ("=", "!="):
                raise CkptscopeError(f"shape compares with = or !=, not {op!r}; e.g. "
                                     f"'all:shape!=barrier'.")
            return
        object.__setattr__(self, "value", _number(self.value, self.metric))

    def __str__(self) -> str:
        target = self.group if self.split is None else f"{self.group}@{self.split}"
        value = self.value if isinstance(self.value, str) else format(self.value, ".15g")
        return f"{target}:{self.metric}{self.op}{value}"


def _number(value, metric: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return float(value.strip().lower() == "true")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CkptscopeError(f"{metric} takes a number, got {value!r}; e.g. "
                             f"'layer3:{metric}<=0.5'.") from None
    if math.isnan(number):
        raise CkptscopeError(f"{metric} cannot be compared with NaN; give a number.")
    return number


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


# --- reading expectations --------------------------------------------------------------------
def parse_expectation(text: str) -> Expectation:
    """Parse ``GROUP[@SPLIT]:METRIC OP VALUE``.

    The last ``:`` followed by a metric name splits the target from the claim, so group regexes
    may hold ``:``; the last ``@`` in the target names the split.

    Example:
        >>> parse_expectation("layer3@test:barrier_height<=0.5")
        Expectation(group='layer3', metric='barrier_height', op='<=', value=0.5, split='test')

    Raises:
        CkptscopeError: the text does not have that form, or names an unknown metric, operator
            or shape.
    """
    if not isinstance(text, str):
        raise CkptscopeError(f"an expectation is a string, got {type(text).__name__}; "
                             f"{_EXAMPLE}.")
    match = _INLINE.match(text.strip())
    if match is None:
        raise CkptscopeError(f"expectation {text!r} is not GROUP[@SPLIT]:METRIC OP VALUE; "
                             f"{_EXAMPLE}.")
    group, at, split = match["target"].strip().rpartition("@")
    if not at:
        group, split = split, None
    elif not split.strip():
        raise CkptscopeError(f"expectation {text!r} has '@' but no split after it; write "
                             f"GROUP@SPLIT, or drop '@' to check every split.")
    return Expectation(group=group.strip(), split=split.strip() if split else None,
                       metric=match["metric"], op=match["op"], value=match["value"])


def load_expectations(path: str | os.PathLike) -> list[Expectation]:
    """Read expectations from a TOML file.

    The file holds one key, ``expect``: an array whose items are inline strings or tables with
    keys ``group``, ``metric``, ``value`` and optionally ``split`` and ``op`` (default ``=``)::

        expect = ["all:shape=plateau", "layer3:barrier_height<=0.5"]

    or::

        [[expect]]
        group = "all"
        split = "test"
        metric = "shape"
        value = "plateau"

    Raises:
        CkptscopeError: the file is missing, not TOML, or an item is malformed (named by its
            position).
    """
    path = Path(path)
    if not path.is_file():
        raise CkptscopeError(f"expectations file {str(path)!r} does not exist or is not a file.")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise CkptscopeError(f"{str(path)!r} is not valid TOML ({err}); see docs/metrics.md "
                             f"for the expectations schema.") from None
    unknown = sorted(set(data) - {"expect"})
    if unknown:
        raise CkptscopeError(f"{str(path)!r} has unknown key(s) {unknown}; the only top-level "
                             f"key is 'expect' (a list of strings or [[expect]] tables).")
    items = data.get("expect")
    if not isinstance(items, list) or not items:
        raise CkptscopeError(f"{str(path)!r} holds no expectations; add "
                             f"expect = [\"all:shape=plateau\"] or [[expect]] tables.")
    out = []
    for i, item in enumerate(items, start=1):
        try:
            if isinstance(item, str):
                out.append(parse_expectation(item))
            elif isinstance(item, dict):
                out.append(_from_table(item))
            else:
                raise CkptscopeError(f"got {type(item).__name__} {item!r}; use a string or a "
                                     f"table")
        except CkptscopeError as err:
            raise CkptscopeError(f"{str(path)!r}, expectation {i}: {err}") from None
    return out


def _from_table(table: dict) -> Expectation:
    unknown = sorted(set(table) - set(TABLE_KEYS))
    if unknown:
        raise CkptscopeError(f"unknown key(s) {unknown}; an [[expect]] table has "
                             f"{', '.join(TABLE_KEYS)}")
    missing = [k for k in ("group", "metric", "value") if k not in table]
    if missing:
        raise CkptscopeError(f"missing key(s) {missing}; an [[expect]] table needs group, "
                             f"metric and value")
    for key in ("group", "split", "metric", "op"):
        if key in table and not isinstance(table[key], str):
            raise CkptscopeError(f"{key} must be a string, got {table[key]!r}")
    return Expectation(group=table["group"], split=table.get("split"), metric=table["metric"],
                       op=table.get("op", "="), value=table["value"])


def _as_expectations(expectations) -> list[Expectation]:
    if isinstance(expectations, str | Expectation):
        expectations = [expectations]
    return [e if isinstance(e, Expectation) else parse_expectation(e) for e in expectations]


# --- checking --------------------------------------------------------------------------------
def check(ds: xr.Dataset, expectations: Iterable[Expectation | str] | Expectation | str, *,
          rtol: float | None = None, atol: float | None = None,
          plateau_alpha: float | None = None) -> list[CheckRow]:
    """Hold expectations against a result; return one row per (expectation, run, group, split).

    ``ds`` is classified first when it has no ``shape`` yet, or when a tolerance is given
    (``shape.classify``; unset ones are read from ``ds.attrs``, else take the defaults). A NaN
    actual value fails with ``curve is invalid (NaN/Inf)`` (or why the metric is undefined), as
    does any claim about an invalid curve other than ``shape=invalid``. Numbers compare
    exactly, except that ``=`` and ``!=`` allow a relative 1e-9.

    Raises:
        CkptscopeError: an expectation names a group or split the result does not have (the
            known ones are listed).
    """
    exps = _as_expectations(expectations)
    if "shape" not in ds.data_vars or any(v is not None for v in (rtol, atol, plateau_alpha)):
        ds = shapes.classify(ds, **_shape_options(ds, rtol, atol, plateau_alpha))
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
    if metric not in ds.data_vars:
        raise CkptscopeError(f"the result has no {metric!r} (classified by an older ckptscope?); "
                             f"classify it again with ckptscope.shape.classify.")
    return ds[metric].transpose(*shapes.CURVE_DIMS).values


def _hold(exp: Expectation, actual, verdict: str, ds: xr.Dataset, index) -> tuple[bool, str]:
    want = f"{exp.op} {exp.value}" if isinstance(exp.value, str) else f"{exp.op} {exp.value:g}"
    if exp.metric == "shape":
        if actual == "invalid" and exp.value != "invalid":
            return False, _INVALID
        passed = OPS[exp.op](str(actual), exp.value)
        r, g, s = index
        height = float(ds["barrier_height"].values[r, g, s]) if "barrier_height" in ds else None
        tol = float(ds["tolerance"].values[r, g, s]) if "tolerance" in ds else None
        detail = ""
        if actual != "invalid" and height is not None and tol is not None:
            detail = f" (barrier_height {height:.4g}, tolerance {tol:.4g})"
        head = f"shape = {actual}{detail}"
        return passed, head if passed else f"{head}, expected {want}"
    actual = float(actual)
    if math.isnan(actual):
        if verdict == "invalid":
            return False, _INVALID
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

    Both are (re)classified with the same shape tolerances: those given, else the ones recorded
    in ``baseline.attrs``, else the defaults. Per (group, split) one ``shape`` row (the most
    common verdict over runs, ties going to ``barrier``, any invalid run making it ``invalid``)
    passes when the verdict is unchanged; one row per metric in ``COMPARED`` (means over runs)
    passes when ``|new - baseline| <= atol + rtol * |baseline|``. Runs need not match: the two
    results may hold different seeds and numbers of runs.

    Raises:
        CkptscopeError: the results differ in groups, splits or alpha grid.
    """
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
    options = _shape_options(baseline, shape_rtol, shape_atol, plateau_alpha)
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
            for metric in COMPARED:
                b = float(np.mean(base_values[metric][:, ia[0], ia[1]]))
                n = float(np.mean(cand_values[metric][:, ib[0], ib[1]]))
                rows.append(_drift_row(group, split, metric, b, n, rtol=rtol, atol=atol))
    return rows


def _shape_options(ds: xr.Dataset, rtol, atol, plateau_alpha) -> dict:
    """Return classify options: those given, else the ones recorded in ``ds``, else defaults."""
    given = {"rtol": rtol, "atol": atol, "plateau_alpha": plateau_alpha}
    defaults = {"rtol": shapes.DEFAULT_RTOL, "atol": shapes.DEFAULT_ATOL,
                "plateau_alpha": shapes.DEFAULT_PLATEAU_ALPHA}
    return {k: given[k] if given[k] is not None else float(ds.attrs.get(f"shape_{k}", defaults[k]))
            for k in given}


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
               atol: float) -> CompareRow:
    if math.isnan(b) or math.isnan(n):
        side = "baseline" if math.isnan(b) else "new"
        return CompareRow(group, split, metric, b, n, False, f"{side} {_INVALID}")
    delta = n - b
    passed = abs(delta) <= atol + rtol * abs(b)
    message = f"{metric} {b:.4g} -> {n:.4g} ({delta:+.3g}"
    if not passed and metric == "barrier_height":
        message += "; higher barrier, H-LB" if delta > 0 else "; lower barrier, L-LB"
    message += ")" if passed else f"; beyond atol {atol:g} + rtol {rtol:g} x |baseline|)"
    return CompareRow(group, split, metric, b, n, passed, message)
