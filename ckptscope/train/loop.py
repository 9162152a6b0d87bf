"""The one training loop: a seeded pass over the data, and an exact evaluation.

``train_epoch`` is the loop every recipe runs (``ckptscope.train.run``), the random-label
pre-training uses, and :func:`fit` (the demo's plain trainer) wraps. Batches are index slices
of tensors already on the device; the order and the augmentations come from CPU generators, so
one seed gives one run.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ckptscope.errors import CkptscopeError
from ckptscope.losses import get_loss, target_dtype
from ckptscope.train.augment import augment_batch

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    """How to train (the demo's plain settings; recipes are :class:`ckptscope.train.Recipe`).

    Attributes:
        epochs: passes over the training split.
        batch_size: examples per step (the paper: 500 on spiral, 128 elsewhere).
        lr: learning rate (the paper's MLPs: Adam 5e-4).
        optimizer: ``adam`` or ``sgd`` (momentum 0.9).
        weight_decay: L2 penalty (the MLPs: 0).
        seed: fixes the data order.
    """

    epochs: int = 10
    batch_size: int = 500
    lr: float = 5e-4
    optimizer: str = "adam"
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise CkptscopeError(f"optimizer {self.optimizer!r} is not one of {OPTIMIZERS}.")
        if self.epochs < 0 or self.batch_size < 1 or not self.lr > 0:
            raise CkptscopeError("epochs >= 0, batch_size >= 1 and lr > 0 are required.")


@dataclass(frozen=True)
class Augmentation:
    """Which augmentations a training batch gets (see :mod:`ckptscope.train.augment`)."""

    kinds: tuple[str, ...] = ()
    padding: int = 4
    brightness: float = 0.0
    normalization: tuple[Sequence[float], Sequence[float]] | None = None


@dataclass(frozen=True)
class EpochStats:
    """Sums over one epoch's training batches (train mode, augmented)."""

    loss_sum: float
    correct: float
    examples: int
    steps: int
    seconds: float

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.examples, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.examples, 1)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on ``device`` when ``enabled``, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def train_epoch(
    module: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable,
    batch_size: int,
    order: torch.Generator,
    augment: Augmentation = Augmentation(),
    augment_generator: torch.Generator | None = None,
    max_steps: int = 0,
    amp: bool = False,
    memory_format: torch.memory_format = torch.contiguous_format,
    on_step: Callable[[int, int, float, float], None] | None = None,
) -> EpochStats:
    """Run one pass over ``(x, y)`` in a seeded order; return the running sums.

    Args:
        module: trained in place (left in train mode).
        x, y: the training split, on the module's device; ``y`` in the loss's dtype.
        optimizer: stepped once per batch.
        loss_fn: ``loss_fn(outputs: (1, B, ...), targets: (B, ...)) -> (loss_sum, correct[,
            count])``; class labels only here (the count, if any, is B).
        batch_size: examples per step; the last batch may be smaller.
        order: a CPU generator; one ``randperm`` is drawn from it per epoch.
        augment, augment_generator: the batch augmentations and their CPU generator.
        max_steps: stop after this many steps (0: the whole pass).
        amp: bf16 autocast for the forward pass.
        memory_format: ``torch.channels_last`` for image batches on a GPU.
        on_step: called as ``on_step(step, steps, running_loss, running_accuracy)``.
    """
    module.train()
    n = len(x)
    perm = torch.randperm(n, generator=order).to(x.device)
    steps = (n + batch_size - 1) // batch_size
    if max_steps:
        steps = min(steps, max_steps)
    loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)
    correct = torch.zeros((), device=x.device, dtype=torch.float64)
    seen = 0
    start = time.perf_counter()
    for step in range(steps):
        idx = perm[step * batch_size: (step + 1) * batch_size]
        xb, yb = x[idx], y[idx]
        if augment.kinds:
            xb = augment_batch(xb, augment.kinds, generator=augment_generator,
                               padding=augment.padding, brightness=augment.brightness,
                               normalization=augment.normalization)
        if xb.dim() == 4:
            xb = xb.contiguous(memory_format=memory_format)
        optimizer.zero_grad(set_to_none=True)
        with autocast(x.device, amp):
            out = module(xb)
        # Class labels: the sums cover the batch's examples (a count, if returned, is len(idx)).
        batch_loss, batch_correct = loss_fn(out.float().unsqueeze(0), yb)[:2]
        (batch_loss[0] / len(idx)).backward()
        optimizer.step()
        loss_sum += batch_loss[0].detach()
        correct += batch_correct[0].detach()
        seen += len(idx)
        if on_step and ((step + 1) % 20 == 0 or step + 1 == steps):  # a sync: not every step
            on_step(step + 1, steps, float(loss_sum) / seen, float(correct) / seen)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return EpochStats(float(loss_sum), float(correct), seen, steps, time.perf_counter() - start)


def evaluate(module: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss_fn: Callable,
             batch_size: int = 1000, amp: bool = False,
             memory_format: torch.memory_format = torch.contiguous_format
             ) -> tuple[float, float]:
    """Return (loss, accuracy) over all of ``(x, y)`` in eval mode: sums over examples / N."""
    was_training = module.training
    module.eval()
    loss_sum, correct = 0.0, 0.0
    with torch.no_grad():
        for lo in range(0, len(x), batch_size):
            xb = x[lo: lo + batch_size]
            if xb.dim() == 4:
                xb = xb.contiguous(memory_format=memory_format)
            with autocast(x.device, amp):
                out = module(xb)
            batch_loss, batch_correct = loss_fn(out.float().unsqueeze(0),
                                                y[lo: lo + batch_size])[:2]
            loss_sum += float(batch_loss[0])
            correct += float(batch_correct[0])
    module.train(was_training)
    return loss_sum / len(x), correct / len(x)


def fit(
    module: nn.Module,
    splits: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    loss: str = "cross_entropy",
    config: TrainConfig = TrainConfig(),
    on_epoch: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train ``module`` in place on ``splits["train"]``; return one metrics dict per epoch.

    Each dict holds ``epoch``, ``train_loss``, ``train_accuracy`` and, when there is a test
    split, ``test_loss`` and ``test_accuracy`` (measured in eval mode after the epoch).
    """
    loss_fn = get_loss(loss)
    tdtype = target_dtype(loss)
    x, y = splits["train"]
    y = y.to(tdtype) if tdtype is not None else y
    test = splits.get("test")
    if test is not None and tdtype is not None:
        test = (test[0], test[1].to(tdtype))
    optimizer = make_optimizer(module, optimizer=config.optimizer, lr=config.lr,
                               weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    history = []
    for epoch in range(1, config.epochs + 1):
        train_epoch(module, x, y, optimizer=optimizer, loss_fn=loss_fn,
                    batch_size=config.batch_size, order=generator)
        record = {"epoch": epoch}
        record["train_loss"], record["train_accuracy"] = evaluate(module, x, y, loss_fn=loss_fn)
        if test is not None:
            record["test_loss"], record["test_accuracy"] = evaluate(module, *test,
                                                                    loss_fn=loss_fn)
        history.append(record)
        if on_epoch:
            on_epoch(record)
    module.eval()
    return history


def make_optimizer(module: nn.Module, *, optimizer: str, lr: float, weight_decay: float,
                   momentum: float = 0.9, param_groups: Sequence[Mapping] = ()
                   ) -> torch.optim.Optimizer:
    """Return SGD (with ``momentum``) or Adam over the module's trainable parameters.

    Args:
        param_groups: ``{pattern, lr, weight_decay}`` tables; a parameter joins the first whose
            ``pattern`` ``re.match``-es its name, the rest form a default group with ``lr`` and
            ``weight_decay``. Each group remembers its ``initial_lr`` for the schedule.

    Raises:
        CkptscopeError: a pattern matches no parameter (listing the first names).
    """
    import re

    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    buckets: list[list[torch.nn.Parameter]] = [[] for _ in param_groups]
    rest = []
    for name, param in named:
        for i, group in enumerate(param_groups):
            if re.match(group["pattern"], name):
                buckets[i].append(param)
                break
        else:
            rest.append(param)
    groups = []
    for group, params in zip(param_groups, buckets, strict=True):
        if not params:
            raise CkptscopeError(
                f"param_groups pattern {group['pattern']!r} matches no parameter (or only ones "
                f"an earlier group took); names start with {[n for n, _ in named[:5]]}."
            )
        groups.append({"params": params, "lr": float(group.get("lr", lr)),
                       "weight_decay": float(group.get("weight_decay", weight_decay))})
    if rest:
        groups.append({"params": rest, "lr": float(lr), "weight_decay": float(weight_decay)})
    for group in groups:
        group["initial_lr"] = group["lr"]
    if optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise CkptscopeError(f"optimizer {optimizer!r} is not one of {OPTIMIZERS}.")


def lr_factor(epoch: int, *, milestones: Sequence[int], gamma: float) -> float:
    """The schedule's factor for 1-based ``epoch``: ``gamma`` per milestone passed before it.

    ``milestones=[33, 66]``: epochs 1-33 get 1, 34-66 get ``gamma``, 67- get ``gamma ** 2``.
    """
    return gamma ** sum(1 for m in milestones if m < epoch)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's lr to ``initial_lr * factor``."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
