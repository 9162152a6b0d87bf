"""The instability test and the trajectories of the CPU-sized recipes, measured over seeds.

Usage: python benchmarks/instability.py --out runs/instability [--seeds 0-2] [--threads 1]

For the spiral and digits MLPs (shortened so the whole measurement takes minutes on two
cores; the overrides are in ``RECIPES``), and each parent seed: train the parent, spawn two
children at each K of ``SPAWN_AT`` (seeds S + 1, S + 2), train them to the end and evaluate
the path between them (``ckptscope.train.instability.instability``); then evaluate the
trajectory of the parent's saved checkpoints (``ckptscope.trajectory``, every pair).

Writes OUT/summary.md (the tables docs/trajectories.md quotes), docs/instability.png (error
barrier against K, mean and std over seeds) and docs/trajectory.png (the first seed's spiral
parent: heatmaps and the to-final view).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from ckptscope.train import load_recipe, override
from ckptscope.train.instability import instability, stability_table
from ckptscope.train.sweep import parse_seeds
from ckptscope.trajectories import trajectory

RECIPES = {  # recipe -> overrides that keep one run to seconds on a shared CPU core
    "mlp-spiral-fig1a": {"epochs": 24, "lr": 0.005, "batch_size": 100,
                         "data": "spiral:4000,2000", "eval_train": False},
    "mlp-digits-fig1a": {"epochs": 30, "eval_train": False},
}
SPAWN_AT = [0, 1, 2, 4, 8, 16]
ROOT = Path(__file__).resolve().parent.parent


def _sets(changes: dict) -> str:
    """The overrides as ``--set`` options of the CLI."""
    def literal(v):
        if isinstance(v, bool):
            return str(v).lower()
        return f"\"'{v}'\"" if isinstance(v, str) else str(v)

    return " ".join(f"--set {k}={literal(v)}" for k, v in changes.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", default="0-2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--alphas", type=int, default=11)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = parse_seeds(args.seeds)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"# Instability and trajectories: {stamp}",
             "", f"- machine: {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
             f"- seeds: {seeds}; spawn at K = {SPAWN_AT}; 2 copies; {args.alphas} alphas", ""]
    curves: dict[str, np.ndarray] = {}
    first_trajectory = None
    started = time.monotonic()
    for name, changes in RECIPES.items():
        recipe = override(load_recipe(name), changes)
        per_seed, final_acc, traj_rows = [], [], []
        t0 = time.monotonic()
        for seed in seeds:
            out = instability(recipe, spawn_at=SPAWN_AT, copies=2, seed=seed,
                              out=args.out / name / f"seed_{seed}", alphas=args.alphas)
            rows = stability_table(out.result)
            per_seed.append([r["error_barrier"] for r in rows])
            final_acc.append([r["final_accuracy"] for r in rows])
            loss_rows = [r["loss_barrier"] for r in rows]
            per_seed[-1] = per_seed[-1] + loss_rows
            ds = trajectory(out.parent, alphas=args.alphas, device="cpu")
            if first_trajectory is None:
                first_trajectory = (name, seed, ds)
            at = {"end": "final", "group": "all", "split": "test"}
            traj_rows.append((ds["start_epoch"].values[:-1],
                              ds["error_chord_barrier"].sel(at).values[:-1],
                              ds["chord_barrier"].sel(at).values[:-1],
                              ds["distance"].sel(end="final", group="all").values[:-1]))
        seconds = time.monotonic() - t0
        values = np.array(per_seed)  # (seed, 2 K): error barriers then loss barriers
        k = len(SPAWN_AT)
        err, los, acc = values[:, :k], values[:, k:], np.array(final_acc)
        curves[name] = err
        lines += [f"## {name}", "",
                  f"`ckptscope instability --recipe {name} {_sets(changes)} --spawn-at "
                  f"{','.join(map(str, SPAWN_AT))} --copies 2 --seed S --out DIR` for S in "
                  f"{seeds} ({seconds:.0f} s in all, trajectories included)", "",
                  "| K | error barrier % (mean +- std over seeds) | loss barrier | children's "
                  "final test accuracy |", "|---|---|---|---|"]
        for i, kk in enumerate(SPAWN_AT):
            spread = 100 * err[:, i].std(ddof=1)
            lines.append(f"| {kk} | {100 * err[:, i].mean():.2f} +- {spread:.2f}"
                         f" | {los[:, i].mean():.4f} +- {los[:, i].std(ddof=1):.4f} | "
                         f"{acc[:, i].mean():.4f} |")
        lines += ["", "Trajectory of each parent (`ckptscope trajectory DIR/parent`): paths "
                  "from each saved epoch to the final", "",
                  "| start epoch | error chord barrier % | loss chord barrier | distance to "
                  "final |", "|---|---|---|---|"]
        epochs = traj_rows[0][0]
        for i, e in enumerate(epochs):
            e_cb = np.array([r[1][i] for r in traj_rows])
            l_cb = np.array([r[2][i] for r in traj_rows])
            dist = np.array([r[3][i] for r in traj_rows])
            lines.append(f"| {int(e)} | {100 * e_cb.mean():.2f} +- {100 * e_cb.std(ddof=1):.2f}"
                         f" | {l_cb.mean():.4f} +- {l_cb.std(ddof=1):.4f} | "
                         f"{dist.mean():.4f} +- {dist.std(ddof=1):.4f} |")
        lines.append("")
    lines.append(f"Total: {time.monotonic() - started:.0f} s.")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    _figures(curves, first_trajectory, seeds)
    print("\n".join(lines))


def _figures(curves: dict, first, seeds) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ckptscope.trajectory_plots import plot_trajectory

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, err in curves.items():
        mean, std = 100 * err.mean(axis=0), 100 * err.std(axis=0, ddof=1)
        ax.errorbar(SPAWN_AT, mean, yerr=std, marker="o", capsize=3, label=name)
    ax.axhline(2.0, color="tab:red", linestyle=":", linewidth=1, label="2 % (unstable)")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("spawn epoch K")
    ax.set_ylabel("error barrier between children (%)")
    ax.set_title(f"instability, mean +- std over {len(seeds)} parent seeds")
    ax.legend(fontsize="small", frameon=False)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "instability.png", dpi=110)
    name, seed, ds = first
    fig = plot_trajectory(ds, title=f"{name} (shortened), parent seed {seed}")
    fig.savefig(ROOT / "docs" / "trajectory.png", dpi=90)


if __name__ == "__main__":
    main()
