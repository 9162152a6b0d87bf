"""Directions for surfaces around one checkpoint: random ones normalised as Li et al. (NeurIPS
2018, "Visualizing the Loss Landscape of Neural Nets") do, ones saved in a file, or two
checkpoints' differences from the centre.

A direction is a state over the centre's floating keys (``key -> tensor`` of the key's shape).
A surface evaluates theta(x, y) = centre + x d_x + y d_y.

- Random directions draw every floating tensor from N(0, 1) with a ``torch.Generator`` seeded
  by ``seed`` (x's tensors first, then y's, in the centre's key order, on the CPU), so one seed
  gives the same directions on every machine.
- ``norm="filter"`` rescales each filter of a direction tensor (a row of a Linear weight, an
  output channel of a conv: a slice along dim 0) to the norm of the centre's filter;
  ``"layer"`` rescales the whole tensor to the centre tensor's norm; ``"none"`` leaves it.
- Tensors of one dimension or none (biases, BatchNorm's weight and bias) get a zero direction,
  as in Li et al.'s code (``ignore="biasbn"``); ``include_1d=True`` gives them one,
  normalised like the others (under ``filter`` each scalar is its own filter). Buffers
  (BatchNorm's running statistics) always get zero: a random running variance could turn
  negative.
- Files are safetensors with the tensors' own names under ``x.`` and ``y.`` (``x.fc.weight``);
  a key the file leaves out has a zero direction.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ckptscope.checkpoints import check_pair, load_checkpoint, save_checkpoint
from ckptscope.errors import CkptscopeError
from ckptscope.identity import buffer_keys

NORMS = ("filter", "layer", "none")
AXES = ("x", "y")
_EPS = 1e-10  # as Li et al.'s normalize_direction: a zero filter of the direction stays zero

State = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Directions:
    """Two directions around a centre.

    Attributes:
        x, y: key -> direction tensor (float, the key's shape), for the centre's floating keys.
        kind: ``random``, ``file`` or ``checkpoints``.
        norm: the normalisation applied (``filter``, ``layer`` or ``none``).
        seed: the seed of random directions (-1 otherwise).
        include_1d: whether one-dimensional tensors got a direction.
        source: the file, or the two checkpoints, they came from ("" for random ones).
    """

    x: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]
    kind: str
    norm: str
    seed: int = -1
    include_1d: bool = False
    source: str = ""

    def moving(self, keys) -> tuple[str, ...]:
        """The keys among ``keys`` whose direction is not zero along x or y."""
        return tuple(k for k in keys if k in self.x and (
            bool(self.x[k].any()) or bool(self.y[k].any())))


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise CkptscopeError(f"norm {norm!r} is not one of {', '.join(NORMS)}.")
    return norm


def normalise(direction: torch.Tensor, weight: torch.Tensor, norm: str) -> torch.Tensor:
    """``direction`` rescaled to ``weight``'s norms, per filter (slices along dim 0), per
    layer (the whole tensor), or not at all; a new tensor. A zero-dimensional tensor is one
    filter."""
    check_norm(norm)
    if norm == "none":
        return direction.clone()
    d, w = direction.double(), weight.double()
    if norm == "layer" or d.dim() == 0:
        scale = w.norm() / (d.norm() + _EPS)
    else:
        dims = tuple(range(1, d.dim()))
        shape = (-1, *([1] * (d.dim() - 1)))
        d_norm = d.square().sum(dims).sqrt() if dims else d.abs()
        w_norm = w.square().sum(dims).sqrt() if dims else w.abs()
        scale = (w_norm / (d_norm + _EPS)).view(shape)
    return (d * scale).to(direction.dtype)


def _zeroed(center: State, module: nn.Module | None, include_1d: bool) -> set[str]:
    """The floating keys that get a zero direction: buffers, and 1-D tensors unless asked."""
    zero = {k for k in buffer_keys(center, module) if center[k].is_floating_point()}
    if not include_1d:
        zero |= {k for k, v in center.items() if v.is_floating_point() and v.dim() <= 1}
    return zero


def random_directions(center: State, *, seed: int = 0, norm: str = "filter",
                      include_1d: bool = False, module: nn.Module | None = None) -> Directions:
    """Two random directions around ``center``, normalised to it.

    Args:
        center: the centre's state (key -> tensor).
        seed: seeds the CPU generator the directions are drawn from.
        norm: ``filter`` (Li et al.'s filter normalisation), ``layer`` or ``none``.
        include_1d: give biases and BatchNorm weights a direction too (default: zero).
        module: tells buffers from parameters (default: by name, see
            :func:`ckptscope.identity.buffer_keys`).
    """
    check_norm(norm)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CkptscopeError(f"seed {seed!r} is not an int.")
    generator = torch.Generator().manual_seed(seed)
    zero = _zeroed(center, module, include_1d)
    floats = [k for k, v in center.items() if v.is_floating_point()]
    out = []
    for _ in AXES:
        direction = {}
        for k in floats:
            w = center[k]
            drawn = torch.randn(w.shape, generator=generator, dtype=torch.float64)
            direction[k] = (torch.zeros_like(w) if k in zero
                            else normalise(drawn, w, norm).to(w.dtype))
        out.append(direction)
    if not any(bool(v.any()) for v in out[0].values()):
        raise CkptscopeError(
            "every tensor of the centre is one-dimensional or a buffer, so every direction is "
            "zero; pass include_1d=True (--include-1d)."
        )
    return Directions(out[0], out[1], "random", norm, seed, include_1d)


def checkpoint_directions(center: State, a: State, b: State, *, norm: str = "none",
                          names: tuple[str, str, str] = ("CENTER", "A", "B"),
                          include_1d: bool = True, module: nn.Module | None = None
                          ) -> Directions:
    """The directions ``a - center`` (x) and ``b - center`` (y), over every floating tensor
    (buffers too, as on a path), normalised to the centre when ``norm`` is not ``none``
    (then, as for random ones, 1-D tensors and buffers get zero unless ``include_1d``).

    Raises:
        CkptscopeError: the states do not match, or one of them equals the centre.
    """
    check_norm(norm)
    check_pair(center, a, names=(names[0], names[1]))
    check_pair(center, b, names=(names[0], names[2]))
    floats = [k for k, v in center.items() if v.is_floating_point()]
    zero = _zeroed(center, module, include_1d) if norm != "none" else set()
    out = []
    for other, name in ((a, names[1]), (b, names[2])):
        diff = {k: other[k].double() - center[k].double() for k in floats}
        if not any(bool(v.any()) for v in diff.values()):
            raise CkptscopeError(
                f"{name} equals {names[0]} in every floating tensor, so its direction is zero; "
                f"pass a checkpoint that differs from the centre."
            )
        out.append({k: torch.zeros_like(center[k]) if k in zero
                    else normalise(v, center[k], norm).to(center[k].dtype)
                    for k, v in diff.items()})
    return Directions(out[0], out[1], "checkpoints", norm, -1, include_1d or norm == "none",
                      f"{names[1]},{names[2]}")


def save_directions(path: str | os.PathLike, directions: Directions) -> Path:
    """Write the directions as safetensors (``x.KEY`` and ``y.KEY``), atomically, with how
    they were made in the metadata."""
    if Path(path).suffix.lower() != ".safetensors":
        raise CkptscopeError(f"directions file {str(path)!r} should end in .safetensors.")
    tensors = {f"{axis}.{k}": v for axis in AXES
               for k, v in getattr(directions, axis).items()}
    return save_checkpoint(path, tensors, metadata={
        "kind": "directions", "directions": directions.kind, "norm": directions.norm,
        "seed": str(directions.seed), "include_1d": str(directions.include_1d).lower(),
        "source": directions.source})


def load_directions(path: str | os.PathLike, center: State, *, norm: str = "none",
                    module: nn.Module | None = None) -> Directions:
    """Read directions written by :func:`save_directions` (or by hand: ``x.KEY``/``y.KEY``
    tensors of the centre's shapes) for ``center``; a key left out has zero direction.
    ``norm`` other than ``none`` normalises them to the centre again.

    Raises:
        CkptscopeError: the file is unreadable, holds other names or shapes than the centre's
            floating tensors, or a direction that is zero everywhere.
    """
    check_norm(norm)
    ckpt = load_checkpoint(path)
    floats = {k: v for k, v in center.items() if v.is_floating_point()}
    bad = sorted(k for k in ckpt.state if k.partition(".")[0] not in AXES
                 or k.partition(".")[2] not in floats)
    if bad:
        raise CkptscopeError(
            f"directions file {str(path)!r} holds {', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}, which are not x.KEY / y.KEY for a floating "
            f"tensor of the centre (keys start with {list(floats)[:3]}); save the directions "
            f"for this model with --save-directions."
        )
    out = []
    for axis in AXES:
        direction = {}
        for k, w in floats.items():
            v = ckpt.state.get(f"{axis}.{k}")
            if v is None:
                direction[k] = torch.zeros_like(w)
                continue
            if v.shape != w.shape or not v.is_floating_point():
                raise CkptscopeError(
                    f"directions file {str(path)!r}: {axis}.{k} is {v.dtype} {tuple(v.shape)}, "
                    f"the centre's {k} is {tuple(w.shape)}; save the directions for this model."
                )
            direction[k] = normalise(v, w, norm).to(w.dtype) if norm != "none" else v.to(w.dtype)
        if not any(bool(v.any()) for v in direction.values()):
            raise CkptscopeError(
                f"directions file {str(path)!r}: the {axis} direction is zero everywhere; "
                f"give a direction that moves some tensor."
            )
        if not all(bool(torch.isfinite(v).all()) for v in direction.values()):
            raise CkptscopeError(
                f"directions file {str(path)!r}: the {axis} direction holds NaN or Inf."
            )
        out.append(direction)
    meta = ckpt.metadata  # inert text: kept only where it is a value ckptscope writes
    seed, stored = meta.get("seed", "-1"), meta.get("norm", "none")
    return Directions(out[0], out[1], "file",
                      norm if norm != "none" else stored if stored in NORMS else "none",
                      int(seed) if seed.lstrip("-").isdigit() and len(seed) < 20 else -1,
                      meta.get("include_1d", "false") == "true", str(path))

