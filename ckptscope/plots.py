"""Paper-style figures from a result dataset (a leaf: imports matplotlib, never saves or shows)."""

from __future__ import annotations

import xarray as xr

from ckptscope.groups import WHOLE_MODEL


def plot_path(
    ds: xr.Dataset,
    *,
    variable: str = "loss",
    split: str | None = None,
    ax=None,
    title: str | None = None,
):
    """Draw ``variable`` against alpha, one line per group, the whole-model path dashed.

    With several runs the line is the mean over runs and a band shows +-1 std.

    Args:
        ds: a result dataset.
        variable: ``loss`` or ``accuracy``.
        split: the split to draw (default: the first).
        ax: the axes to draw on (default: a new figure's).
        title: the axes title (default: the data and split).

    Returns:
        The matplotlib ``Axes``.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.8))
    split = split if split is not None else str(ds["split"].values[0])
    curves = ds[variable].sel(split=split)
    alpha = ds["alpha"].values
    # Blue is the whole model's (as in the paper); the groups take the other tab10 colours.
    palette = [plt.get_cmap("tab10")(i) for i in range(1, 10)]
    n_group = 0
    for group in ds["group"].values:
        runs = curves.sel(group=group)
        mean, std = runs.mean("run").values, runs.std("run").values
        whole = str(group) == WHOLE_MODEL
        (line,) = ax.plot(
            alpha,
            mean,
            linestyle="--" if whole else "-",
            color="tab:blue" if whole else palette[n_group % len(palette)],
            linewidth=2 if whole else 1.5,
            label="full model" if whole else str(group),
        )
        n_group += 0 if whole else 1
        if runs.sizes["run"] > 1:
            ax.fill_between(alpha, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel(r"$\alpha$")
    ax.set_ylabel(f"{split} {variable}")
    ax.set_title(title if title is not None else f"{ds.attrs.get('data', '')} ({split})")
    ax.legend(fontsize="small", frameon=False)
    return ax
