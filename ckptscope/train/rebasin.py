"""``ckptscope reproduce rebasin``: Git Re-Basin's MNIST MLP result on a CPU.

Two MLPs of width 512 (3 hidden layers, ReLU) trained from different seeds (Adam 1e-3, batch
128) on the shipped 8x8 digits (``mlp512-digits-rebasin``; MNIST with ``data_dir``,
``mlp512-mnist-rebasin``). Per pair of seeds, the whole-model path from A to B under six
conditions: as trained, weight matching, activation matching, each without and with REPAIR.
The barriers are Git Re-Basin's (Ainsworth et al. 2023, eq. 3 and figure 2):

    loss barrier     = max_alpha [ L(alpha) - ((1 - alpha) L(0) + alpha L(1)) ]
    accuracy barrier = max_alpha [ ((1 - alpha) A(0) + alpha A(1)) - A(alpha) ]

on the train and the test split. Git Re-Basin reports a loss barrier near zero after weight
matching for this MLP on MNIST.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import xarray as xr

from ckptscope.errors import CkptscopeError
from ckptscope.train.recipe import load_recipe
from ckptscope.train.reproduce import ReproOutput
from ckptscope.train.run import RunOutput, run
from ckptscope.train.sweep import run_dir

CONDITIONS = {  # label -> (align, repair, colour, line style)
    "none": (None, False, "black", "-"),
    "none+repair": (None, True, "black", ":"),
    "weights": ("weights", False, "tab:blue", "-"),
    "weights+repair": ("weights", True, "tab:blue", ":"),
    "activations": ("activations", False, "tab:orange", "-"),
    "activations+repair": ("activations", True, "tab:orange", ":"),
}
RECIPES = {"digits": "mlp512-digits-rebasin", "mnist": "mlp512-mnist-rebasin"}


def barriers(loss: np.ndarray, accuracy: np.ndarray, alpha: np.ndarray) -> tuple[float, float]:
    """Git Re-Basin's loss and accuracy barriers of one path: loss, accuracy and alpha (n,)."""
    a = np.asarray(alpha, dtype=np.float64)
    line_loss = (1 - a) * loss[0] + a * loss[-1]
    line_acc = (1 - a) * accuracy[0] + a * accuracy[-1]
    return float(np.max(loss - line_loss)), float(np.max(line_acc - accuracy))


def rebasin(out: str | os.PathLike, *, seeds: Sequence[int] = (0, 1), epochs: int | None = None,
            alphas: int = 51, data_dir: str | os.PathLike | None = None, device: str = "cpu",
            on_run: Callable[[str, int, RunOutput], None] | None = None) -> ReproOutput:
    """Train ``seeds`` and evaluate each consecutive pair under the six conditions.

    Args:
        out: the folder: ``out/seed_S`` per run, ``out/<condition>.nc`` per condition.
        seeds: at least two; pairs are (seeds[0], seeds[1]), (seeds[1], seeds[2]), ...
        epochs: overrides the recipe's (digits 30, MNIST 10).
        alphas: points per path.
        data_dir: a folder with MNIST's IDX files; ``None``: the shipped digits.
        device: where to train and evaluate.

    Returns:
        The results per condition (runs labelled ``A-B`` by seed), one row per (condition,
        pair, split) and the figure (not saved).
    """
    from ckptscope.engine import EvalConfig
    from ckptscope.linear import linear_paths
    from ckptscope.results import save_result

    seeds = list(seeds)
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise CkptscopeError(f"rebasin needs two or more distinct seeds, not {seeds}.")
    recipe = load_recipe(RECIPES["mnist" if data_dir else "digits"])
    if epochs is not None:
        recipe = replace(recipe, epochs=int(epochs))
    out = Path(out)
    runs = {}
    for seed in seeds:
        runs[seed] = run(recipe, seed=seed, out=run_dir(out, seed), data_dir=data_dir,
                         device=device, resume=True, checkpoint_every=max(1, recipe.epochs // 5))
        if on_run:
            on_run("rebasin", seed, runs[seed])
    pairs = {f"{a}-{b}": (str(runs[a].final), str(runs[b].final))
             for a, b in zip(seeds[:-1], seeds[1:], strict=True)}
    results, paths, rows = {}, {}, []
    for label, (align, repair, _, _) in CONDITIONS.items():
        ds = linear_paths(pairs, alphas=alphas, split="both", device=device, align=align,
                          repair=repair, config=EvalConfig(seed=0))
        ds.attrs["recipe"] = recipe.name
        paths[label] = save_result(ds, out / f"{label}.nc")
        results[label] = ds
        rows += _rows(label, ds, runs)
    return ReproOutput(results, paths, {"rebasin": runs}, rows, figure=plot_rebasin(results))


def _rows(label: str, ds: xr.Dataset, runs: Mapping[int, RunOutput]) -> list[dict]:
    rows = []
    alpha = ds["alpha"].values
    for pair in map(str, ds["run"].values):
        a, b = (int(s) for s in pair.split("-"))
        for split in map(str, ds["split"].values):
            loss = ds["loss"].sel(run=pair, group="all", split=split).values
            acc = ds["accuracy"].sel(run=pair, group="all", split=split).values
            loss_barrier, acc_barrier = barriers(loss, acc, alpha)
            rows.append({"condition": label, "pair": pair, "split": split,
                         "loss_barrier": loss_barrier, "accuracy_barrier": acc_barrier,
                         "loss_mid": float(loss[len(loss) // 2]),
                         "accuracy_ends": (float(acc[0]), float(acc[-1])),
                         "test_accuracy": (runs[a].last.get("test_accuracy", float("nan")),
                                           runs[b].last.get("test_accuracy", float("nan")))})
    return rows


def barrier_table(rows: Sequence[Mapping]) -> str:
    """A Markdown table: per condition, pair and split the barriers; then per condition and
    split their mean and std over pairs."""
    head = ("| condition | pair (seeds) | split | loss barrier | accuracy barrier | "
            "L(0.5) | accuracy at A, B |\n|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['condition']} | {r['pair']} | {r['split']} | {r['loss_barrier']:.4f} | "
        f"{r['accuracy_barrier']:.4f} | {r['loss_mid']:.4f} | "
        f"{r['accuracy_ends'][0]:.4f}, {r['accuracy_ends'][1]:.4f} |\n" for r in rows)
    groups: dict[tuple, list[Mapping]] = {}
    for r in rows:
        groups.setdefault((r["condition"], r["split"]), []).append(r)
    agg = ("\n| condition | split | pairs | loss barrier mean | std | accuracy barrier mean | "
           "std |\n|---|---|---|---|---|---|---|\n")
    for (condition, split), rs in groups.items():
        lb = np.array([r["loss_barrier"] for r in rs])
        ab = np.array([r["accuracy_barrier"] for r in rs])
        std = (lambda v: f"{v.std(ddof=1):.2g}" if len(v) > 1 else "-")  # noqa: E731
        agg += (f"| {condition} | {split} | {len(rs)} | {lb.mean():.4f} | {std(lb)} | "
                f"{ab.mean():.4f} | {std(ab)} |\n")
    return head + body + agg


def plot_rebasin(results: Mapping[str, xr.Dataset]):
    """Return the figure: test loss and test accuracy along the path per condition, mean over
    pairs."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10.4, 3.8))
    for label, ds in results.items():
        _, _, colour, style = CONDITIONS[label]
        alpha = ds["alpha"].values
        for ax, variable in zip(axes, ("loss", "accuracy"), strict=True):
            curve = ds[variable].sel(group="all", split="test").values.mean(0)
            ax.plot(alpha, curve, color=colour, linestyle=style, label=label)
    first = next(iter(results.values()))
    n = first.sizes["run"]
    for ax, variable in zip(axes, ("test loss", "test accuracy"), strict=True):
        ax.set_xlabel(r"$\alpha$ (A $\to$ B)")
        ax.set_ylabel(variable)
    axes[0].set_title(f"3x512 MLP, {first.attrs.get('data')}: {n} pair(s)")
    axes[1].legend(fontsize="small", frameon=False)
    fig.tight_layout()
    return fig
