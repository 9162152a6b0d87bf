"""The instability analysis of Frankle et al. (2020): how early does SGD noise stop mattering?

Train one parent run of a recipe, saving its state at each spawn epoch K; from each such state
train ``copies`` children that differ only in their data order and augmentations (their
seeds), to the recipe's last epoch; evaluate the linear path between every two children of one
K. A network is *stable* at K when those paths have no error barrier (Frankle et al. call it
unstable above 2 %). The folder::

    DIR/parent/                   the parent run (skipped when finished; or --parent RUN)
    DIR/spawn_KKK/copy_C/         the child of copy C spawned at epoch K (seed S + 1 + C)
    DIR/instability.nc            the result: dims spawn, pair (two copies), group, split, alpha

Finished runs are reused and unfinished ones resumed, so an interrupted analysis continues.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from ckptscope.errors import CkptscopeError
from ckptscope.train.recipe import Recipe
from ckptscope.train.run import INIT, RunOutput, data_spec, run

RESULT = "instability.nc"


@dataclass(frozen=True)
class InstabilityOutput:
    """The runs of an instability analysis and its result."""

    parent: Path
    children: dict[tuple[int, int], RunOutput]  # (K, copy) -> the child run
    result: xr.Dataset
    result_path: Path


def parse_epochs(text: str | Sequence[int]) -> list[int]:
    """``"0,1,2,5"`` (or a list) as distinct non-negative epochs, in increasing order."""
    from ckptscope.train.sweep import parse_seeds

    try:
        epochs = parse_seeds(text)
    except CkptscopeError:
        raise CkptscopeError(f"spawn epochs {text!r} are not a list like 0,1,2,5 (distinct "
                             f"non-negative integers).") from None
    return sorted(epochs)


def spawn_source(parent: Path, epoch: int) -> Path:
    """The parent's file a child spawned at ``epoch`` starts from."""
    return parent / (INIT if epoch == 0 else f"epoch_{epoch:03d}.safetensors")


def child_dir(out: str | os.PathLike, epoch: int, copy: int) -> Path:
    """Where the analysis keeps the child of ``copy`` spawned at ``epoch``."""
    return Path(out) / f"spawn_{epoch:03d}" / f"copy_{copy}"


def instability(recipe: Recipe, *, spawn_at: Sequence[int], out: str | os.PathLike,
                copies: int = 2, seed: int = 0, parent: str | os.PathLike | None = None,
                child_seeds: Sequence[int] | None = None,
                data_dir: str | os.PathLike | None = None, device: str | None = "cpu",
                groups: Sequence[str] | Mapping[str, str] = (), alphas: int = 11,
                split: str = "test", train_options: Mapping[str, object] | None = None,
                on_run: Callable[[str, RunOutput], None] | None = None,
                on_epoch: Callable[[str, dict], None] | None = None,
                progress: Callable[[str, int, int], None] | None = None
                ) -> InstabilityOutput:
    """Spawn ``copies`` children at each epoch of ``spawn_at``, train them, and evaluate the
    paths between each K's children into ``out/instability.nc``.

    Args:
        recipe: what the parent and every child train.
        spawn_at: the epochs K (0: the init; each before ``recipe.epochs``).
        out: the analysis folder.
        copies: children per K (>= 2); every two of one K make a ``pair``.
        seed: the parent's seed (init and its data order up to K).
        parent: an existing run directory to spawn from (trained with ``--save-every`` at
            each K > 0) instead of training ``out/parent``.
        child_seeds: the seed of each copy (default ``seed + 1 + copy``); a copy's seed is the
            same at every K.
        data_dir, device: as for :func:`ckptscope.train.run`; the paths are evaluated on
            ``device`` too.
        groups: groups to evaluate besides the whole model.
        alphas: points per path on [0, 1].
        split: the split the paths are evaluated on.
        train_options: more :func:`ckptscope.train.run` keywords (amp, ...).
        on_run: called as ``on_run(label, run_output)`` after each run (``parent``, ``K/C``).
        on_epoch: called as ``on_epoch(label, record)`` after each epoch of each run.
        progress: called as ``progress(path_label, done, total)`` during the evaluation.

    Raises:
        CkptscopeError: bad spawn epochs, copies or seeds, or a parent run without the state of
            a spawn epoch.
    """
    from ckptscope.engine import EvalConfig
    from ckptscope.linear import linear_paths

    spawns = parse_epochs(spawn_at)
    late = [k for k in spawns if k >= recipe.epochs]
    if late:
        raise CkptscopeError(f"spawn epoch {late[0]} is not before the recipe's last epoch "
                             f"({recipe.epochs}); spawn at 0..{recipe.epochs - 1}.")
    if copies < 2:
        raise CkptscopeError(f"copies={copies}: the instability test compares two or more "
                             f"children per spawn epoch.")
    seeds = list(child_seeds) if child_seeds is not None else [seed + 1 + c
                                                               for c in range(copies)]
    if len(seeds) != copies or len(set(seeds)) != copies:
        raise CkptscopeError(f"child seeds {seeds} must be {copies} distinct seeds, one per copy.")
    options = dict(train_options or {})

    def hook(label):
        return (lambda record: on_epoch(label, record)) if on_epoch else None

    parent_dir = Path(parent) if parent is not None else Path(out) / "parent"
    if parent is None:
        done = run(recipe, seed=seed, out=parent_dir, data_dir=data_dir, device=device,
                   resume=True, save_every=[k for k in spawns if k], on_epoch=hook("parent"),
                   **options)
        if on_run:
            on_run("parent", done)
    missing = [spawn_source(parent_dir, k).name for k in spawns
               if not spawn_source(parent_dir, k).is_file()]
    if missing:
        raise CkptscopeError(
            f"parent run {str(parent_dir)!r} lacks {', '.join(missing[:3])}; spawn at the "
            f"epochs it saved, or train it again (delete it) with these spawn epochs.")
    children: dict[tuple[int, int], RunOutput] = {}
    for k in spawns:
        source = spawn_source(parent_dir, k)
        for c, child_seed in enumerate(seeds):
            label = f"{k}/{c}"
            children[k, c] = run(recipe, seed=child_seed, out=child_dir(out, k, c),
                                 data_dir=data_dir, device=device, resume=True,
                                 spawn_from=source, on_epoch=hook(label), **options)
            _check_lineage(children[k, c], source)
            if on_run:
                on_run(label, children[k, c])
    pairs = [(a, b) for a in range(copies) for b in range(a + 1, copies)]
    paths = {f"{k}:{a}-{b}": (str(children[k, a].final), str(children[k, b].final))
             for k in spawns for a, b in pairs}
    specs = _group_specs(groups)
    swept = linear_paths(paths, recipe.adapter, data_spec(recipe, data_dir), groups=specs,
                         adapter_options=dict(recipe.adapter_options), alphas=alphas,
                         split=split, device=device, config=EvalConfig(seed=recipe.data_seed),
                         progress=progress)
    ds = _result(swept, spawns, pairs, copies, children, attrs={
        "recipe": recipe.name, "parent": str(parent_dir), "parent_seed": int(seed),
        "child_seeds": json.dumps(seeds), "epochs": int(recipe.epochs)})
    from ckptscope.matrix_results import save_matrix

    path = save_matrix(ds, Path(out) / RESULT)
    return InstabilityOutput(parent_dir, children, ds, path)


def _check_lineage(child: RunOutput, source: Path) -> None:
    """Refuse a reused child that was spawned from another state than ``source`` (an earlier
    analysis in the same folder with another ``--parent``)."""
    from ckptscope.checkpoints import file_sha256, load_checkpoint

    notes = json.loads(load_checkpoint(child.final).metadata.get("init", "{}") or "{}")
    if notes.get("spawn_sha256") != file_sha256(source):
        raise CkptscopeError(
            f"{child.out} holds a child spawned from {notes.get('spawned_from', 'another state')}"
            f", not from {source}; choose another --out, or delete {child.out}.")


def _group_specs(groups) -> dict[str, str] | None:
    from ckptscope.groups import normalise_groups

    return normalise_groups(groups) if groups else None


def _result(swept: xr.Dataset, spawns: list[int], pairs: list[tuple[int, int]], copies: int,
            children: Mapping[tuple[int, int], RunOutput], *, attrs: dict) -> xr.Dataset:
    """Reshape the swept paths (run = ``K:a-b``) to (spawn, pair, ...); each child's final
    loss from the whole-model path's end at it (an anchor is evaluated bitwise there)."""
    from ckptscope.groups import WHOLE_MODEL
    from ckptscope.matrix_results import build_instability

    n_g, n_sp, n_a = swept.sizes["group"], swept.sizes["split"], swept.sizes["alpha"]
    shape = (len(spawns), len(pairs))
    loss = swept["loss"].values.reshape(*shape, n_g, n_sp, n_a)
    accuracy = swept["accuracy"].values.reshape(*shape, n_g, n_sp, n_a)
    distance = swept["distance"].values.reshape(*shape, n_g)
    g = [str(x) for x in swept["group"].values].index(WHOLE_MODEL)
    final_loss = np.full((len(spawns), copies, n_sp), np.nan)
    final_accuracy = np.full_like(final_loss, np.nan)
    for p, (a, b) in enumerate(pairs):
        for copy, at in ((a, 0), (b, -1)):
            final_loss[:, copy] = loss[:, p, g, :, at]
            final_accuracy[:, copy] = accuracy[:, p, g, :, at]
    kept = {k: v for k, v in swept.attrs.items()
            if not k.startswith("shape_") and k != "merged_from"}
    return build_instability(
        loss=loss, accuracy=accuracy, distance=distance, alphas=swept["alpha"].values,
        spawns=spawns, pairs=pairs, copies=list(range(copies)), final_loss=final_loss,
        final_accuracy=final_accuracy,
        child_paths=[[str(children[k, c].final) for c in range(copies)] for k in spawns],
        groups=[str(x) for x in swept["group"].values],
        patterns=[str(x) for x in swept["pattern"].values],
        splits=[str(s) for s in swept["split"].values],
        n_examples=swept["n_examples"].values.tolist(), attrs=kept | attrs)


def stability_table(ds: xr.Dataset, *, group: str = "all", split: str | None = None) -> list[dict]:
    """Per spawn epoch: the error and loss barriers (mean, and std over pairs: NaN for one
    pair) and the children's final accuracy (mean over copies)."""
    split = split if split is not None else str(ds["split"].values[0])
    rows = []
    for k in ds["spawn"].values:
        at = {"spawn": k, "group": group, "split": split}
        err = ds["error_barrier"].sel(at).values
        los = ds["midpoint_barrier"].sel(at).values
        rows.append({
            "spawn": int(k), "error_barrier": float(np.mean(err)),
            "error_barrier_std": float(np.std(err, ddof=1)) if err.size > 1 else np.nan,
            "loss_barrier": float(np.mean(los)),
            "loss_barrier_std": float(np.std(los, ddof=1)) if los.size > 1 else np.nan,
            "final_accuracy": float(ds["final_accuracy"].sel(spawn=k, split=split).mean()),
        })
    return rows
