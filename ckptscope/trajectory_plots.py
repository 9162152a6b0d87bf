"""Figures of trajectory and instability results (a leaf: imports matplotlib, never saves).

- :func:`plot_trajectory`: heatmaps of per-path metrics over (start, end), and the "later
  iterates to the final" view (Frankle et al. 2020): each checkpoint's path to the last one,
  and its barriers against the checkpoint's epoch.
- :func:`plot_instability`: the error and loss barriers between children against the epoch
  they were spawned at.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ckptscope.matrix_results import validate_matrix

HEATMAPS = ("chord_barrier", "error_chord_barrier", "distance")
TITLES = {"barrier_height": "loss barrier height", "chord_barrier": "chord barrier",
          "midpoint_barrier": "loss barrier (vs endpoint mean)", "midpoint_loss":
          "loss at alpha = 0.5", "error_barrier": "error barrier (vs endpoint mean)",
          "error_chord_barrier": "error chord barrier", "distance":
          "relative distance"}


def _pick(ds: xr.Dataset, group: str, split: str | None) -> tuple[str, str]:
    groups = [str(g) for g in ds["group"].values]
    if group not in groups:
        raise ValueError(f"group {group!r} is not in the result; it has {groups}.")
    return group, split if split is not None else str(ds["split"].values[0])


def plot_heatmap(ds: xr.Dataset, variable: str = "barrier_height", *, group: str = "all",
                 split: str | None = None, ax=None):
    """Draw one per-path variable of a trajectory over (start, end); paths not evaluated
    (start after end) are left blank. Returns the ``Axes``."""
    import matplotlib.pyplot as plt

    group, split = _pick(ds, group, split)
    at = {"group": group} if variable == "distance" else {"group": group, "split": split}
    values = ds[variable].sel(at).values
    if ax is None:
        _, ax = plt.subplots(figsize=(4.6, 4.0))
    finite = values[np.isfinite(values)]
    top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    image = ax.imshow(np.ma.masked_invalid(values), cmap="magma", origin="upper",
                      aspect="auto", vmin=0.0, vmax=top)
    ax.figure.colorbar(image, ax=ax, shrink=0.85)
    starts = [str(s) for s in ds["start"].values]
    ends = [str(e) for e in ds["end"].values]
    ax.set_yticks(range(len(starts)), [_short(s) for s in starts], fontsize="small")
    ax.set_xticks(range(len(ends)), [_short(e) for e in ends], fontsize="small", rotation=90)
    ax.set_ylabel("start")
    ax.set_xlabel("end")
    if values.size <= 64:
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=6,
                        color="white" if v < 0.5 * top else "black")
    ax.set_title(f"{TITLES.get(variable, variable)} ({group}, {split})", fontsize="medium")
    return ax


def _short(label: str) -> str:
    """``epoch_010`` -> ``10``; other labels as they are."""
    if not label.startswith("epoch_"):
        return label
    return label.removeprefix("epoch_").lstrip("0") or "0"


def plot_to_final(ds: xr.Dataset, *, group: str = "all", split: str | None = None, axes=None):
    """Draw each checkpoint's path to the last checkpoint (loss against alpha, coloured by
    epoch) and the barriers of those paths against the start's epoch. Returns two ``Axes``."""
    import matplotlib.pyplot as plt

    group, split = _pick(ds, group, split)
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    final = str(ds["end"].values[-1])
    at = {"end": final, "group": group, "split": split}
    curves = ds["loss"].sel(at)
    epochs = ds["start_epoch"].values
    starts = [str(s) for s in ds["start"].values]
    cmap = plt.get_cmap("viridis")
    top = max(int(epochs.max()), 1)
    for s, label in enumerate(starts[:-1] if starts[-1] == final else starts):
        axes[0].plot(ds["alpha"].values, curves.sel(start=label).values,
                     color=cmap(epochs[s] / top), label=label if len(starts) <= 8 else None)
    axes[0].set_xlabel(r"$\alpha$ (0: the checkpoint, 1: " + final + ")")
    axes[0].set_ylabel(f"{split} loss")
    axes[0].set_title(f"paths to {final} ({group})", fontsize="medium")
    if len(starts) <= 8:
        axes[0].legend(fontsize="small", frameon=False)
    mask = np.array([s != final for s in starts])
    for variable, style in (("error_chord_barrier", "o-"), ("chord_barrier", "s--")):
        axes[1].plot(epochs[mask], ds[variable].sel(at).values[mask], style,
                     label=TITLES[variable])
    axes[1].set_xlabel("epoch of the start checkpoint")
    axes[1].set_ylabel(f"barrier to {final}")
    axes[1].legend(fontsize="small", frameon=False)
    return axes


def plot_trajectory(ds: xr.Dataset, *, group: str = "all", split: str | None = None,
                    heatmaps: tuple[str, ...] = HEATMAPS, title: str | None = None):
    """Return a figure: the heatmaps of ``heatmaps`` (every pair evaluated) over the
    to-final view (:func:`plot_to_final`)."""
    import matplotlib.pyplot as plt

    validate_matrix(ds)
    full = ds.attrs.get("pairs") == "all" and ds.sizes["end"] > 2
    rows = 2 if full else 1
    fig = plt.figure(figsize=(4.6 * max(len(heatmaps), 2), 4.0 * rows))
    grid = fig.add_gridspec(rows, 2 * max(len(heatmaps), 2))
    if full:
        width = 2 * max(len(heatmaps), 2) // len(heatmaps)
        for i, variable in enumerate(heatmaps):
            plot_heatmap(ds, variable, group=group, split=split,
                         ax=fig.add_subplot(grid[0, i * width:(i + 1) * width]))
    half = max(len(heatmaps), 2)
    plot_to_final(ds, group=group, split=split,
                  axes=[fig.add_subplot(grid[rows - 1, :half]),
                        fig.add_subplot(grid[rows - 1, half:])])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_instability(ds: xr.Dataset, *, group: str = "all", split: str | None = None,
                     title: str | None = None):
    """Return a figure of the error barrier and the loss barrier between children against the
    spawn epoch K: each pair a dot, the mean over pairs a line."""
    import matplotlib.pyplot as plt

    validate_matrix(ds)
    group, split = _pick(ds, group, split)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    k = ds["spawn"].values
    for ax, variable, scale in ((axes[0], "error_barrier", 100.0),
                                (axes[1], "midpoint_barrier", 1.0)):
        values = ds[variable].sel(group=group, split=split).values * scale  # (spawn, pair)
        for p in range(values.shape[1]):
            ax.plot(k, values[:, p], "o", color="tab:blue", alpha=0.35, markersize=4)
        ax.plot(k, values.mean(axis=1), "-", color="tab:blue", linewidth=2, label="mean")
        if k.max() > 20 * max(int(k[k > 0].min()) if (k > 0).any() else 1, 1):
            ax.set_xscale("symlog", linthresh=1)  # K spread over decades, as Frankle's
        ax.set_xlabel("spawn epoch K")
        ax.set_ylabel(TITLES[variable] + (" (%)" if scale != 1 else ""))
        ax.axhline(0, color="0.6", linewidth=0.8)
    axes[0].axhline(2.0, color="tab:red", linestyle=":", linewidth=1, label="2 % (unstable)")
    axes[0].legend(fontsize="small", frameon=False)
    fig.suptitle(title or f"instability: {ds.attrs.get('recipe', '')} ({group}, {split})")
    fig.tight_layout()
    return fig
