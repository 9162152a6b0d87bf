"""The linear path: the alpha grid and the interpolated state (eq. 1 and 2 of the paper).

Eq. 1 (whole model): theta(alpha) = (1 - alpha) theta_a + alpha theta_b.
Eq. 2 (one group): the group's tensors follow eq. 1; every other tensor stays at the held
endpoint (``hold="end"``: theta_b, as in the paper; ``hold="start"``: theta_a).

Each point is computed fresh with :func:`torch.lerp`; at alpha = 0 and alpha = 1 the endpoint
itself is taken (so the ends are exact, and a NaN in one endpoint does not reach the other).
Integer tensors (``num_batches_tracked``) never move: they are always taken from the held
endpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ckptscope.errors import CkptscopeError

HOLDS = ("end", "start")


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
    parts = text.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        start, stop, n = float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        raise CkptscopeError(
            f"alpha range {text!r} is not START:STOP:N (e.g. -0.5:1.5:81)."
        ) from None
    if n < 2 or not start < stop:
        raise CkptscopeError(f"alpha range {text!r} needs START < STOP and N >= 2.")
    return np.linspace(start, stop, n)


@dataclass(frozen=True)
class PathPlan:
    """What moves on one path and what is held.

    Attributes:
        moving: keys that follow eq. 1 (floating tensors of the group).
        start: key -> tensor at alpha = 0 for the moving keys.
        end: key -> tensor at alpha = 1 for the moving keys.
        base: key -> tensor for every key: the held endpoint (moving keys included, as a default).
    """

    moving: tuple[str, ...]
    start: dict[str, torch.Tensor]
    end: dict[str, torch.Tensor]
    base: dict[str, torch.Tensor]


def plan_path(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    keys: Sequence[str],
    *,
    hold: str = "end",
) -> PathPlan:
    """Return the plan for moving ``keys`` from ``a`` to ``b`` with the rest held.

    Args:
        a, b: the two endpoint states (same keys and shapes).
        keys: the group's keys; integer tensors among them are not moved.
        hold: which endpoint the tensors outside the group come from: "end" (b) or "start" (a).
    """
    if hold not in HOLDS:
        raise CkptscopeError(f"hold={hold!r} is not one of {HOLDS}.")
    held = b if hold == "end" else a
    moving = tuple(k for k in keys if a[k].is_floating_point())
    return PathPlan(
        moving=moving,
        start={k: a[k] for k in moving},
        end={k: b[k] for k in moving},
        base=dict(held),
    )


def state_at(plan: PathPlan, alpha: float) -> dict[str, torch.Tensor]:
    """Return the full state at ``alpha`` (the slow, obvious form; the evaluator is faster)."""
    state = dict(plan.base)
    for k in plan.moving:
        if alpha in (0, 1):  # the endpoint itself: a NaN in the other end stays out
            state[k] = plan.end[k] if alpha == 1 else plan.start[k]
        else:
            state[k] = torch.lerp(plan.start[k], plan.end[k], float(alpha))
    return state


def write_point(
    targets: list[torch.Tensor], starts: list[torch.Tensor], ends: list[torch.Tensor], alpha: float
) -> None:
    """Write the point at ``alpha`` into ``targets`` in place (the evaluator's fast form).

    ``torch._foreach_copy_`` then ``torch._foreach_lerp_``: no allocation. The ends are copied,
    not lerped, as in :func:`state_at`.
    """
    torch._foreach_copy_(targets, ends if alpha == 1 else starts)
    if alpha not in (0, 1):
        torch._foreach_lerp_(targets, ends, float(alpha))


def stack_points(start: torch.Tensor, end: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Return ``(k, *shape)``: the points at ``alphas`` (k,), stacked, the ends exact.

    The vectorised form of :func:`state_at` for one tensor: at alpha = 0 and 1 the endpoint
    itself is taken, so a NaN in one endpoint never reaches the other.
    """
    w = alphas.view(-1, *([1] * start.dim()))
    out = torch.lerp(start.unsqueeze(0), end.unsqueeze(0), w)
    out = torch.where(w == 0, start.unsqueeze(0), out)
    return torch.where(w == 1, end.unsqueeze(0), out)
