"""Data given in Python as batches: a ``DataLoader`` or any iterable of ``(inputs, targets)``.

The batches are read once, in order, without a progress display, and concatenated into one pair
of tensors on the CPU; the engine then holds them on the device or streams them by its own rules,
as it does any ``(inputs, targets)`` pair, and a resumed path's fingerprint sees their bytes.

What is read as what (``docs/api.md``, "Data"):

- ``(inputs, targets)``: a tuple or list of two tensors or arrays: the data itself;
- an iterable of batches: a ``DataLoader``, a generator, an iterator, or a list or tuple of
  one or more ``(inputs, targets)`` pairs (tensors or arrays) — except a list of exactly two
  pairs, which could be either and is refused with the two ways to say which;
- a batch is an ``(x, y)`` tuple or list (a ``DataLoader`` over a ``TensorDataset`` yields
  lists). A mapping batch (``{"input_ids": ..., "labels": ...}``, as Hugging Face collators
  make) is refused: the model is called with one input tensor and the loss compares its
  outputs with the targets position by position, so labels that the model would shift itself
  would be scored against the wrong positions without a word.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from ckptscope.errors import CkptscopeError

_ARRAY = (torch.Tensor, np.ndarray)


def is_array_pair(value: object) -> bool:
    """Whether ``value`` is a tuple or list of two tensors or arrays."""
    return (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, _ARRAY) for v in value))


def is_batch_list(value: object) -> bool:
    """Whether ``value`` is a non-empty tuple or list whose every item is an ``(x, y)`` pair of
    tensors or arrays."""
    return (isinstance(value, (tuple, list)) and len(value) > 0
            and all(is_array_pair(item) for item in value))


def is_batch_iterable(value: object) -> bool:
    """Whether ``value`` is read as batches: a ``DataLoader``, an iterator or other iterable
    that is not itself data (a tensor, an array, a string, a mapping of splits, a pair)."""
    if isinstance(value, torch.utils.data.DataLoader):
        return True
    if isinstance(value, (*_ARRAY, str, bytes, Mapping, tuple, list)):
        return False
    return isinstance(value, Iterable)


def ambiguous(value: object, *, source: str) -> CkptscopeError:
    """The error for a list of exactly two ``(x, y)`` pairs: two batches, or (inputs, targets)
    whose inputs and targets are each a pair of tensors?"""
    return CkptscopeError(
        f"{source} is a {type(value).__name__} of two (tensor, tensor) pairs: two batches, or "
        f"(inputs, targets)? Pass batches as an iterator or a DataLoader (iter(batches)), or "
        f"the data as two tensors: (torch.cat(xs), torch.cat(ys))."
    )


def read_batches(batches: Iterable, *, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read every ``(x, y)`` batch once and concatenate them on the CPU.

    Args:
        batches: a ``DataLoader``, an iterator, or a sequence of ``(x, y)`` pairs; ``x: (B, ...)``
            and ``y: (B, ...)``, the same trailing shapes and dtypes in every batch.
        source: how to call the data in messages (``data``, ``data['test']``).

    Returns:
        ``(inputs, targets)``: ``(N, ...)`` each, N the examples of all batches, in order.

    Raises:
        CkptscopeError: no batch, a batch that is not an ``(x, y)`` pair (a mapping batch with
            the way to pass it), or batches whose shapes or dtypes disagree.
    """
    if isinstance(batches, torch.utils.data.DataLoader):
        _warn_if_shuffled(batches, source=source)
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    for i, batch in enumerate(batches):
        x, y = _pair(batch, i, source=source)
        if xs:
            _check_like(x, xs[0], i, "inputs", source=source)
            _check_like(y, ys[0], i, "targets", source=source)
        xs.append(x)
        ys.append(y)
    if not xs:
        raise CkptscopeError(f"{source} yielded no batch; an iterator can be read only once: "
                             f"pass a DataLoader or a fresh iterator.")
    return torch.cat(xs), torch.cat(ys)


def _pair(batch: object, i: int, *, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``i`` as two CPU tensors with a batch dim of the same length."""
    if isinstance(batch, Mapping):
        raise CkptscopeError(
            f"{source}: batch {i} is a mapping with keys {sorted(map(str, batch))[:6]}; "
            f"ckptscope calls the model with one input tensor and scores its outputs against "
            f"the targets position by position: yield (inputs, targets) pairs instead (for a "
            f"causal LM: (ids[:, :-1], ids[:, 1:]))."
        )
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        what = (f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list))
                else f"a {type(batch).__name__}")
        raise CkptscopeError(
            f"{source}: batch {i} is {what}, not an (inputs, targets) pair; yield (x, y) "
            f"batches (a DataLoader over a TensorDataset(x, y) does)."
        )
    out = []
    for name, v in zip(("inputs", "targets"), batch, strict=True):
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(v)
        if not isinstance(v, torch.Tensor):
            raise CkptscopeError(
                f"{source}: batch {i}'s {name} are a {type(v).__name__}, not a tensor or an "
                f"array; yield (x, y) pairs of tensors."
            )
        if v.dim() == 0:
            raise CkptscopeError(f"{source}: batch {i}'s {name} are a scalar; a batch's "
                                 f"tensors have a leading batch dim.")
        out.append(v.detach().cpu())
    x, y = out
    if len(x) != len(y):
        raise CkptscopeError(f"{source}: batch {i} has {len(x)} inputs and {len(y)} targets; "
                             f"they must be equal.")
    return x, y


def _check_like(t: torch.Tensor, first: torch.Tensor, i: int, name: str, *, source: str) -> None:
    if t.shape[1:] != first.shape[1:] or t.dtype != first.dtype:
        raise CkptscopeError(
            f"{source}: batch {i}'s {name} are {tuple(t.shape)} {t.dtype}, batch 0's "
            f"{tuple(first.shape)} {first.dtype}; every batch needs the same trailing shape and "
            f"dtype to be concatenated (pad or crop them the same way)."
        )


def _warn_if_shuffled(loader: torch.utils.data.DataLoader, *, source: str) -> None:
    """A shuffling loader is read in one random order: the curves do not depend on it (up to
    float rounding), but a resumed path sees other bytes and starts again. A loader that drops
    its last batch leaves examples out."""
    if loader.drop_last and loader.batch_size:
        try:
            left = len(loader.dataset) % loader.batch_size
        except TypeError:  # an iterable dataset without a length
            left = 0
        if left:
            warnings.warn(f"{source} is a DataLoader with drop_last=True: its last {left} "
                          f"example(s) are not evaluated.", stacklevel=5)
    if isinstance(loader.sampler, torch.utils.data.RandomSampler):
        warnings.warn(
            f"{source} is a DataLoader that shuffles; it is read once, in this pass's order. "
            f"Pass shuffle=False for curves that repeat bitwise and resume.",
            stacklevel=5,
        )
