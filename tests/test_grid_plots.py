"""Figures of grid results: contours, the checkpoints labelled, the paths between them."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest

from ckptscope.errors import CkptscopeError
from ckptscope.grid_plots import plot_grid, plot_grid_result
from ckptscope.planes import plane
from tests.conftest import perturbed

matplotlib.use("Agg")


@pytest.fixture
def plane_ds(mlp_pair):
    from ckptscope.data import load_data

    module, a, b = mlp_pair
    return plane(a, b, perturbed(a, 0.4, 7), module, load_data("spiral:40,30", seed=0),
                 grid=4, groups=["layers.0"], loss="bce")


def test_plot_grid_marks_checkpoints_and_paths(plane_ds):
    ax = plot_grid(plane_ds, group="layers.0")
    assert [t.get_text() for t in ax.texts] == ["A", "B", "C"]
    assert len(ax.lines) == 3  # A-B, A-C, B-C
    xs, ys = ax.collections[-1].get_offsets().T  # the checkpoints' markers
    c = float(plane_ds.c.sel(group="layers.0").values[0])
    np.testing.assert_allclose(xs, [0, 1, c])
    np.testing.assert_allclose(ys, [0, 0, 1])
    assert ax.get_title() == "loss: layers.0 (test)"


def test_plot_grid_survives_nan_and_linear_scale(plane_ds):
    nan = plane_ds.copy(deep=True)
    nan["loss"][:] = np.nan
    ax = plot_grid(nan)
    assert "no finite values" in [t.get_text() for t in ax.texts]
    fig = plot_grid_result(plane_ds, log=False)
    assert len(fig.axes) == 4  # two panels and their colour bars


def test_plot_grid_unknown_names(plane_ds):
    with pytest.raises(CkptscopeError, match="group 'head' is not in the result"):
        plot_grid(plane_ds, group="head")
    with pytest.raises(CkptscopeError, match="variable 'distance' is not one of"):
        plot_grid(plane_ds, variable="distance")
