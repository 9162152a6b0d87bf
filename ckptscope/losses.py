"""Per-example losses and correctness for the evaluator, over a leading alpha dim.

Every function takes ``outputs: (k, B, ...)`` (k points of the path) and ``targets: (B, ...)``
and returns ``(loss_sum, correct)`` or ``(loss_sum, correct, count)``, each ``(k,)``: the sum
over the batch of the loss and of the 0/1 correctness, and how many units (examples, or tokens
for token-level targets) those sums cover. The evaluator adds each up over the batches and
divides the loss and correct totals by the count total once at the end, so the loss is the
exact mean over what was counted, not a mean of batch means. Without a count, the units are the
B examples. See ``docs/losses.md``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ckptscope.errors import CkptscopeError

LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]
Sums = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
IGNORE_INDEX = -100  # the targets cross_entropy leaves out (PyTorch's and Hugging Face's value)


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> Sums:
    """Softmax cross entropy on logits ``(k, B, ..., C)`` with class-index targets ``(B, ...)``.

    Targets equal to ``-100`` (:data:`IGNORE_INDEX`) are left out of every sum and of the count:
    token-level data (``(k, B, T, V)`` logits, ``(B, T)`` targets) is averaged over the counted
    tokens, padding and unmasked positions excluded.

    Returns:
        ``(loss_sum, correct, count)``, each ``(k,)``: summed over the counted targets.
    """
    if outputs.dim() < 2 or outputs.shape[1:-1] != targets.shape:
        raise CkptscopeError(
            f"loss 'cross_entropy' takes outputs (points, batch, ..., classes) with targets "
            f"(batch, ...); got outputs of shape {tuple(outputs.shape[1:])} per point for "
            f"targets of shape {tuple(targets.shape)}: check that the data fits the model."
        )
    k, classes = outputs.shape[0], outputs.shape[-1]
    flat = outputs.reshape(-1, classes)
    units = targets.reshape(-1)
    losses = F.cross_entropy(flat, units.repeat(k), reduction="none", ignore_index=IGNORE_INDEX)
    # An argmax is never -100, so ignored targets are never hits: no mask needed for them.
    correct = (outputs.argmax(-1).view(k, -1) == units).sum(-1)
    count = (units != IGNORE_INDEX).sum().expand(k)
    return losses.view(k, -1).sum(-1), correct, count


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
    ``(loss_sum, correct)`` or ``(loss_sum, correct, count)`` of shape ``(k,)``; return a
    NaN-filled ``correct`` where accuracy has no meaning.
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


def counted_units(loss: str, targets: torch.Tensor) -> int:
    """How many units a built-in loss counts on ``targets`` (B, ...): for ``cross_entropy`` the
    targets that are not ``-100`` (B for class labels), for ``bce`` the B examples."""
    if loss == "cross_entropy":
        return int((targets != IGNORE_INDEX).sum())
    return len(targets)
