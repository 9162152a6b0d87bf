"""``linear_path``: the one function that composes load -> group -> plan -> evaluate -> result."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone

import numpy as np
import torch
import xarray as xr
from torch import nn

from ckptscope import distributed
from ckptscope.adapters import Adapter, module_name
from ckptscope.cache import chunk_size, chunks, open_cache
from ckptscope.checkpoints import Checkpoint, as_checkpoint, check_pair
from ckptscope.data import as_splits, load_data, select_splits
from ckptscope.data.transforms import subset
from ckptscope.distance import distance_table
from ckptscope.errors import CkptscopeError
from ckptscope.evaluate import EvalConfig, Evaluator, resolve_device
from ckptscope.groups import normalise_groups, resolve_groups
from ckptscope.inputs import check_stored, data_seed, data_spec, resolve_model
from ckptscope.path import HOLDS, alpha_grid
from ckptscope.results import RunInfo, build_result, merge_results
from ckptscope.shape import check_tolerances, classify, shape_attrs, shape_variables

StateSource = str | os.PathLike | Mapping[str, torch.Tensor] | Checkpoint
DTYPES = {"float32": torch.float32, "float64": torch.float64}
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _version() -> str:
    from ckptscope import __version__

    return __version__


def _warn_nonfinite(ckpt: Checkpoint, label: str) -> None:
    bad = sorted(
        k
        for k, v in ckpt.state.items()
        if v.is_floating_point() and not bool(torch.isfinite(v).all())
    )
    if bad:
        warnings.warn(
            f"checkpoint {label} has NaN/Inf in {len(bad)} tensor(s) ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); the curves will hold NaN there.",
            stacklevel=3,
        )


def linear_path(
    start: StateSource,
    end: StateSource,
    model: nn.Module | str | Adapter | None = None,
    data: object = None,
    *,
    groups: Sequence[str] | Mapping[str, str] | None = None,
    alphas: int | Sequence[float] = 51,
    full: bool = True,
    loss: str | Callable | None = None,
    hold: str = "end",
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    split: str = "test",
    adapter_options: Mapping[str, object] | None = None,
    dtype: str = "float32",
    strategy: str = "auto",
    channels_last: bool | None = None,
    bn: str = "interpolate",
    bn_batches: int = 20,
    data_size: int | None = None,
    memory_budget: int | None = None,
    seed: int | None = None,
    run: str = "0",
    tolerances: Mapping[str, float] | None = None,
    progress: Callable[[int, int], None] | None = None,
    resume_dir: str | os.PathLike | None = None,
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
        loss: ``cross_entropy``, ``bce`` or a callable (see :mod:`ckptscope.losses`);
            ``None``: the adapter's, else ``cross_entropy``.
        hold: the endpoint the rest of the model sits at on a group path: "end" or "start".
        device: ``None``/"auto" (CUDA when present), "cpu", "cuda:1", ...
        batch_size: examples per forward pass; ``None`` picks one from the memory budget.
        split: ``test``, ``train`` or ``both``, for datasets with those splits.
        adapter_options: options for the adapter's ``build`` (e.g. ``{"widths": [2, 50, 1]}``).
        dtype: "float32" (default), "float64", or "bf16" / "fp16" (float32 weights, forward
            passes under ``torch.autocast`` in that precision).
        strategy: "auto", "loop" or "vmap" (see :mod:`ckptscope.evaluate`).
        channels_last: conv nets in channels-last memory layout; ``None``: where it is faster
            (CUDA; the CPU's ``loop`` with batches of 32 or more). Changes rounding only.
        bn: BatchNorm running statistics: "interpolate" (they move with their group, as in the
            paper), "recompute" (re-estimated at every alpha on ``bn_batches`` batches of the
            training split) or "batch" (each evaluation batch's own statistics).
        bn_batches: training batches per alpha for ``bn="recompute"``.
        data_size: evaluate on the first ``data_size`` examples of a seeded permutation of
            each split (``None``: all of them).
        memory_budget: bytes for replicated tensors and activations (``None``: automatic).
        seed: seed for generated datasets and subsets; ``None``: the checkpoint's recorded
            ``data_seed`` (so a trainer's spiral is the one it trained on), else 0.
        run: the label of this pair in the ``run`` dim.
        tolerances: ``rtol``, ``atol``, ``plateau_alpha`` for the shape verdicts
            (:func:`ckptscope.classify`); recorded in the result's attrs.
        progress: called as ``progress(done, total)`` after each alpha of each group.
        resume_dir: keep each finished chunk of a path (8 alphas of the whole-model path, a
            quarter of a group path) in this folder and reuse the ones a previous, interrupted
            call with the same inputs left there, after verifying them (see
            :mod:`ckptscope.cache`); the result's notes say how many points were reused.

    Returns:
        A dataset with ``loss`` and ``accuracy`` (run, group, split, alpha), ``distance``
        (run, group), and the shape verdict ``shape`` (run, group, split) with its metrics;
        see ``docs/results.md`` and ``docs/metrics.md``.

    Example:
        >>> ds = ckptscope.linear_path("init.safetensors", "final.safetensors",
        ...                            groups={"fc": "fc"}, alphas=51)   # doctest: +SKIP
        >>> ds.loss.sel(group="all", split="test").plot()                  # doctest: +SKIP
    """
    if dtype not in DTYPES and dtype not in AUTOCAST:
        raise CkptscopeError(f"dtype {dtype!r} is not one of {sorted(DTYPES) + sorted(AUTOCAST)}.")
    if hold not in HOLDS:
        raise CkptscopeError(f"hold={hold!r} is not one of {HOLDS}.")
    check_tolerances(**dict(tolerances or {}))  # before the work, not after it
    grid = alpha_grid(alphas)
    a, b = as_checkpoint(start), as_checkpoint(end)
    check_pair(a.state, b.state, names=(a.path or "start", b.path or "end"))
    _warn_nonfinite(a, a.path or "start")
    _warn_nonfinite(b, b.path or "end")
    module, adapter, options = resolve_model(model, a, b, adapter_options)
    expected = module.state_dict()
    check_pair(
        {k: v for k, v in expected.items()},
        a.state,
        names=(
            f"the model ({adapter.name if adapter else module_name(module)})",
            f"the checkpoint {a.path or 'start'}",
        ),
        fix="pick the adapter and options the checkpoint was saved from",
    )

    if seed is None:
        seed = data_seed(a) if data is None else 0
    spec = data_spec(data, a, adapter)
    if isinstance(spec, str):
        every_split = load_data(spec, seed=seed)
        data_label = spec
    else:
        every_split = as_splits(spec)
        data_label = "in-memory"
    if data_size is not None:
        every_split = subset(every_split, data_size, seed=seed)
    splits = select_splits(every_split, split)
    bn_data = every_split["train"][0] if bn == "recompute" and "train" in every_split else None
    loss = loss or (adapter.loss(options) if adapter else "cross_entropy")

    keys = list(a.state)
    group_specs = normalise_groups(groups)
    resolved = resolve_groups(keys, group_specs, full=full, source=a.path or "A")
    if not resolved:
        raise CkptscopeError("nothing to evaluate: full=False and no groups; add a group.")
    rank, size, device = distributed.setup(device)
    config = EvalConfig(
        device=resolve_device(device),
        dtype=DTYPES.get(dtype, torch.float32),
        autocast=AUTOCAST.get(dtype),
        batch_size=batch_size,
        strategy=strategy,
        channels_last=channels_last,
        memory_budget=memory_budget,
        bn=bn,
        bn_batches=bn_batches,
    )
    evaluator = Evaluator(
        module, a.state, b.state, splits, loss=loss, config=config, bn_data=bn_data
    )

    # Under torchrun each rank evaluates its share of the (group, alpha) points.
    mine = distributed.owned(len(resolved), len(grid), rank, size)
    total, done = int(mine.sum()), 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    shape = (1, len(resolved), len(splits), len(grid))
    losses, accuracies = np.zeros(shape), np.zeros(shape)
    cache, resume_note = None, None
    if resume_dir is not None and size == 1:
        cache, resume_note = open_cache(
            resume_dir,
            module=module,
            loss=loss,
            anchors=(a.state, b.state),
            data=splits,
            bn_data=bn_data,
            settings={
                "alphas": grid.tolist(), "hold": hold, "dtype": dtype, "bn": bn,
                "bn_batches": bn_batches, "seed": seed, "data_size": data_size,
                "data": data_label, "options": options, "adapter": adapter and adapter.name,
                # Rounding depends on these: a resumed curve is bitwise the uninterrupted one.
                "batch": evaluator.batch_size(), "strategy": config.resolved_strategy,
                "channels_last": evaluator.channels_last,
            },
            device=config.device,
            grid=grid,
        )
    # Each path in chunks of grid points (with resume): the finished ones are read back.
    todo = []  # (group index, the grid indices of one chunk on this rank)
    floats = {k for k, v in a.state.items() if v.is_floating_point()}
    for g, group in enumerate(resolved):
        points = np.flatnonzero(mine[g])
        per_chunk = chunk_size(len(grid), hoistable=not floats <= set(group.keys))
        for part in chunks(points, per_chunk) if cache is not None else [points]:
            found = cache.load(group.keys, part) if cache is not None and part.size else None
            if found is not None:
                losses[0, g][:, part], accuracies[0, g][:, part] = found
                advance(len(part))
            elif part.size:
                todo.append((g, part))
    for line in (resume_note, cache and cache.warning()):
        if line:
            warnings.warn(line, stacklevel=2)
    batch = evaluator.batch_size()

    def store(i: int, curves) -> None:
        g, part = todo[i]
        for s, name in enumerate(splits):
            losses[0, g, s, part], accuracies[0, g, s, part] = curves[name]
        # After an out-of-memory back-off the batch size is not the key's: nothing more is kept.
        if cache is not None and evaluator.batch_size() == batch:
            cache.store(resolved[g].keys, part, losses[0, g][:, part], accuracies[0, g][:, part])

    evaluator.paths(
        [(resolved[g].keys, grid[part]) for g, part in todo],
        hold=hold,
        progress=advance,
        done=store,
    )
    if size > 1:  # every point is owned by one rank and zero on the others
        losses = distributed.reduce_sum(losses, config.device)
        accuracies = distributed.reduce_sum(accuracies, config.device)

    moved = distance_table(a, b, groups=group_specs, module=evaluator.module, full=full)
    tol = dict(tolerances or {})
    return build_result(
        loss=losses,
        accuracy=accuracies,
        distance=np.asarray(moved["relative"])[None],
        alphas=grid,
        groups=[g.name for g in resolved],
        patterns=[g.pattern for g in resolved],
        n_tensors=[len(g.keys) for g in resolved],
        n_params=moved["n_params"],
        splits=list(splits),
        n_examples=[len(x) for x, _ in splits.values()],
        runs=[RunInfo(run, a.path, b.path, a.sha256, b.sha256)],
        attrs={
            "ckptscope_version": _version(),
            "torch_version": torch.__version__,
            "device": str(config.device),
            "world_size": int(size),
            "dtype": dtype,
            "strategy": config.resolved_strategy,
            "batch_size": int(evaluator.batch_size()),
            "adapter": adapter.name if adapter else module_name(module),
            "adapter_options": json.dumps(options, sort_keys=True),
            "data": data_label,
            "data_seed": int(seed),
            "loss_function": loss if isinstance(loss, str) else getattr(loss, "__name__", "custom"),
            "bn_policy": bn,
            "bn_batches": int(bn_batches) if bn == "recompute" else 0,
            "hold": hold,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "notes": "; ".join(
                n for n in (*a.notes, *b.notes, *(cache.notes(total) if cache else (resume_note,)))
                if n
            ),
            **shape_attrs(**tol),
        },
        extra=shape_variables(losses, grid, **tol),
    )


def linear_paths(
    pairs: Mapping[str, tuple[StateSource, StateSource]]
    | Sequence[tuple[StateSource, StateSource]],
    model: nn.Module | str | Adapter | None = None,
    data: object = None,
    *,
    progress: Callable[[str, int, int], None] | None = None,
    **options,
) -> xr.Dataset:
    """Evaluate several checkpoint pairs (seeds, conditions) into one result with a ``run`` dim.

    Args:
        pairs: run label -> (start, end), or a sequence of (start, end) labelled "0", "1", ...
        model, data: as for :func:`linear_path` (shared by every pair).
        progress: called as ``progress(run, done, total)``.
        options: any other :func:`linear_path` keyword (groups, alphas, hold, tolerances, ...).

    Returns:
        The runs joined along ``run`` (:func:`ckptscope.results.merge_results`), classified.
    """
    items = (
        list(pairs.items())
        if isinstance(pairs, Mapping)
        else [(str(i), pair) for i, pair in enumerate(pairs)]
    )
    if not items:
        raise CkptscopeError("no checkpoint pairs given; pass at least one (start, end).")
    for _, (start, end) in items:
        check_stored(start, end, model, data, options)
    results = []
    for label, (start, end) in items:
        report = None
        if progress:

            def report(done, total, label=label):
                progress(label, done, total)

        results.append(linear_path(start, end, model, data, run=label, progress=report, **options))
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
    return classify(merged, **dict(options.get("tolerances") or {}))
