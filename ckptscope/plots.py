"""Paper-style figures from a result dataset (a leaf: imports matplotlib, never saves or shows)."""

from __future__ import annotations

import numpy as np
import xarray as xr

from ckptscope.groups import WHOLE_MODEL
from ckptscope.shape import classify, majority, shape_options

VARIABLES = ("loss", "accuracy")
LAYOUTS = ("split", "run")


def _verdict_label(ds: xr.Dataset, group: str, split: str) -> str:
    """``barrier``, or ``barrier 3/10`` over several runs, for the legend."""
    if "shape" not in ds.data_vars:
        return ""
    verdict, count, total = majority(ds["shape"].sel(group=group, split=split).values)
    return verdict if total == 1 else f"{verdict} {count}/{total}"


def plot_path(ds: xr.Dataset, *, variable: str = "loss", split: str | None = None, ax=None,
              title: str | None = None, reference: bool = True, verdicts: bool = True):
    """Draw ``variable`` against alpha, one line per group, the whole-model path dashed.

    With several runs each line is the mean over runs and a band shows +-1 std.

    Args:
        ds: a result dataset (select one condition's runs first with ``ds.sel(run=...)``).
        variable: ``loss`` or ``accuracy``.
        split: the split to draw (default: the first).
        ax: the axes to draw on (default: a new figure's).
        title: the axes title (default: the data and split).
        reference: draw a dotted line at the whole-model value at alpha = 0 (the paper's "level
            of loss at initialization").
        verdicts: put each curve's shape verdict in the legend (for a classified result:
            recomputed from the loss curves with its recorded tolerances).

    Returns:
        The matplotlib ``Axes``.
    """
    import matplotlib.pyplot as plt

    if verdicts and variable == "loss" and "shape" in ds.data_vars:
        # The legend's verdicts come from the curves drawn, never from the stored ones (a file
        # can say anything): classified again with the result's recorded tolerances.
        ds = classify(ds, **shape_options(ds))
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.8))
    split = split if split is not None else str(ds["split"].values[0])
    curves = ds[variable].sel(split=split)
    alpha = ds["alpha"].values
    # Blue is the whole model's (as in the paper); the groups take the other tab10 colours.
    palette = [plt.get_cmap("tab10")(i) for i in range(1, 10)]
    n_group = 0
    for group in ds["group"].values:
        group = str(group)
        runs = curves.sel(group=group)
        mean = runs.mean("run").values
        whole = group == WHOLE_MODEL
        label = "full model" if whole else group
        verdict = _verdict_label(ds, group, split) if verdicts and variable == "loss" else ""
        color = "tab:blue" if whole else palette[n_group % len(palette)]
        n_group += 0 if whole else 1
        ax.plot(alpha, mean, linestyle="--" if whole else "-", color=color,
                linewidth=2 if whole else 1.5, label=f"{label} ({verdict})" if verdict else label)
        if runs.sizes["run"] > 1:
            std = runs.std("run", ddof=1).values  # as aggregate()'s loss_std
            ax.fill_between(alpha, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
    if reference and WHOLE_MODEL in [str(g) for g in ds["group"].values]:
        start = curves.sel(group=WHOLE_MODEL).mean("run").values
        at_zero = np.flatnonzero(np.isclose(alpha, 0.0))
        if at_zero.size:
            ax.axhline(start[at_zero[0]], color="0.5", linestyle=":", linewidth=1)
    ax.set_xlabel(r"$\alpha$")
    ax.set_ylabel(f"{split} {variable}")
    ax.set_title(title if title is not None else f"{ds.attrs.get('data', '')} ({split})")
    ax.legend(fontsize="small", frameon=False)
    return ax


def plot_result(ds: xr.Dataset, *, variables: tuple[str, ...] = ("loss",), layout: str = "split",
                title: str | None = None):
    """Return a figure with one panel per split (``layout="split"``) or per run (``"run"``,
    for results whose runs are conditions), and one row per variable.
    """
    import matplotlib.pyplot as plt

    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}.")
    panels = ([("split", str(s)) for s in ds["split"].values] if layout == "split"
              else [("run", str(r)) for r in ds["run"].values])
    fig, axes = plt.subplots(len(variables), len(panels), squeeze=False,
                             figsize=(5.0 * len(panels), 3.6 * len(variables)))
    for row, variable in enumerate(variables):
        for col, (dim, label) in enumerate(panels):
            sub = ds.sel(run=[label]) if dim == "run" else ds
            split = label if dim == "split" else None
            name = f"run {label}" if dim == "run" else label
            plot_path(sub, variable=variable, split=split, ax=axes[row, col],
                      title=f"{title + ': ' if title else ''}{name}")
    fig.tight_layout()
    return fig
