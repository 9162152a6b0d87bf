"""Commands that answer study-level questions across runs: ``summarize``, ``correlate`` and
``report``."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from ckptscope.cli.options import check_suffix, parse_tolerances
from ckptscope.cli.output import save_figure
from ckptscope.files import write_text

_BY_HELP = ("Conditions: a run coordinate, run_prefix (the run label up to its last ':'), or an "
            "attribute of each result (e.g. recipe).")


def _open_all(results: tuple[str, ...]) -> list:
    """The results, in order (each labelled by its file: ``ds.encoding["source"]``)."""
    from ckptscope.results import open_result

    return [open_result(path) for path in results]


@click.command()
@click.argument("results", nargs=-1, required=True, type=click.Path())
@click.option("--by", default=None, metavar="COORD|ATTR", help=_BY_HELP)
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "csv"]), default="text",
              show_default=True)
@click.option("--tolerance", "tolerances", multiple=True, metavar="KEY=VALUE",
              help="Re-classify with these shape tolerances first (rtol, atol, plateau_alpha).")
@click.option("-o", "--out", type=click.Path(dir_okay=False), default=None,
              help="Also write the table to this file.")
def summarize(results, by, fmt, tolerances, out):
    """Verdict counts and metric statistics over runs, per group, split and condition."""
    from ckptscope.summary import format_summary
    from ckptscope.summary import summarize as run_summarize

    datasets = _open_all(results)
    text = format_summary(run_summarize(datasets, by=by, **parse_tolerances(tolerances)), fmt)
    if out:
        write_text(out, text)
    click.echo(text, nl=False)
    if out:
        click.echo(f"wrote {out}", err=True)


@click.command()
@click.argument("result", type=click.Path())
@click.option("--metric", required=True, metavar="GROUP[@SPLIT]:METRIC",
              help="The shape metric, e.g. all:barrier_height.")
@click.option("--with", "with_", required=True, metavar="METRIC|FIELD|FILE.csv[:COLUMN]",
              help="The outcome: acc_end, loss_end (or any metric), an end-checkpoint metadata "
                   "field such as final_metrics.test_accuracy, or a CSV keyed by run.")
@click.option("--method", type=click.Choice(["spearman", "kendall", "pearson"]),
              default="spearman", show_default=True)
@click.option("--bootstrap", type=click.IntRange(min=0), default=0, show_default=True,
              help="Resamples for a percentile interval (e.g. 1000).")
@click.option("--seed", type=int, default=0, show_default=True, help="The bootstrap's seed.")
@click.option("--confidence", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=0.95, show_default=True)
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="Resolve the result's relative checkpoint paths against this folder.")
@click.option("--runs", default=None, metavar="GLOB",
              help="Use only the runs whose labels match, e.g. 'i-f:*'.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Write a scatter figure (.png, .pdf, .svg).")
def correlate(result, metric, with_, method, bootstrap, seed, confidence, root, runs, plot):
    """Correlate a shape metric with an outcome across the runs of RESULT."""
    from ckptscope.correlation import correlate as run_correlate
    from ckptscope.results import open_result

    check_suffix(plot, (".png", ".pdf", ".svg"), "--plot")
    corr = run_correlate(open_result(result), metric, with_, method=method,
                         bootstrap=bootstrap, seed=seed, confidence=confidence, root=root,
                         runs=runs)
    if plot:
        from ckptscope.report import plot_correlation

        save_figure(plot_correlation(corr).figure, Path(plot))
    click.echo(str(corr))
    if corr.dropped:
        click.echo(f"left out (a NaN value): {', '.join(corr.dropped)}")
    if plot:
        click.echo(f"wrote {plot}")


@click.command()
@click.argument("results", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--out", type=click.Path(dir_okay=False), required=True,
              help="The report (.html).")
@click.option("--expect", "expects", multiple=True, metavar="FILE|EXPR",
              help="Expectations to show the check of: a TOML file or GROUP[@SPLIT]:METRIC OP "
                   "VALUE; repeatable.")
@click.option("--by", default=None, metavar="COORD|ATTR", help=_BY_HELP)
@click.option("--correlate", "pairs", type=(str, str), multiple=True,
              metavar="GROUP[@SPLIT]:METRIC OUTCOME",
              help="Also show this correlation across runs (as `correlate --with OUTCOME`); "
                   "repeatable.")
@click.option("--title", default=None)
def report(results, out, expects, by, pairs, title):
    """Write a self-contained HTML report of one or more results (exit 0 whatever the check
    says: gate with `ckptscope check`)."""
    from ckptscope.report import report as write_report

    check_suffix(out, (".html", ".htm"), "--out")
    command = shlex.join(["ckptscope", *sys.argv[1:]]) if sys.argv[1:2] == ["report"] else None
    write_report(_open_all(results), out, expect=list(expects) or None, title=title, by=by,
                 correlate=list(pairs), command=command)
    click.echo(f"wrote {out}")
