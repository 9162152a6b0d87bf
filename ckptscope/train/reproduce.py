"""Reproduction targets: the paper's figures and tables as commands.

``fig1a`` and ``figA17`` run end to end here (train, evaluate, figure, verdict table); the
others are GPU-sized and listed with the commands that regenerate them (``TARGETS``).

Figure 1A: a 2x50 ReLU MLP trained with Adam (5e-4, no wd) on MNIST (batch 128; offline, the
8x8 ``digits`` stand in) and on the spiral (batch 500), three whole-model paths per seed:
theta_i -> theta_f (blue), theta'_i -> theta_f (green; the paper's path "between theta_f and
theta'_i", oriented from the init so that it reads like the blue one) and theta_i -> theta'_i
(black), where theta'_i is a fresh init from an independent random stream of the seed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from ckptscope.adapters import get_adapter
from ckptscope.checkpoints import load_checkpoint, save_checkpoint
from ckptscope.errors import CkptscopeError
from ckptscope.metadata import stored_float
from ckptscope.train.recipe import Recipe, load_recipe
from ckptscope.train.run import RunOutput, read_metrics, run, stream_seed
from ckptscope.train.sweep import run_dir

OTHER_INIT = "other_init.safetensors"
PATHS = {  # label -> (start file, end file, colour, legend)
    "i-f": ("init", "final", "tab:blue", r"$\theta_i \to \theta_f$"),
    "i'-f": ("other", "final", "tab:green", r"$\theta'_i \to \theta_f$"),
    "i-i'": ("init", "other", "black", r"$\theta_i \to \theta'_i$"),
}
FIG1A = {"spiral": "mlp-spiral-fig1a", "digits": "mlp-digits-fig1a"}
FIGA17 = {"50": "mlp6-spiral-50", "500": "mlp6-spiral-500", "mixed": "mlp6-spiral-mixed"}


@dataclass(frozen=True)
class Target:
    """A figure or table of the paper and how to regenerate it."""

    name: str
    description: str
    commands: tuple[str, ...]
    cpu: bool = False


@dataclass(frozen=True)
class ReproOutput:
    """What a reproduction wrote: per panel a result; the figure and the verdict rows."""

    results: dict[str, xr.Dataset]
    result_paths: dict[str, Path]
    runs: dict[str, dict[int, RunOutput]]
    rows: list[dict]
    figure: object = None
    notes: dict = field(default_factory=dict)


def _sweep(name: str, bcast: str = "") -> str:
    return f"ckptscope sweep --recipe {name} --seeds 0-9 --data DIR --out runs/{bcast or name}"


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("fig1a", "MLP 2x50 on MNIST (digits offline) and spiral: theta_i->theta_f, "
           "theta'_i->theta_f, theta_i->theta'_i", ("ckptscope reproduce fig1a --out repro/fig1a",),
           cpu=True),
    Target("figA17", "6-hidden-layer MLPs on the spiral, widths 50 / 500 / 500-25, layer-wise "
           "paths (2000 epochs: hours on 2 CPU cores, minutes on a GPU)",
           ("ckptscope reproduce figA17 --out repro/figA17 --device cuda",), cpu=True),
    Target("rebasin", "Git Re-Basin's MNIST MLP (3x512) on digits (MNIST with --data DIR): "
           "loss and accuracy barriers between two seeds before and after weight / activation "
           "matching, with and without REPAIR",
           ("ckptscope reproduce rebasin --out repro/rebasin",), cpu=True),
    Target("fig1b", "ResNet-18 CIFAR-10 baseline, block-wise paths (also Fig. A11, A18 with "
           "--preset bn-split:layer3)",
           (_sweep("resnet18-cifar10") + " --preset blocks",)),
    Target("fig2a", "pre-trained vs scratch: ResNet-18 CIFAR-10, ResNet-50 CIFAR-100 (ImageNet "
           "weights as torchvision-keyed state dicts)", (
               _sweep("resnet18-cifar10"),
               _sweep("resnet18-cifar10-pretrained") + " --set init_from=resnet18-imagenet.pt",
               _sweep("resnet50-cifar100"),
               _sweep("resnet50-cifar100-pretrained") + " --set init_from=resnet50-imagenet.pt",
               "ckptscope path --pair runs/resnet18-cifar10-pretrained/seed_0/final.safetensors "
               "runs/resnet18-cifar10/seed_1/init.safetensors  # theta_f(pre-trained) to "
               "theta'_i")),
    Target("fig2b", "random-label (adversarial) init vs scratch, no wd", (
        _sweep("resnet18-cifar10-nowd"), _sweep("resnet18-cifar10-random-labels"))),
    Target("fig3", "init at the barrier of no-wd runs (5 runs with barriers); Table A3 and Fig. "
           "A12 with init_alpha = barrier -+ 5/50", (
               _sweep("resnet18-cifar10-nowd"),
               "ckptscope train --recipe resnet18-cifar10-barrier-init --data DIR --set "
               "init_result=runs/resnet18-cifar10-nowd/result.nc --set init_run=seed_S --out "
               "runs/barrier-init/seed_S  # for each run S with a barrier")),
    Target("fig4", "partial (pre-)training: T/P-All with block k reset (RI-k)", (
        "ckptscope sweep --recipe resnet18-cifar10-partial --data DIR --seeds 0-9 --set "
        "init_from=runs/resnet18-cifar10/seed_0/final.safetensors --set "
        "\"reset=['layerK\\.']\" --out runs/partial-T-RI-K",)),
    Target("fig5", "block-wise random-label init, no wd (Fig. A13: --set weight_decay=1e-4, "
           "5e-4)", ("ckptscope sweep --recipe resnet18-cifar10-blockwise-random-labels --data "
                     "DIR --seeds 0-9 --set \"random_labels_blocks=['layerK\\.']\" --preset "
                     "blocks --out runs/rl-block-K",)),
    Target("fig6", "training-set size and augmentation (Fig. A14, A15)", (
        _sweep("resnet18-cifar10-subset") + " --preset blocks --set train_examples=N",
        _sweep("resnet18-cifar10-noaug") + " --preset blocks",
        _sweep("resnet18-cifar10-subset", "subset-noaug") + " --set augment=[] --preset blocks",
        _sweep("resnet18-cifar10-brightness") + " --preset blocks")),
    Target("fig7", "weight decay 0, 1e-4, 5e-4 and larger", tuple(
        _sweep("resnet18-cifar10", f"wd-{wd}") + f" --set weight_decay={wd}"
        for wd in ("0.0", "1e-4", "5e-4", "1e-3", "5e-3"))),
    Target("fig8", "fixed learning rates 0.1, 0.01, 0.001 (distances: ckptscope distance)",
           tuple(_sweep("resnet18-cifar10-fixed-lr", f"fixed-lr-{lr}") + f" --set lr={lr}"
                 for lr in ("0.1", "0.01", "0.001"))),
    Target("fig9", "lr 0.01 for the blocks with barriers (Fig. A16A, Table 2)", (
        _sweep("resnet18-cifar10") + " --preset blocks",
        _sweep("resnet18-cifar10-lr-barrier-blocks") + " --preset blocks")),
    Target("table2", "per-group lr and weight decay for ResNet-18 and VGG-11 (rows: "
           "param_groups on the blocks with / without barriers)", (
               _sweep("resnet18-cifar10-lr-barrier-blocks"),
               _sweep("resnet18-cifar10-wd-barrier-blocks"),
               _sweep("resnet18-cifar10", "lr-nb") + " --set \"param_groups=[{pattern='(?!"
               "layer[23]\\.|layer4\\.0\\.)', lr=0.01}]\"",
               _sweep("vgg11-bn-cifar10-lr-barrier-layers"))),
    Target("fig10", "depth: ResNet-18/34/50 block-wise", tuple(
        _sweep(r) + " --preset blocks" for r in ("resnet18-cifar10", "resnet34-cifar10",
                                                  "resnet50-cifar10"))),
    Target("figA16b", "VGG-11 lr 0.01 for the barrier layers", (
        _sweep("vgg11-bn-cifar10") + " --preset blocks",
        _sweep("vgg11-bn-cifar10-lr-barrier-layers") + " --preset blocks")),
    Target("figA19", "VGG-11 with and without BatchNorm", (
        _sweep("vgg11-bn-cifar10") + " --preset blocks", _sweep("vgg11-cifar10") +
        " --preset blocks")),
)}


# --- training several seeds -------------------------------------------------------------------
def _from_disk(out: Path) -> RunOutput:
    """The RunOutput of a finished run, read back from its directory."""
    final = out / "final.safetensors"
    rate = stored_float(load_checkpoint(final).metadata, "images_per_second", source=str(final))
    return RunOutput(out, out / "init.safetensors", final, read_metrics(out / "metrics.jsonl"),
                     float("nan") if rate is None else rate)


def train_seeds(recipe: Recipe, seeds: Sequence[int], out: Path, *, jobs: int = 1,
                device: str = "cpu", on_run: Callable[[int, RunOutput], None] | None = None
                ) -> dict[int, RunOutput]:
    """Train ``recipe`` for each seed into ``out/seed_S`` on ``device``, ``jobs`` at a time.

    With ``jobs > 1`` each run is a child process (``python -m ckptscope.train.reproduce``)
    with one thread; its result is then that of a one-thread run (the thread count is in the
    checkpoints' metadata). Finished runs are skipped, interrupted ones resumed.
    """
    runs: dict[int, RunOutput] = {}
    every = max(1, recipe.epochs // 10)
    if jobs <= 1:
        for seed in seeds:
            runs[seed] = run(recipe, seed=seed, out=run_dir(out, seed), device=device,
                             resume=True, checkpoint_every=every)
            if on_run:
                on_run(seed, runs[seed])
        return runs
    if device != "cpu":
        raise CkptscopeError(f"jobs={jobs} trains in CPU processes; use jobs=1 on {device}.")
    config = json.dumps(recipe.to_dict())
    pending = list(seeds)
    active: dict[int, subprocess.Popen] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    while pending or active:
        while pending and len(active) < jobs:
            seed = pending.pop(0)
            active[seed] = subprocess.Popen(
                [sys.executable, "-m", "ckptscope.train.reproduce", config, str(seed),
                 str(run_dir(out, seed)), str(every)], env=env)
        for seed, proc in list(active.items()):
            if proc.poll() is None:
                continue
            del active[seed]
            if proc.returncode:
                for other in active.values():
                    other.kill()
                raise CkptscopeError(
                    f"training seed {seed} into {run_dir(out, seed)} failed (exit status "
                    f"{proc.returncode}); rerun with --jobs 1 to see why (finished seeds are "
                    f"kept).")
            runs[seed] = _from_disk(run_dir(out, seed))
            if on_run:
                on_run(seed, runs[seed])
        time.sleep(0.05)
    return {seed: runs[seed] for seed in seeds}


def other_init(recipe: Recipe, seed: int, out: Path) -> Path:
    """Write theta'_i for ``seed``: a fresh init from an independent stream, with the metadata
    of the run's ``init.safetensors`` (so paths to it need no flags)."""
    path = out / OTHER_INIT
    if path.is_file():
        return path
    torch.manual_seed(stream_seed(seed, "other_init"))
    module = get_adapter(recipe.adapter).make(dict(recipe.adapter_options))
    meta = dict(load_checkpoint(out / "init.safetensors").metadata)
    meta.update(role="other_init", seed_stream=f"{seed}:other_init")
    return save_checkpoint(path, module.state_dict(), metadata=meta)


def _rows(panel: str, ds: xr.Dataset, runs: Mapping[int, RunOutput]) -> list[dict]:
    from ckptscope.shape import summary

    rows = []
    for row in summary(ds):
        label, _, seed = row["run"].rpartition(":")
        last = runs[int(seed)].last
        rows.append({"panel": panel, "path": label, "seed": int(seed), **{
            k: row[k] for k in ("group", "split", "loss_start", "loss_max", "alpha_max",
                                "loss_end", "shape", "barrier_height")},
            "test_accuracy": last.get("test_accuracy", float("nan")),
            "train_accuracy": last.get("train_accuracy", float("nan"))})
    return rows


def fig1a(out: str | os.PathLike, *, seeds: Sequence[int] = (0, 1, 2),
          epochs: Mapping[str, int] | None = None, alphas: int = 51, jobs: int = 1,
          panels: Sequence[str] = ("digits", "spiral"), device: str = "cpu",
          on_run: Callable[[str, int, RunOutput], None] | None = None,
          progress: Callable[[str, int, int], None] | None = None) -> ReproOutput:
    """Figure 1A end to end: train, evaluate the three paths per seed, draw, tabulate.

    Args:
        out: the folder; ``out/<panel>/seed_S`` per run and ``out/<panel>/result.nc``.
        seeds: the seeds (default three).
        epochs: panel -> epochs, overriding the recipes (spiral 2000, digits 300).
        alphas: points per path.
        jobs: runs trained at once (one thread each when > 1).
        panels: ``digits`` (the MNIST stand-in) and/or ``spiral``.
        on_run, progress: callbacks for finished runs and the evaluation.

    Returns:
        The results (runs labelled ``<path>:<seed>``, path one of ``i-f``, ``i'-f``,
        ``i-i'``), the verdict rows and the figure (not saved).
    """
    from ckptscope.engine import EvalConfig
    from ckptscope.linear import linear_paths
    from ckptscope.results import save_result

    unknown = [p for p in panels if p not in FIG1A]
    if unknown:
        raise CkptscopeError(f"fig1a panel {unknown[0]!r} is not one of {sorted(FIG1A)}.")
    out = Path(out)
    results, paths, all_runs, rows = {}, {}, {}, []
    for panel in panels:
        recipe = load_recipe(FIG1A[panel])
        if epochs and panel in epochs:
            recipe = replace(recipe, epochs=int(epochs[panel]))
        folder = out / panel
        runs = train_seeds(recipe, seeds, folder, jobs=jobs, device=device,
                           on_run=(lambda s, r, p=panel: on_run(p, s, r)) if on_run else None)
        files = {}
        for seed in seeds:
            d = run_dir(folder, seed)
            files[seed] = {"init": d / "init.safetensors", "final": d / "final.safetensors",
                           "other": other_init(recipe, seed, d)}
        pairs = {f"{label}:{seed}": (str(files[seed][a]), str(files[seed][b]))
                 for label, (a, b, _, _) in PATHS.items() for seed in seeds}
        ds = linear_paths(pairs, alphas=alphas, split="test", device=device,
                          config=EvalConfig(seed=recipe.data_seed),
                          progress=(lambda run, d, t, p=panel: progress(f"{p} {run}", d, t))
                          if progress else None)
        ds.attrs["recipe"] = recipe.name
        paths[panel] = save_result(ds, folder / "result.nc")
        results[panel], all_runs[panel] = ds, runs
        rows += _rows(panel, ds, runs)
    return ReproOutput(results, paths, all_runs, rows, figure=plot_fig1a(results))


def plot_fig1a(results: Mapping[str, xr.Dataset]):
    """Return the figure: per panel the test loss of the three paths, mean +- std over seeds,
    the legend counting each path's verdicts."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 3.8), squeeze=False)
    for ax, (panel, ds) in zip(axes[0], results.items(), strict=True):
        alpha = ds["alpha"].values
        for label, (_, _, colour, legend) in PATHS.items():
            runs = [r for r in map(str, ds["run"].values) if r.rpartition(":")[0] == label]
            loss = ds["loss"].sel(run=runs, group="all", split="test").values  # (seed, alpha)
            shapes = [str(s) for s in ds["shape"].sel(run=runs, group="all",
                                                      split="test").values]
            counts = ", ".join(f"{s} {shapes.count(s)}/{len(shapes)}"
                               for s in sorted(set(shapes)))
            mean = loss.mean(0)
            ax.plot(alpha, mean, color=colour, label=f"{legend} ({counts})")
            if len(runs) > 1:
                std = loss.std(0, ddof=1)
                ax.fill_between(alpha, mean - std, mean + std, color=colour, alpha=0.2,
                                linewidth=0)
        ax.set_xlabel(r"$\alpha$")
        ax.set_ylabel("test loss")
        title = "digits (MNIST stand-in)" if panel == "digits" else panel
        ax.set_title(f"{title}: 2x50 MLP, {len(runs)} seeds")
        ax.legend(fontsize="small", frameon=False)
    fig.tight_layout()
    return fig


def figa17(out: str | os.PathLike, *, seeds: Sequence[int] = (0,), epochs: int | None = None,
           alphas: int = 51, jobs: int = 1, widths: Sequence[str] = ("50", "500", "mixed"),
           device: str = "cpu",
           on_run: Callable[[str, int, RunOutput], None] | None = None,
           progress: Callable[[str, int, int], None] | None = None) -> ReproOutput:
    """Figure A17: 6-hidden-layer MLPs on the spiral, whole-model and layer-wise paths.

    Args:
        out: the folder; ``out/<widths>/seed_S`` and ``out/<widths>/result.nc``.
        seeds: the seeds (default one).
        epochs: overrides the recipes' 2000.
        widths: any of ``50``, ``500``, ``mixed`` (500 for hidden layers 1-4, 25 for 5-6).
    """
    import matplotlib.pyplot as plt

    from ckptscope.engine import EvalConfig
    from ckptscope.linear import linear_paths
    from ckptscope.plots import plot_path
    from ckptscope.results import save_result

    unknown = [w for w in widths if w not in FIGA17]
    if unknown:
        raise CkptscopeError(f"figA17 widths {unknown[0]!r} is not one of {sorted(FIGA17)}.")
    out = Path(out)
    results, paths, all_runs, rows = {}, {}, {}, []
    for name in widths:
        recipe = load_recipe(FIGA17[name])
        if epochs is not None:
            recipe = replace(recipe, epochs=int(epochs))
        folder = out / name
        runs = train_seeds(recipe, seeds, folder, jobs=jobs, device=device,
                           on_run=(lambda s, r, n=name: on_run(n, s, r)) if on_run else None)
        keys = list(load_checkpoint(runs[seeds[0]].init).state)
        groups = get_adapter("mlp").presets["layers"](keys)
        pairs = {f"i-f:{s}": (str(r.init), str(r.final)) for s, r in runs.items()}
        ds = linear_paths(pairs, groups=groups, alphas=alphas, split="test", device=device,
                          config=EvalConfig(seed=recipe.data_seed),
                          progress=(lambda run, d, t, n=name: progress(f"{n} {run}", d, t))
                          if progress else None)
        ds.attrs["recipe"] = recipe.name
        paths[name] = save_result(ds, folder / "result.nc")
        results[name], all_runs[name] = ds, runs
        rows += _rows(name, ds, runs)
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 3.8), squeeze=False)
    for ax, (name, ds) in zip(axes[0], results.items(), strict=True):
        acc = np.mean([r.last.get("test_accuracy", np.nan) for r in all_runs[name].values()])
        plot_path(ds, variable="loss", split="test", ax=ax,
                  title=f"widths {name}: test acc {acc:.4f}")
    fig.tight_layout()
    return ReproOutput(results, paths, all_runs, rows, figure=fig)


def verdict_table(rows: Sequence[Mapping]) -> str:
    """A Markdown table of the rows, then per (panel, path, group) the verdict counts and the
    barrier height's mean and std over seeds."""
    head = ("| panel | path | group | seed | test acc | L(0) | L(max) | at alpha | L(1) | "
            "shape | barrier |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['panel']} | {r['path']} | {r['group']} | {r['seed']} | "
        f"{r['test_accuracy']:.4f} | {r['loss_start']:.4g} | {r['loss_max']:.4g} | "
        f"{r['alpha_max']:.2f} | {r['loss_end']:.4g} | {r['shape']} | "
        f"{r['barrier_height']:.3g} |\n" for r in rows)
    keys: dict[tuple, list[Mapping]] = {}
    for r in rows:
        keys.setdefault((r["panel"], r["path"], r["group"]), []).append(r)
    agg = ("\n| panel | path | group | n | verdicts | barrier height mean | std | test acc "
           "mean |\n|---|---|---|---|---|---|---|---|\n")
    for (panel, path, group), rs in keys.items():
        shapes = [r["shape"] for r in rs]
        heights = np.array([r["barrier_height"] for r in rs], dtype=float)
        accs = np.array([r["test_accuracy"] for r in rs], dtype=float)
        counts = ", ".join(f"{s} {shapes.count(s)}" for s in sorted(set(shapes)))
        std = heights.std(ddof=1) if len(rs) > 1 else float("nan")
        agg += (f"| {panel} | {path} | {group} | {len(rs)} | {counts} | {heights.mean():.3g} | "
                f"{std:.2g} | {accs.mean():.4f} |\n")
    return head + body + agg


def _worker(config: str, seed: str, out: str, every: str) -> None:
    """Train one seed in a child process (``train_seeds`` with ``jobs > 1``)."""
    torch.set_num_threads(1)
    run(Recipe(**json.loads(config)), seed=int(seed), out=out, device="cpu", resume=True,
        checkpoint_every=int(every))


if __name__ == "__main__":
    _worker(*sys.argv[1:5])
