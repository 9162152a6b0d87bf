"""Surfaces around one checkpoint: theta(x, y) = CENTER + x d_x + y d_y over a square grid, with
the directions of :mod:`ckptscope.directions` (random and filter-normalised as Li et al.,
NeurIPS 2018, read from a file, or two checkpoints' differences from the centre).

Two checkpoints A, B as directions, not normalised, make the surface the plane through CENTER,
A and B in skew coordinates: the anchors are the checkpoints themselves with weights
``(1 - x - y, x, y)``, so (1, 0) is A and (0, 1) is B bit for bit. Otherwise the anchors are
the centre and the two direction states with weights ``(1, x, y)``, and (0, 0) is the centre
bit for bit. Every tensor without a direction (a zero one) stays at the centre.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import xarray as xr

from ckptscope.checkpoints import Checkpoint, as_checkpoint, check_pair
from ckptscope.directions import (
    Directions,
    check_norm,
    checkpoint_directions,
    load_directions,
    random_directions,
)
from ckptscope.directions import save_directions as write_directions
from ckptscope.engine import EvalConfig
from ckptscope.errors import CkptscopeError
from ckptscope.grids import build_grid
from ckptscope.inputs import StateSource
from ckptscope.keys import strip_given
from ckptscope.landscape import (
    Evaluation,
    Model,
    anchor_notes,
    axis_counts,
    axis_range,
    evaluate_grid,
    grid_groups,
    group_fields,
    inner,
    load_anchors,
    match_anchors,
    prepare,
    provenance,
)
from ckptscope.points import SURFACE_ANCHORS, axis_grid, grid_points, surface_weights
from ckptscope.questions import settle_config

DirectionSpec = str | os.PathLike | Directions | Sequence[StateSource]
ANCHOR_NAMES = ("CENTER", "A", "B")  # in-memory states' names in notes and errors


def surface(
    center: StateSource,
    model: Model = None,
    data: object = None,
    *,
    directions: DirectionSpec = "random",
    norm: str | None = None,
    seed: int = 0,
    span: float = 1.0,
    grid: int | Sequence[int] = 21,
    x_range: Sequence[float] | None = None,
    y_range: Sequence[float] | None = None,
    include_1d: bool = False,
    groups: Sequence[str] | Mapping[str, str] | None = None,
    full: bool = True,
    save_directions: str | os.PathLike | None = None,
    loss: str | Callable | None = None,
    bn: str = "interpolate",
    split: str = "test",
    device: str | torch.device | None = None,
    dtype: str = "float32",
    adapter_options: Mapping[str, object] | None = None,
    run: str = "0",
    progress: Callable[[int, int], None] | None = None,
    config: EvalConfig | None = None,
    strip_prefix: str | Sequence[str] | None = None,
) -> xr.Dataset:
    """Evaluate loss and accuracy on a surface around ``center``.

    Args:
        center: a checkpoint path or state dict.
        model, data: as for :func:`ckptscope.linear_path` (``None``: from its metadata).
        directions: ``"random"``; a ``.safetensors`` file of ``x.KEY``/``y.KEY`` tensors
            (:func:`ckptscope.directions.save_directions`); two checkpoints ``(A, B)``, whose
            differences from the centre are the directions; or a
            :class:`~ckptscope.directions.Directions`.
        norm: ``filter``, ``layer`` or ``none``; default ``filter`` for random directions and
            ``none`` for a file or two checkpoints (used as they are).
        seed: seeds the random directions (recorded in the result).
        span: the default grid is [-span, span] along both axes.
        grid: points along each axis (one count, or ``(nx, ny)``).
        x_range, y_range: ``(lo, hi)`` or ``(lo, hi, n)`` instead of the span. The centre's 0
            (and, for two checkpoints, their 1) is always a grid value when inside.
        include_1d: give biases and BatchNorm weights a direction too (Li et al. leave them
            at the centre, the default); buffers never get one.
        groups, full: the surface for each group's tensors alone (the rest at the centre), and
            for the whole model (group ``all``).
        save_directions: write the directions used to this ``.safetensors`` file.
        loss, bn, split, device, dtype, adapter_options, run, progress, config,
            strip_prefix: as for :func:`ckptscope.plane` (the centre's and the direction
            checkpoints' keys are matched to the model; the ``notes`` attribute says how).

    Returns:
        A grid result (``docs/results.md``) of kind ``surface``: ``loss`` and ``accuracy``
        (run, group, split, y, x), ``x_norm``, ``y_norm``, ``cosine`` (run, group), the
        anchors' coordinates, and the directions' provenance in the attributes.

    Example:
        >>> ds = ckptscope.surface("final.safetensors", seed=0, span=1.0, grid=31,
        ...                        save_directions="dirs.safetensors")     # doctest: +SKIP
    """
    if norm is not None:
        check_norm(norm)
    nx, ny = axis_counts(grid)
    if not (isinstance(span, (int, float)) and np.isfinite(span) and span > 0):
        raise CkptscopeError(f"span={span!r} must be a positive number (e.g. 1.0).")
    config = settle_config(config, bn=bn, dtype=dtype, device=device, caller="surface")
    [ck_o] = load_anchors({"CENTER": center}, strip_prefix=strip_prefix)
    evaluation = prepare(model, data, [ck_o], ["CENTER"], adapter_options=adapter_options,
                         split=split, loss=loss, config=config, dtype=dtype)
    [ck_o] = evaluation.checkpoints
    dirs, others = _directions(directions, ck_o, norm=norm, seed=seed, include_1d=include_1d,
                               evaluation=evaluation, strip_prefix=strip_prefix)
    if save_directions is not None:
        write_directions(save_directions, dirs)
    affine = others is not None and dirs.norm == "none"
    if affine:
        anchors = {"center": ck_o.state, "d1": others[0].state, "d2": others[1].state}
        names, coords = ["center", "A", "B"], [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)]
    else:
        anchors = {"center": ck_o.state, "d1": dirs.x, "d2": dirs.y}
        names, coords = ["center"], [(0.0, 0.0)]
    keep = [c for xy in coords for c in xy]
    x = axis_grid(*axis_range(x_range, (-span, span), nx, "x"), keep=keep, name="x")
    y = axis_grid(*axis_range(y_range, (-span, span), ny, "y"), keep=keep, name="y")
    groups_ = grid_groups(ck_o, groups, full=full)
    weights = surface_weights(x, y, affine=affine)
    requests, geometry = [], []
    for g in groups_:
        moving = dirs.moving(g.keys)
        if not moving:
            raise CkptscopeError(
                f"group {g.name!r} has a zero direction in every tensor (its tensors are "
                f"one-dimensional or buffers); pass include_1d=True (--include-1d) or another "
                f"group."
            )
        requests.append(grid_points(weights, SURFACE_ANCHORS, g.keys if affine else moving,
                                    hold="center", every=ck_o.state, nearest=affine))
        geometry.append(_direction_geometry(dirs, moving))
    loss_, accuracy = evaluate_grid(evaluation, anchors, requests, (len(y), len(x)), progress)
    geometry = np.asarray(geometry)  # (group, 3)
    sources = [ck_o, *(others or ())]
    notes = anchor_notes(sources, ANCHOR_NAMES[:len(sources)])
    n_groups = len(groups_)
    return build_grid(
        kind="surface",
        loss=loss_,
        accuracy=accuracy,
        x=x,
        y=y,
        **group_fields(evaluation, groups_),
        runs=[run],
        anchors=names,
        anchor_paths=np.array([[ck.path for ck in sources[:len(names)]]]),
        anchor_sha256=np.array([[ck.sha256 for ck in sources[:len(names)]]]),
        anchor_x=np.broadcast_to([c[0] for c in coords], (1, n_groups, len(names))),
        anchor_y=np.broadcast_to([c[1] for c in coords], (1, n_groups, len(names))),
        geometry={"x_norm": geometry[None, :, 0], "y_norm": geometry[None, :, 1],
                  "cosine": geometry[None, :, 2]},
        attrs=provenance(evaluation, config, notes, {
            "hold": "center",
            "directions": dirs.kind,
            "direction_source": dirs.source,
            "direction_norm": dirs.norm,
            "direction_seed": int(dirs.seed),
            "include_1d": int(dirs.include_1d),
            "span": float(span),
            "x_range": f"{x[0]:g}:{x[-1]:g}:{len(x)}",
            "y_range": f"{y[0]:g}:{y[-1]:g}:{len(y)}",
            "surface_coordinates": ("theta(x, y) = (1 - x - y) CENTER + x A + y B" if affine
                                    else "theta(x, y) = CENTER + x d_x + y d_y"),
        }),
    )


def _directions(spec: DirectionSpec, center: Checkpoint, *, norm: str | None, seed: int,
                include_1d: bool, evaluation: Evaluation,
                strip_prefix: str | Sequence[str] | None
                ) -> tuple[Directions, tuple[Checkpoint, ...] | None]:
    """The directions, and the two checkpoints (their keys matched to the model, as the
    centre's) when they came from checkpoints."""
    module = evaluation.module
    if isinstance(spec, Directions):
        for axis in ("x", "y"):
            check_pair({k: v for k, v in center.state.items() if v.is_floating_point()},
                       getattr(spec, axis), names=("the centre", f"the {axis} direction"))
        return spec, None
    if isinstance(spec, str) and spec == "random":
        return random_directions(center.state, seed=seed, norm=norm or "filter",
                                 include_1d=include_1d, module=module), None
    if isinstance(spec, (str, os.PathLike)):
        return load_directions(spec, center.state, norm=norm or "none", module=module), None
    if isinstance(spec, Sequence) and len(spec) == 2:
        loaded = [center, *(as_checkpoint(s) for s in spec)]  # a prefix may be the centre's
        loaded = strip_given(loaded, strip_prefix, [c.path or n for c, n in
                                                    zip(loaded, ANCHOR_NAMES, strict=True)])
        _, a, b = match_anchors(loaded, ANCHOR_NAMES, module,
                                evaluation.adapter)
        names = (center.path or "CENTER", a.path or "A", b.path or "B")
        dirs = checkpoint_directions(center.state, a.state, b.state, norm=norm or "none",
                                     names=names, include_1d=include_1d, module=module)
        return dirs, (a, b)
    raise CkptscopeError(
        f"directions={spec!r} is not 'random', a .safetensors file or two checkpoints (A, B)."
    )


def _direction_geometry(dirs: Directions, keys: Sequence[str]) -> tuple[float, float, float]:
    """``(||d_x||, ||d_y||, cosine)`` over the moving ``keys``."""
    xx, yy = inner(dirs.x, dirs.x, keys), inner(dirs.y, dirs.y, keys)
    xy = inner(dirs.x, dirs.y, keys)
    denom = np.sqrt(xx * yy)
    return float(np.sqrt(xx)), float(np.sqrt(yy)), float(xy / denom) if denom else 0.0
