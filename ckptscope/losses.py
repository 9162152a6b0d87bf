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
        raise CkptscopeError(
            f"unknown loss {loss!r}; known: {', '.join(sorted(LOSSES))}, or pkg.module:attr for "
            f"your own (Python: a callable)."
        ) from None


def resolve_loss(spec: str | LossFn | None) -> str | LossFn | None:
    """A loss the user named: a built-in name (kept as the name), ``pkg.module:attr`` (imported:
    the callable), a callable, or ``None`` (the adapter's).

    Only for what the user passes (``--loss``, ``loss=``): a name read from a file never reaches
    here, so nothing is imported because a file says so.

    Raises:
        CkptscopeError: an unknown name (the known ones listed), a spec that does not import, or
            an attribute that is not callable.
    """
    from ckptscope.registry import import_object, is_import_spec

    if spec is None or callable(spec):
        return spec
    if not isinstance(spec, str):
        raise CkptscopeError(
            f"loss {spec!r} is a {type(spec).__name__}; give a name ({', '.join(sorted(LOSSES))}),"
            f" pkg.module:attr or a callable."
        )
    if spec in LOSSES or not is_import_spec(spec):
        get_loss(spec)  # an unknown name: refused with the known ones
        return spec
    fn = import_object(spec, what="loss")
    if not callable(fn):
        raise CkptscopeError(
            f"loss {spec!r} is a {type(fn).__name__}, not a callable (outputs, targets) -> "
            f"(loss_sum, correct)."
        )
    return fn


def target_dtype(loss: str | LossFn) -> torch.dtype | None:
    """The dtype targets are cast to for a named loss (``None``: leave them as given)."""
    return {"cross_entropy": torch.long, "bce": torch.float32}.get(
        loss if isinstance(loss, str) else ""
    )
