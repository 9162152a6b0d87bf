"""What an evaluator keeps between calls: the model and the data on the device, the sizes chosen
for them, and the per-batch plumbing every strategy shares."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ckptscope.engine.config import EvalConfig
from ckptscope.engine.deferred import Deferred, totals
from ckptscope.engine.failures import Where, from_user_code, loss_name
from ckptscope.engine.placement import (
    as_input,
    autocast,
    first_line,
    ignore_as_strided_fallback,
    set_layout,
    wants_channels_last,
)
from ckptscope.engine.sizing import Sizes, nbytes, probe, streams
from ckptscope.errors import CkptscopeError
from ckptscope.identity import aliases, named_tensors
from ckptscope.losses import LossFn, get_loss, target_dtype
from ckptscope.outputs import logits_of

Data = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


class Context:
    """The model and the evaluation data on the device, and how to run batches through them.

    Args:
        module: the architecture; its own weights are ignored (a private copy is used, and the
            probe pass runs at its weights). A module on the meta device costs nothing to pass:
            its copy is allocated on the device, zero-filled for the probe pass.
        data: split -> (inputs, targets), moved to the device once (kept on the CPU and
            streamed batch by batch when they do not fit the memory budget).
        loss: a loss name from :mod:`ckptscope.losses` or a callable of that form.
        config: device, dtype, batch size, strategy, memory budget, BatchNorm policy.
        bn_data: training inputs for ``config.bn == "recompute"``.
        own_module: ``True``: ``module`` was built for this evaluator (by an adapter), which
            takes it as its own (moved and cast in place, its weights overwritten) instead of
            copying it: one copy of the weights in memory instead of two.
        model_name: what to call the model in messages (an adapter name); ``None``: its class.
        data_name: what to call the data in messages (a dataset spec), if known.

    Attributes:
        module: the private copy, on the device, in eval mode.
        slots: every parameter and buffer of ``module`` under every name (tied ones repeated).
        alias: name -> the first name of the same tensor (:func:`ckptscope.identity.aliases`).
        data: the splits where they are evaluated from (the device, or the CPU when streamed).
        sizes: the probe's measurements, the batch size, the budget.
        channels_last: whether the model and its 4-D inputs run in channels-last layout.
        hoisted: point sets evaluated with hoisting (a diagnostic).
        where: the model, the data and the batch in flight, for errors of the user's code
            (:mod:`ckptscope.engine.failures`).
        loss_fn: the loss, checked: what it raises becomes one line naming the model and the
            data, and its results must be ``(k,)`` each.
    """

    def __init__(self, module: nn.Module, data: Data, *, loss: str | LossFn, config: EvalConfig,
                 bn_data: torch.Tensor | None = None, own_module: bool = False,
                 model_name: str | None = None, data_name: str | None = None):
        self.config = config
        self.where = Where(model_name or type(module).__name__, data_name)
        self._loss, self._loss_name = get_loss(loss), loss_name(loss)
        ignore_as_strided_fallback()  # before any forward pass (see there)
        dev, dtype = config.device, config.dtype
        self.module = working_module(module, dev, dtype, copy_module=not own_module)
        self.channels_last = False  # the layout is chosen at the end of __init__
        self.batchnorms = [m for m in self.module.modules() if isinstance(m, _BatchNorm)]
        if config.bn == "batch":
            for m in self.batchnorms:  # no running statistics: eval mode uses the batch's
                m.track_running_stats = False
                m.running_mean = m.running_var = m.num_batches_tracked = None
        self.slots = named_tensors(self.module)
        self.alias = aliases(self.slots)
        tdtype = target_dtype(loss)
        data_bytes = sum(nbytes([x, y]) for x, y in data.values())
        self.streaming = streams(dev, data_bytes, config.budget)
        home = torch.device("cpu") if self.streaming else dev
        self.data = {
            split: (
                x.to(home, dtype if x.is_floating_point() else x.dtype),
                y.to(home) if tdtype is None else y.to(home, tdtype),
            )
            for split, (x, y) in data.items()
        }
        self._views: dict[tuple[str, int], list] = {}
        if config.bn == "recompute":
            if bn_data is None or len(bn_data) == 0:
                raise CkptscopeError(
                    "BatchNorm policy 'recompute' needs training inputs to re-estimate the "
                    "running statistics; give data with a 'train' split."
                )
            if not self.batchnorms:
                raise CkptscopeError(
                    "BatchNorm policy 'recompute' was asked for, but the model has no "
                    "BatchNorm layer; use the default 'interpolate'."
                )
        self.bn_data = None if bn_data is None else bn_data.to(home, dtype)
        self.hoisted = 0
        self.sizes = Sizes(config, activation_bytes=1, output_bytes=1,
                           fold_single=config.bn != "interpolate")
        # The layout first where it does not depend on the batch size, so the probe runs in it.
        early = config.channels_last is not None or dev.type == "cuda"
        if early:
            self._try_channels_last()
        # One probe forward pass: checks that the data fits the model and measures the
        # activations that size the batches and point chunks.
        split, (x_all, _) = next(iter(self.data.items()))
        self.sizes.activation_bytes, self.sizes.output_bytes = probe(
            self.module, self.input(x_all[:8]).clone(), lambda x: self.forward(x, split), dev
        )
        self.sizes.pick_batch(max(len(x) for x, _ in self.data.values()), config.batch_size)
        if not early:
            self._try_channels_last()

    # --- layout ------------------------------------------------------------------------------
    def _try_channels_last(self) -> None:
        """Switch a conv net to channels-last when :func:`wants_channels_last` says so, and
        check it with a forward pass of two examples: a model that reshapes with ``.view``
        fails in that layout, and then keeps the default one (or, when ``channels_last=True``
        was asked for, gets a one-line error)."""
        config = self.config
        if not wants_channels_last(self.module, asked=config.channels_last, device=config.device,
                                   strategy=config.resolved_strategy, batch_size=self.sizes.batch):
            return
        self._set_layout(torch.channels_last)
        if (err := self._forward_error()) is None:
            return
        self._set_layout(torch.contiguous_format)
        # Asked for, and the model runs in the default layout: the layout is what fails. (If
        # it fails in both, the probe pass that follows says what is wrong with the data.)
        if config.channels_last and self._forward_error() is None:
            raise CkptscopeError(
                f"channels-last layout was asked for (--channels-last, channels_last=True), but "
                f"{type(self.module).__name__} fails in it ({first_line(err)}); leave the layout "
                f"to ckptscope or turn it off (--no-channels-last, channels_last=False)."
            )

    def _forward_error(self) -> Exception | None:
        """The error of a forward pass on two examples, if it fails."""
        x_all = next(iter(self.data.values()))[0]
        try:
            with torch.no_grad(), self.autocast():
                self.module(self.input(x_all[:2]))
        except Exception as err:  # anything (an assert on the layout, say): the default layout
            return err
        return None

    def _set_layout(self, layout: torch.memory_format) -> None:
        """The module's 4-D tensors, and the data held on the device, in ``layout``.

        In place (:func:`set_layout`), so that every slot, tied alias and captured reference
        stays the same tensor. Streamed batches are converted as they are moved (:meth:`input`).
        """
        self.channels_last = layout is torch.channels_last
        set_layout(self.slots.values(), layout)
        self._views.clear()
        if self.streaming:
            return
        self.data = {
            split: (x.contiguous(memory_format=layout) if x.dim() == 4 else x, y)
            for split, (x, y) in self.data.items()
        }
        if self.bn_data is not None and self.bn_data.dim() == 4:
            self.bn_data = self.bn_data.contiguous(memory_format=layout)

    # --- tensors -----------------------------------------------------------------------------
    def place(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors of ``state`` that the module holds, on the device.

        Nothing is copied on the CPU: an anchor stays as the checkpoint holds it (memory-mapped,
        half precision kept), and each point is computed from it one tensor at a time in the
        module's dtype (:func:`ckptscope.points.write_point`). On another device a floating
        tensor keeps its dtype when it is no wider than the evaluation dtype (a bfloat16
        checkpoint takes half the device memory of a float32 copy) and is cast to it otherwise.
        """
        dev, dtype = self.config.device, self.config.dtype
        wide = torch.finfo(dtype).bits
        return {
            k: v.to(device=dev, dtype=dtype if v.is_floating_point() and dev.type != "cpu"
                    and torch.finfo(v.dtype).bits > wide else v.dtype)
            for k, v in state.items()
            if k in self.slots
        }

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy ``state`` into the module's own tensors (no ``load_state_dict``)."""
        keys = [k for k in self.slots if k in state]
        with torch.no_grad():
            torch._foreach_copy_([self.slots[k] for k in keys], [state[k] for k in keys])

    def chunk_size(self, moving: Sequence[str], n: int) -> int:
        """Points per vectorised pass: as many of ``n`` as the memory budget holds."""
        return self.sizes.chunk(nbytes([self.slots[k] for k in moving]), n)

    # --- batches -----------------------------------------------------------------------------
    def input(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of inputs on the device (channels-last for conv nets)."""
        return as_input(x, self.config.device, self.channels_last)

    def autocast(self):
        return autocast(self.config.device, self.config.autocast)

    def forward(self, x: torch.Tensor, split: str) -> torch.Tensor:
        """The module's logits on ``x`` (:func:`ckptscope.outputs.logits_of`); an error of the
        model becomes one line naming the model and the data
        (:meth:`ckptscope.engine.failures.Where.model_failed`)."""
        try:
            return logits_of(self.module(x))
        except Exception as err:
            if not from_user_code(err):
                raise
            self.where.at(split, x)
            raise self.where.model_failed(err) from err

    def loss_fn(self, outputs: torch.Tensor, targets: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loss's ``(loss_sum, correct, count)`` for ``outputs: (k, B, ...)``, each ``(k,)``:
        a loss that returns ``(loss_sum, correct)`` counts the B examples. An error of the loss,
        or a result of another form, becomes one line naming the loss, the shapes, the model and
        the data."""
        try:
            result = self._loss(outputs, targets)
        except CkptscopeError as err:  # a built-in loss's own refusal: say where
            raise self.where.located(err) from err
        except Exception as err:
            if not from_user_code(err):
                raise
            raise self.where.loss_failed(err, self._loss_name, outputs, targets) from err
        k = outputs.shape[0] if isinstance(outputs, torch.Tensor) and outputs.dim() else 1
        if not isinstance(result, (tuple, list)):
            raise self.where.loss_returned(self._loss_name, f"a {type(result).__name__}", k)
        if len(result) not in (2, 3):
            raise self.where.loss_returned(self._loss_name, f"{len(result)} values", k)
        for part in result:
            if not isinstance(part, torch.Tensor) or tuple(part.shape) != (k,):
                what = (f"a tensor of shape {tuple(part.shape)}"
                        if isinstance(part, torch.Tensor) else f"a {type(part).__name__}")
                raise self.where.loss_returned(self._loss_name, what, k)
        if len(result) == 2:
            loss, correct = result
            count = torch.full((k,), targets.shape[0], dtype=torch.float64, device=loss.device)
            return loss, correct, count
        return tuple(result)

    def batches(self, split: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The split's (inputs, targets) batches at the current batch size: views, made once
        per batch size when the data lives on the device."""
        key = (split, self.sizes.batch)
        if key in self._views:
            return self._views[key]
        x_all, y_all = self.data[split]
        batches = [(x_all[lo:hi], y_all[lo:hi]) for lo, hi in self.sizes.spans(len(x_all))]
        if not self.streaming:
            self._views[key] = batches
        return batches

    def deferred(self, split: str, n: int, examples: int | None = None) -> Deferred:
        """A :class:`Deferred` loss for ``n`` points on ``split`` (or on one batch of
        ``examples``), holding as many points' outputs as the budget allows."""
        examples = len(self.data[split][0]) if examples is None else examples
        return Deferred(self.loss_fn, self.sizes.deferred(examples, n))

    def over_batches(self, fn: Callable, split: str, k: int) -> list:
        """``fn(x, y)`` on each batch of the split, in order; the list of what it returned.

        Under ``bn="interpolate"`` an out-of-memory error on a one-point pass halves the batch
        size and starts the split again (the curves do not depend on it there).
        """
        dev = self.config.device
        where = self.where
        while True:
            batch = self.sizes.batch
            try:
                out = []
                for x, y in self.batches(split):
                    where.at(split, x)  # for an error of the model's, whichever path calls it
                    out.append(fn(self.input(x), y.to(dev, non_blocking=True)))
                return out
            except torch.OutOfMemoryError:
                if self.config.bn != "interpolate":
                    raise CkptscopeError(
                        f"out of device memory at batch size {batch}; under --bn "
                        f"{self.config.bn} the curves depend on the batch size, so it is not "
                        f"lowered automatically: pass a smaller --batch-size."
                    ) from None
                if batch == 1 or k > 1:  # a vmap chunk halves its points first (its caller)
                    raise
                self.sizes.batch = max(1, batch // 2)
                self.note_oom(f"batch size {batch} -> {self.sizes.batch}")

    def accumulate(self, outputs_fn: Callable, split: str, k: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sum loss, correctness and count over the split's batches; ``outputs_fn(x) -> (k, B,
        ...)``.

        Returns float64 tensors (k,) on the device: the caller moves them off it once.
        """
        return totals(self.over_batches(lambda x, y: self.loss_fn(outputs_fn(x), y), split, k))

    def recompute_bn(self) -> None:
        """Re-estimate every BatchNorm's running statistics at the current weights."""
        for m in self.batchnorms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
            m.train()
        for lo, hi in self.sizes.spans(len(self.bn_data))[: self.config.bn_batches]:
            self.where.at("train", self.bn_data[lo:hi])
            self.module(self.input(self.bn_data[lo:hi]))
        for m in self.batchnorms:
            m.eval()

    def note_oom(self, change: str) -> None:
        self.sizes.note_oom(change, self.config.device)


def working_module(module: nn.Module, device: torch.device, dtype: torch.dtype, *,
                   copy_module: bool = True) -> nn.Module:
    """The module an evaluator runs: ``module`` (or a copy) on ``device``, floating tensors in
    ``dtype``, in eval mode.

    A module on the meta device is allocated on ``device`` (``to_empty``) and zero-filled:
    the anchors overwrite every tensor a state dict holds. A buffer a state dict does not hold
    (``persistent=False``: a causal mask, rotary frequencies) would have no value, so such a
    module is refused.
    """
    tensors = [*module.parameters(), *module.buffers()]
    if any(t.is_meta for t in tensors):
        lost = sorted(
            f"{prefix}.{name}" if prefix else name
            for prefix, m in module.named_modules()
            for name in m._non_persistent_buffers_set
            if getattr(m, name, None) is not None  # to_empty would drop it, on any device
        )
        if lost:
            raise CkptscopeError(
                f"{type(module).__name__} is on the meta device, but its buffers "
                f"{', '.join(lost[:5])} are not saved in a state dict, so their values would be "
                f"lost; build the module on the CPU, or pass an adapter that builds it."
            )
        module = copy.deepcopy(module) if copy_module else module  # free on the meta device
        module = module.to_empty(device=device)
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                t.zero_()
    elif copy_module:
        module = copy.deepcopy(module)
    return module.to(device=device, dtype=dtype).eval()
