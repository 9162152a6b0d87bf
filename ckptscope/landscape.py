"""The steps that planes and surfaces share: settle the options, build the model, the data and
the evaluator, evaluate one grid per group, and the provenance of the result.

:func:`ckptscope.plane` and :func:`ckptscope.surface` are each a short pipeline over these:

    options -> checkpoints -> model -> data -> evaluator -> groups -> geometry -> points
    -> evaluate -> result
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import torch
from torch import nn

from ckptscope.adapters import Adapter, module_name
from ckptscope.checkpoints import Checkpoint, as_checkpoint, check_pair
from ckptscope.engine import EvalConfig, Evaluator
from ckptscope.errors import CkptscopeError
from ckptscope.groups import Group, normalise_groups, resolve_groups
from ckptscope.identity import model_identity, parameter_keys, unique_keys
from ckptscope.inputs import Inputs, check_model, load_inputs, resolve_model, warn_nonfinite
from ckptscope.keys import file_notes, match_keys, strip_given
from ckptscope.points import PointSet

State = Mapping[str, torch.Tensor]
Model = nn.Module | str | Adapter | None


def load_anchors(sources: Mapping[str, object], *,
                 strip_prefix: str | Sequence[str] | None = None) -> list[Checkpoint]:
    """Read each checkpoint (name -> path or state), strip the prefixes asked for, match every
    one's keys to the first's (:func:`ckptscope.keys.match_keys`: prefixes, tied names,
    BatchNorm counters) and warn about NaN/Inf in any. Whether they fit each other and the
    model is checked once the model is known (:func:`match_anchors`)."""
    checkpoints = [as_checkpoint(source) for source in sources.values()]
    labels = [ck.path or name for ck, name in zip(checkpoints, sources, strict=True)]
    checkpoints = strip_given(checkpoints, strip_prefix, labels)
    first = checkpoints[0]
    for i in range(1, len(checkpoints)):
        first, checkpoints[i] = match_keys(first, checkpoints[i])
    checkpoints[0] = first
    for ck, label in zip(checkpoints, labels, strict=True):
        warn_nonfinite(ck, label, holds="the grid", stacklevel=4)
    return checkpoints


def match_anchors(checkpoints: Sequence[Checkpoint], names: Sequence[str], module: nn.Module,
                  adapter: Adapter | None) -> list[Checkpoint]:
    """Match each checkpoint's keys to the model (:func:`ckptscope.keys.match_keys`), then
    refuse checkpoints whose keys, shapes or kinds of dtype differ from the first's, or that
    the model does not fit; ``names`` label in-memory states in errors."""
    matched = [match_keys(ck, module=module)[0] for ck in checkpoints]
    first, label = matched[0], matched[0].path or names[0]
    for ck, name in zip(matched[1:], names[1:], strict=True):
        check_pair(first.state, ck.state, names=(label, ck.path or name))
    check_model(module, adapter, first)
    return matched


def anchor_notes(checkpoints: Sequence[Checkpoint], names: Sequence[str]) -> list[str]:
    """The checkpoints' loading notes, each naming its file (or ``names``' for a state)."""
    return [note for ck, name in zip(checkpoints, names, strict=True)
            for note in file_notes(ck, name)]


@dataclass(frozen=True)
class Evaluation:
    """What a grid is evaluated with.

    Attributes:
        module: the model (its weights are the anchors').
        adapter: its adapter, or ``None`` for a module given as such.
        options: the adapter's options.
        inputs: the evaluation data.
        loss: the loss's name or callable.
        evaluator: the engine, holding the model and data on the device.
        dtype: the dtype option as given (``float32``, ``bf16``, ...).
        checkpoints: the anchors' checkpoints, their keys matched to the model.
    """

    module: nn.Module
    adapter: Adapter | None
    options: dict
    inputs: Inputs
    loss: str | Callable
    evaluator: Evaluator
    dtype: str
    checkpoints: tuple[Checkpoint, ...]


def prepare(model: Model, data: object, checkpoints: Sequence[Checkpoint],
            names: Sequence[str], *, adapter_options: Mapping[str, object] | None, split: str,
            loss: str | Callable | None, config: EvalConfig, dtype: str) -> Evaluation:
    """The model (from ``model`` or the first checkpoint's metadata), the checkpoints matched
    to it and checked (:func:`match_anchors`); the data; the evaluator."""
    first, second = checkpoints[0], checkpoints[min(1, len(checkpoints) - 1)]
    module, adapter, options = resolve_model(model, first, second, adapter_options)
    checkpoints = match_anchors(checkpoints, names, module, adapter)
    inputs = load_inputs(data, checkpoints[0], adapter, split=split, config=config)
    loss = loss or (adapter.loss(options) if adapter else "cross_entropy")
    evaluator = Evaluator(module, inputs.splits, loss=loss, config=config,
                          bn_data=inputs.bn_data)
    return Evaluation(module, adapter, options, inputs, loss, evaluator, dtype,
                      tuple(checkpoints))


def group_fields(run: Evaluation, groups: Sequence[Group]) -> dict:
    """The keywords of :func:`ckptscope.grids.build_grid` that say what was evaluated: the
    groups (names, patterns, tensor and parameter counts) and the splits."""
    state = run.checkpoints[0].state
    return {
        "groups": [g.name for g in groups],
        "patterns": [g.pattern for g in groups],
        "n_tensors": [len(g.keys) for g in groups],
        "n_params": [count_params(state, g.keys, run.module) for g in groups],
        "splits": list(run.inputs.splits),
        "n_examples": [len(v) for v, _ in run.inputs.splits.values()],
    }


def grid_groups(anchor: Checkpoint, groups, *, full: bool) -> list[Group]:
    """Each group's keys in the checkpoint, ``all`` first."""
    resolved = resolve_groups(list(anchor.state), normalise_groups(groups), full=full,
                              source=anchor.path or "the checkpoint")
    if not resolved:
        raise CkptscopeError("nothing to evaluate: full=False and no groups; add a group.")
    return resolved


def geometry_keys(state: State, keys: Sequence[str], module: nn.Module) -> list[str]:
    """The keys a group's geometry (inner products, norms) is measured over: its parameters,
    each tied tensor once; a group of buffers only (running statistics) uses its floating
    tensors."""
    params = unique_keys(keys, parameter_keys(state, module), module)
    return params or [k for k in keys if state[k].is_floating_point()]


def count_params(state: State, keys: Sequence[str], module: nn.Module) -> int:
    """Scalar parameters among ``keys`` (each tied tensor once), as a path result counts."""
    return sum(state[k].numel() for k in unique_keys(keys, parameter_keys(state, module), module))


def inner(u: State, v: State, keys: Sequence[str]) -> float:
    """<u, v> over ``keys`` in float64."""
    return float(sum(torch.sum(u[k].double() * v[k].double()) for k in keys))


def evaluate_grid(run: Evaluation, anchors: Mapping[str, State], requests: Sequence[PointSet],
                  shape: tuple[int, int], progress: Callable[[int, int], None] | None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Evaluate one point set per group (rows in (y, x) order) into
    ``(loss, accuracy)``, each (1, group, split, y, x)."""
    splits = list(run.inputs.splits)
    out = np.zeros((1, len(requests), len(splits), *shape)), np.zeros(
        (1, len(requests), len(splits), *shape))
    total, done = sum(len(r) for r in requests), 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    def store(i: int, curves) -> None:
        for s, name in enumerate(splits):
            loss, accuracy = curves[name]
            out[0][0, i, s] = np.asarray(loss).reshape(shape)
            out[1][0, i, s] = np.asarray(accuracy).reshape(shape)

    run.evaluator.evaluate(anchors, requests, progress=advance, done=store)
    return out


def provenance(run: Evaluation, config: EvalConfig, notes: Sequence[str],
               extra: Mapping[str, object]) -> dict:
    """The attributes every grid result records (as a path result's), then ``extra``;
    ``notes`` are the loading notes (:func:`anchor_notes`)."""
    from ckptscope import __version__

    loss = run.loss
    return {
        "ckptscope_version": __version__,
        "torch_version": torch.__version__,
        "device": str(config.device),
        "world_size": 1,
        "dtype": run.dtype,
        "strategy": config.resolved_strategy,
        "batch_size": int(run.evaluator.batch_size()),
        "adapter": run.adapter.name if run.adapter else module_name(run.module),
        "adapter_options": json.dumps(run.options, sort_keys=True),
        "model_identity": model_identity(run.module, loss),
        "data": run.inputs.label,
        "data_seed": int(run.inputs.seed),
        "loss_function": loss if isinstance(loss, str) else getattr(loss, "__name__", "custom"),
        "bn_policy": config.bn,
        "bn_batches": int(config.bn_batches) if config.bn == "recompute" else 0,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "notes": "; ".join(n for n in notes if n),
        **dict(extra),
    }


def axis_counts(grid: int | Sequence[int]) -> tuple[int, int]:
    """``grid`` as (points along x, points along y): one int for both, or a pair."""
    if isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
        return int(grid), int(grid)
    if (isinstance(grid, Sequence) and len(grid) == 2
            and all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in grid)):
        return int(grid[0]), int(grid[1])
    raise CkptscopeError(f"grid={grid!r} is not a count (21) or a pair of counts (31, 21).")


def axis_range(given, default: tuple[float, float], count: int, name: str
               ) -> tuple[float, float, int]:
    """``(lo, hi, n)`` from ``given`` (``None``, ``(lo, hi)`` or ``(lo, hi, n)``), the
    default range and the grid's count."""
    if given is None:
        return default[0], default[1], count
    try:
        values = [float(v) for v in given]
    except (TypeError, ValueError):
        raise CkptscopeError(
            f"{name}_range={given!r} is not (LO, HI) or (LO, HI, N) numbers."
        ) from None
    if len(values) == 2:
        return values[0], values[1], count
    if len(values) == 3 and values[2] == int(values[2]):
        return values[0], values[1], int(values[2])
    raise CkptscopeError(f"{name}_range={given!r} is not (LO, HI) or (LO, HI, N).")
