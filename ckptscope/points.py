"""Points as weights over anchor states: the alpha grid, point sets, and the state at a point.

Every question ckptscope answers is the loss at points theta = sum_i w_i theta_i of a few anchor
states theta_i, for a set of moving tensors, every other tensor held at one anchor. A path from
A to B (eq. 1 of the paper) is two anchors, ``start`` and ``end``, with w = (1 - alpha, alpha);
on a group path (eq. 2) only the group's tensors move and every other tensor stays at B
(``hold="end"``, as in the paper) or at A (``hold="start"``).

- A point is computed fresh from the anchors, never by accumulating steps. On the two-anchor
  line it is ``torch.lerp(theta_start, theta_end, alpha)``; other weights are summed over the
  anchors whose weight is not 0 (so a NaN in an anchor that does not contribute stays out).
- A point whose weights are a unit vector is that anchor's tensors, copied: the ends of a path
  are its checkpoints bit for bit, and a NaN in one end does not reach the other.
- A point is computed in the evaluation dtype (float32, or float64), whatever the anchors'
  dtype: an anchor held in float16 / bfloat16 (a checkpoint as stored) is upcast one tensor at
  a time, so ``lerp(float32(a), float32(b), alpha)``, never a bf16 lerp (:func:`work_dtype`,
  :func:`write_tensor`).
- Non-float tensors (``num_batches_tracked``, a bool pruning mask) never interpolate. On a point
  set that holds nothing (the whole model: its group holds every tensor) they come from the
  nearest anchor, the one with the largest weight (ties to the later anchor, the end), so the
  whole-model path starts at A and ends at B whatever ``hold`` is; on a group path they come
  from the held anchor, like every other tensor outside the group.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ckptscope.errors import CkptscopeError

HOLDS = ("end", "start")
PATH_ANCHORS = ("start", "end")  # alpha = 0 and alpha = 1
_AFFINE_TOL = 1e-12


def alpha_grid(alphas: int | Sequence[float] | np.ndarray) -> np.ndarray:
    """Return the alpha values as a float64 array.

    Args:
        alphas: an int count ``n >= 2`` (evenly spaced on [0, 1], both ends included) or a
            sequence of at least two finite, strictly increasing values (values outside [0, 1]
            extrapolate). A float is refused: ``51.0`` is neither.
    """
    if isinstance(alphas, bool):
        raise CkptscopeError(f"alphas={alphas} is a bool; give a count (51) or a list of values.")
    if isinstance(alphas, (int, np.integer)):
        if alphas < 2:
            raise CkptscopeError(f"alphas={alphas} is too few; ask for at least 2 (0 and 1).")
        return np.linspace(0.0, 1.0, int(alphas))
    if isinstance(alphas, (str, bytes)) or np.ndim(alphas) == 0:
        # A float count (51.0) would otherwise read as the one-point grid [51.0].
        raise CkptscopeError(
            f"alphas={alphas!r} is neither a count nor a list; give an int count (e.g. 51) or "
            f"the values as a list (e.g. [0, 0.5, 1])."
        )
    try:
        grid = np.asarray(alphas, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise CkptscopeError(
            f"alphas={alphas!r} is not a list of numbers; give e.g. [0, 0.5, 1] or a count."
        ) from None
    if grid.size == 0:
        raise CkptscopeError("the alpha grid is empty; give a count or a list of values.")
    if grid.size == 1:
        raise CkptscopeError(
            f"the alpha grid has one point ({grid[0]:g}); a path needs at least two (0 and 1)."
        )
    if not np.all(np.isfinite(grid)):
        raise CkptscopeError(f"the alpha grid holds NaN or Inf ({grid.tolist()[:8]}).")
    if grid.size > 1 and not np.all(np.diff(grid) > 0):
        raise CkptscopeError(
            "the alpha grid must be strictly increasing; sort it and drop repeats."
        )
    return grid


def parse_alpha_range(text: str) -> np.ndarray:
    """Parse ``START:STOP:N`` into ``N`` evenly spaced values, both ends included."""
    start, stop, n = _parse_range(text, what="alpha range", ends=("START", "STOP"),
                                  example="-0.5:1.5:81")
    return np.linspace(start, stop, n)


def _parse_range(text: str, *, what: str, ends: tuple[str, str], example: str
                 ) -> tuple[float, float, int]:
    """``(lo, hi, n)`` from ``LO:HI:N`` text; ``what``, ``ends`` and ``example`` word the
    errors (``"x range"``, ``("LO", "HI")``, ``"-0.25:1.25:21"``)."""
    parts = text.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        lo, hi, n = float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        raise CkptscopeError(
            f"{what} {text!r} is not {ends[0]}:{ends[1]}:N (e.g. {example})."
        ) from None
    if n < 2 or not lo < hi:
        raise CkptscopeError(f"{what} {text!r} needs {ends[0]} < {ends[1]} and N >= 2.")
    return lo, hi, n


@dataclass(frozen=True, eq=False)
class PointSet:
    """Points theta = sum_i w_i theta_i over named anchor states, for one set of moving tensors.

    Attributes:
        anchors: the anchor names, in the order of the weight columns.
        weights: (n, k) float64, one row per point.
        moving: the keys that move (a group's); non-float tensors among them do not.
        held: the anchor every tensor that does not move stays at; ``None``: nothing is held
            (the whole model), and the tensors that do not move (the non-float ones) come from
            each point's nearest anchor.
    """

    anchors: tuple[str, ...]
    weights: np.ndarray
    moving: tuple[str, ...]
    held: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "anchors", tuple(self.anchors))
        object.__setattr__(self, "moving", tuple(self.moving))
        weights = np.asarray(self.weights, dtype=np.float64)
        if weights.ndim == 1 and weights.size == 0:
            weights = weights.reshape(0, len(self.anchors))
        object.__setattr__(self, "weights", weights)
        if not self.anchors or len(set(self.anchors)) != len(self.anchors):
            raise CkptscopeError(f"anchors {self.anchors} must be distinct names, at least one.")
        if weights.ndim != 2 or weights.shape[1] != len(self.anchors):
            raise CkptscopeError(
                f"weights of shape {weights.shape} do not match {len(self.anchors)} anchors "
                f"{self.anchors}; give one row of {len(self.anchors)} weights per point."
            )
        if not np.all(np.isfinite(weights)):
            raise CkptscopeError("the weights hold NaN or Inf; every weight must be finite.")
        if self.held is not None and self.held not in self.anchors:
            raise CkptscopeError(
                f"held anchor {self.held!r} is not one of the anchors {self.anchors}."
            )

    def __len__(self) -> int:
        return len(self.weights)

    def rest(self) -> np.ndarray:
        """(n,) the index of the anchor that the tensors which do not move come from at each
        point: the held one, or the nearest (the largest weight, ties to the later anchor)."""
        n, k = self.weights.shape
        if self.held is not None:
            return np.full(n, self.anchors.index(self.held), dtype=np.intp)
        return (k - 1 - np.argmax(self.weights[:, ::-1], axis=1)).astype(np.intp)

    def exact(self) -> np.ndarray:
        """(n,) the anchor each point equals (its weights a unit vector), or -1."""
        return np.array([_exact(w) for w in self.weights.tolist()], dtype=np.intp)


def path_points(
    alphas: Sequence[float] | np.ndarray,
    moving: Sequence[str],
    *,
    hold: str = "end",
    every: Collection[str] | None = None,
) -> PointSet:
    """The points at ``alphas`` on the path from anchor ``start`` (0) to ``end`` (1).

    Args:
        alphas: (n,) the points, as from :func:`alpha_grid` (any values; empty is allowed).
        moving: the group's keys.
        hold: where the tensors outside the group stay: "end" or "start".
        every: every key of the state. When ``moving`` holds them all, nothing is held: the
            whole-model path, whose non-float tensors come from the nearer end.
    """
    if hold not in HOLDS:
        raise CkptscopeError(f"hold={hold!r} is not one of {HOLDS}.")
    alphas = np.asarray(alphas, dtype=np.float64).reshape(-1)
    whole = every is not None and set(every) <= set(moving)
    return PointSet(PATH_ANCHORS, np.stack([1.0 - alphas, alphas], axis=1), tuple(moving),
                    None if whole else hold)


def _exact(w: Sequence[float]) -> int:
    """The anchor a weight row equals (a unit vector), or -1. Plain floats: it runs per point."""
    hit = -1
    for i, x in enumerate(w):
        if x == 0:
            continue
        if x != 1 or hit >= 0:
            return -1
        hit = i
    return hit


def _line_alpha(w: Sequence[float]) -> float | None:
    """alpha when a row is (1 - alpha, alpha) on two anchors, else ``None``."""
    if len(w) == 2 and abs(w[0] + w[1] - 1.0) <= _AFFINE_TOL * max(1.0, abs(w[0]) + abs(w[1])):
        return float(w[1])
    return None


def work_dtype(values: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype a point is computed in from its anchors' ``values``: float32, or float64 when
    an anchor is float64. Half-precision anchors (float16, bfloat16) are upcast."""
    dtype = torch.float32
    for value in values:
        dtype = torch.promote_types(dtype, value.dtype)
    return dtype


def combine(values: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """One tensor at one point: ``values[i]`` is its value at anchor i, ``weights`` (k,).

    The slow, obvious form, which :func:`write_point` and :func:`stack_points` reproduce:
    an anchor itself for a unit vector, ``torch.lerp`` on the two-anchor line, else the sum over
    the anchors whose weight is not 0; in :func:`work_dtype` (half-precision anchors are upcast
    to float32 first, the whole tensor at once).
    """
    dtype = work_dtype(values)
    w = np.asarray(weights, dtype=np.float64).tolist()
    if (j := _exact(w)) >= 0:
        return values[j].to(dtype)
    if (alpha := _line_alpha(w)) is not None:
        return torch.lerp(values[0].to(dtype), values[1].to(dtype), alpha)
    out = torch.zeros(values[0].shape, dtype=dtype, device=values[0].device)
    for value, wi in zip(values, w, strict=True):
        if wi != 0:
            out = torch.add(out, value.to(dtype), alpha=wi)
    return out


def state_at(
    points: PointSet, anchors: Mapping[str, Mapping[str, torch.Tensor]], i: int
) -> dict[str, torch.Tensor]:
    """The full state at point ``i`` of ``points`` (the slow, obvious form; the evaluator is
    faster): the tensors that do not move from the held or nearest anchor, the moving floating
    tensors from :func:`combine`."""
    states = [anchors[name] for name in points.anchors]
    rest = states[points.rest()[i]]
    state = dict(rest)
    for k in points.moving:
        if k in rest and rest[k].is_floating_point():
            state[k] = combine([s[k] for s in states], points.weights[i])
    return state


def path_state(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    alpha: float,
    *,
    keys: Sequence[str] | None = None,
    hold: str = "end",
) -> dict[str, torch.Tensor]:
    """The full state at ``alpha`` on the path from ``a`` to ``b``: every tensor (``keys``
    ``None``) or only ``keys`` moving, the rest held at ``hold``."""
    keys = list(a) if keys is None else list(keys)
    points = path_points([alpha], keys, hold=hold, every=list(a))
    return state_at(points, {"start": a, "end": b}, 0)


def write_point(
    targets: Sequence[torch.Tensor],
    sources: Sequence[Sequence[torch.Tensor]],
    weights: np.ndarray,
) -> None:
    """Write one point into ``targets`` in place (the loop's form of :func:`combine`).

    Args:
        targets: the tensors to write (the module's own, in the evaluation dtype).
        sources: per anchor, its values in the order of ``targets``, in any floating dtype
            (a checkpoint's float16 / bfloat16 tensors as stored, memory-mapped).
        weights: (k,) the point's weights.

    Where every anchor's tensor has its target's dtype: ``torch._foreach_copy_`` for an anchor;
    ``_foreach_copy_`` then ``_foreach_lerp_`` on the two-anchor line; a scaled copy and
    ``_foreach_add_`` otherwise. No allocation. The other tensors one at a time, in the
    target's dtype (:func:`write_tensor`): a checkpoint held in half precision is upcast one
    block of a tensor at a time, never as a whole state.
    """
    w = weights.tolist() if isinstance(weights, np.ndarray) else [float(x) for x in weights]
    mixed = [i for i, t in enumerate(targets) if any(src[i].dtype != t.dtype for src in sources)]
    if mixed:
        for i in mixed:
            write_tensor(targets[i], [src[i] for src in sources], w)
        same = sorted(set(range(len(targets))) - set(mixed))
        targets = [targets[i] for i in same]
        sources = [[src[i] for i in same] for src in sources]
        if not targets:
            return
    if (j := _exact(w)) >= 0:
        torch._foreach_copy_(targets, sources[j])
        return
    if (alpha := _line_alpha(w)) is not None:
        torch._foreach_copy_(targets, sources[0])
        torch._foreach_lerp_(targets, sources[1], alpha)
        return
    torch._foreach_zero_(targets)
    for source, wi in zip(sources, w, strict=True):
        if wi != 0:
            torch._foreach_add_(targets, source, alpha=wi)


UPCAST_BLOCK = 1 << 22  # elements of a source upcast at once: 16 MiB in float32


def _row_blocks(t: torch.Tensor) -> list:
    """Indices along dim 0 that cut ``t`` into blocks of about :data:`UPCAST_BLOCK` elements
    (``...``, the whole tensor, for a 0-d or small one)."""
    if t.dim() == 0 or t.numel() <= UPCAST_BLOCK:
        return [...]
    rows = max(1, UPCAST_BLOCK // max(1, t[0].numel()))
    return [slice(lo, lo + rows) for lo in range(0, t.shape[0], rows)]


def write_tensor(target: torch.Tensor, values: Sequence[torch.Tensor],
                 weights: Sequence[float]) -> None:
    """Write one tensor at one point into ``target`` in place, computed in ``target``'s dtype
    (:func:`combine`'s arithmetic): ``values[i]`` is its value at anchor i, in any floating
    dtype; a value of another dtype is upcast a block of rows at a time, so the temporary
    memory is at most :data:`UPCAST_BLOCK` elements per anchor."""
    w = [float(x) for x in weights]
    if (j := _exact(w)) >= 0:
        target.copy_(values[j])  # converts as it copies
        return
    alpha = _line_alpha(w)
    for rows in _row_blocks(target):
        out, parts = target[rows], [v[rows] for v in values]
        if alpha is not None:
            out.copy_(parts[0])
            out.lerp_(parts[1].to(out.dtype), alpha)
            continue
        out.zero_()
        for part, wi in zip(parts, w, strict=True):
            if wi != 0:
                out.add_(part.to(out.dtype), alpha=wi)


@dataclass(frozen=True)
class Stacking:
    """One chunk of points as tensors on the device, for :func:`stack_points`.

    Attributes:
        alphas: (c,) alpha per point when every row is (1 - alpha, alpha), else ``None``.
        weights: (c, k) the weights.
        exact: per point, the anchor it equals, or -1.
    """

    alphas: torch.Tensor | None
    weights: torch.Tensor
    exact: np.ndarray


def stacking(weights: np.ndarray, *, dtype: torch.dtype, device: torch.device) -> Stacking:
    """The chunk ``weights`` (c, k) ready for :func:`stack_points`, in ``dtype`` on ``device``."""
    weights = np.asarray(weights, dtype=np.float64)
    rows = weights.tolist()
    alphas = None
    if weights.shape[1] == 2 and all(_line_alpha(w) is not None for w in rows):
        alphas = torch.as_tensor(weights[:, 1], dtype=dtype, device=device)
    return Stacking(alphas, torch.as_tensor(weights, dtype=dtype, device=device),
                    np.array([_exact(w) for w in rows], dtype=np.intp))


def stack_points(values: Sequence[torch.Tensor], at: Stacking) -> torch.Tensor:
    """``(c, *shape)``: one tensor at the chunk's points, stacked (the vectorised form of
    :func:`combine`), in the chunk's dtype; ``values[i]`` is its value at anchor i (a value
    in another dtype, a half-precision anchor's, is upcast first)."""
    dtype = at.weights.dtype  # anchors held in half precision are upcast, one tensor here
    values = [v if v.dtype == dtype else v.to(dtype) for v in values]
    first = values[0]
    view = (-1, *([1] * first.dim()))
    if at.alphas is not None:  # the line: at alpha = 0 and 1 the end itself
        w = at.alphas.view(view)
        start, end = values[0].unsqueeze(0), values[1].unsqueeze(0)
        out = torch.lerp(start, end, w)
        out = torch.where(w == 0, start, out)
        return torch.where(w == 1, end, out)
    out = torch.zeros((len(at.weights), *first.shape), dtype=first.dtype, device=first.device)
    for i, value in enumerate(values):
        w = at.weights[:, i].view(view)
        if not bool((w != 0).any()):
            continue
        # A weight of 0 contributes nothing, not 0 * NaN.
        out = out + torch.where(w == 0, torch.zeros((), dtype=first.dtype,
                                                    device=first.device), w * value)
    for j in set(at.exact.tolist()) - {-1}:
        rows = torch.as_tensor(at.exact == j, device=first.device).view(view)
        out = torch.where(rows, values[j].unsqueeze(0), out)
    return out


# --- grids over two coordinates: planes and surfaces ----------------------------------------
PLANE_ANCHORS = ("a", "b", "c")  # (0, 0), (1, 0), (c, 1) in the plane's coordinates
SURFACE_ANCHORS = ("center", "d1", "d2")  # theta = center + x d1 + y d2


def axis_grid(lo: float, hi: float, n: int, *, keep: Sequence[float] = (),
              name: str = "x") -> np.ndarray:
    """``n`` values evenly spaced on [lo, hi], both ends included, holding every value of
    ``keep`` that falls inside (the anchors' coordinates), so a grid point at an anchor is
    that anchor exactly.

    A kept value replaces the grid value nearest to it (the grid keeps its ``n`` points and its
    ends, the spacing moves by less than half a step there); where that value is an end or
    already kept, the kept value is inserted instead (one point more).

    Raises:
        CkptscopeError: ``lo``/``hi`` not finite, ``lo >= hi`` or ``n < 2``.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise CkptscopeError(f"the {name} grid needs an int count of at least 2 points, got {n!r}.")
    if not (np.isfinite(lo) and np.isfinite(hi)) or not lo < hi:
        raise CkptscopeError(
            f"the {name} range [{lo}, {hi}] is not finite and increasing; give LO < HI "
            f"(e.g. -0.25:1.25:21)."
        )
    grid = np.linspace(float(lo), float(hi), int(n)).tolist()
    kept = {grid[0], grid[-1]}
    for value in sorted({float(v) for v in keep}):
        if not lo <= value <= hi or value in kept:
            continue
        if value not in grid:
            i = int(np.argmin(np.abs(np.asarray(grid) - value)))
            if grid[i] in kept:
                grid = sorted([*grid, value])
            else:
                grid[i] = value  # the nearest: it stays between its neighbours
        kept.add(value)
    return np.asarray(grid, dtype=np.float64)


def parse_axis_range(text: str, *, name: str = "x") -> tuple[float, float, int]:
    """Parse ``LO:HI:N`` into ``(lo, hi, n)``."""
    return _parse_range(text, what=f"{name} range", ends=("LO", "HI"), example="-0.25:1.25:21")


def plane_weights(x: np.ndarray, y: np.ndarray, c: float) -> np.ndarray:
    """(len(y) * len(x), 3) the weights over anchors (a, b, c) of the plane's points, rows in
    (y, x) order: theta(x, y) = A + x (B - A) + y V with V = (C - A) - c (B - A), i.e.
    w = (1 - x - y + c y, x - c y, y). The points at (0, 0), (1, 0) and (c, 1) are the unit
    vectors exactly (rounding would otherwise leave 1e-17 of the other anchors)."""
    xx, yy = np.meshgrid(np.asarray(x, np.float64), np.asarray(y, np.float64))
    xx, yy = xx.reshape(-1), yy.reshape(-1)
    w = np.stack([1.0 - xx - yy + c * yy, xx - c * yy, yy], axis=1)
    for j, (ax, ay) in enumerate(((0.0, 0.0), (1.0, 0.0), (c, 1.0))):
        hit = (xx == ax) & (yy == ay)
        w[hit] = np.eye(3)[j]
    return w


def surface_weights(x: np.ndarray, y: np.ndarray, *, affine: bool = False) -> np.ndarray:
    """(len(y) * len(x), 3) the weights over (center, d1, d2), rows in (y, x) order:
    ``(1, x, y)`` for direction states (theta = center + x d1 + y d2), or, ``affine``, over
    (center, A, B) ``(1 - x - y, x, y)``, whose (0, 0), (1, 0), (0, 1) are the anchors."""
    xx, yy = np.meshgrid(np.asarray(x, np.float64), np.asarray(y, np.float64))
    xx, yy = xx.reshape(-1), yy.reshape(-1)
    first = 1.0 - xx - yy if affine else np.ones_like(xx)
    return np.stack([first, xx, yy], axis=1)


def grid_points(weights: np.ndarray, anchors: Sequence[str], moving: Sequence[str], *,
                hold: str, every: Collection[str], nearest: bool = True) -> PointSet:
    """A point set over ``anchors``: the group's keys ``moving`` move, the rest stays at anchor
    ``hold``. When ``moving`` holds every key and ``nearest``, nothing is held: the non-float
    tensors come from each point's nearest anchor, as on the whole-model path."""
    whole = nearest and set(every) <= set(moving)
    return PointSet(tuple(anchors), weights, tuple(moving), None if whole else hold)
