"""Apply a permutation of hidden units to a state dict."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ckptscope.align.spec import PermutationSpec

Permutations = Mapping[str, torch.Tensor]  # class name -> (n,) int64: new unit i is old perm[i]


def apply_permutation(spec: PermutationSpec, perms: Permutations,
                      state: Mapping[str, torch.Tensor], *,
                      skip: tuple[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Return ``state`` with each class's axes reordered by its permutation.

    Args:
        spec: the classes of axes (a blocked axis ``(key, dim, block)`` moves whole blocks).
        perms: class name -> (n,) int64 permutation; along each of the class's axes, entry ``i``
            of the result is entry ``perms[name][i]`` of ``state``.
        state: key -> tensor. Tensors no class names (integer buffers among them) are the same
            objects in the result.
        skip: one axis ``(key, dim)`` to leave as it is (weight matching's cost for a class
            leaves that class's own axis unpermuted).

    Returns:
        A new dict; permuted tensors are new tensors.
    """
    out = dict(state)
    for name, axes in spec.classes.items():
        perm = perms.get(name)
        if perm is None:
            continue
        for key, dim, *block in axes:
            if (key, dim) != skip:
                out[key] = out[key].index_select(dim, expand(perm, *block).to(out[key].device))
    return out


def expand(perm: torch.Tensor, block: int = 1) -> torch.Tensor:
    """A permutation of n blocks of ``block`` entries as one of the n * block entries."""
    if block == 1:
        return perm
    return (perm[:, None] * block + torch.arange(block)).reshape(-1)


def identity_permutations(sizes: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """class name -> ``arange(n)``."""
    return {name: torch.arange(n) for name, n in sizes.items()}


def inverse(perm: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes ``perm``: ``x[perm][inverse(perm)] == x``."""
    out = torch.empty_like(perm)
    out[perm] = torch.arange(len(perm), device=perm.device)
    return out


def random_permutations(sizes: Mapping[str, int], *, seed: int) -> dict[str, torch.Tensor]:
    """class name -> a random permutation, from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randperm(n, generator=generator) for name, n in sizes.items()}
