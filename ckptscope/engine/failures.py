"""Errors of the user's code during an evaluation, as one line that says where they happened.

The model and the loss are the user's code: whatever they raise (a shape mismatch, an assert, a
``KeyError`` from a custom forward) becomes one :class:`~ckptscope.errors.CkptscopeError` naming
the model, the data (its spec, the split and the batch's input shape) and the error's first line,
chained to the original (``raise ... from err``) so that ``ckptscope --debug`` shows the
traceback. Out-of-memory errors are not the user's: the engine's back-off handles them. Neither
are ``KeyboardInterrupt`` and ``SystemExit``, which are not ``Exception``\\ s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ckptscope.engine.placement import first_line
from ckptscope.errors import CkptscopeError

_DEBUG_HINT = "rerun with --debug for the traceback"


def from_user_code(err: BaseException) -> bool:
    """Whether ``err``, raised inside an evaluation, is the model's or the loss's failure (not
    ckptscope's own message, not an out-of-memory error the back-off handles)."""
    return isinstance(err, Exception) and not isinstance(
        err, (CkptscopeError, torch.OutOfMemoryError)
    )


def describe(err: BaseException) -> str:
    """``Type: first line`` of an error (its type alone when it has no message)."""
    line = first_line(err)
    name = type(err).__name__
    return name if line == name else f"{name}: {line}"


@dataclass
class Where:
    """What an evaluation is running, for messages: set as batches go through.

    Attributes:
        model: the model's name (adapter name or class).
        data: the data spec (``spiral:200,150``, ``in-memory``), or ``None`` when unknown.
        split: the split of the batch in flight (``test``; ``train`` for BatchNorm
            re-estimation).
        shape: the input shape of the batch in flight.
    """

    model: str
    data: str | None = None
    split: str | None = None
    shape: tuple[int, ...] | None = None

    def at(self, split: str, x: torch.Tensor) -> None:
        """Note the batch about to run."""
        self.split, self.shape = split, tuple(x.shape)

    def _context(self) -> str:
        parts = [f"model {self.model}"]
        if self.data:
            parts.append(f"data {self.data}")
        return ", ".join(parts)

    def model_failed(self, err: BaseException) -> CkptscopeError:
        """The one-line error for a model that raised ``err`` on the batch in flight."""
        on = (f"the {self.split!r} inputs of shape {self.shape}" if self.split is not None
              else "its inputs")
        return CkptscopeError(
            f"the model failed on {on} ({self._context()}): {describe(err)}; check that the "
            f"data fits the model (--data / --adapter), or {_DEBUG_HINT}."
        )

    def located(self, err: CkptscopeError) -> CkptscopeError:
        """ckptscope's own one-line refusal (a built-in loss's shape check) with the model,
        the data and the split appended."""
        return CkptscopeError(f"{str(err).rstrip('.')} ({self._context()}, split "
                              f"{self.split!r}).")

    def loss_failed(self, err: BaseException, loss: str, outputs: object,
                    targets: object) -> CkptscopeError:
        """The one-line error for a loss that raised ``err`` on ``(outputs, targets)``."""
        return CkptscopeError(
            f"the loss {loss} failed on outputs of shape {_shape(outputs)} and targets of shape "
            f"{_shape(targets)} ({self._context()}, split {self.split!r}): {describe(err)}; "
            f"check that the loss fits the model's outputs and the targets (--loss), or "
            f"{_DEBUG_HINT}."
        )

    def loss_returned(self, loss: str, what: str, k: int) -> CkptscopeError:
        """The one-line error for a loss whose result breaks the contract."""
        return CkptscopeError(
            f"the loss {loss} returned {what} for {k} point(s) ({self._context()}); a loss "
            f"returns (loss_sum, correct) or (loss_sum, correct, count), each a tensor of "
            f"shape ({k},): the per-point sums over the batch (the LossFn contract, "
            f"docs/losses.md)."
        )


def _shape(value: object) -> object:
    """A tensor's shape as a tuple; anything else by its type's name."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    return type(value).__name__


def loss_name(loss: object) -> str:
    """A loss for messages: its registry name, or the callable's name."""
    if isinstance(loss, str):
        return repr(loss)
    return repr(getattr(loss, "__qualname__", None) or getattr(loss, "__name__", None)
                or type(loss).__name__)
