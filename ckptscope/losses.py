"""Per-example losses and correctness for the evaluator, over a leading alpha dim.

Every function takes ``outputs: (k, B, ...)`` (k points of the path) and ``targets: (B, ...)``
and returns ``(loss_sum, correct)``, both ``(k,)``: the sum over the B examples of the loss and
of the 0/1 correctness. The evaluator divides the totals by N once at the end, so the loss is
the exact mean over examples, not a mean of batch means.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ckptscope.errors import CkptscopeError

LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def cross_entropy(
    outputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax cross entropy on logits ``(k, B, C)`` with class-index targets ``(B,)``."""
    k, batch, classes = outputs.shape[0], outputs.shape[1], outputs.shape[-1]
    flat = outputs.reshape(k * batch, classes)
    losses = F.cross_entropy(flat, targets.repeat(k), reduction="none").view(k, batch)
    correct = (outputs.argmax(-1) == targets).sum(-1)
    return losses.sum(-1), correct


def binary_cross_entropy(
    outputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary cross entropy on logits ``(k, B)`` or ``(k, B, 1)`` with 0/1 targets ``(B,)``."""
    logits = outputs.reshape(outputs.shape[0], outputs.shape[1])
    target = targets.to(logits.dtype).expand_as(logits)
    losses = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    correct = ((logits > 0) == (targets > 0.5)).sum(-1)
    return losses.sum(-1), correct


LOSSES: dict[str, LossFn] = {
    "cross_entropy": cross_entropy,
    "bce": binary_cross_entropy,
}


def get_loss(loss: str | LossFn) -> LossFn:
    """Return a loss function by name (``cross_entropy``, ``bce``) or pass a callable through.

    A callable takes ``outputs: (k, B, ...)`` and ``targets: (B, ...)`` and returns
    ``(loss_sum, correct)`` of shape ``(k,)``; return a NaN-filled ``correct`` where accuracy
    has no meaning.
    """
    if callable(loss):
        return loss
    try:
        return LOSSES[loss]
    except KeyError:
        raise CkptscopeError(f"unknown loss {loss!r}; known: {sorted(LOSSES)}.") from None


def target_dtype(loss: str | LossFn) -> torch.dtype | None:
    """The dtype targets are cast to for a named loss (``None``: leave them as given)."""
    return {"cross_entropy": torch.long, "bce": torch.float32}.get(
        loss if isinstance(loss, str) else ""
    )
