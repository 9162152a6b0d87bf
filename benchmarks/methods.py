"""The methods compared: ckptscope's entry points and two ways people do it without ckptscope.

Every method has the signature ``method(workload, alphas, *, batch_size, device, mark=None)
-> Curves`` and evaluates the workload's paths (the whole model, or each group with the rest
held at the end state) at every alpha, returning loss and accuracy with shape
``(path, alpha)``. All of them use the same batch size (``linear_path, all defaults`` picks its
own: the evaluator's, which ``run.py`` gives the others) and compute both the mean loss and the
accuracy, so the work is the same.
``mark(g)``, when given, is called as soon as path ``g`` is done (for per-group timings).

- ``plain_loop``: what one writes by hand — build the interpolated state dict, ``load_state_dict``,
  run the batches. The reference for numbers and for speed.
- ``loss_landscapes_path``: ``loss_landscapes.linear_interpolation`` (the PyPI package
  ``loss-landscapes``), with a Metric that computes loss and accuracy over the same batches. It
  steps from the start with ``steps`` accumulated in-place adds of ``(end - start) / steps`` and
  evaluates after each add, so it never evaluates alpha = 0 and its alpha = 1 is the start plus
  the rounded steps; we evaluate alpha = 0 with ``loss_landscapes.point`` to cover the same grid.
  It moves ``module.parameters()`` only (buffers stay at the start model's); the workloads keep
  the buffers equal at both ends so that the paths are the same. Where the package is not
  installed, ``ll_reimplementation.py`` (the same loop, re-implemented) stands in, under the
  name ``LL_REIMPLEMENTED``.
- ``ckptscope linear_path, ...`` and ``ckptscope Evaluator.evaluate, ...``: ckptscope end to
  end (checks, grouping, evaluation, distances, the xarray result and its shape verdicts) and
  its engine alone. On a group path the engine hoists the part of the forward pass upstream of the
  group out of the alpha loop (``EvalConfig.hoist``); the ``no hoisting`` rows turn that off.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from workloads import Workload

from ckptscope.engine import EvalConfig, Evaluator
from ckptscope.linear import linear_path


@dataclass(frozen=True)
class Curves:
    """Mean loss and accuracy, each ``(path, alpha)``."""

    loss: np.ndarray
    accuracy: np.ndarray


Method = Callable[..., Curves]
Mark = Callable[[int], None]
# Every group path in one call: under vmap those not hoisted share vectorised passes.
TOGETHER = "ckptscope Evaluator.evaluate, groups in one call, vmap, no hoisting"
LL_REIMPLEMENTED = "loss-landscapes linear_interpolation (re-implementation)"
# linear_path as a user calls it: the evaluator picks the batch size and the strategy.
DEFAULTS = "ckptscope linear_path, all defaults"


def _batch_loss_and_correct(
    out: torch.Tensor, y: torch.Tensor, loss: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and number correct of one batch (as ``ckptscope.losses`` defines them)."""
    if out.dtype in (torch.bfloat16, torch.float16):  # an autocast forward's logits
        out = out.float()
    if loss == "bce":
        logits = out.reshape(-1)
        return (
            F.binary_cross_entropy_with_logits(logits, y, reduction="sum"),
            ((logits > 0) == (y > 0.5)).sum(),
        )
    return F.cross_entropy(out, y, reduction="sum"), (out.argmax(-1) == y).sum()


def _targets(w: Workload, device: torch.device) -> torch.Tensor:
    return w.y.to(device, torch.float32 if w.loss == "bce" else torch.long)


def _evaluate_module(model, x, y, loss: str, batch_size: int) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` over all of ``x``; one host sync at the end."""
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.float64, device=x.device)
    for lo in range(0, len(x), batch_size):
        batch_loss, batch_correct = _batch_loss_and_correct(
            model(x[lo : lo + batch_size]), y[lo : lo + batch_size], loss
        )
        total += batch_loss.double()
        correct += batch_correct.double()
    return total.item() / len(x), correct.item() / len(x)


_COMPILED: dict[tuple, tuple[torch.nn.Module, Callable]] = {}  # compiled models, per process


def plain_loop(w: Workload, alphas: np.ndarray, *, batch_size: int, device,
               mark: Mark | None = None, channels_last: bool = False,
               autocast: torch.dtype | None = None, compile_mode: str | None = None) -> Curves:
    """Per alpha: lerp every moving tensor into a new state dict and ``load_state_dict`` it.

    ``channels_last``: model and images in channels-last layout (what ckptscope does for conv
    nets), to tell the layout's gain from the strategy's. ``autocast``: forward passes under
    ``torch.autocast`` in this dtype (the weight-cast cache off, as in ckptscope), to tell the
    precision's gain from the strategy's. ``compile_mode``: the forward pass through
    ``torch.compile(model, mode=...)`` (``"default"``, or ``"reduce-overhead"`` for CUDA graphs),
    to see whether compilation pays before ckptscope's evaluator takes it on.
    """
    device = torch.device(device)
    key = (w.module, device, channels_last, compile_mode)  # the module itself: its id is reused
    if compile_mode and key in _COMPILED:  # compiled once per process, not once per call
        model, forward = _COMPILED[key]
    else:
        model = copy.deepcopy(w.module).to(device).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        # load_state_dict writes the eager module's tensors in place; the compiled one reads them.
        forward = torch.compile(model, mode=compile_mode) if compile_mode else model
        if compile_mode:
            _COMPILED[key] = model, forward
    x, y = w.x.to(device), _targets(w, device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    a = {k: v.to(device) for k, v in w.start.items()}
    b = {k: v.to(device) for k, v in w.end.items()}
    groups = w.resolved_groups()
    loss = np.empty((len(groups), len(alphas)))
    accuracy = np.empty_like(loss)
    with torch.no_grad():
        for g, group in enumerate(groups):
            moving = {k for k in group.keys if a[k].is_floating_point()}
            for i, alpha in enumerate(alphas):
                state = {
                    k: torch.lerp(a[k], b[k], float(alpha)) if k in moving else b[k] for k in b
                }
                model.load_state_dict(state)
                with torch.autocast(device.type, dtype=autocast or torch.bfloat16,
                                    enabled=autocast is not None, cache_enabled=False):
                    loss[g, i], accuracy[g, i] = _evaluate_module(
                        forward, x, y, w.loss, batch_size)
            if mark:
                mark(g)
    return Curves(loss, accuracy)


def loss_landscapes_available() -> str | None:
    """The installed ``loss-landscapes`` version, or ``None`` when it cannot be imported."""
    try:
        from importlib.metadata import version

        import loss_landscapes  # noqa: F401

        return version("loss-landscapes")
    except Exception:  # not installed, or broken beside this torch: the column is skipped
        return None


def loss_landscapes_path(w: Workload, alphas: np.ndarray, *, batch_size: int, device,
                         mark: Mark | None = None, package: bool = True) -> Curves:
    """``loss_landscapes.linear_interpolation`` with ``steps = len(alphas) - 1``, plus alpha = 0.

    Only an evenly spaced grid from 0 to 1 can be asked of it. A group path starts from the end
    state with the group's tensors taken from the start, so the other tensors have a zero step.
    ``package=False``: the re-implementation in ``ll_reimplementation.py`` instead.
    """
    if package:
        import loss_landscapes
        from loss_landscapes.metrics import Metric
    else:
        import ll_reimplementation as loss_landscapes

        Metric = object

    n = len(alphas)
    if not np.allclose(alphas, np.linspace(0, 1, n)):
        raise ValueError("loss-landscapes steps evenly from 0 to 1; pass an even grid.")
    device = torch.device(device)
    x, y = w.x.to(device), _targets(w, device)

    class LossAndAccuracy(Metric):
        def __call__(self, model_wrapper):
            with torch.no_grad():
                return _evaluate_module(model_wrapper.forward, x, y, w.loss, batch_size)

    metric = LossAndAccuracy()
    groups = w.resolved_groups()
    loss = np.empty((len(groups), n))
    accuracy = np.empty_like(loss)
    end = copy.deepcopy(w.module).to(device).eval()
    end.load_state_dict(w.end)
    for g, group in enumerate(groups):
        start = copy.deepcopy(end)
        start.load_state_dict(
            {**w.end, **{k: w.start[k] for k in group.keys if w.start[k].is_floating_point()}}
        )
        loss[g, 0], accuracy[g, 0] = loss_landscapes.point(start, metric)
        values = loss_landscapes.linear_interpolation(
            start, end, metric, steps=n - 1, deepcopy_model=True
        )
        loss[g, 1:], accuracy[g, 1:] = values[:, 0], values[:, 1]
        if mark:
            mark(g)
    return Curves(loss, accuracy)


def _linear_path(strategy: str | None, dtype: str = "float32") -> Method:
    """``linear_path`` with the given strategy and the shared batch size; ``strategy=None``:
    no config at all (the evaluator's own batch size and strategy)."""

    def run(w: Workload, alphas: np.ndarray, *, batch_size: int, device,
            mark: Mark | None = None) -> Curves:
        def progress(done: int, total: int) -> None:
            if mark and done % len(alphas) == 0:
                mark(done // len(alphas) - 1)

        ds = linear_path(
            w.start,
            w.end,
            w.module,
            {"test": (w.x, w.y)},
            groups=w.groups or None,
            full=not w.groups,
            alphas=alphas,
            loss=w.loss,
            device=device,
            dtype=dtype,
            progress=progress,
            config=None if strategy is None else EvalConfig(batch_size=batch_size,
                                                            strategy=strategy),
        )
        sel = {"run": 0, "split": 0}
        return Curves(ds["loss"].isel(sel).values, ds["accuracy"].isel(sel).values)

    return run


def _evaluator(strategy: str, *, hoist: bool = True, together: bool = False) -> Method:
    """The engine alone: ``Evaluator.evaluate`` per group, or once for all of them
    (``together``: under vmap the group paths that are not hoisted share vectorised passes)."""

    def run(w: Workload, alphas: np.ndarray, *, batch_size: int, device,
            mark: Mark | None = None) -> Curves:
        config = EvalConfig(
            device=torch.device(device), strategy=strategy, batch_size=batch_size, hoist=hoist
        )
        ev = Evaluator(w.module, {"test": (w.x, w.y)}, loss=w.loss, config=config)
        groups = w.resolved_groups()
        if together:
            results = ev.evaluate(w.anchors(), [w.points(g.keys, alphas) for g in groups],
                                  done=lambda g, _: mark(g) if mark else None)
            curves = [r["test"] for r in results]
        else:
            curves = []
            for g, group in enumerate(groups):
                [result] = ev.evaluate(w.anchors(), [w.points(group.keys, alphas)])
                curves.append(result["test"])
                if mark:
                    mark(g)
        return Curves(np.stack([c[0] for c in curves]), np.stack([c[1] for c in curves]))

    return run


METHODS: dict[str, Method] = {
    "plain load_state_dict loop": plain_loop,
    "plain load_state_dict loop, channels-last": partial(plain_loop, channels_last=True),
    "plain load_state_dict loop, channels-last, torch.compile": partial(
        plain_loop, channels_last=True, compile_mode="default"),
    "plain load_state_dict loop, channels-last, torch.compile reduce-overhead": partial(
        plain_loop, channels_last=True, compile_mode="reduce-overhead"),
    "plain load_state_dict loop, channels-last, bf16 autocast": partial(
        plain_loop, channels_last=True, autocast=torch.bfloat16),
    "loss-landscapes linear_interpolation": loss_landscapes_path,
    LL_REIMPLEMENTED: partial(loss_landscapes_path, package=False),
    "ckptscope linear_path, auto": _linear_path("auto"),
    DEFAULTS: _linear_path(None),
    "ckptscope linear_path, loop": _linear_path("loop"),
    "ckptscope linear_path, vmap": _linear_path("vmap"),
    "ckptscope Evaluator.evaluate, loop": _evaluator("loop"),
    "ckptscope Evaluator.evaluate, vmap": _evaluator("vmap"),
    "ckptscope Evaluator.evaluate, loop, no hoisting": _evaluator("loop", hoist=False),
    "ckptscope Evaluator.evaluate, vmap, no hoisting": _evaluator("vmap", hoist=False),
    TOGETHER: _evaluator("vmap", hoist=False, together=True),
    "ckptscope linear_path, auto, bf16 autocast": _linear_path("auto", "bf16"),
}
BASELINE = "plain load_state_dict loop"


def loss_landscapes_method() -> str:
    """The loss-landscapes row this machine can run: the package, or its re-implementation."""
    if loss_landscapes_available() is None:
        return LL_REIMPLEMENTED
    return "loss-landscapes linear_interpolation"


def methods(names: Sequence[str]) -> dict[str, Method]:
    """The named methods, in the given order; the loss-landscapes package's row becomes the
    re-implementation's where the package cannot be imported."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise KeyError(f"unknown methods {unknown}; known: {sorted(METHODS)}.")
    ll = loss_landscapes_method()
    chosen = [ll if n == "loss-landscapes linear_interpolation" else n for n in names]
    return {n: METHODS[n] for n in dict.fromkeys(chosen)}
