"""Tables and progress bars of the command line, drawn by rich."""

from __future__ import annotations

import re

import pytest

from ckptscope.cli.output import ProgressBar, table
from ckptscope.train.cli import EpochBar

HEADERS = ["", "group", "split", "L(0)", "note"]
CELLS = [
    ["PASS", "all", "test", "0.6931", "shape = barrier (barrier_height 0.12)"],
    ["FAIL", "layers.0.*", "train", "1.2", "[bold]not markup[/bold] \\x1b"],
    ["PASS", "a-much-longer-group-name-than-the-others", "test", "nan", ""],
]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def reference_table(headers, cells):
    """The plain table as the hand-written printer made it: left-aligned columns two spaces
    apart under a rule of dashes, trailing spaces stripped."""
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in cells]
    return lines


def test_plain_table_rows_are_those_of_the_old_printer(monkeypatch):
    monkeypatch.setenv("COLUMNS", "30")  # a narrow terminal changes nothing off a terminal
    got = table(HEADERS, CELLS, terminal=False).split("\n")
    assert got == reference_table(HEADERS, CELLS)


def test_plain_table_without_rows():
    assert table(["group", "split"], [], terminal=False).split("\n")[0] == "group  split"


def test_terminal_table_fits_the_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    text = table(HEADERS, CELLS, terminal=True)
    lines = ANSI.sub("", text).split("\n")
    assert max(len(line) for line in lines) <= 60
    assert "a-much-longer" in ANSI.sub("", text) and "[bold]not" in text  # folded, not markup


def test_progress_bar_is_silent_off_a_terminal(capsys):
    bar = ProgressBar("evaluating")  # stderr is captured: not a terminal
    for done in range(1, 4):
        bar(done, 3)
    bar.close()
    assert capsys.readouterr().err == ""


def test_progress_bar_shows_count_rate_and_eta(capsys):
    bar = ProgressBar("evaluating", enabled=True)
    for done in range(1, 6):
        bar(done, 5)
    bar.close()  # a second close does nothing
    err = capsys.readouterr().err
    assert "evaluating" in err and "5/5" in err and "/s" in err and "eta" in err


def test_progress_bar_closed_early_stops(capsys):
    bar = ProgressBar("run 0", enabled=True)
    bar(2, 10)
    bar.close()
    bar(3, 10)  # after close: nothing more
    err = capsys.readouterr().err
    assert "2/10" in err and "3/10" not in err


@pytest.mark.parametrize("enabled", [True, False])
def test_epoch_bar(capsys, enabled):
    bar = EpochBar(2, enabled=enabled)
    bar.end_epoch({"phase": "random-labels", "epoch": 1, "accuracy": 0.5})
    bar.step(3, 4, 0.25, 0.75)
    record = {"epoch": 1, "lr": 0.1, "train_loss": 0.5, "train_accuracy": 0.8, "seconds": 1.0,
              "images_per_second": 100.0}
    bar.end_epoch(record)
    bar.label = "seed 1: "
    bar.end_epoch({**record, "epoch": 2})
    bar.close()
    err = capsys.readouterr().err
    if not enabled:
        assert err == ""
        return
    assert "training" in err and "seed 1" in err and "2/2" in err and "train loss 0.5000" in err
