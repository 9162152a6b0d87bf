"""What the commands show and write: progress bars, tables, figures and check verdicts."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import numpy as np

from ckptscope.files import replacing, write_text

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


class ProgressBar:
    """A one-line progress bar on stderr; silent when stderr is not a terminal."""

    def __init__(self, label: str, *, enabled: bool | None = None):
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * done / max(total, 1))
        elapsed = time.monotonic() - self.start
        eta = elapsed / done * (total - done) if done else 0.0
        sys.stderr.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
            f"{done}/{total} {elapsed:5.1f}s eta {eta:5.1f}s"
        )
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def table(headers: list[str], cells: list[list[str]]) -> str:
    """Left-aligned columns under a header and a rule of dashes."""
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
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

