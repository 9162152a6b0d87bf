"""Commands whose exit status is a verdict, for CI: ``check`` and ``compare``."""

from __future__ import annotations

from pathlib import Path

import click

from ckptscope.cli.options import parse_tolerances
from ckptscope.cli.output import format_value, verdict


@click.command()
@click.argument("result", type=click.Path())
@click.option("--expect", "expects", multiple=True, required=True, metavar="FILE|EXPR",
              help="An expectations TOML file, or GROUP[@SPLIT]:METRIC OP VALUE; repeatable.")
@click.option("--tolerance", "tolerances", multiple=True, metavar="KEY=VALUE",
              help="Re-classify with these shape tolerances first.")
@click.option("--junit", type=click.Path(dir_okay=False), default=None,
              help="Write a JUnit XML report.")
def check(result, expects, tolerances, junit):
    """Hold a result against expectations; exit 0 if all pass, 1 if any fails."""
    from ckptscope.check import check as run_check
    from ckptscope.check import load_expectations, parse_expectation
    from ckptscope.results import open_result

    ds = open_result(result)
    expectations = []
    for item in expects:
        if Path(item).suffix.lower() == ".toml" or Path(item).is_file():
            expectations += load_expectations(item)
        else:
            expectations.append(parse_expectation(item))
    rows = run_check(ds, expectations, **parse_tolerances(tolerances))
    verdict(rows, ["expectation", "run", "group", "split", "actual", "note"],
            [[str(r.expectation), r.run, r.group, r.split, format_value(r.actual), r.message]
             for r in rows], junit)


@click.command()
@click.argument("baseline", type=click.Path())
@click.argument("new", type=click.Path())
@click.option("--rtol", type=click.FloatRange(min=0), default=None,
              help="Relative drift allowed (default 0.05).")
@click.option("--atol", type=click.FloatRange(min=0), default=None,
              help="Absolute drift allowed (default 1e-3).")
@click.option("--junit", type=click.Path(dir_okay=False), default=None)
def compare(baseline, new, rtol, atol, junit):
    """Verdict changes and metric drifts from BASELINE to NEW; exit 1 on any."""
    from ckptscope.check import compare as run_compare
    from ckptscope.results import open_result

    tol = {k: v for k, v in (("rtol", rtol), ("atol", atol)) if v is not None}
    rows = run_compare(open_result(baseline), open_result(new), **tol)
    verdict(rows, ["group", "split", "metric", "baseline", "new", "note"],
            [[r.group, r.split, r.metric, format_value(r.baseline), format_value(r.new),
              r.message] for r in rows], junit)
