"""Figures of grid results (planes and surfaces): filled contours with the checkpoints marked and
the straight paths between them drawn (a leaf: imports matplotlib, never saves or shows)."""

from __future__ import annotations

import numpy as np
import xarray as xr

from ckptscope.errors import CkptscopeError

GRID_VARIABLES = ("loss", "accuracy")
LEVELS = 20


def _pick(ds: xr.Dataset, dim: str, value: str | None) -> str:
    labels = [str(v) for v in ds[dim].values]
    if value is None:
        return labels[0]
    if value not in labels:
        raise CkptscopeError(f"{dim} {value!r} is not in the result; it has {labels}.")
    return value


def plot_grid(ds: xr.Dataset, *, variable: str = "loss", group: str | None = None,
              split: str | None = None, run: str | None = None, log: bool | None = None,
              levels: int = LEVELS, ax=None, title: str | None = None):
    """Draw one (run, group, split) of a grid result as filled contours.

    The checkpoints are marked and labelled (``anchor_x``/``anchor_y``) and, where there are
    several, the straight paths between them drawn as dashed lines.

    Args:
        ds: a grid result (:func:`ckptscope.plane` or :func:`ckptscope.surface`).
        variable: ``loss`` or ``accuracy``.
        group, split, run: which slice (default: the first of each).
        log: log-scaled colours; default: for the loss when every value is positive.
        levels: the number of contour levels.
        ax: the axes to draw on (default: a new figure's).
        title: the axes title (default: variable, group and split).

    Returns:
        The matplotlib ``Axes``.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    if variable not in GRID_VARIABLES:
        raise CkptscopeError(f"variable {variable!r} is not one of {GRID_VARIABLES}.")
    group, split, run = (_pick(ds, "group", group), _pick(ds, "split", split),
                         _pick(ds, "run", run))
    if ax is None:
        _, ax = plt.subplots(figsize=(5.2, 4.4))
    z = ds[variable].sel(run=run, group=group, split=split).values  # (y, x)
    x, y = ds["x"].values, ds["y"].values
    finite = z[np.isfinite(z)]
    positive = finite.size > 0 and bool((finite > 0).all())
    log = (variable == "loss" and positive) if log is None else (log and positive)
    masked = np.ma.masked_invalid(z)
    if finite.size == 0:
        ax.text(0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center")
        filled = None
    elif log and finite.max() > finite.min():
        bounds = np.geomspace(finite.min(), finite.max(), levels + 1)
        filled = ax.contourf(x, y, masked, levels=bounds, norm=LogNorm(), cmap="viridis")
        ax.contour(x, y, masked, levels=bounds, colors="k", linewidths=0.3, alpha=0.4)
    else:
        cmap = "viridis" if variable == "loss" else "magma"
        filled = ax.contourf(x, y, masked, levels=levels, cmap=cmap)
        ax.contour(x, y, masked, levels=filled.levels, colors="k", linewidths=0.3, alpha=0.4)
    if filled is not None:
        bar = ax.figure.colorbar(filled, ax=ax)
        if log:  # a contour colour bar under LogNorm labels no level by default
            ticks = filled.levels[:: max(1, len(filled.levels) // 6)]
            bar.set_ticks(ticks, labels=[f"{t:.3g}" for t in ticks])
            bar.minorticks_off()
        bar.set_label(f"{split} {variable}{' (log)' if log else ''}")
    _anchors(ds, ax, run=run, group=group)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(title if title is not None else f"{variable}: {group} ({split})")
    return ax


def _anchors(ds: xr.Dataset, ax, *, run: str, group: str) -> None:
    """The checkpoints as labelled points, and the straight paths between every two."""
    names = [str(a) for a in ds["anchor"].values]
    ax_ = ds["anchor_x"].sel(run=run, group=group).values
    ay = ds["anchor_y"].sel(run=run, group=group).values
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            ax.plot([ax_[i], ax_[j]], [ay[i], ay[j]], color="white", linestyle="--",
                    linewidth=1.2)
    ax.scatter(ax_, ay, s=40, color="white", edgecolor="black", zorder=3)
    for name, px, py in zip(names, ax_, ay, strict=True):
        ax.annotate(name, (px, py), xytext=(5, 5), textcoords="offset points", color="white",
                    fontweight="bold", fontsize="medium")


def plot_grid_result(ds: xr.Dataset, *, variables: tuple[str, ...] = GRID_VARIABLES,
                     group: str | None = None, split: str | None = None,
                     log: bool | None = None, title: str | None = None):
    """Return a figure with one panel per variable (loss, accuracy) for one group and split."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(variables), squeeze=False,
                             figsize=(5.2 * len(variables), 4.4))
    group = _pick(ds, "group", group)
    split = _pick(ds, "split", split)
    for col, variable in enumerate(variables):
        plot_grid(ds, variable=variable, group=group, split=split,
                  log=log if variable == "loss" else False, ax=axes[0, col],
                  title=f"{title + ': ' if title else ''}{variable}, {group} ({split})")
    fig.tight_layout()
    return fig
