"""A self-contained HTML report of one or more results, to share with a reviewer or keep as a
CI artifact.

One file, no scripts, nothing fetched at view time: figures are SVG in ``data:`` URIs, styles
inline, and a Content-Security-Policy forbids any other source. Per result it shows the check
outcome (when expectations are given), the :func:`ckptscope.summary.summarize` table, the
correlations asked for (:func:`ckptscope.correlation.correlate`, with their scatter), the path
figures (all groups together, then each group with every run), the verdict table with the
tolerances, and the provenance (the result's attributes, checkpoint files and digests, groups,
splits, and the versions and date of the report). Every string from a result is HTML-escaped.

Verdicts are recomputed from the loss curves (:func:`ckptscope.summary.trusted`). A leaf:
matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import platform
import warnings
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import xarray as xr

from ckptscope.files import write_text
from ckptscope.summary import as_results, summarize, summary_rows, trusted

# Content-Security-Policy: no script, no network; images only from data: URIs.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pass { color: #176f2c; font-weight: 600; } .fail { color: #b00020; font-weight: 600; }
.barrier { background: #fde8e8; } .plateau { background: #fff6d6; }
.invalid { background: #eee; color: #b00020; } code { font-size: 12px; }
figure { display: inline-block; margin: .4em; } img { max-width: 100%; }
.muted { color: #666; }
"""
_VERDICT_COLUMNS = (("barrier_height", "barrier height"), ("tolerance", "tolerance"),
                    ("chord_barrier", "chord barrier"), ("peak_alpha", "peak alpha"),
                    ("half_drop_alpha", "half-drop alpha"))


def report(results, path: str | os.PathLike, *, expect=None, title: str | None = None,
           by: str | None = None, correlate: Sequence[tuple[str, object]] = (),
           command: str | None = None) -> Path:
    """Write the HTML report of ``results`` to ``path`` atomically; return the path.

    Args: as :func:`render_report`.
    """
    return write_text(path, render_report(results, expect=expect, title=title, by=by,
                                          correlate=correlate, command=command))


def render_report(results, *, expect=None, title: str | None = None, by: str | None = None,
                  correlate: Sequence[tuple[str, object]] = (),
                  command: str | None = None) -> str:
    """Return the HTML report of one result, several (a sequence), or a mapping label ->
    result.

    Args:
        expect: expectations held against every result (``ckptscope.check.check``): strings
            such as ``all:shape=monotonic``, ``Expectation`` objects, or paths of TOML files.
        title: the page title (default: "ckptscope report").
        by: conditions for the summary tables (:func:`ckptscope.summary.summarize`).
        correlate: ``(metric, outcome)`` pairs, each correlated across every result's runs
            (:func:`ckptscope.correlation.correlate`, Spearman, 1000 bootstrap resamples, seed
            0) and shown with its scatter. One that cannot be computed (fewer than 3 runs, a
            constant column, an unknown name, a missing metadata field) is shown with its
            reason and also raised as a ``UserWarning``: a report is written anyway.
        command: the command line that made the report, recorded in the provenance.

    Raises:
        CkptscopeError: a result is malformed or disagrees with its curves, an expectation is
            malformed or names a group or split a result lacks, or ``by`` names nothing.
    """
    from ckptscope import __version__
    from ckptscope.check import check

    items = [(label, trusted(ds, source=repr(label))) for label, ds in as_results(results)]
    expectations = _expectations(expect)
    checks = {label: check(ds, expectations) for label, ds in items} if expectations else {}
    title = title or "ckptscope report"
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    body = [f"<h1>{_e(title)}</h1>",
            f"<p class=muted>Made {_e(created)} by ckptscope {_e(__version__)}; "
            f"{len(items)} result(s): {_e(', '.join(label for label, _ in items))}.</p>"]
    if checks:
        rows = [r for rows in checks.values() for r in rows]
        failed = sum(not r.passed for r in rows)
        verdict = "FAIL" if failed else "PASS"
        body.append(f"<p>Check: <span class={verdict.lower()}>{verdict}</span>, "
                    f"{len(rows) - failed} passed, {failed} failed.</p>")
    body.append("<ul>" + "".join(f'<li><a href="#result-{i}">{_e(label)}</a></li>'
                                 for i, (label, _) in enumerate(items)) + "</ul>")
    for i, (label, ds) in enumerate(items):
        body.append(_result_section(i, label, ds, checks.get(label), by, correlate))
    body.append(_environment(created, expectations, by, command))
    return ("<!DOCTYPE html>\n<html lang=en>\n<head>\n<meta charset=utf-8>\n"
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
            f"<title>{_e(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def _expectations(expect) -> list:
    from ckptscope.check import Expectation, load_expectations, parse_expectation

    if expect is None:
        return []
    if isinstance(expect, (str, os.PathLike, Expectation)):
        expect = [expect]
    out = []
    for item in expect:
        if isinstance(item, Expectation):
            out.append(item)
        elif isinstance(item, os.PathLike) or str(item).lower().endswith(".toml") \
                or Path(str(item)).is_file():
            out += load_expectations(item)
        else:
            out.append(parse_expectation(str(item)))
    return out


# --- sections --------------------------------------------------------------------------------
def _result_section(i: int, label: str, ds: xr.Dataset, rows, by: str | None,
                    pairs: Sequence[tuple[str, object]] = ()) -> str:
    attrs = ds.attrs
    parts = [f'<h2 id="result-{i}">{_e(label)}</h2>',
             f"<p>{ds.sizes['run']} run(s), groups {_e(', '.join(map(str, ds.group.values)))}; "
             f"splits {_e(', '.join(map(str, ds.split.values)))}; {ds.sizes['alpha']} alphas "
             f"from {float(ds.alpha[0]):g} to {float(ds.alpha[-1]):g}; data "
             f"<code>{_e(attrs.get('data', ''))}</code>, adapter "
             f"<code>{_e(attrs.get('adapter', ''))}</code>.</p>"]
    tolerances = (f"shape tolerances: rtol {attrs['shape_rtol']:g}, atol "
                  f"{attrs['shape_atol']:g}, plateau_alpha {attrs['shape_plateau_alpha']:g}")
    if rows is not None:
        parts.append(_check_table(rows))
    parts.append(f"<h3>Summary over runs</h3><p class=muted>Verdicts recomputed from the loss "
                 f"curves ({tolerances}); metrics: mean ± std (median) over the valid runs."
                 f"</p>")
    parts.append(_summary_table(summarize(ds, by=by)))
    if pairs:
        parts.append(_correlations(label, ds, pairs))
    parts.append("<h3>Paths</h3>")
    parts.append(_figures(ds))
    parts.append(f"<h3>Verdicts</h3><p class=muted>One row per run, group and split; "
                 f"{tolerances}. A barrier is a rise above the running minimum of more than "
                 f"the tolerance max(rtol × range, atol).</p>")
    parts.append(_verdict_table(ds))
    parts.append(_provenance(ds))
    return "\n".join(parts)


def _correlations(label: str, ds: xr.Dataset, pairs: Sequence[tuple[str, object]]) -> str:
    from ckptscope.correlation import correlate
    from ckptscope.errors import CkptscopeError

    cells, figures = [], []
    for metric, outcome in pairs:
        try:
            c = correlate(ds, metric, outcome, bootstrap=1000, seed=0)
        except CkptscopeError as err:
            warnings.warn(f"{label}: no correlation of {metric} with {outcome}: {err}",
                          UserWarning, stacklevel=2)
            cells.append([_e(metric), _e(outcome), "", "", "", "", _e(err)])
            continue
        low, high = c.interval
        cells.append([_e(c.metric), _e(c.outcome), f"{c.statistic:+.3f}", f"{c.pvalue:.3g}",
                      str(c.n), f"[{low:+.3f}, {high:+.3f}]",
                      _e(f"left out (NaN): {', '.join(c.dropped)}" if c.dropped else "")])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            figures.append(_img(plot_correlation(c).figure,
                                f"{c.metric} against {c.outcome} across runs"))
    return ("<h3>Correlations across runs</h3><p class=muted>Spearman's rho and its p-value "
            "(scipy.stats), a 95% percentile interval from 1000 bootstrap resamples of the runs "
            "(seed 0).</p>"
            + _table(["metric", "outcome", "rho", "p", "runs", "95% interval", "note"], cells)
            + "\n".join(figures))


def _check_table(rows) -> str:
    failed = sum(not r.passed for r in rows)
    head = (f"<h3>Check</h3><p><span class={'fail' if failed else 'pass'}>"
            f"{'FAIL' if failed else 'PASS'}</span>: {len(rows) - failed} passed, {failed} "
            f"failed.</p>")
    cells = [[f"<span class={'pass' if r.passed else 'fail'}>"
              f"{'PASS' if r.passed else 'FAIL'}</span>", _e(r.expectation), _e(r.run),
              _e(r.group), _e(r.split), _num(r.actual), _e(r.message)] for r in rows]
    return head + _table(["", "expectation", "run", "group", "split", "actual", "note"], cells)


def _summary_table(summary: xr.Dataset) -> str:
    from ckptscope.results import SHAPES
    from ckptscope.summary import SUMMARIZED

    rows = summary_rows(summary)
    lead = ["condition"] if "condition" in summary.dims else []
    labels = {"barrier_height": "barrier height", "chord_barrier": "chord barrier",
              "peak_alpha": "peak alpha", "distance": "distance", "acc_end": "acc(1)",
              "loss_end": "L(1)"}
    cells = []
    for r in rows:
        spread = []
        for m in SUMMARIZED:
            mean, std, median = (r[f"{m}_{s}"] for s in ("mean", "std", "median"))
            spread.append("-" if math.isnan(mean) else
                          f"{mean:.4g}{'' if math.isnan(std) else f' ± {std:.2g}'} "
                          f"({median:.4g})")
        cells.append([*(_e(r[k]) for k in lead), _e(r["group"]), _e(r["split"]),
                      str(r["n_run"]),
                      *(f"{r[f'count_{s}']} ({100 * r[f'fraction_{s}']:.0f}%)" for s in SHAPES),
                      *map(_e, spread)])
    return _table([*lead, "group", "split", "runs", *SHAPES, *(labels[m] for m in SUMMARIZED)],
                  cells)


def _verdict_table(ds: xr.Dataset) -> str:
    from ckptscope.summary import curve_metric

    metrics = {m: curve_metric(ds, m) for m, _ in _VERDICT_COLUMNS}
    ends = {m: curve_metric(ds, m) for m in ("loss_start", "loss_end", "acc_end", "distance")}
    verdicts = ds["shape"].transpose("run", "group", "split").values
    cells = []
    for r, run in enumerate(ds["run"].values):
        for g, group in enumerate(ds["group"].values):
            for s, split in enumerate(ds["split"].values):
                verdict = str(verdicts[r, g, s])
                cells.append([_e(run), _e(group), _e(split),
                              f"<span class={verdict}>{_e(verdict)}</span>",
                              *(_num(metrics[m][r, g, s]) for m, _ in _VERDICT_COLUMNS),
                              *(_num(ends[m][r, g, s]) for m in ends)])
    return _table(["run", "group", "split", "shape", *(label for _, label in _VERDICT_COLUMNS),
                   "L(0)", "L(1)", "acc(1)", "distance"], cells)


def _provenance(ds: xr.Dataset) -> str:
    attrs = _table(["attribute", "value"],
                   [[_e(k), f"<code>{_e(v)}</code>"] for k, v in sorted(ds.attrs.items())])
    runs = _table(["run", "start", "start sha256", "end", "end sha256"], [
        [_e(run), f"<code>{_e(ds['start_path'].values[i])}</code>",
         f"<code>{_e(ds['start_sha256'].values[i])}</code>",
         f"<code>{_e(ds['end_path'].values[i])}</code>",
         f"<code>{_e(ds['end_sha256'].values[i])}</code>"]
        for i, run in enumerate(ds["run"].values)])
    groups = _table(["group", "pattern", "tensors", "parameters"], [
        [_e(g), f"<code>{_e(ds['pattern'].values[i])}</code>",
         _num(ds["n_tensors"].values[i]) if "n_tensors" in ds.coords else "",
         _num(ds["n_params"].values[i]) if "n_params" in ds.coords else ""]
        for i, g in enumerate(ds["group"].values)])
    splits = _table(["split", "examples"], [
        [_e(s), _num(ds["n_examples"].values[i]) if "n_examples" in ds.coords else ""]
        for i, s in enumerate(ds["split"].values)])
    return ("<h3>Provenance</h3><h4>Checkpoints</h4>" + runs + "<h4>Groups</h4>" + groups
            + "<h4>Data</h4>" + splits + "<h4>Settings and versions</h4>" + attrs)


def _environment(created: str, expectations: Sequence, by: str | None,
                 command: str | None) -> str:
    import importlib.metadata as metadata

    versions = [["python", platform.python_version()], ["platform", platform.platform()]]
    for name in ("ckptscope", "numpy", "scipy", "xarray", "matplotlib"):
        try:
            versions.append([name, metadata.version(name)])
        except metadata.PackageNotFoundError:
            continue
    rows = [[_e(k), f"<code>{_e(v)}</code>"] for k, v in versions]
    rows.append(["made", _e(created)])
    if command:
        rows.append(["command", f"<code>{_e(command)}</code>"])
    if by:
        rows.append(["conditions by", f"<code>{_e(by)}</code>"])
    if expectations:
        rows.append(["expectations", "<br>".join(f"<code>{_e(e)}</code>"
                                                 for e in expectations)])
    return "<h2>This report</h2>" + _table(["", ""], rows)


# --- figures ---------------------------------------------------------------------------------
def _figures(ds: xr.Dataset) -> str:
    """The result's figure (every group, one panel per split) and one per group with every
    run's curve, as ``<img>`` elements with SVG data URIs.

    An invalid curve (NaN/Inf) is drawn with its gaps, silently: the verdict table says it is
    invalid, and a mean or std over runs that meets an Inf is no news.
    """
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return _draw_figures(ds)


def _draw_figures(ds: xr.Dataset) -> str:
    from matplotlib.figure import Figure

    from ckptscope.plots import plot_path

    out = []
    splits = [str(s) for s in ds["split"].values]
    fig = Figure(figsize=(5.2 * len(splits), 3.6))
    for ax, split in zip(fig.subplots(1, len(splits), squeeze=False)[0], splits, strict=True):
        plot_path(ds, split=split, ax=ax, title=f"all groups: {split}")
    fig.tight_layout()
    out.append(_img(fig, f"loss along the path for every group ({', '.join(splits)})"))
    for group in (str(g) for g in ds["group"].values):
        fig = Figure(figsize=(4.2 * len(splits), 3.0))
        axes = fig.subplots(1, len(splits), squeeze=False)[0]
        for ax, split in zip(axes, splits, strict=True):
            _draw_runs(ds, group, split, ax)
        fig.tight_layout()
        out.append(_img(fig, f"group {group}: loss along the path, every run"))
    return "\n".join(out)


def _draw_runs(ds: xr.Dataset, group: str, split: str, ax) -> None:
    from collections import Counter

    alpha = ds["alpha"].values
    curves = ds["loss"].sel(group=group, split=split).transpose("run", "alpha").values
    verdicts = [str(v) for v in ds["shape"].sel(group=group, split=split).values]
    colours = {"monotonic": "tab:blue", "barrier": "tab:red", "plateau": "tab:orange",
               "invalid": "0.5"}
    seen = set()
    for curve, verdict in zip(curves, verdicts, strict=True):
        ax.plot(alpha, curve, color=colours[verdict], linewidth=1, alpha=0.7,
                label=None if verdict in seen else verdict)
        seen.add(verdict)
    if len(curves) > 1:
        ax.plot(alpha, np.nanmean(curves, axis=0), color="black", linewidth=2, linestyle="--",
                label="mean")
    ax.legend(fontsize="small", frameon=False)
    counts = Counter(verdicts)
    ax.set_title(f"{group} ({split}): " + ", ".join(f"{k} {v}" for k, v in counts.items()),
                 fontsize="medium")
    ax.set_xlabel(r"$\alpha$")
    ax.set_ylabel(f"{split} loss")


def plot_correlation(corr, ax=None, *, labels: bool | None = None):
    """Draw a :class:`ckptscope.correlation.Correlation` as a scatter of its paired values.

    Args:
        corr: the correlation.
        ax: the axes (default: a new figure's).
        labels: write each point's run label (default: when there are at most 20 runs).

    Returns:
        The matplotlib ``Axes``.
    """
    if ax is None:
        from matplotlib.figure import Figure

        ax = Figure(figsize=(5.0, 3.8)).subplots()
    ax.scatter(corr.x, corr.y, color="tab:blue", zorder=3)
    if labels if labels is not None else corr.n <= 20:
        for run, x, y in zip(corr.runs, corr.x, corr.y, strict=True):
            ax.annotate(run, (x, y), textcoords="offset points", xytext=(4, 3),
                        fontsize="x-small", color="0.3")
    symbol = {"spearman": r"\rho", "kendall": r"\tau", "pearson": "r"}[corr.method]
    text = f"${symbol}$ = {corr.statistic:+.2f}, p = {corr.pvalue:.2g}, n = {corr.n}"
    if corr.bootstrap and not math.isnan(corr.interval[0]):
        text += f"\n{100 * corr.confidence:g}% CI [{corr.interval[0]:+.2f}, " \
                f"{corr.interval[1]:+.2f}]"
    ax.set_title(text, fontsize="medium")
    ax.set_xlabel(corr.metric)
    ax.set_ylabel(corr.outcome)
    ax.figure.tight_layout()
    return ax


def svg_data_uri(fig) -> str:
    """A matplotlib figure as a ``data:image/svg+xml;base64,...`` URI (text as text, no
    date, stable ids: the same figure gives the same bytes)."""
    import matplotlib

    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "ckptscope"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(fig, alt: str) -> str:
    return f'<figure><img alt="{_e(alt)}" src="{svg_data_uri(fig)}"></figure>'


# --- html ------------------------------------------------------------------------------------
def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value) -> str:
    if isinstance(value, (str, np.str_)):
        return _e(value)
    value = float(value)
    if math.isnan(value):
        return "NaN"
    return f"{value:.0f}" if value.is_integer() and abs(value) >= 1 else f"{value:.4g}"


def _table(headers: Iterable[str], cells: Iterable[Sequence[str]]) -> str:
    """An HTML table; ``headers`` are escaped, ``cells`` are HTML already."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
