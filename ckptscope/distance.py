"""Distances in weight space (the paper's appendix E, eq. 4).

d(theta_b, theta_a) = ||theta_b - theta_a||_F / ||theta_a||_F over a group's parameters,
in float64. Buffers (BatchNorm running statistics, ``num_batches_tracked``) are not parameters
and are left out; tied tensors (two keys, one storage) count once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def parameter_keys(state: Mapping[str, torch.Tensor], module: nn.Module | None = None) -> set[str]:
    """Return the keys of ``state`` that are parameters, each storage once.

    With a module, its ``named_parameters()`` (which already drops tied duplicates) decides;
    without one, floating tensors whose names do not end in a BatchNorm buffer name count,
    deduplicated by storage.
    """
    if module is not None:
        return {k for k, _ in module.named_parameters()} & set(state)
    keys, seen = set(), set()
    for k, v in state.items():
        if not v.is_floating_point() or k.rsplit(".", 1)[-1] in BUFFER_SUFFIXES:
            continue
        storage = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if v.numel() and storage in seen:
            continue
        seen.add(storage)
        keys.add(k)
    return keys


def relative_distance(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], keys: Iterable[str]
) -> float:
    """Return ||b - a||_F / ||a||_F over ``keys`` (eq. 4); NaN for no keys or ||a|| = 0 = ||b - a||.

    Returns ``inf`` when ``a`` is zero over the keys but ``b`` is not.
    """
    num = den = 0.0
    for k in keys:
        x, y = a[k].double(), b[k].double()
        num += float(torch.sum((y - x) ** 2))
        den += float(torch.sum(x**2))
    if den == 0.0:
        return math.inf if num > 0 else math.nan
    return math.sqrt(num) / math.sqrt(den)


def group_distances(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    groups: Sequence[Sequence[str]],
    params: set[str],
) -> list[float]:
    """Return eq. 4 for each group's keys, restricted to ``params``."""
    return [relative_distance(a, b, [k for k in keys if k in params]) for keys in groups]
