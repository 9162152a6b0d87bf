"""Evaluation and training sets: a registry of loaders, all offline.

A dataset spec is ``NAME`` or ``NAME:ARG`` for a registered set (``spiral``, ``digits``, ...), or
``pkg.module:attr`` for your own, where ``attr`` is ``(inputs, targets)``, a ``DataLoader`` or
other iterable of ``(inputs, targets)`` batches, a mapping split -> either, or a callable
returning one of these. Nothing is ever downloaded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ckptscope.data.batches import ambiguous, is_batch_iterable, is_batch_list, read_batches
from ckptscope.errors import CkptscopeError
from ckptscope.registry import Registry, import_object, is_import_spec

Split = tuple[torch.Tensor, torch.Tensor]
SPLITS = ("test", "train", "both")


@dataclass(frozen=True)
class Dataset:
    """A registered dataset.

    Attributes:
        name: the registry name.
        load: ``load(arg, *, seed) -> {"train": (x, y), "test": (x, y)}``; ``arg`` is the text
            after the colon in ``NAME:ARG`` (a directory, for file-based sets) or ``None``.
        description: one line for listings.
    """

    name: str
    load: Callable[..., dict[str, Split]]
    description: str = ""


DATASETS: Registry[Dataset] = Registry("dataset")


def as_splits(data: object, *, source: str = "data") -> dict[str, Split]:
    """Return split -> (inputs, targets) tensors from a pair, batches, or a mapping of either.

    A bare ``(inputs, targets)`` pair, or iterable of batches, becomes the single split
    ``eval``. Batches (a ``DataLoader``, an iterator, a list of ``(x, y)`` pairs) are read once
    and concatenated on the CPU (:mod:`ckptscope.data.batches`, which says what is read as
    what; a list of exactly two ``(x, y)`` pairs is ambiguous and refused).
    """
    if callable(data) and not isinstance(data, (tuple, list, Mapping, torch.Tensor)):
        data = data()
    if isinstance(data, Mapping):
        splits = dict(data)
    elif _is_batches(data, source=source) or (isinstance(data, (tuple, list))
                                               and len(data) == 2):
        splits = {"eval": data}
    else:
        raise CkptscopeError(
            f"{source} is a {type(data).__name__}; give (inputs, targets), a DataLoader or "
            f"iterable of (inputs, targets) batches, or a mapping split -> either."
        )
    out = {}
    for split, pair in splits.items():
        where = source if len(splits) == 1 and not isinstance(data, Mapping) else (
            f"{source}[{split!r}]")
        if _is_batches(pair, source=where):
            pair = read_batches(pair, source=where)
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise CkptscopeError(
                f"{source}: split {split!r} is a {type(pair).__name__}, not an (inputs, "
                f"targets) pair or an iterable of (inputs, targets) batches."
            )
        x, y = (torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v
                for v in pair)
        if len(x) == 0 or len(x) != len(y):
            raise CkptscopeError(
                f"{source}: split {split!r} has {len(x)} inputs and {len(y)} targets; they must "
                f"be equal and non-zero."
            )
        out[str(split)] = (x, y)
    return out


def _is_batches(value: object, *, source: str) -> bool:
    """Whether ``value`` is read as batches (:mod:`ckptscope.data.batches`); a list of exactly
    two ``(x, y)`` pairs is refused as ambiguous."""
    if is_batch_iterable(value):
        return True
    if is_batch_list(value):
        if len(value) == 2:
            raise ambiguous(value, source=source)
        return True
    return False


def load_data(spec: str, *, seed: int = 0) -> dict[str, Split]:
    """Return every split of a dataset spec (see the module docstring)."""
    name, _, arg = spec.partition(":")
    if name in DATASETS or not is_import_spec(spec):
        return as_splits(DATASETS.get(name).load(arg or None, seed=seed), source=spec)
    return as_splits(import_object(spec, what="dataset"), source=spec)


def select_splits(splits: Mapping[str, Split], which: str) -> dict[str, Split]:
    """Keep ``test``, ``train`` or ``both`` (test first); a set with other splits keeps all."""
    if which not in SPLITS:
        raise CkptscopeError(f"split {which!r} is not one of {SPLITS}.")
    wanted = ["test", "train"] if which == "both" else [which]
    if not set(splits) & {"test", "train"}:
        return dict(splits)
    missing = [s for s in wanted if s not in splits]
    if missing:
        raise CkptscopeError(f"the data has no {missing[0]!r} split (it has {sorted(splits)}).")
    return {s: splits[s] for s in wanted}


# Register the built-in datasets.
from ckptscope.data import cifar, digits, mnist, spiral, tokens  # noqa: E402,F401
