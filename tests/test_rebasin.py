"""``ckptscope reproduce rebasin``: the barriers, the command end to end, its errors."""

from __future__ import annotations

import click
import numpy as np
import pytest
from click.testing import CliRunner

from ckptscope.results import open_result
from ckptscope.train.cli import reproduce
from ckptscope.train.rebasin import CONDITIONS, barriers

pytestmark = pytest.mark.usefixtures("one_thread")


def _invoke(*args: str):
    group = click.Group()
    group.add_command(reproduce)
    return CliRunner().invoke(group, ["reproduce", *args], catch_exceptions=True)


def test_barriers_are_the_largest_gap_to_the_line_between_the_ends():
    alpha = np.array([0.0, 0.25, 0.5, 1.0])
    loss = np.array([1.0, 1.5, 3.0, 2.0])  # the line: 1, 1.25, 1.5, 2
    accuracy = np.array([0.9, 0.7, 0.5, 0.8])  # the line: 0.9, 0.875, 0.85, 0.8
    loss_barrier, accuracy_barrier = barriers(loss, accuracy, alpha)
    assert loss_barrier == pytest.approx(1.5)
    assert accuracy_barrier == pytest.approx(0.35)
    flat = barriers(np.array([2.0, 1.0, 0.5]), np.array([0.5, 0.7, 0.9]), np.linspace(0, 1, 3))
    assert flat[0] == pytest.approx(0.0) and flat[1] == pytest.approx(0.0)  # the ends' own gaps


@pytest.mark.slow  # 5 s at load 3, 105 s at load 15 on the shared 2-core machine
def test_reproduce_rebasin_writes_every_condition_a_figure_and_a_table(tmp_path):
    result = _invoke("rebasin", "--out", str(tmp_path), "--seeds", "0,1", "--epochs", "1",
                     "--alphas", "3")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "rebasin.png").stat().st_size > 0
    table = (tmp_path / "rebasin.md").read_text()
    for label, (align, repair, _, _) in CONDITIONS.items():
        assert f"| {label} | 0-1 | test |" in table
        ds = open_result(tmp_path / f"{label}.nc")
        assert ds.attrs["align"] == (align or "none")
        assert ds.attrs["repair"] == ("rescale" if repair else "none")
        assert ds.attrs["adapter_options"] == '{"widths": [64, 512, 512, 512, 10]}'


def test_reproduce_rebasin_needs_two_seeds(tmp_path):
    result = _invoke("rebasin", "--out", str(tmp_path), "--seeds", "1", "--epochs", "1")
    assert "rebasin needs two or more distinct seeds, not [0]" in str(result.exception)
