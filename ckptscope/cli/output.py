"""What the commands show and write: progress bars, tables, figures and check verdicts.

Progress bars and tables are drawn by ``rich`` (imported here, on use: ``import ckptscope``
never imports it). Progress goes to stderr, with the rate and the time left, and only when
stderr is a terminal. Tables fit the terminal's width when stdout is one; otherwise they are
plain text (left-aligned columns two spaces apart under a rule of dashes, no colour, never
wrapped), the same whatever the terminal, for scripts and tests to parse.
"""

from __future__ import annotations

import functools
import re
import sys
from io import StringIO
from pathlib import Path

import click
import numpy as np

from ckptscope.files import replacing, write_text

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


def progress_columns():
    """The columns of every progress bar: label, bar, done/total, rate, elapsed, time left."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        """Items per second (points, steps), from rich's running estimate."""

        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("-/s" if speed is None else f"{speed:.3g}/s", style="progress.data.speed")

    return (TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
            RateColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())


def stderr_progress(*columns, enabled: bool | None = None):
    """A ``rich.progress.Progress`` on stderr, or ``None`` when stderr is not a terminal (or
    ``enabled`` is false)."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    if not (console.is_terminal if enabled is None else enabled):
        return None
    return Progress(*(columns or progress_columns()), console=console, auto_refresh=False,
                    redirect_stdout=False, redirect_stderr=False)


class ProgressBar:
    """A progress bar on stderr (``rich``), with rate and time left; silent when stderr is not
    a terminal. Called as ``bar(done, total)``; it ends when ``done`` reaches ``total``, or at
    :meth:`close`."""

    def __init__(self, label: str, *, enabled: bool | None = None):
        self.label = label
        self.progress = stderr_progress(enabled=enabled)
        self.task = None

    def __call__(self, done: int, total: int) -> None:
        if self.progress is None:
            return
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=total)
        self.progress.update(self.task, completed=done, total=total, refresh=True)
        if done >= total:
            self.close()

    def close(self) -> None:
        """Stop drawing (the bar's last state stays on screen); safe to call twice."""
        if self.progress is not None and self.task is not None:
            self.progress.stop()
        self.progress = None


@functools.lru_cache(maxsize=1)
def _plain_box():
    """A rich box that draws nothing but a rule of dashes under the header: with one space of
    padding and a space between columns, columns are two spaces apart."""
    from rich.box import Box

    return Box("    \n    \n -  \n    \n    \n    \n    \n    \n", ascii=True)


def table(headers: list[str], cells: list[list[str]], *, terminal: bool | None = None) -> str:
    """Columns under a header, rendered by ``rich``.

    Args:
        headers, cells: the header and the rows, text.
        terminal: fit the terminal's width, with a bold header (``None``: when stdout is a
            terminal). Otherwise plain text: left-aligned columns two spaces apart under a rule
            of dashes, never wrapped, no trailing spaces.
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    terminal = sys.stdout.isatty() if terminal is None else terminal
    if terminal:
        width = Console().width
        out = Console(file=StringIO(), width=width, force_terminal=True, markup=False,
                      highlight=False, emoji=False)
        grid = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, show_edge=False,
                     padding=(0, 1, 0, 0))  # columns two spaces apart, as in plain text
        for h in headers:
            grid.add_column(h, overflow="fold")
    else:
        out = Console(file=StringIO(), width=1 << 20, color_system=None, force_terminal=False,
                      no_color=True, markup=False, highlight=False, emoji=False)
        grid = Table(box=_plain_box(), show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
        for h in headers:
            grid.add_column(h, no_wrap=True, overflow="ignore")
    for row in cells:
        grid.add_row(*row)
    out.print(grid, crop=False, soft_wrap=False)
    lines = [line.rstrip() for line in out.file.getvalue().splitlines()]
    if not terminal and len(lines) > 1:  # the rule under each column's text, not its padding
        lines[1] = re.sub(r"-(?= )", " ", lines[1])
    return "\n".join(lines)


def path_table(rows: list[dict]) -> str:
    """One line per (run, group, split) of :func:`ckptscope.shape.summary`; a run column when
    there are several runs."""
    many = len({r["run"] for r in rows}) > 1
    headers = ["run"] * many + ["group", "split", "L(0)", "L(max)", "at alpha", "L(1)",
                                "acc(0)", "acc(1)", "distance", "shape", "barrier"]
    cells = [
        [r["run"]] * many + [
            r["group"], r["split"], f"{r['loss_start']:.4g}", f"{r['loss_max']:.4g}",
            f"{r['alpha_max']:.2f}", f"{r['loss_end']:.4g}", f"{r['acc_start']:.3f}",
            f"{r['acc_end']:.3f}", f"{r['distance']:.4g}", r["shape"],
            f"{r['barrier_height']:.3g}",
        ]
        for r in rows
    ]
    return table(headers, cells)


def aggregate_table(ds) -> str:
    """Per group and split over runs: barrier fraction, barrier height and L(1) mean +- std."""
    from ckptscope.shape import aggregate

    agg = aggregate(ds)
    cells = []
    for group in ds["group"].values:
        for split in ds["split"].values:
            at = {"group": group, "split": split}
            heights = ds["barrier_height"].sel(at).values
            ends = ds["loss"].sel(at).sel(alpha=1.0, method="nearest").values
            cells.append([
                str(group), str(split), f"{float(agg['barrier_fraction'].sel(at)):.2f}",
                f"{np.nanmean(heights):.3g} +- {np.nanstd(heights, ddof=1):.2g}",
                f"{np.nanmean(ends):.4g} +- {np.nanstd(ends, ddof=1):.2g}",
                str(int(agg["n_valid"].sel(at))),
            ])
    return table(["group", "split", "barrier fraction", "barrier height", "L(1)", "valid runs"],
                 cells)


def save_figure(fig, path: Path) -> None:
    """Save a figure atomically (the format follows the suffix)."""
    with replacing(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, dpi=120)


def verdict(rows, headers: list[str], cells: list[list[str]], junit: str | None) -> None:
    """Print a PASS/FAIL table and the counts, write the JUnit report, exit 1 on a failure."""
    from ckptscope.check import to_junit

    # Everything is rendered before the report is written: a failure leaves no file behind.
    marks = [["PASS" if r.passed else "FAIL", *cell] for r, cell in zip(rows, cells, strict=True)]
    text = table(["", *headers], marks)
    _write_text(junit, to_junit(rows))
    click.echo(text)
    failed = sum(not r.passed for r in rows)
    click.echo(f"{len(rows) - failed} passed, {failed} failed")
    sys.exit(EXIT_FAILED if failed else 0)


def format_value(value) -> str:
    """A float to four significant digits, anything else as text."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _write_text(path: str | None, text: str) -> None:
    """Write a text file atomically (nothing for ``None``)."""
    if path is not None:
        write_text(path, text)

