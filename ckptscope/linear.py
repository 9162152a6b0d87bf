"""Linear paths between checkpoints: :func:`linear_path` for one pair, :func:`linear_paths` for a
sweep over pairs (seeds, conditions).

Each pair runs the same pipeline of named steps:

    options -> pair -> model -> data -> groups -> evaluator -> points -> resume -> evaluate
    -> distances -> result

A sweep builds its data and its evaluator once and hands each pair's checkpoints to it as the
anchors ``start`` and ``end``; pairs whose model, data or loss differ get their own.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import numpy as np
import torch
import xarray as xr
from torch import nn

from ckptscope import distributed
from ckptscope.adapters import Adapter, module_name
from ckptscope.align.steps import prepare_pair
from ckptscope.cache import ChunkCache, chunk_size, chunks, open_cache
from ckptscope.checkpoints import Checkpoint
from ckptscope.distance import distance_table
from ckptscope.engine import EvalConfig, Evaluator
from ckptscope.errors import CkptscopeError
from ckptscope.groups import Group, normalise_groups, resolve_groups
from ckptscope.identity import model_identity
from ckptscope.inputs import (
    Inputs,
    StateSource,
    check_stored,
    load_inputs,
    load_pair,
    match_model,
    pair_model,
)
from ckptscope.keys import file_notes
from ckptscope.points import PointSet, path_points
from ckptscope.questions import PathQuestion, path_question
from ckptscope.results import RunInfo, build_result, merge_results
from ckptscope.shape import (
    classify,
    shape_attrs,
    shape_variables,
)

Model = nn.Module | str | Adapter | None


def _version() -> str:
    from ckptscope import __version__

    return __version__


def linear_path(
    start: StateSource,
    end: StateSource,
    model: Model = None,
    data: object = None,
    *,
    groups: Sequence[str] | Mapping[str, str] | None = None,
    alphas: int | Sequence[float] = 51,
    full: bool = True,
    hold: str = "end",
    loss: str | Callable | None = None,
    bn: str = "interpolate",
    split: str = "test",
    device: str | torch.device | None = None,
    dtype: str = "float32",
    adapter_options: Mapping[str, object] | None = None,
    run: str = "0",
    tolerances: Mapping[str, float] | None = None,
    progress: Callable[[int, int], None] | None = None,
    resume_dir: str | os.PathLike | None = None,
    config: EvalConfig | None = None,
    strip_prefix: str | Sequence[str] | None = None,
    align: str | None = None,
    repair: bool = False,
) -> xr.Dataset:
    """Evaluate loss and accuracy on the straight line from ``start`` to ``end``.

    The whole-model path (group ``all``, eq. 1 of the paper) and, per group, the path on which
    only that group moves while every other tensor is held at an endpoint (eq. 2).

    Args:
        start, end: checkpoint paths (safetensors or torch files) or state dicts.
        model: an ``nn.Module`` (its own weights are ignored), an adapter name (``mlp``) or
            ``pkg.module:attr``; ``None`` reads the adapter from the checkpoint's metadata, which
            may name a built-in adapter only (``docs/security.md``).
        data: ``(inputs, targets)``, a mapping split -> ``(inputs, targets)``, or a dataset spec
            (``spiral``, ``digits``, ``pkg.module:attr``); ``None``: the checkpoint's (a
            registered set only) or the adapter's.
        groups: regexes (``"layer3.*"`` or ``"name=regex"``) or a mapping name -> regex.
        alphas: a count (evenly spaced on [0, 1], ends included) or increasing values.
        full: include the whole-model path as group ``all``.
        hold: the endpoint the rest of the model sits at on a group path: "end" or "start".
            The whole-model path holds nothing: its non-float tensors come from the nearer
            end (docs/semantics.md).
        loss: ``cross_entropy``, ``bce``, ``pkg.module:attr`` or a callable (see
            :mod:`ckptscope.losses`); ``None``: the adapter's, else ``cross_entropy``. An error
            the model or the loss raises is one :class:`CkptscopeError` naming the model, the
            data and the error (the original is its ``__cause__``).
        bn: BatchNorm running statistics: "interpolate" (they move with their group, as in the
            paper), "recompute" (re-estimated at every alpha on ``config.bn_batches`` batches of
            the training split) or "batch" (each evaluation batch's own statistics).
        split: ``test``, ``train`` or ``both``, for datasets with those splits.
        device: ``None``/"auto" (CUDA when present), "cpu", "cuda:1", ...
        dtype: "float32" (default), "float64", or "bf16" / "fp16" (float32 weights, forward
            passes under ``torch.autocast`` in that precision).
        adapter_options: options for the adapter's ``build`` (e.g. ``{"widths": [2, 50, 1]}``).
        run: the label of this pair in the ``run`` dim.
        tolerances: ``rtol``, ``atol``, ``plateau_alpha`` for the shape verdicts
            (:func:`ckptscope.classify`); recorded in the result's attrs.
        progress: called as ``progress(done, total)`` after each alpha of each group.
        resume_dir: keep each finished chunk of a path (8 alphas of the whole-model path, a
            quarter of a group path) in this folder and reuse the ones a previous, interrupted
            call with the same inputs left there, after verifying them (see
            :mod:`ckptscope.cache`); the result's notes say how many points were reused.
        config: the engine's knobs (:class:`ckptscope.EvalConfig`): batch size, strategy,
            channels-last, memory budget, BatchNorm batches, data size, seed. Its device,
            dtype and BatchNorm policy are this function's keywords of those names.
        strip_prefix: a prefix (or several) to strip from the keys of each checkpoint whose
            keys all start with it (``"model."``; a missing final dot is added). Wrappers'
            prefixes (DDP's ``module.``, ``torch.compile``'s ``_orig_mod.``, Lightning's
            ``model.``) are found without it (``docs/loading.md``); a prefix that no
            checkpoint's keys all have is an error.
        align: ``"weights"`` or ``"activations"``: permute ``end``'s hidden units to match
            ``start``'s first (:func:`ckptscope.align.alignment`, seed ``config.seed`` or 0);
            the curves and distances are of the aligned pair, the result's ``align*`` attrs
            say how (``docs/alignment.md``).
        repair: rescale the interpolated networks: with BatchNorm, ``bn="recompute"``;
            without, REPAIR (:mod:`ckptscope.align.repair`) on the training data. Recorded
            in the ``repair`` attr.

    Returns:
        A dataset with ``loss`` and ``accuracy`` (run, group, split, alpha), ``distance``
        (run, group), and the shape verdict ``shape`` (run, group, split) with its metrics;
        see ``docs/results.md`` and ``docs/metrics.md``.

    Example:
        >>> ds = ckptscope.linear_path("init.safetensors", "final.safetensors",
        ...                            groups={"fc": "fc"}, alphas=51,
        ...                            config=EvalConfig(batch_size=256))  # doctest: +SKIP
        >>> ds.loss.sel(group="all", split="test").plot()                  # doctest: +SKIP
    """
    question = path_question(
        groups=groups, alphas=alphas, full=full, hold=hold, loss=loss, bn=bn, split=split,
        device=device, dtype=dtype, adapter_options=adapter_options, tolerances=tolerances,
        resume_dir=resume_dir, config=config, strip_prefix=strip_prefix, align=align,
        repair=repair)
    return _pair(run, start, end, model, data, question, _Shared(), progress)


def linear_paths(
    pairs: Mapping[str, tuple[StateSource, StateSource]]
    | Sequence[tuple[StateSource, StateSource]],
    model: Model = None,
    data: object = None,
    *,
    groups: Sequence[str] | Mapping[str, str] | None = None,
    alphas: int | Sequence[float] = 51,
    full: bool = True,
    hold: str = "end",
    loss: str | Callable | None = None,
    bn: str = "interpolate",
    split: str = "test",
    device: str | torch.device | None = None,
    dtype: str = "float32",
    adapter_options: Mapping[str, object] | None = None,
    tolerances: Mapping[str, float] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    resume_dir: str | os.PathLike | None = None,
    config: EvalConfig | None = None,
    strip_prefix: str | Sequence[str] | None = None,
    align: str | None = None,
    repair: bool = False,
) -> xr.Dataset:
    """Evaluate several checkpoint pairs (seeds, conditions) into one result with a ``run`` dim.

    The data is loaded, and the evaluator built (the model copied to the device, the probe
    pass run, the forward graph traced per group), once for all pairs that share the model,
    the data and the loss.

    Args:
        pairs: run label -> (start, end), or a sequence of (start, end) labelled "0", "1", ...
        model, data: as for :func:`linear_path` (shared by every pair).
        progress: called as ``progress(run, done, total)``.
        groups, alphas, full, hold, loss, bn, split, device, dtype, adapter_options,
            tolerances, resume_dir, config, strip_prefix, align, repair: as for
            :func:`linear_path`.

    Returns:
        The runs joined along ``run`` (:func:`ckptscope.merge`), classified.
    """
    items = (
        list(pairs.items())
        if isinstance(pairs, Mapping)
        else [(str(i), pair) for i, pair in enumerate(pairs)]
    )
    if not items:
        raise CkptscopeError("no checkpoint pairs given; pass at least one (start, end).")
    question = path_question(
        groups=groups, alphas=alphas, full=full, hold=hold, loss=loss, bn=bn, split=split,
        device=device, dtype=dtype, adapter_options=adapter_options, tolerances=tolerances,
        resume_dir=resume_dir, config=config, strip_prefix=strip_prefix, align=align,
        repair=repair)
    for _, (start, end) in items:  # a pair's metadata refused before any pair is evaluated
        check_stored(start, end, model, data, {"adapter_options": adapter_options,
                                               "seed": question.config.seed,
                                               "strip_prefix": question.strip_prefix})
    shared = _Shared()
    results = []
    for label, (start, end) in items:
        report = None
        if progress:

            def report(done, total, label=label):
                progress(label, done, total)

        results.append(_pair(label, start, end, model, data, question, shared, report))
    if len(results) == 1:
        return results[0]
    merged = merge_results(results, sources=[label for label, _ in items])
    merged.attrs.pop("merged_from", None)
    # The merge keeps the first run's attrs: every run's notes (what was resumed), by label.
    merged.attrs["notes"] = "; ".join(
        f"run {label}: {note}"
        for (label, _), ds in zip(items, results, strict=True)
        for note in ds.attrs["notes"].split("; ")
        if note
    )
    return classify(merged, **question.tolerances)


# --- the pipeline ----------------------------------------------------------------------------
class _Shared:
    """What one call builds once for all its pairs: the data per spec and seed, an evaluator
    per (model, data, loss), an adapter's module per (adapter, options) with its state layout
    as built (meta tensors) and its identity per loss."""

    def __init__(self):
        self.inputs: dict[tuple, Inputs] = {}
        self.evaluators: dict[tuple, Evaluator] = {}
        self.built: dict[tuple, tuple[nn.Module, dict[str, torch.Tensor]]] = {}
        self.identities: dict[tuple, str] = {}
        self.owned: set[int] = set()  # ids of the modules an evaluator took as its own


@dataclass(frozen=True)
class _Run:
    """One pair as the pipeline resolves it."""

    label: str
    a: Checkpoint
    b: Checkpoint
    module: nn.Module
    adapter: Adapter | None
    options: dict
    inputs: Inputs
    loss: str | Callable
    groups: list[Group]
    evaluator: Evaluator
    mine: np.ndarray  # (group, alpha): the points this rank evaluates
    identity: str  # model_identity of the module as built
    aligned: dict  # the result's align* and repair attrs
    rescale: torch.Tensor | None = None  # REPAIR's data when it rescales the points


def _pair(label: str, start: StateSource, end: StateSource, model: Model, data: object,
          question: PathQuestion, shared: _Shared,
          progress: Callable[[int, int], None] | None) -> xr.Dataset:
    """One pair through the pipeline."""
    a, b = load_pair(start, end, strip_prefix=question.strip_prefix)
    module, adapter, options, layout = pair_model(model, a, b, question.adapter_options,
                                                  built=shared.built)
    a, b = match_model(a, b, module, adapter, layout=layout)
    b, aligned, rescale, recompute = prepare_pair(
        a, b, module, adapter, data, align=question.align, repair=question.repair,
        seed=question.config.seed or 0)
    if recompute:  # REPAIR for a network with BatchNorm
        question = replace(question, config=replace(question.config, bn="recompute"))
    inputs = load_inputs(data, a, adapter, split=question.split, config=question.config,
                         loaded=shared.inputs)
    groups = _groups(a, question)
    loss = question.loss or (adapter.loss(options) if adapter else "cross_entropy")
    # Before the evaluator may cast the module it owns; once per module and loss in a call.
    ident_key = (id(module), loss if isinstance(loss, str) else id(loss))
    if ident_key not in shared.identities:
        shared.identities[ident_key] = model_identity(module, loss)
    identity = shared.identities[ident_key]
    evaluator = _evaluator(model, module, adapter, options, inputs, loss, question, shared)
    mine = distributed.owned(len(groups), len(question.grid), question.rank, question.size)
    run = _Run(label, a, b, module, adapter, options, inputs, loss, groups, evaluator, mine,
               identity, aligned, rescale)
    shape = (1, len(groups), len(inputs.splits), len(question.grid))
    curves = np.zeros(shape), np.zeros(shape)  # loss, accuracy
    total, done = int(mine.sum()), 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    todo, cache, off = _resume(run, question, curves, advance)
    _evaluate(run, _points(run, question, todo), todo, cache, curves, advance)
    if question.size > 1:  # every point is owned by one rank and zero on the others
        curves = tuple(distributed.reduce_sum(c, question.config.device) for c in curves)
    moved = distance_table(a, b, groups=normalise_groups(question.groups),
                           module=evaluator.module, full=question.full)
    notes = (*file_notes(a, "start"), *file_notes(b, "end"),
             *(cache.notes(total) if cache else (off,)))
    return _result(run, question, curves, moved, [n for n in notes if n])


def _groups(a: Checkpoint, question: PathQuestion) -> list[Group]:
    """Each group's keys in the checkpoint, ``all`` first."""
    resolved = resolve_groups(list(a.state), normalise_groups(question.groups),
                              full=question.full, source=a.path or "A")
    if not resolved:
        raise CkptscopeError("nothing to evaluate: full=False and no groups; add a group.")
    return resolved


def _evaluator(model: Model, module: nn.Module, adapter: Adapter | None, options: dict,
               inputs: Inputs, loss, question: PathQuestion, shared: _Shared) -> Evaluator:
    """One per (model, data, loss) for the whole call."""
    built = ("module", id(model)) if adapter is None else (
        adapter.name, json.dumps(options, sort_keys=True, default=str))
    key = (built, inputs.key, loss if isinstance(loss, str) else id(loss))
    if key not in shared.evaluators:
        # A module an adapter built is ckptscope's: the first evaluator runs it instead of a
        # copy (one copy of the weights in memory, not two); a user's module is copied.
        own = adapter is not None and id(module) not in shared.owned
        shared.evaluators[key] = Evaluator(
            module, inputs.splits, loss=loss, config=question.config, bn_data=inputs.bn_data,
            own_module=own, model_name=adapter.name if adapter else module_name(module),
            data_name=inputs.label)
        if own:
            shared.owned.add(id(module))
    return shared.evaluators[key]


def _resume(run: _Run, question: PathQuestion, curves: tuple[np.ndarray, np.ndarray],
            advance: Callable[[int], None]) -> tuple[list[tuple[int, np.ndarray]],
                                                     ChunkCache | None, str | None]:
    """Fill ``curves`` with the chunks of each group path that an earlier, interrupted call
    left in ``resume_dir``, after verifying them (:mod:`ckptscope.cache`).

    Returns what is left to evaluate as (group index, grid indices of one chunk), the cache the
    finished chunks go to, and a note when resuming is off (inputs that cannot be identified).
    """
    losses, accuracies = curves
    config, grid = question.config, question.grid
    cache, off = None, None
    if question.resume_dir is not None and question.size == 1:
        cache, off = open_cache(
            question.resume_dir,
            module=run.module,
            loss=run.loss,
            anchors=(run.a.state, run.b.state),
            data=run.inputs.splits,
            bn_data=run.inputs.bn_data,
            settings={
                "alphas": grid.tolist(), "hold": question.hold, "dtype": question.dtype,
                "bn": config.bn, "bn_batches": config.bn_batches, "seed": run.inputs.seed,
                "data_size": config.data_size, "data": run.inputs.label,
                "options": run.options, "adapter": run.adapter and run.adapter.name,
                # Rounding depends on these: a resumed curve is bitwise the uninterrupted one.
                "batch": run.evaluator.batch_size(), "strategy": config.resolved_strategy,
                "channels_last": run.evaluator.channels_last,
                "align": question.align, "repair": run.aligned["repair"],
            },
            device=config.device,
            grid=grid,
        )
    todo = []
    every = set(run.a.state)
    for g, group in enumerate(run.groups):
        points = np.flatnonzero(run.mine[g])
        per_chunk = chunk_size(len(grid), hoistable=not every <= set(group.keys))
        for part in chunks(points, per_chunk) if cache is not None else [points]:
            found = cache.load(group.keys, part) if cache is not None and part.size else None
            if found is not None:
                losses[0, g][:, part], accuracies[0, g][:, part] = found
                advance(len(part))
            elif part.size:
                todo.append((g, part))
    for line in (off, cache and cache.warning()):
        if line:
            warnings.warn(line, stacklevel=4)
    return todo, cache, off


def _points(run: _Run, question: PathQuestion, todo: Sequence[tuple[int, np.ndarray]]
            ) -> list[PointSet]:
    """Per (group, chunk) left to evaluate, its alphas as weights over the anchors ``start``
    and ``end``; a group that holds every tensor is the whole-model path."""
    return [path_points(question.grid[part], run.groups[g].keys, hold=question.hold,
                        every=run.a.state)
            for g, part in todo]


def _evaluate(run: _Run, requests: Sequence[PointSet],
              todo: Sequence[tuple[int, np.ndarray]], cache: ChunkCache | None,
              curves: tuple[np.ndarray, np.ndarray], advance: Callable[[int], None]) -> None:
    """The pair's checkpoints are the anchors; each chunk that finishes is written into
    ``curves`` (and kept in the cache)."""
    losses, accuracies = curves
    batch = run.evaluator.batch_size()

    def store(i: int, result) -> None:
        g, part = todo[i]
        for s, name in enumerate(run.inputs.splits):
            losses[0, g, s, part], accuracies[0, g, s, part] = result[name]
        # After an out-of-memory back-off the batch size is not the key's: nothing more is kept.
        if cache is not None and run.evaluator.batch_size() == batch:
            cache.store(run.groups[g].keys, part, losses[0, g][:, part],
                        accuracies[0, g][:, part])

    anchors = {"start": run.a.state, "end": run.b.state}
    if run.rescale is not None:  # REPAIR: each point's own rescaled state
        from ckptscope.align.repair import repaired_points

        anchors, requests = repaired_points(run.module, anchors, requests, run.rescale)
    run.evaluator.evaluate(anchors, requests, progress=advance, done=store)


def _result(run: _Run, question: PathQuestion, curves: tuple[np.ndarray, np.ndarray],
            moved: dict, notes: Sequence[str]) -> xr.Dataset:
    """The curves, distances, provenance and shape verdicts as a dataset."""
    losses, accuracies = curves
    a, b, inputs, loss, groups = run.a, run.b, run.inputs, run.loss, run.groups
    config, grid, tol = question.config, question.grid, question.tolerances
    return build_result(
        loss=losses,
        accuracy=accuracies,
        distance=np.asarray(moved["relative"])[None],
        alphas=grid,
        groups=[g.name for g in groups],
        patterns=[g.pattern for g in groups],
        n_tensors=[len(g.keys) for g in groups],
        n_params=moved["n_params"],
        splits=list(inputs.splits),
        n_examples=[len(x) for x, _ in inputs.splits.values()],
        runs=[RunInfo(run.label, a.path, b.path, a.sha256, b.sha256)],
        attrs={
            "ckptscope_version": _version(),
            "torch_version": torch.__version__,
            "device": str(config.device),
            "world_size": int(question.size),
            "dtype": question.dtype,
            "strategy": config.resolved_strategy,
            "batch_size": int(run.evaluator.batch_size()),
            "adapter": run.adapter.name if run.adapter else module_name(run.module),
            "adapter_options": json.dumps(run.options, sort_keys=True),
            "model_identity": run.identity,
            "data": inputs.label,
            "data_seed": int(inputs.seed),
            "loss_function": loss if isinstance(loss, str) else getattr(loss, "__name__", "custom"),
            "bn_policy": config.bn,
            "bn_batches": int(config.bn_batches) if config.bn == "recompute" else 0,
            "hold": question.hold,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "notes": "; ".join(notes),
            **run.aligned,
            **shape_attrs(**tol),
        },
        extra=shape_variables(losses, grid, **tol),
    )
