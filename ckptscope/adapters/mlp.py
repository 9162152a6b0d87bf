"""Multi-layer perceptrons of any widths (the paper's spiral and MNIST MLPs, appendix A)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ckptscope.adapters import ADAPTERS, Adapter
from ckptscope.adapters.presets import bn_affine, bn_stats
from ckptscope.errors import CkptscopeError

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
_WEIGHT = re.compile(r"^layers\.(\d+)\.weight$")
_NORM = re.compile(r"^norms\.(\d+)\.running_mean$")


class MLP(nn.Module):
    """Linear layers with an activation between them; inputs are flattened.

    Args:
        widths: ``[in, hidden..., out]``; ``[2, 50, 50, 1]`` is the paper's spiral net.
        activation: ``relu``, ``tanh`` or ``gelu``.
        batchnorm: put a ``BatchNorm1d`` after each hidden linear layer, before the activation.

    State-dict keys are ``layers.{i}.weight`` and ``layers.{i}.bias``, and with ``batchnorm``
    also ``norms.{i}.*`` for each hidden layer ``i``.
    """

    def __init__(self, widths: Sequence[int] = (2, 50, 50, 1), activation: str = "relu",
                 batchnorm: bool = False):
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 2 or min(widths) < 1:
            raise CkptscopeError(f"MLP widths {widths} need an input and an output width >= 1.")
        if activation not in _ACTIVATIONS:
            raise CkptscopeError(
                f"MLP activation {activation!r} is not one of {sorted(_ACTIVATIONS)}."
            )
        if not isinstance(batchnorm, bool):
            raise CkptscopeError(f"MLP batchnorm={batchnorm!r} must be true or false.")
        self.layers = nn.ModuleList(
            nn.Linear(i, o) for i, o in zip(widths[:-1], widths[1:], strict=True)
        )
        self.activation = _ACTIVATIONS[activation]()
        if batchnorm:
            self.norms = nn.ModuleList(nn.BatchNorm1d(w) for w in widths[1:-1])
        else:
            self.norms = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                if self.norms is not None:
                    x = self.norms[i](x)
                x = self.activation(x)
        return x


def infer_widths(state: Mapping[str, torch.Tensor]) -> dict:
    """Read ``widths`` off an MLP state dict's weight shapes; ``batchnorm`` if it has norms."""
    shapes = {int(m.group(1)): v.shape for k, v in state.items() if (m := _WEIGHT.match(k))}
    if not shapes or sorted(shapes) != list(range(len(shapes))):
        return {}
    widths = [int(shapes[0][1])] + [int(shapes[i][0]) for i in range(len(shapes))]
    options: dict = {"widths": widths}
    if any(_NORM.match(k) for k in state):
        options["batchnorm"] = True
    return options


def layer_groups(keys: Sequence[str]) -> dict[str, str]:
    """One group per linear layer: ``layer1`` ... ``layerN`` (the paper's layer numbering).

    With ``batchnorm``, a hidden layer's group also holds the BatchNorm that follows it.
    """
    indices = sorted({int(m.group(1)) for k in keys if (m := _WEIGHT.match(k))})
    norms = {int(m.group(1)) for k in keys if (m := _NORM.match(k))}
    return {f"layer{i + 1}": rf"(?:layers|norms)\.{i}\." if i in norms else rf"layers\.{i}\."
            for i in indices}


ADAPTERS.register("mlp")(Adapter(
    name="mlp",
    build=MLP,
    loss=lambda options: "bce" if list(options.get("widths", (2, 50, 50, 1)))[-1] == 1
    else "cross_entropy",
    default_data="spiral",
    presets={"layers": layer_groups, "bn-stats": bn_stats, "bn-affine": bn_affine},
    infer_options=infer_widths,
    description="MLP of any widths (options: widths=[in,...,out], activation=relu|tanh|gelu, "
                "batchnorm=false)",
))
