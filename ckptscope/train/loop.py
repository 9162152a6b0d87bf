"""One plain training loop: seeded, full-batch-free, metrics per epoch.

The recipes of the paper's experiments build on this loop (see the trainer issue); the demo
uses it as it is to train the spiral MLP of appendix A.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ckptscope.errors import CkptscopeError
from ckptscope.losses import get_loss, target_dtype

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    """How to train.

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


def _evaluate(module: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn) -> tuple[float, float]:
    module.eval()
    with torch.no_grad():
        loss, correct = loss_fn(module(x).unsqueeze(0), y)
    module.train()
    return float(loss[0]) / len(x), float(correct[0]) / len(x)


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
    params = [p for p in module.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    history = []
    module.train()
    for epoch in range(1, config.epochs + 1):
        order = torch.randperm(len(x), generator=generator)
        for lo in range(0, len(x), config.batch_size):
            idx = order[lo : lo + config.batch_size]
            opt.zero_grad(set_to_none=True)
            batch_loss, _ = loss_fn(module(x[idx]).unsqueeze(0), y[idx])
            (batch_loss[0] / len(idx)).backward()
            opt.step()
        record = {"epoch": epoch}
        record["train_loss"], record["train_accuracy"] = _evaluate(module, x, y, loss_fn)
        if test is not None:
            record["test_loss"], record["test_accuracy"] = _evaluate(module, *test, loss_fn)
        history.append(record)
        if on_epoch:
            on_epoch(record)
    module.eval()
    return history
