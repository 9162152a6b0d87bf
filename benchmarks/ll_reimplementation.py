"""A re-implementation of loss-landscapes' ``linear_interpolation`` loop, for machines where the
``loss-landscapes`` package (PyPI, 3.0.x) is not installed. NOT the package: its rows are
labelled ``(re-implementation)`` in the tables.

It does what the package does, written from its documented behaviour and its 3.0.7 source
(``loss_landscapes/main.py``, ``model_interface/model_wrapper.py`` and
``model_parameters.py``):

- ``wrap_model`` wraps a module and turns ``requires_grad`` off on its parameters;
- ``linear_interpolation(start, end, metric, steps, deepcopy_model=True)`` deep-copies both
  models, takes the lists of their parameters (``module.parameters()``: buffers are not moved),
  computes ``direction = (end - start) / steps`` per parameter, then ``steps`` times adds the
  direction in place to the start copy's parameters (``p += d``, one tensor at a time) and calls
  ``metric(wrapper)``. It never evaluates alpha = 0, and its alpha = 1 is the start plus the
  rounded steps, not the end;
- ``point(model, metric)`` is ``metric(wrap_model(model))``.

The metric is called with the wrapper, whose ``forward(x)`` runs the module, as in the package.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import nn


class Wrapper:
    """The package's ``SimpleModelWrapper``: one module, gradients off."""

    def __init__(self, module: nn.Module):
        self.module = module
        for p in module.parameters():
            p.requires_grad = False

    def parameters(self) -> list[torch.Tensor]:
        return list(self.module.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


Metric = Callable[[Wrapper], object]


def point(model: nn.Module, metric: Metric) -> object:
    """The metric at the model's own parameters."""
    return metric(Wrapper(model))


def linear_interpolation(model_start: nn.Module, model_end: nn.Module, metric: Metric,
                         steps: int = 100, deepcopy_model: bool = False) -> np.ndarray:
    """The metric after each of ``steps`` accumulated in-place steps from start towards end."""
    start = Wrapper(copy.deepcopy(model_start) if deepcopy_model else model_start)
    end = Wrapper(copy.deepcopy(model_end) if deepcopy_model else model_end)
    start_point, end_point = start.parameters(), end.parameters()
    direction = [(e - s) / steps for s, e in zip(start_point, end_point, strict=True)]
    values = []
    for _ in range(steps):
        for p, d in zip(start_point, direction, strict=True):
            p += d
        values.append(metric(start))
    return np.array(values)
