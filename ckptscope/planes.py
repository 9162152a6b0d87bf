"""Planes through three checkpoints, in the coordinates of Garipov et al. (NeurIPS 2018, "Loss
Surfaces, Mode Connectivity, and Fast Ensembling of DNNs"):

    theta(x, y) = A + x (B - A) + y V,   V = (C - A) - c (B - A),   c = <C - A, B - A> / ||B - A||^2

so A = (0, 0), B = (1, 0) and C = (c, 1); V is the part of C - A orthogonal to B - A. The
inner products and norms are over the group's parameters (each tied tensor once); every floating
tensor of the group (BatchNorm's running statistics too, under ``bn="interpolate"``) moves with
the same weights ``(1 - x - y + c y, x - c y, y)`` over (A, B, C). On a group's plane the rest
of the model stays at one checkpoint (``hold``, B by default, as a group path holds its end), so
the plane's row y = 0 is the group path from A to B.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import xarray as xr

from ckptscope.engine import EvalConfig
from ckptscope.errors import CkptscopeError
from ckptscope.grids import build_grid
from ckptscope.inputs import StateSource
from ckptscope.landscape import (
    Model,
    State,
    anchor_notes,
    axis_counts,
    axis_range,
    evaluate_grid,
    geometry_keys,
    grid_groups,
    group_fields,
    inner,
    load_anchors,
    prepare,
    provenance,
)
from ckptscope.points import PLANE_ANCHORS, axis_grid, grid_points, plane_weights
from ckptscope.questions import settle_config

PLANE_HOLDS = PLANE_ANCHORS
MARGIN = 0.25  # the default grid reaches this far beyond the three checkpoints
_COLLINEAR = 1e-6  # ||V|| below this fraction of ||C - A||: C is on the line through A and B


def plane_geometry(a: State, b: State, c: State, keys: Sequence[str], *, group: str = "all"
                   ) -> tuple[float, float, float]:
    """``(c, ||B - A||, ||V||)`` over ``keys`` (float64).

    Raises:
        CkptscopeError: A equals B over ``keys``, or C lies on the line through A and B.
    """
    ab = {k: b[k].double() - a[k].double() for k in keys}
    ac = {k: c[k].double() - a[k].double() for k in keys}
    ab2 = inner(ab, ab, keys)
    if ab2 == 0:
        raise CkptscopeError(
            f"A and B are identical over group {group!r}, so the plane has no x axis; pass two "
            f"different checkpoints as A and B (or leave the group out)."
        )
    coef = inner(ac, ab, keys) / ab2
    v2 = max(inner(ac, ac, keys) - 2 * coef * inner(ac, ab, keys) + coef**2 * ab2, 0.0)
    v_norm = float(np.sqrt(v2))
    if v_norm <= _COLLINEAR * np.sqrt(inner(ac, ac, keys)) or v_norm == 0:
        raise CkptscopeError(
            f"C lies on the line through A and B over group {group!r} (c = {coef:.4g}), so "
            f"the plane has no y axis; pass a third checkpoint off that line."
        )
    return float(coef), float(np.sqrt(ab2)), v_norm


def plane(
    a: StateSource,
    b: StateSource,
    c: StateSource,
    model: Model = None,
    data: object = None,
    *,
    grid: int | Sequence[int] = 21,
    x_range: Sequence[float] | None = None,
    y_range: Sequence[float] | None = None,
    groups: Sequence[str] | Mapping[str, str] | None = None,
    full: bool = True,
    hold: str = "b",
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
    """Evaluate loss and accuracy on the plane through three checkpoints.

    Args:
        a, b, c: checkpoint paths or state dicts; A is the origin, B is (1, 0), C is (c, 1).
        model, data: as for :func:`ckptscope.linear_path` (``None``: from A's metadata).
        grid: points along each axis (one count, or ``(nx, ny)``).
        x_range, y_range: ``(lo, hi)`` or ``(lo, hi, n)``; default: the three checkpoints
            with a margin of 0.25 ([-0.25, 1.25], wider where c falls outside [0, 1]). A
            checkpoint's coordinate inside a range is always a grid value (the nearest value
            moves onto it), so the grid point there is that checkpoint exactly.
        groups: regexes or name -> regex; each group gets its own plane (its own c), its
            tensors moving and the rest of the model at ``hold``.
        full: include the whole-model plane as group ``all``.
        hold: where the tensors outside a group stay: ``"a"``, ``"b"`` (default) or ``"c"``.
            The whole-model plane holds nothing: its non-float tensors come from the nearest
            checkpoint (the largest weight).
        loss, bn, split, device, dtype, adapter_options, config: as for
            :func:`ckptscope.linear_path`.
        run: the label in the ``run`` dim.
        progress: called as ``progress(done, total)`` as points finish.
        strip_prefix: as for :func:`ckptscope.linear_path`. The three checkpoints' keys are
            matched to the model as a path's are (wrapper prefixes, tied names, BatchNorm
            counters: ``docs/loading.md``); what was done is in the ``notes`` attribute.

    Returns:
        A grid result (``docs/results.md``): ``loss`` and ``accuracy`` (run, group, split, y,
        x), the anchors' coordinates ``anchor_x``/``anchor_y`` (run, group, anchor) and ``c``,
        ``ab_norm``, ``v_norm`` (run, group).

    Example:
        >>> ds = ckptscope.plane("seed0.safetensors", "seed1.safetensors",
        ...                      "seed2.safetensors", grid=21)             # doctest: +SKIP
        >>> ds.loss.sel(run="0", group="all", split="test").plot.contourf()  # doctest: +SKIP
    """
    if hold not in PLANE_HOLDS:
        raise CkptscopeError(f"hold={hold!r} is not one of {PLANE_HOLDS}.")
    nx, ny = axis_counts(grid)
    config = settle_config(config, bn=bn, dtype=dtype, device=device, caller="plane")
    names = ("A", "B", "C")
    anchors = load_anchors(dict(zip(names, (a, b, c), strict=True)), strip_prefix=strip_prefix)
    run_ = prepare(model, data, anchors, names, adapter_options=adapter_options, split=split,
                   loss=loss, config=config, dtype=dtype)
    ck_a, ck_b, ck_c = run_.checkpoints
    groups_ = grid_groups(ck_a, groups, full=full)
    states = {"a": ck_a.state, "b": ck_b.state, "c": ck_c.state}
    geometry = np.array([
        plane_geometry(ck_a.state, ck_b.state, ck_c.state,
                       geometry_keys(ck_a.state, g.keys, run_.module), group=g.name)
        for g in groups_])  # (group, 3): c, ||B - A||, ||V||
    cs = geometry[:, 0]
    lo_x, hi_x = min(-MARGIN, cs.min() - MARGIN), max(1 + MARGIN, cs.max() + MARGIN)
    x = axis_grid(*axis_range(x_range, (lo_x, hi_x), nx, "x"), keep=[0.0, 1.0, *cs], name="x")
    y = axis_grid(*axis_range(y_range, (-MARGIN, 1 + MARGIN), ny, "y"), keep=[0.0, 1.0],
                  name="y")
    requests = [grid_points(plane_weights(x, y, coef), PLANE_ANCHORS, g.keys, hold=hold,
                            every=ck_a.state) for g, coef in zip(groups_, cs, strict=True)]
    loss_, accuracy = evaluate_grid(run_, states, requests, (len(y), len(x)), progress)
    ones, zeros = np.ones_like(cs), np.zeros_like(cs)
    return build_grid(
        kind="plane",
        loss=loss_,
        accuracy=accuracy,
        x=x,
        y=y,
        **group_fields(run_, groups_),
        runs=[run],
        anchors=["A", "B", "C"],
        anchor_paths=np.array([[ck.path for ck in (ck_a, ck_b, ck_c)]]),
        anchor_sha256=np.array([[ck.sha256 for ck in (ck_a, ck_b, ck_c)]]),
        anchor_x=np.stack([zeros, ones, cs], axis=1)[None],
        anchor_y=np.stack([zeros, zeros, ones], axis=1)[None],
        geometry={"c": cs[None], "ab_norm": geometry[None, :, 1],
                  "v_norm": geometry[None, :, 2]},
        attrs=provenance(run_, config, anchor_notes(run_.checkpoints, names), {
            "hold": hold,
            "x_range": f"{x[0]:g}:{x[-1]:g}:{len(x)}",
            "y_range": f"{y[0]:g}:{y[-1]:g}:{len(y)}",
            "plane_coordinates": "theta(x, y) = A + x (B - A) + y V, V = (C - A) - c (B - A), "
                           "c = <C - A, B - A> / ||B - A||^2 (Garipov et al. 2018)",
        }),
    )
