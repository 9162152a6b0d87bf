"""The deferred loss: the outputs of several points go through one loss call per batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ckptscope.errors import CkptscopeError
from ckptscope.losses import LossFn


def total(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The float64 sum of per-batch sums, each (k,): (k,)."""
    return torch.stack(list(parts)).double().sum(0)


def totals(parts: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """Per-batch ``(loss, correct, count)`` sums, each (k,), added up: a float64 (k,) each."""
    return tuple(total(column) for column in zip(*parts))


def joined(parts: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """Consecutive points' ``(loss, correct, count)`` sums concatenated: (k1 + k2 + ...,) each."""
    return tuple(torch.cat([p.reshape(-1) for p in column]) for column in zip(*parts))


class Deferred:
    """Forward outputs of consecutive points, kept on the device until one loss call per batch
    covers up to ``size`` of them.

    A loss call is a handful of small kernels; on a small model, one per batch and point is a
    large share of the path. Stacking the outputs into ``(k, B, ...)`` gives the same per-point
    sums (the loss contract is per point) from one call per batch. ``size`` 0 keeps nothing:
    each batch's loss is taken as soon as its output exists (outputs too large to hold).
    """

    def __init__(self, loss_fn: LossFn, size: int):
        self.loss_fn, self.size = loss_fn, size  # loss_fn: (loss, correct, count) always
        self.outputs: list[list[torch.Tensor]] = []  # per pending point: per batch
        self.targets: list[torch.Tensor] = []
        self.done: list[tuple[torch.Tensor, ...]] = []  # (loss, correct, count) (k,) float64

    def batch_fn(self, forward: Callable[[object], torch.Tensor]):
        """What to run on each batch ``(x, y)``: keep ``forward(x)``, or with ``size`` 0 take
        its loss sums at once (inside the caller's out-of-memory back-off)."""
        if self.size == 0:
            return lambda x, y: self.loss_fn(forward(x).unsqueeze(0), y)
        return lambda x, y: (forward(x), y)

    def add(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One point's per-batch results of :meth:`batch_fn`. The targets are the split's, cut
        the same way at every point until the batch size changes."""
        if self.size == 0:  # (loss, correct, count) sums, (1,) each
            self.done.append(totals(batches))
            return
        targets = [y for _, y in batches]
        # A changed batch size (out-of-memory back-off) cuts the batches differently.
        if self.outputs and [len(y) for y in targets] != [len(y) for y in self.targets]:
            self.flush()
        self.targets = targets
        self.outputs.append([out for out, _ in batches])
        if len(self.outputs) >= self.size:
            self.flush()

    def flush(self) -> None:
        if not self.outputs:
            return
        try:
            parts = [
                self.loss_fn(torch.stack([point[b] for point in self.outputs]), y)
                for b, y in enumerate(self.targets)
            ]
        except torch.OutOfMemoryError:
            parts = None  # out of the handler first: its traceback holds the stacked tensors
        if parts is None:  # the stacked loss did not fit: one point at a time
            try:
                per_point = [
                    [self.loss_fn(point[b].unsqueeze(0), y) for b, y in enumerate(self.targets)]
                    for point in self.outputs
                ]
            except torch.OutOfMemoryError:
                raise CkptscopeError(
                    "out of device memory in the loss of one point; lower --batch-size or "
                    "evaluate on the CPU."
                ) from None
            parts = [joined([p[b] for p in per_point]) for b in range(len(self.targets))]
        self.done.append(totals(parts))
        self.outputs = []

    def sums(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every point's (loss sum, correct sum, count), float64 on the device, (n,) each."""
        self.flush()
        if not self.done:
            return tuple(torch.zeros(n, dtype=torch.float64) for _ in range(3))
        return joined(self.done)

    def totals(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`sums` on the host."""
        return tuple(column.cpu().numpy() for column in self.sums(n))
