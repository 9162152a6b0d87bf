"""Where tensors live and how they are laid out: the device, channels-last, autocast.

Shared with the trainer (:mod:`ckptscope.train.run`), which uses the same layout switch and the
same batch-size threshold, so a checkpoint trained channels-last is evaluated the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from ckptscope.errors import CkptscopeError

# oneDNN's channels-last convolutions beat the default layout from about this batch size on
# (ResNet-18 forward, one thread: -5% at 8-24 images, +6% at 45, +10% at 128); the trainer
# uses the same threshold.
CHANNELS_LAST_MIN_BATCH = 32


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Return the device for ``None``/``"auto"`` (CUDA when present), or the one named."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise CkptscopeError(
            f"device {device!r} is not a torch device; use auto, cpu or cuda[:i]."
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CkptscopeError(f"device {device!r} was asked for but CUDA is not available; use cpu.")
    return dev


def set_layout(tensors: Iterable[torch.Tensor], layout: torch.memory_format) -> None:
    """Every 4-D tensor among ``tensors`` in ``layout``, in place: each tensor object stays
    the same (``Module.to(memory_format=...)`` gives a converted buffer a new tensor under each
    module that holds it, which unties a shared one)."""
    for t in {id(t): t for t in tensors if t.dim() == 4}.values():
        t.data = t.data.contiguous(memory_format=layout)


def wants_channels_last(module: nn.Module, *, asked: bool | None, device: torch.device,
                        strategy: str, batch_size: int) -> bool:
    """Whether to run ``module`` channels-last: as ``asked``; by default on CUDA (tensor
    cores, cuDNN), and on the CPU under ``loop`` with batches of at least
    ``CHANNELS_LAST_MIN_BATCH`` examples (oneDNN; measured in docs/semantics.md). Only a conv
    net (a module with a ``Conv2d``) is ever switched."""
    if not any(isinstance(m, nn.Conv2d) for m in module.modules()):
        return False
    if asked is not None:
        return asked
    if device.type == "cuda":
        return True
    return strategy == "loop" and batch_size >= CHANNELS_LAST_MIN_BATCH


def as_input(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A batch of inputs on ``device``, channels-last when the model runs in that layout."""
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` in ``dtype`` (off for ``None``), without the weight-cast cache: the
    weights change in place between forward passes, and a cached low-precision copy would
    freeze them at the first point."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None,
                          cache_enabled=False)


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an error's message (its type's name when it has none), cut short."""
    return (str(err).splitlines() or [type(err).__name__])[0][:limit]


_AS_STRIDED_FALLBACK = (
    "There is a performance drop because we have not yet implemented the batching rule for "
    "aten::as_strided_"
)


def ignore_as_strided_fallback() -> None:
    """Silence functorch's warning that it loops over the vmapped dimension for
    ``aten::as_strided_``: the channels-last path of ``adaptive_avg_pool2d`` restrides its
    (N, C, 1, 1) output with it, a loop over that small output that the user cannot act on.

    Called when an evaluator is made and again when a vmapped pass is built, not at import (a
    filter added inside someone's ``catch_warnings`` block is gone when the block ends), and it
    adds the filter only when it is missing: every change to the filters makes Python forget
    which warnings it has shown, so touching them per call would repeat every other warning once
    per batch."""
    if not any(f[0] == "ignore" and f[1] is not None and f[1].pattern == _AS_STRIDED_FALLBACK
               for f in warnings.filters):
        warnings.filterwarnings("ignore", message=_AS_STRIDED_FALLBACK, category=UserWarning)
