"""Trajectories: the linear paths between the checkpoints of one training run.

A run directory written by ``ckptscope train --save-every K`` holds ``init``, ``epoch_XXX`` and
``final`` checkpoints. :func:`trajectory` evaluates the path between every pair of them in
training order (``start`` before ``end``), or from each one to the final only (``to_final``,
the "later iterates to the final" view of Frankle et al. 2020), as one sweep:

    checkpoints (each file read once) -> pairs -> linear_paths (one evaluator) -> matrices

The result has two checkpoint dims, ``start`` and ``end`` (``docs/results.md``): curves
``loss``/``accuracy`` (start, end, group, split, alpha) and per path ``barrier_height``,
``chord_barrier``, ``midpoint_barrier``, ``midpoint_loss``, ``error_barrier``,
``error_chord_barrier`` and ``distance``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from ckptscope.checkpoints import Checkpoint, load_checkpoint
from ckptscope.engine import EvalConfig
from ckptscope.errors import CkptscopeError
from ckptscope.groups import WHOLE_MODEL
from ckptscope.keys import strip_given
from ckptscope.linear import Model, linear_paths
from ckptscope.matrix_results import CheckpointInfo, build_trajectory
from ckptscope.points import alpha_grid

_EPOCH_FILE = re.compile(r"epoch_(\d+)\.safetensors")
# Order of the files of one epoch: a child run's init is the state it was spawned from.
_RANK = {"init": 0, "epoch": 1, "final": 2}
# Separates the two checkpoint labels of a pair's run label in the intermediate sweep.
_PAIR = " -> "


def checkpoint_files(run_dir: str | os.PathLike) -> list[Path]:
    """The ``init``, ``epoch_XXX`` and ``final`` safetensors files of a run directory, sorted
    by name (read nothing).

    Raises:
        CkptscopeError: the folder is missing or holds fewer than two of them.
    """
    folder = Path(run_dir)
    if not folder.is_dir():
        raise CkptscopeError(f"run directory {str(folder)!r} does not exist or is not a folder.")
    found = sorted(p for p in folder.iterdir()
                   if p.name in ("init.safetensors", "final.safetensors")
                   or _EPOCH_FILE.fullmatch(p.name))
    if len(found) < 2:
        raise CkptscopeError(
            f"run directory {str(folder)!r} holds {len(found)} of init.safetensors, "
            f"epoch_XXX.safetensors, final.safetensors; a trajectory needs two or more: train "
            f"with `ckptscope train --save-every K`.")
    return found


def run_checkpoints(run_dir: str | os.PathLike) -> list[tuple[CheckpointInfo, Checkpoint]]:
    """Read a run directory's ``init``, ``epoch_XXX`` and ``final`` checkpoints, in training
    order: init first, final last, the epochs by number (a spawned child's init is at the
    epoch its metadata records).

    Returns:
        (info, checkpoint) per file, each file read once.

    Raises:
        CkptscopeError: the folder is missing or holds fewer than two of those checkpoints.
    """
    out = []
    for path in checkpoint_files(run_dir):
        match = _EPOCH_FILE.fullmatch(path.name)
        kind = "epoch" if match else path.stem
        ckpt = load_checkpoint(path)
        epoch = int(match.group(1)) if match else _recorded_epoch(ckpt, kind)
        out.append((_RANK[kind], CheckpointInfo(path.stem, epoch, str(path), ckpt.sha256), ckpt))
    # The final after everything; init before everything (metadata may lack epochs).
    out.sort(key=lambda t: (t[0] == 2, t[0] != 0, t[1].epoch))
    return [(info, ckpt) for _, info, ckpt in out]


def _recorded_epoch(ckpt: Checkpoint, kind: str) -> int:
    """The epoch a checkpoint's metadata records; 0 for an init without one, -1 for a final."""
    try:
        return int(ckpt.metadata.get("epoch", 0 if kind == "init" else -1))
    except ValueError:
        return 0 if kind == "init" else -1


def _as_checkpoints(source) -> list[tuple[CheckpointInfo, Checkpoint]]:
    """A run directory, or checkpoint files given in training order (their epochs: as their
    metadata records, else their positions)."""
    if isinstance(source, (str, os.PathLike)):
        return run_checkpoints(source)
    items = []
    for i, path in enumerate(source):
        ckpt = load_checkpoint(path)
        epoch = ckpt.metadata.get("epoch", "")  # the trainer's record, else the position
        epoch = int(epoch) if epoch.isdigit() else i
        items.append((CheckpointInfo(Path(path).stem, epoch, str(path), ckpt.sha256), ckpt))
    labels = [info.label for info, _ in items]
    if len(set(labels)) != len(labels):
        items = [(CheckpointInfo(f"{i}:{info.label}", i, info.path, info.sha256), ckpt)
                 for i, (info, ckpt) in enumerate(items)]
    if len(items) < 2:
        raise CkptscopeError(f"a trajectory needs two or more checkpoints; got {len(items)}.")
    return items


def trajectory_pairs(n: int, *, to_final: bool = False) -> list[tuple[int, int]]:
    """The (start, end) index pairs a trajectory evaluates over ``n`` checkpoints in training
    order: every ``start < end``, or ``(i, n - 1)`` for each ``i < n - 1``."""
    if to_final:
        return [(i, n - 1) for i in range(n - 1)]
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def trajectory(
    run_dir: str | os.PathLike | Sequence[str | os.PathLike],
    model: Model = None,
    data: object = None,
    *,
    alphas: int | Sequence[float] = 11,
    to_final: bool = False,
    groups: Sequence[str] | Mapping[str, str] | None = None,
    full: bool = True,
    hold: str = "end",
    loss: str | Callable | None = None,
    bn: str = "interpolate",
    split: str = "test",
    device: str | torch.device | None = None,
    dtype: str = "float32",
    adapter_options: Mapping[str, object] | None = None,
    tolerances: Mapping[str, float] | None = None,
    progress: Callable[[int, int], None] | None = None,
    config: EvalConfig | None = None,
    strip_prefix: str | Sequence[str] | None = None,
) -> xr.Dataset:
    """Evaluate the linear paths between a training run's checkpoints.

    Every pair is evaluated once, start before end in training order, by one sweep of
    :func:`ckptscope.linear_paths` (one evaluator, each file read once). The path from a
    checkpoint to itself is not evaluated: it is that checkpoint at every alpha, so the
    diagonal holds the constant curve of the checkpoint's loss, read exactly from the
    whole-model paths' ends (NaN without the whole-model path, ``full=False``), and barriers
    and distance 0. Pairs against training order (start after end) hold NaN.

    Args:
        run_dir: a run directory (``init``, ``epoch_XXX``, ``final`` safetensors), or
            checkpoint files in training order.
        model, data: as for :func:`ckptscope.linear_path` (default: from the metadata).
        alphas: points per path (evenly spaced on [0, 1]) or increasing values in [0, 1].
        to_final: only each checkpoint's path to the last one; the ``end`` dim is then the
            final alone.
        groups, full, hold, loss, bn, split, device, dtype, adapter_options, tolerances,
            config, strip_prefix: as for :func:`ckptscope.linear_path` (each pair's keys are
            matched to the model as a path's are; the ``notes`` attribute says how).
        progress: called as ``progress(done, total)`` over all paths' points.

    Returns:
        A trajectory result: ``loss``, ``accuracy`` (start, end, group, split, alpha); the
        metrics ``barrier_height``, ``chord_barrier``, ``midpoint_barrier``, ``midpoint_loss``,
        ``error_barrier``, ``error_chord_barrier`` (start, end, group, split); ``distance``
        (start, end, group). See ``docs/results.md``.

    Example:
        >>> ds = ckptscope.trajectory("runs/spiral/seed_0", to_final=True)  # doctest: +SKIP
        >>> ds.error_chord_barrier.sel(end="final", group="all", split="test")  # doctest: +SKIP
    """
    grid = alpha_grid(alphas)
    if grid[0] != 0.0 or grid[-1] != 1.0:
        raise CkptscopeError(f"a trajectory's alphas run from 0 to 1 (both included); got "
                             f"{grid[0]:g} to {grid[-1]:g}. Extrapolate with `ckptscope path`.")
    items = _as_checkpoints(run_dir)
    if strip_prefix is not None:  # before linear_paths checks what the metadata names
        stripped = strip_given([ck for _, ck in items], strip_prefix,
                               [info.path for info, _ in items])
        items = [(info, ck) for (info, _), ck in zip(items, stripped, strict=True)]
    infos = [info for info, _ in items]
    pairs = trajectory_pairs(len(items), to_final=to_final)
    runs = {f"{infos[i].label}{_PAIR}{infos[j].label}": (items[i][1], items[j][1])
            for i, j in pairs}
    done: dict[str, int] = {}

    def report(label: str, n: int, total: int) -> None:  # every path has the same total
        done[label] = n
        progress(sum(done.values()), total * len(runs))

    swept = linear_paths(runs, model, data, groups=groups, alphas=grid, full=full, hold=hold,
                         loss=loss, bn=bn, split=split, device=device, dtype=dtype,
                         adapter_options=adapter_options, tolerances=tolerances,
                         progress=report if progress else None, config=config)
    ends = [infos[-1]] if to_final else infos
    return _matrices(swept, infos, ends, pairs, to_final=to_final, run_dir=run_dir)


def _matrices(swept: xr.Dataset, starts: list[CheckpointInfo], ends: list[CheckpointInfo],
              pairs: list[tuple[int, int]], *, to_final: bool, run_dir) -> xr.Dataset:
    """Place each swept path at its (start, end); fill the diagonal; build the result."""
    n_s, n_e = len(starts), len(ends)
    n_g, n_sp, n_a = swept.sizes["group"], swept.sizes["split"], swept.sizes["alpha"]
    loss = np.full((n_s, n_e, n_g, n_sp, n_a), np.nan)
    accuracy = np.full_like(loss, np.nan)
    distance = np.full((n_s, n_e, n_g), np.nan)
    column = {info.label: k for k, info in enumerate(ends)}
    # linear_paths keeps the pairs' order along ``run``.
    for r, (i, j) in enumerate(pairs):  # starts are every checkpoint: j indexes them too
        k = column[starts[j].label]
        loss[i, k] = swept["loss"].values[r]
        accuracy[i, k] = swept["accuracy"].values[r]
        distance[i, k] = swept["distance"].values[r]
    groups = [str(g) for g in swept["group"].values]
    alpha = swept["alpha"].values
    for i, j in ((i, column[info.label]) for i, info in enumerate(starts)
                 if info.label in column):
        at = _checkpoint_value(swept, pairs, i, alpha, groups)
        if at is not None:  # the constant curve of the checkpoint itself
            loss[i, j] = at[0][None, :, None]
            accuracy[i, j] = at[1][None, :, None]
        distance[i, j] = 0.0
    attrs = {k: v for k, v in swept.attrs.items()
             if not k.startswith("shape_") and k != "merged_from"}
    attrs |= {"pairs": "to_final" if to_final else "all",
              "run_dir": str(run_dir) if isinstance(run_dir, (str, os.PathLike)) else ""}
    return build_trajectory(
        loss=loss, accuracy=accuracy, distance=distance, alphas=alpha, starts=starts,
        ends=ends, groups=groups, patterns=[str(p) for p in swept["pattern"].values],
        splits=[str(s) for s in swept["split"].values],
        n_examples=swept["n_examples"].values.tolist(), attrs=attrs)


def _checkpoint_value(swept: xr.Dataset, pairs: list[tuple[int, int]], i: int,
                      alpha: np.ndarray, groups: list[str]
                      ) -> tuple[np.ndarray, np.ndarray] | None:
    """(loss, accuracy) per split of checkpoint ``i``, read from a whole-model path that
    starts (alpha = 0) or ends (alpha = 1) at it: an anchor is evaluated bitwise there."""
    if WHOLE_MODEL not in groups:
        return None
    g = groups.index(WHOLE_MODEL)
    for r, (a, b) in enumerate(pairs):
        for end, index in ((a, 0.0), (b, 1.0)):
            at = np.flatnonzero(alpha == index)
            if end == i and at.size:
                return (swept["loss"].values[r, g, :, at[0]],
                        swept["accuracy"].values[r, g, :, at[0]])
    return None
