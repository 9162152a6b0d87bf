"""Weight matching (Git Re-Basin, Ainsworth et al. 2023, algorithm 1).

Find the permutations P of OTHER's hidden units that maximise the summed inner product of the
two networks' tensors, sum_k <theta_ref[k], P(theta_other)[k]>. One class at a time, holding
the others, that objective is linear in the class's permutation: a linear assignment problem
(``scipy.optimize.linear_sum_assignment``) over the n x n matrix

    A[i, j] = sum over the class's axes (k, d) of <ref[k] unit i along d, other'[k] unit j along d>

where ``other'`` has every other axis permuted by the current permutations. Classes are visited
in an order shuffled per sweep by a seeded generator; a class's permutation is replaced only when
the new one raises the objective, and the sweeps stop when none changes (or after
``max_sweeps``). A class none of whose neighbours (the classes it shares a tensor with) changed
since its last visit is skipped: its problem, and so its answer, would be the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ckptscope.align.apply import apply_permutation, expand, identity_permutations
from ckptscope.align.spec import PermutationSpec, check_spec

_IMPROVE_RTOL = 1e-6  # a change must beat the current assignment by more than rounding


@dataclass(frozen=True)
class Matching:
    """What a matching found.

    Attributes:
        perms: class name -> (n,) int64 permutation of OTHER's units.
        objective_before: the matched quantity at the identity (weights: the summed inner
            product of the tensors; activations: the mean correlation of matched units).
        objective_after: the same at ``perms``.
        sweeps: sweeps over the classes until none changed (weights), 1 for activations.
    """

    perms: dict[str, torch.Tensor]
    objective_before: float
    objective_after: float
    sweeps: int


def inner_product(spec: PermutationSpec, ref: Mapping[str, torch.Tensor],
                  other: Mapping[str, torch.Tensor]) -> float:
    """sum_k <ref[k], other[k]> over the tensors ``spec`` permutes (float32 dot products,
    summed in float64)."""
    return float(sum(float(torch.dot(ref[k].reshape(-1).float(), other[k].reshape(-1).float()))
                     for k in spec.permuted))


def axes_by_key(spec: PermutationSpec) -> dict[str, list[tuple[str, int, int]]]:
    """key -> the (class name, dim, block) triples that permute it (block 1: a plain axis)."""
    found: dict[str, list[tuple[str, int, int]]] = {}
    for name, axes in spec.classes.items():
        for key, dim, *block in axes:
            found.setdefault(key, []).append((name, dim, block[0] if block else 1))
    return found


def class_cost(spec: PermutationSpec, name: str, ref: Mapping[str, torch.Tensor],
               other: Mapping[str, torch.Tensor], perms: Mapping[str, torch.Tensor],
               by_key: Mapping[str, list[tuple[str, int, int]]] | None = None,
               unfolded: dict[tuple[str, int], torch.Tensor] | None = None) -> torch.Tensor:
    """(n, n) float64: A[i, j], the objective's part that unit i of ``ref`` matched to unit j
    of ``other`` contributes along class ``name``, every other class at ``perms``.

    ``by_key`` is :func:`axes_by_key` of ``spec`` and ``unfolded`` a cache of ``ref``'s tensors
    as (n, -1) matrices per axis, passed to save rebuilding them per class."""
    by_key = axes_by_key(spec) if by_key is None else by_key
    unfolded = {} if unfolded is None else unfolded
    cost = None
    n = len(perms[name])
    for key, dim, *_ in spec.classes[name]:
        # the tensor with every other axis permuted; this class's own axis left as it is
        moved = other[key]
        for c, d, block in by_key[key]:
            if (c, d) != (name, dim):
                moved = moved.index_select(d, expand(perms[c], block))
        if (key, dim) not in unfolded:  # a blocked axis: n blocks, the rest of the block aside
            unfolded[key, dim] = ref[key].unflatten(dim, (n, -1)).movedim(dim, 0).reshape(n, -1)
        a = unfolded[key, dim]
        b = moved.unflatten(dim, (n, -1)).movedim(dim, 0).reshape(n, -1)
        cost = a @ b.T if cost is None else cost.addmm_(a, b.T)
    return cost.double()


def weight_matching(spec: PermutationSpec, ref: Mapping[str, torch.Tensor],
                    other: Mapping[str, torch.Tensor], *, seed: int = 0,
                    max_sweeps: int = 100) -> Matching:
    """Permutations of ``other``'s units that bring its weights closest to ``ref``'s.

    Args:
        spec: the permutation classes (:func:`ckptscope.align.spec_from_graph`).
        ref, other: state dicts of one architecture.
        seed: seeds the order in which classes are visited each sweep.
        max_sweeps: a bound on the sweeps (the objective rises strictly with each change,
            so the sweeps end; the bound is a guard).

    Returns:
        The permutations and the objective (summed inner product) before and after.
    """
    from scipy.optimize import linear_sum_assignment  # scipy loads on first use only

    sizes = check_spec(spec, ref)
    check_spec(spec, other)
    # float32 products and sums (float64 doubles the time of ResNet-18's matching,
    # benchmarks/align.py); a change must beat the current assignment by more than float32
    # rounding.
    ref = {k: ref[k].float() for k in spec.permuted}
    other = {k: other[k].float() for k in spec.permuted}
    perms = identity_permutations(sizes)
    before = inner_product(spec, ref, other)
    generator = np.random.default_rng(seed)
    names = list(spec.classes)
    by_key = axes_by_key(spec)
    # A class's cost depends only on the classes it shares a tensor with: one whose neighbours
    # have not changed since its last visit would solve the same problem again, and is skipped.
    neighbours = {name: {c for key, *_ in spec.classes[name] for c, *_ in by_key[key]}
                  for name in names}
    stale = set(names)
    unfolded: dict[tuple[str, int], torch.Tensor] = {}
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):  # noqa: B007
        changed = False
        for i in generator.permutation(len(names)):
            name = names[i]
            if name not in stale:
                continue
            stale.discard(name)
            cost = class_cost(spec, name, ref, other, perms, by_key, unfolded)
            _, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(cols, dtype=torch.int64)
            rows = torch.arange(len(new))
            current = float(cost[rows, perms[name]].sum())
            gain = float(cost[rows, new].sum()) - current
            if gain > _IMPROVE_RTOL * max(abs(current), float(cost.abs().max())):
                perms[name] = new
                changed = True
                # its neighbours' costs changed (and its own, where a tensor has two of its axes)
                stale |= neighbours[name] - {name}
                if any(sum(c == name for c, *_ in by_key[key]) > 1
                       for key, *_ in spec.classes[name]):
                    stale.add(name)
        if not changed:
            break
    after = inner_product(spec, ref, apply_permutation(spec, perms, other))
    return Matching(perms, before, after, sweeps)
