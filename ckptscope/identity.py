"""Which tensors are which: tied aliases, and the parameter / buffer / non-float split.

A module may hold one tensor under several names (tied weights: an embedding and its output
layer; one buffer registered in two modules). Whatever moves, counts or compares tensors asks
here which names are one tensor: the engine moves a tied tensor once, under every name it has;
distances count it once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

# Buffer names of BatchNorm layers, which tell buffers from parameters when no module is given.
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` under every name it has (tied ones repeated)."""
    return {
        **dict(module.named_parameters(remove_duplicate=False)),
        **dict(module.named_buffers(remove_duplicate=False)),
    }


def aliases(tensors: Mapping[str, torch.Tensor], keys: Iterable[str] | None = None
            ) -> dict[str, str]:
    """Name -> the first name of the same tensor object.

    Args:
        tensors: name -> tensor, as from :func:`named_tensors`.
        keys: the names to map, in order (default: every name of ``tensors``); the first of
            them that names a tensor is the one its other names map to. Names that ``tensors``
            does not hold are left out.
    """
    names = list(tensors) if keys is None else [k for k in keys if k in tensors]
    first: dict[int, str] = {}
    return {k: first.setdefault(id(tensors[k]), k) for k in names}


def tied(keys: Iterable[str], tensors: Mapping[str, torch.Tensor]) -> frozenset[str]:
    """Every name of the tensors that ``keys`` name (a tied tensor under all its names)."""
    ids = {id(tensors[k]) for k in keys if k in tensors}
    return frozenset(k for k, t in tensors.items() if id(t) in ids)


def unique(keys: Iterable[str], alias: Mapping[str, str]) -> list[str]:
    """``keys`` with one name per tensor: a later name of a tied tensor is dropped."""
    seen: set[str] = set()
    out = []
    for k in keys:
        ident = alias.get(k, k)
        if ident not in seen:
            seen.add(ident)
            out.append(k)
    return out


def state_aliases(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Name -> the first name whose tensor shares its storage (same memory, offset and shape):
    the tied tensors of a state dict taken from a module. An empty tensor is its own."""
    first: dict[tuple, str] = {}
    out = {}
    for k, v in state.items():
        place = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        out[k] = first.setdefault(place, k) if v.numel() else k
    return out


def parameter_keys(state: Mapping[str, torch.Tensor], module: nn.Module | None = None) -> set[str]:
    """Return the keys of ``state`` that are parameters.

    With a module, its parameters under every name (a tied one under each; groups count each
    tensor once with :func:`unique_keys`). Without one, floating tensors whose names do not end
    in a BatchNorm buffer name, one key per storage (:func:`state_aliases`).
    """
    if module is not None:
        return {k for k, _ in module.named_parameters(remove_duplicate=False)} & set(state)
    candidates = {
        k: v for k, v in state.items()
        if v.is_floating_point() and k.rsplit(".", 1)[-1] not in BUFFER_SUFFIXES
    }
    alias = state_aliases(candidates)
    return {k for k in candidates if alias[k] == k}


def buffer_keys(state: Mapping[str, torch.Tensor], module: nn.Module | None = None) -> set[str]:
    """Return the keys of ``state`` that are buffers: the module's (under every name), or
    without one, non-float tensors and those named like BatchNorm's running statistics."""
    if module is not None:
        return {k for k, _ in module.named_buffers(remove_duplicate=False)} & set(state)
    return {
        k for k, v in state.items()
        if not v.is_floating_point() or k.rsplit(".", 1)[-1] in BUFFER_SUFFIXES
    }


def float_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of floating tensors, in order (the ones that interpolate)."""
    return [k for k, v in state.items() if v.is_floating_point()]


def nonfloat_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of integer and bool tensors, in order (they never interpolate)."""
    return [k for k, v in state.items() if not v.is_floating_point()]


def unique_keys(
    keys: Iterable[str], params: set[str], module: nn.Module | None = None
) -> list[str]:
    """``keys`` that are in ``params``, one name per tensor (tied names after the first dropped,
    as the module ties them; without one, :func:`parameter_keys` already kept one per storage)."""
    alias = aliases(dict(module.named_parameters(remove_duplicate=False))) if module else {}
    return unique((k for k in keys if k in params), alias)
