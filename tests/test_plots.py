"""Figures: which artists plot_path and plot_result draw (structure, never pixels)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402

from ckptscope.plots import plot_path, plot_result  # noqa: E402
from ckptscope.results import RunInfo, build_result  # noqa: E402
from ckptscope.shape import classify  # noqa: E402

ALPHA = np.linspace(0.0, 1.0, 11)
BUMP = 2.0 - 1.5 * ALPHA + 0.6 * np.exp(-((ALPHA - 0.5) ** 2) / 0.01)   # a barrier
DECAY = 0.5 + 1.5 * np.exp(-6 * ALPHA)                                  # monotonic
LATE = np.where(ALPHA < 0.8, 2.0, 2.0 - 1.5 * (ALPHA - 0.8) / 0.2)      # a plateau


def make_result(curves=(BUMP, DECAY, LATE), *, groups=("all", "layer1", "layer2"), runs=1,
                splits=("test",), spread=0.1, classified=True):
    """A result whose run r adds r * spread to every curve; accuracy rises from 0.2 to 0.9."""
    curves = np.asarray(curves, dtype=np.float64)
    shape = (runs, len(groups), len(splits), len(ALPHA))
    offset = spread * np.arange(runs)[:, None, None, None]
    loss = np.broadcast_to(curves[None, :, None, :], shape) + offset
    accuracy = np.broadcast_to(np.linspace(0.2, 0.9, len(ALPHA)), shape).copy()
    ds = build_result(
        loss=loss, accuracy=accuracy, distance=np.ones((runs, len(groups))), alphas=ALPHA,
        groups=list(groups), patterns=[".*"] + [f"g{i}" for i in range(len(groups) - 1)],
        n_tensors=[2] * len(groups), n_params=[10] * len(groups), splits=list(splits),
        n_examples=[100] * len(splits), runs=[RunInfo(f"seed{r}") for r in range(runs)],
        attrs={"data": "spiral"},
    )
    return classify(ds) if classified else ds


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def curve_lines(ax):
    """The group lines: every line but the dotted reference."""
    return [line for line in ax.get_lines() if line.get_linestyle() != ":"]


def reference_lines(ax):
    return [line for line in ax.get_lines() if line.get_linestyle() == ":"]


def bands(ax):
    return [c for c in ax.collections if isinstance(c, PolyCollection)]


def legend_labels(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


# --- plot_path -------------------------------------------------------------------------------
def test_plot_path_one_line_per_group_whole_model_dashed():
    ax = plot_path(make_result())
    lines = curve_lines(ax)
    assert len(lines) == 3
    assert [line.get_linestyle() for line in lines] == ["--", "-", "-"]
    assert lines[0].get_linewidth() > lines[1].get_linewidth()
    for line, curve in zip(lines, (BUMP, DECAY, LATE), strict=True):
        np.testing.assert_allclose(line.get_xdata(), ALPHA)
        np.testing.assert_allclose(line.get_ydata(), curve)
    # the group lines never share the whole model's colour
    whole = lines[0].get_color()
    assert all(line.get_color() != whole for line in lines[1:])
    assert lines[1].get_color() != lines[2].get_color()


def test_plot_path_legend_labels_carry_verdicts():
    ax = plot_path(make_result())
    assert legend_labels(ax) == [
        "full model (barrier)", "layer1 (monotonic)", "layer2 (plateau)"]


def test_plot_path_legend_counts_verdicts_over_runs():
    ax = plot_path(make_result(runs=3))
    assert legend_labels(ax) == [
        "full model (barrier 3/3)", "layer1 (monotonic 3/3)", "layer2 (plateau 3/3)"]


@pytest.mark.parametrize("kwargs, ds_kwargs", [
    ({"verdicts": False}, {}),
    ({"variable": "accuracy"}, {}),
    ({}, {"classified": False}),
])
def test_plot_path_legend_without_verdicts(kwargs, ds_kwargs):
    ax = plot_path(make_result(**ds_kwargs), **kwargs)
    assert legend_labels(ax) == ["full model", "layer1", "layer2"]


def test_plot_path_no_band_for_one_run():
    ax = plot_path(make_result(runs=1))
    assert bands(ax) == []


def test_plot_path_band_per_group_with_several_runs():
    runs, spread = 3, 0.1
    ax = plot_path(make_result(runs=runs, spread=spread))
    assert len(bands(ax)) == 3
    lines = curve_lines(ax)
    # each line is the mean over runs: the curve shifted by the mean offset
    np.testing.assert_allclose(lines[1].get_ydata(), DECAY + spread)
    offsets = spread * np.arange(runs)
    # the population std (ddof=0, the band today) or the sample std (ddof=1, aggregate's)
    stds = [pytest.approx(np.std(offsets, ddof=d)) for d in (0, 1)]
    for band, line in zip(bands(ax), lines, strict=True):
        assert band.get_facecolor()[0][:3] == pytest.approx(
            matplotlib.colors.to_rgba(line.get_color())[:3])
        xy = band.get_paths()[0].vertices
        for i, a in enumerate(ALPHA):
            ys = xy[np.isclose(xy[:, 0], a), 1]
            assert (ys.max() + ys.min()) / 2 == pytest.approx(line.get_ydata()[i])
            assert (ys.max() - ys.min()) / 2 in stds


def test_plot_path_reference_line_at_whole_model_start():
    ds = make_result(runs=2, spread=0.2)
    ax = plot_path(ds)
    [ref] = reference_lines(ax)
    start = float(ds.loss.sel(group="all", split="test", alpha=0.0).mean("run"))
    assert list(ref.get_ydata()) == [pytest.approx(start)] * 2
    assert start == pytest.approx(BUMP[0] + 0.1)


def test_plot_path_reference_can_be_left_out():
    assert reference_lines(plot_path(make_result(), reference=False)) == []


def test_plot_path_no_reference_without_whole_model():
    ds = make_result((DECAY, LATE), groups=("layer1", "layer2"))
    ax = plot_path(ds)
    assert reference_lines(ax) == []
    assert [line.get_linestyle() for line in curve_lines(ax)] == ["-", "-"]


def test_plot_path_no_reference_when_alpha_zero_is_off_the_grid():
    ds = make_result().assign_coords(alpha=ALPHA * 0.8 + 0.1)
    assert reference_lines(plot_path(ds)) == []


def test_plot_path_split_labels_and_title():
    ds = make_result(splits=("test", "train"))
    ax = plot_path(ds)
    assert ax.get_ylabel() == "test loss" and ax.get_title() == "spiral (test)"
    ax = plot_path(ds, split="train", variable="accuracy", title="mine")
    assert ax.get_ylabel() == "train accuracy" and ax.get_title() == "mine"
    np.testing.assert_allclose(curve_lines(ax)[0].get_ydata(), np.linspace(0.2, 0.9, 11))


def test_plot_path_draws_on_the_given_axes():
    fig, (left, right) = plt.subplots(1, 2)
    assert plot_path(make_result(), ax=right) is right
    assert left.get_lines() == [] and len(curve_lines(right)) == 3
    assert len(plt.get_fignums()) == 1


# --- plot_result -----------------------------------------------------------------------------
@pytest.mark.parametrize("splits, variables, shape", [
    (("test",), ("loss",), (1, 1)),
    (("test", "train"), ("loss",), (1, 2)),
    (("test", "train"), ("loss", "accuracy"), (2, 2)),
    (("test",), ("loss", "accuracy"), (2, 1)),
])
def test_plot_result_one_panel_per_split_and_variable(splits, variables, shape):
    fig = plot_result(make_result(splits=splits, runs=2), variables=variables)
    axes = np.array(fig.axes).reshape(shape)
    for row, variable in enumerate(variables):
        for col, split in enumerate(splits):
            ax = axes[row, col]
            assert ax.get_ylabel() == f"{split} {variable}"
            assert ax.get_title() == split
            assert len(curve_lines(ax)) == 3 and len(bands(ax)) == 3


def test_plot_result_run_layout_one_panel_per_run_without_bands():
    ds = make_result(runs=3)
    fig = plot_result(ds, layout="run", title="lr sweep")
    assert len(fig.axes) == 3
    assert [ax.get_title() for ax in fig.axes] == [
        "lr sweep: run seed0", "lr sweep: run seed1", "lr sweep: run seed2"]
    for r, ax in enumerate(fig.axes):
        assert bands(ax) == []
        np.testing.assert_allclose(curve_lines(ax)[0].get_ydata(), BUMP + 0.1 * r)
        assert legend_labels(ax)[0] == "full model (barrier)"


def test_plot_result_run_layout_with_both_variables():
    fig = plot_result(make_result(runs=2), variables=("loss", "accuracy"), layout="run")
    axes = np.array(fig.axes).reshape(2, 2)
    assert [ax.get_ylabel() for ax in axes[1]] == ["test accuracy"] * 2


def test_plot_result_unknown_layout_raises():
    with pytest.raises(ValueError, match="layout 'grid' is not one of"):
        plot_result(make_result(), layout="grid")


def test_verdict_label_tie_goes_to_barrier():
    from ckptscope.shape import majority

    assert majority(["monotonic", "barrier"]) == ("barrier", 1, 2)
    assert majority(["plateau", "monotonic"]) == ("plateau", 1, 2)
    assert majority(["barrier", "invalid", "barrier"]) == ("invalid", 1, 3)
