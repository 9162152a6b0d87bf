"""REPAIR (Jordan et al., ICLR 2023): undo the variance collapse of interpolated networks.

Averaging two networks' weights averages out part of their hidden units' signal: the
interpolated network's pre-activations have smaller variance than either end's. REPAIR rescales
each hidden Linear / Conv output channel of the network at alpha so that its mean and standard
deviation over data are the interpolation of the two ends':

    mu_t = (1 - alpha) mu_A + alpha mu_B,   sigma_t = (1 - alpha) sigma_A + alpha sigma_B
    y' = (y - mu) * sigma_t / sigma + mu_t

where mu, sigma are the interpolated network's own statistics, measured layer by layer in
forward order (each layer after the ones before it are repaired). The rescaling is folded into
the layer's weight and bias, so a repaired point is a plain state dict. The ends (alpha = 0 and
1) are left as they are. Networks with BatchNorm get the same effect by re-estimating its
statistics at each point (``bn="recompute"``), which is what ``linear_path(..., repair=True)``
does for them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import fx, nn
from torch.func import functional_call

from ckptscope.align.spec import spec_from_graph
from ckptscope.errors import CkptscopeError
from ckptscope.points import PointSet, state_at

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (mean, std), each (channels,)
REPAIR_EXAMPLES = 1024  # examples the statistics are measured on, at most


def has_batchnorm(model: nn.Module) -> bool:
    """True when ``model`` holds a BatchNorm (REPAIR is then ``bn="recompute"``)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def hidden_layers(model: nn.Module) -> list[str]:
    """The Linear / Conv modules whose outputs are hidden units, in forward order.

    Hidden means their output channels are a permutation class of
    :func:`~ckptscope.align.spec.spec_from_graph` (not the model's output).

    Raises:
        CkptscopeError: fx cannot trace the model, or it has no hidden layer.
    """
    spec = spec_from_graph(model)
    outputs = {ax[0] for axes in spec.classes.values() for ax in axes if ax[1] == 0}
    order = [str(n.target) for n in fx.symbolic_trace(model).graph.nodes
             if n.op == "call_module"]
    layers = []
    for name in dict.fromkeys(order):
        module = model.get_submodule(name)
        if isinstance(module, _LAYERS) and f"{name}.weight" in outputs:
            if module.bias is None:
                raise CkptscopeError(
                    f"REPAIR folds its shift into the bias of {name!r}, which has none; use "
                    f"bn='recompute' for a network with BatchNorm, or give the layer a bias."
                )
            layers.append(name)
    return layers


def _channels(y: torch.Tensor, linear: bool) -> torch.Tensor:
    """(samples, channels): a Linear's last axis, a Conv's axis 1."""
    return y.reshape(-1, y.shape[-1]) if linear else y.movedim(1, -1).reshape(-1, y.shape[1])


def layer_stats(model: nn.Module, state: Mapping[str, torch.Tensor], inputs: torch.Tensor,
                layers: Sequence[str], *, batch_size: int = 256) -> Stats:
    """Per-channel mean and std of each layer's output over ``inputs`` (N, ...), eval mode."""
    sums: dict[str, list] = {}

    def hook(name: str, linear: bool):
        def record(module, args, out):
            y = _channels(out.detach().double(), linear)
            s = sums.setdefault(name, [0, 0.0, 0.0])
            s[0] += len(y)
            s[1] = s[1] + y.sum(0)
            s[2] = s[2] + (y * y).sum(0)
        return record

    handles = [model.get_submodule(n).register_forward_hook(
        hook(n, isinstance(model.get_submodule(n), nn.Linear))) for n in layers]
    try:
        with torch.no_grad():
            model.eval()
            for start in range(0, len(inputs), batch_size):
                functional_call(model, dict(state), (inputs[start:start + batch_size],))
    finally:
        for h in handles:
            h.remove()
    stats = {}
    for name, (n, s1, s2) in sums.items():
        mean = s1 / n
        stats[name] = (mean, (s2 / n - mean * mean).clamp_min(0).sqrt())
    return stats


def repair_state(model: nn.Module, state: Mapping[str, torch.Tensor], alpha: float,
                 ends: tuple[Stats, Stats], inputs: torch.Tensor, layers: Sequence[str]
                 ) -> dict[str, torch.Tensor]:
    """The state at ``alpha`` with each hidden layer's channels rescaled to the ends' statistics
    interpolated (formula above), layer by layer in forward order.

    Args:
        model: the architecture.
        state: the interpolated network's state dict.
        alpha: where it lies between the ends.
        ends: the ends' :func:`layer_stats`.
        inputs: (N, ...) the data the statistics are measured on.
        layers: :func:`hidden_layers`.
    """
    out = dict(state)
    for name in layers:
        mean, std = layer_stats(model, out, inputs, [name])[name]
        (ma, sa), (mb, sb) = ends[0][name], ends[1][name]
        target_mean = (1 - alpha) * ma + alpha * mb
        target_std = (1 - alpha) * sa + alpha * sb
        scale = torch.where(std > 0, target_std / std.clamp_min(1e-12), torch.ones_like(std))
        weight, bias = out[f"{name}.weight"], out[f"{name}.bias"]
        view = (-1, *([1] * (weight.dim() - 1)))
        out[f"{name}.weight"] = (weight.double() * scale.view(view)).to(weight.dtype)
        out[f"{name}.bias"] = ((bias.double() - mean) * scale + target_mean).to(bias.dtype)
    return out


def repaired_points(model: nn.Module, anchors: Mapping[str, Mapping[str, torch.Tensor]],
                    requests: Sequence[PointSet], inputs: torch.Tensor
                    ) -> tuple[dict[str, Mapping[str, torch.Tensor]], list[PointSet]]:
    """Each point of ``requests`` (paths over anchors ``start`` and ``end``) as a repaired state.

    Returns:
        The anchors with one repaired state per point added (``repaired.{r}.{i}``) and the
        requests as point sets on them (one unit weight per point). The ends of each path are
        not rescaled: on the whole-model path they are the anchors, bit for bit.
    """
    inputs = inputs[:REPAIR_EXAMPLES]
    layers = hidden_layers(model)
    every = dict(anchors)
    out = []
    for r, points in enumerate(requests):
        alphas = points.weights[:, 1]
        ends = [state_at(_line(points, [0.0, 1.0]), anchors, i) for i in range(2)]
        stats = tuple(layer_stats(model, s, inputs, layers) for s in ends)
        names, exact = [], points.exact()
        for i, alpha in enumerate(alphas.tolist()):
            if exact[i] >= 0 and points.held is None:  # an end of the whole-model path
                names.append(points.anchors[exact[i]])
                continue
            name = f"repaired.{r}.{i}"
            state = state_at(points, anchors, i)
            every[name] = state if exact[i] >= 0 else repair_state(
                model, state, alpha, stats, inputs, layers)
            names.append(name)
        used = tuple(dict.fromkeys(names))
        weights = np.zeros((len(names), len(used)))
        weights[np.arange(len(names)), [used.index(n) for n in names]] = 1.0
        out.append(PointSet(used, weights, tuple(anchors["start"]), None))
    return every, out


def _line(points: PointSet, alphas: list[float]) -> PointSet:
    """The same group path at other alphas."""
    a = np.asarray(alphas, dtype=np.float64)
    return PointSet(points.anchors, np.stack([1 - a, a], axis=1), points.moving, points.held)
