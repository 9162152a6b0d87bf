"""The batched evaluator: loss and accuracy at every alpha of a path, on preloaded data.

Two strategies compute the same numbers:

- ``loop``: one forward pass per alpha. The moving tensors are written in place into the
  module's own parameters with ``torch._foreach_copy_`` + ``torch._foreach_lerp_`` (no
  ``load_state_dict``, no allocation per alpha). On a CPU this wins: a batched pass of a small
  net does no more useful work per flop than a plain one.
- ``vmap``: ``torch.func.functional_call`` under ``torch.vmap`` over a chunk of alphas, with only
  the moving group's tensors replicated. On a GPU this fills the device that one small forward
  pass leaves idle. The chunk size comes from a memory budget, so peak memory does not grow
  with the number of alphas.

``strategy="auto"`` picks ``loop`` on the CPU and ``vmap`` on CUDA (see ``benchmarks/``).

Around both: on a group path the part of the forward pass upstream of the group runs once per
batch (:mod:`ckptscope.hoist`); under ``loop`` the outputs of several alphas are kept and go
through one loss call per batch (:class:`_Deferred`), so a small model does not spend its time
in loss kernels; and :meth:`Evaluator.paths` lets the group paths that are not hoisted share
``vmap`` passes.
Every pass runs in eval mode, without autograd, in float32 unless asked otherwise; the loss is
the sum over all examples divided by N.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ckptscope.errors import CkptscopeError
from ckptscope.hoist import SplitForward, split_forward, trace
from ckptscope.losses import LossFn, get_loss, target_dtype
from ckptscope.path import PathPlan, plan_path, stack_points, write_point

STRATEGIES = ("auto", "loop", "vmap")
BN_POLICIES = ("interpolate", "recompute", "batch")
Data = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
Progress = Callable[[int], None]

_CPU_BUDGET = 1 << 30  # bytes; a quarter of a small laptop's free memory
_CUDA_FRACTION = 0.5  # of the free device memory
_MAX_BATCH = 4096
# oneDNN's channels-last convolutions beat the default layout from about this batch size on
# (ResNet-18 forward, one thread: -5% at 8-24 images, +6% at 45, +10% at 128); the trainer
# uses the same threshold.
CHANNELS_LAST_MIN_BATCH = 32


def set_layout(tensors: Iterable[torch.Tensor], layout: torch.memory_format) -> None:
    """Every 4-D tensor among ``tensors`` in ``layout``, in place: each tensor object stays
    the same (``Module.to(memory_format=...)`` gives a converted buffer a new tensor under each
    module that holds it, which unties a shared one)."""
    for t in {id(t): t for t in tensors if t.dim() == 4}.values():
        t.data = t.data.contiguous(memory_format=layout)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Return the device for ``None``/``"auto"`` (CUDA when present), or the one named."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise CkptscopeError(
            f"device {device!r} is not a torch device; use auto, cpu or cuda[:i]."
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CkptscopeError(f"device {device!r} was asked for but CUDA is not available; use cpu.")
    return dev


_AS_STRIDED_FALLBACK = (
    "There is a performance drop because we have not yet implemented the batching rule for "
    "aten::as_strided_"
)


def _ignore_as_strided_fallback() -> None:
    """Silence functorch's warning that it loops over the vmapped dimension for
    ``aten::as_strided_``: the channels-last path of ``adaptive_avg_pool2d`` restrides its
    (N, C, 1, 1) output with it, a loop over that small output that the user cannot act on.

    Called when an evaluator is made and again when a vmapped pass is built, not at import (a
    filter added inside someone's ``catch_warnings`` block is gone when the block ends), and it
    adds the filter only when it is missing: every change to the filters makes Python forget
    which warnings it has shown, so touching them per call would repeat every other warning once
    per batch."""
    if not any(f[0] == "ignore" and f[1] is not None and f[1].pattern == _AS_STRIDED_FALLBACK
               for f in warnings.filters):
        warnings.filterwarnings("ignore", message=_AS_STRIDED_FALLBACK, category=UserWarning)


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate.

    Attributes:
        device: where the model and data live.
        dtype: the floating dtype of weights and inputs (float32 by default).
        batch_size: examples per forward pass; ``None`` picks one from the memory budget.
        strategy: ``auto``, ``loop`` or ``vmap`` (see the module docstring).
        memory_budget: bytes the evaluator may use for replicated tensors and activations;
            ``None``: 1 GiB on the CPU, half the free memory on CUDA.
        bn: BatchNorm running statistics along the path: ``interpolate`` (they follow their
            group, as in the paper), ``recompute`` (re-estimated at every alpha on
            ``bn_batches`` training batches, a cumulative average in a fixed order, without
            augmentation) or ``batch`` (each evaluation batch normalised by its own statistics).
        bn_batches: training batches for ``recompute``.
        hoist: on a group path, compute the part of the forward pass upstream of the group once
            per batch instead of once per alpha (:mod:`ckptscope.hoist`); off for
            ``bn="recompute"``, whose statistics change everywhere.
        autocast: run the forward passes under ``torch.autocast`` in this dtype (bfloat16 or
            float16); weights stay in ``dtype`` and losses are summed in float32/float64.
        channels_last: run a conv net (a model with a ``Conv2d``) and its 4-D inputs in
            channels-last layout. ``None``: on CUDA, and on the CPU under the ``loop``
            strategy with batches of 32 examples or more (oneDNN is faster there; with smaller
            batches, and for vectorised convolutions on the CPU, it was not).
    """

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    batch_size: int | None = None
    strategy: str = "auto"
    memory_budget: int | None = None
    bn: str = "interpolate"
    bn_batches: int = 20
    hoist: bool = True
    autocast: torch.dtype | None = None
    channels_last: bool | None = None

    def __post_init__(self):
        if self.autocast not in (None, torch.bfloat16, torch.float16):
            raise CkptscopeError(f"autocast {self.autocast} is not bfloat16 or float16.")
        if self.bn not in BN_POLICIES:
            raise CkptscopeError(f"BatchNorm policy {self.bn!r} is not one of {BN_POLICIES}.")
        if self.bn_batches < 1:
            raise CkptscopeError(f"bn_batches={self.bn_batches} must be a positive integer.")
        if self.strategy not in STRATEGIES:
            raise CkptscopeError(f"strategy {self.strategy!r} is not one of {STRATEGIES}.")
        if self.batch_size is not None and self.batch_size < 1:
            raise CkptscopeError(f"batch_size={self.batch_size} must be a positive integer.")
        if not self.dtype.is_floating_point:
            raise CkptscopeError(f"dtype {self.dtype} is not a floating dtype.")

    @property
    def resolved_strategy(self) -> str:
        # Re-estimating running statistics writes buffers in place: one alpha at a time.
        if self.bn == "recompute":
            return "loop"
        if self.strategy != "auto":
            return self.strategy
        return "vmap" if self.device.type == "cuda" else "loop"

    @property
    def budget(self) -> int:
        if self.memory_budget is not None:
            return int(self.memory_budget)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * _CUDA_FRACTION)
        return _CPU_BUDGET


def streams(device: torch.device, data_bytes: int, budget: int) -> bool:
    """Whether the evaluation data stays on the CPU and goes to ``device`` batch by batch: only
    on an accelerator, and only when the set would take more than half the memory budget."""
    return device.type != "cpu" and data_bytes > budget // 2


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Evaluator:
    """Holds one model and the evaluation data on the device, and evaluates paths on them.

    Args:
        module: the architecture; its own weights are ignored (a private copy is used).
        a, b: the endpoint states, keys matching ``module.state_dict()``.
        data: split -> (inputs, targets), moved to the device once (kept on the CPU and
            streamed batch by batch when they do not fit the memory budget).
        loss: a loss name from :mod:`ckptscope.losses` or a callable of that form.
        config: device, dtype, batch size, strategy, memory budget, BatchNorm policy.
        bn_data: training inputs for ``config.bn == "recompute"``.
    """

    def __init__(
        self,
        module: nn.Module,
        a: Mapping[str, torch.Tensor],
        b: Mapping[str, torch.Tensor],
        data: Data,
        *,
        loss: str | LossFn,
        config: EvalConfig,
        bn_data: torch.Tensor | None = None,
    ):
        self.config = config
        self.loss_fn = get_loss(loss)
        _ignore_as_strided_fallback()  # before any forward pass (see there)
        dev, dtype = config.device, config.dtype
        self.module = copy.deepcopy(module).to(device=dev, dtype=dtype).eval()
        self.channels_last = False  # the layout is chosen at the end of __init__
        self.batchnorms = [m for m in self.module.modules() if isinstance(m, _BatchNorm)]
        if config.bn == "batch":
            for m in self.batchnorms:  # no running statistics: eval mode uses the batch's
                m.track_running_stats = False
                m.running_mean = m.running_var = m.num_batches_tracked = None
        self.slots = {
            **dict(self.module.named_parameters(remove_duplicate=False)),
            **{k: v for k, v in self.module.named_buffers(remove_duplicate=False)},
        }
        self.a = {k: self._to_device(v) for k, v in a.items() if k in self.slots}
        self.b = {k: self._to_device(v) for k, v in b.items() if k in self.slots}
        tdtype = target_dtype(loss)
        data_bytes = sum(_nbytes([x, y]) for x, y in data.values())
        self.streaming = streams(dev, data_bytes, config.budget)
        home = torch.device("cpu") if self.streaming else dev
        self.data = {
            split: (
                x.to(home, dtype if x.is_floating_point() else x.dtype),
                y.to(home) if tdtype is None else y.to(home, tdtype),
            )
            for split, (x, y) in data.items()
        }
        self._batch_views: dict[tuple[str, int], list] = {}
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
        self._oom_warned = False
        self._traced: object = None  # the fx graph, traced on the first group path
        self._splits: dict[frozenset, SplitForward | None] = {}
        self.hoisted_paths = 0
        # The layout first where it does not depend on the batch size, so the probe runs in it.
        early = config.channels_last is not None or config.device.type == "cuda"
        if early:
            self._try_channels_last()
        # One probe forward pass, before any path: checks that the data fits the model and
        # measures the activations that size the batches and alpha chunks.
        self._activation_bytes = self._probe_activation_bytes()
        self._batch_size = self._pick_batch_size()
        if not early:
            self._try_channels_last()

    def _use_channels_last(self) -> bool:
        """Channels-last layout for a conv net: as configured; by default on CUDA (tensor
        cores, cuDNN), and on the CPU under ``loop`` with batches of at least
        ``CHANNELS_LAST_MIN_BATCH`` examples (oneDNN; measured in docs/semantics.md)."""
        config = self.config
        if not any(isinstance(m, nn.Conv2d) for m in self.module.modules()):
            return False
        if config.channels_last is not None:
            return config.channels_last
        if config.device.type == "cuda":
            return True
        return (config.resolved_strategy == "loop"
                and self._batch_size >= CHANNELS_LAST_MIN_BATCH)

    def _try_channels_last(self) -> None:
        """Switch a conv net to channels-last when :meth:`_use_channels_last` says so, and check
        it with a forward pass of two examples: a model that reshapes with ``.view`` fails in
        that layout, and then keeps the default one (or, when ``channels_last=True`` was asked
        for, gets a one-line error)."""
        if not self._use_channels_last():
            return
        self._set_layout(torch.channels_last)
        if (err := self._forward_error()) is None:
            return
        self._set_layout(torch.contiguous_format)
        # Asked for, and the model runs in the default layout: the layout is what fails. (If
        # it fails in both, the probe pass that follows says what is wrong with the data.)
        if self.config.channels_last and self._forward_error() is None:
            reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
            raise CkptscopeError(
                f"channels-last layout was asked for (--channels-last, channels_last=True), but "
                f"{type(self.module).__name__} fails in it ({reason}); leave the layout to "
                f"ckptscope or turn it off (--no-channels-last, channels_last=False)."
            )

    def _forward_error(self) -> Exception | None:
        """The error of a forward pass on two examples, if it fails."""
        x_all = next(iter(self.data.values()))[0]
        try:
            with torch.no_grad(), self._autocast():
                self.module(self._input(x_all[:2]))
        except Exception as err:  # anything (an assert on the layout, say): the default layout
            return err
        return None

    def _set_layout(self, layout: torch.memory_format) -> None:
        """The module's 4-D tensors, and the data held on the device, in ``layout``.

        In place (:func:`set_layout`), so that every slot, tied alias and captured reference
        stays the same tensor. Streamed batches are converted as they are moved
        (:meth:`_input`)."""
        self.channels_last = layout is torch.channels_last
        set_layout(self.slots.values(), layout)
        if self.streaming:
            return
        self.data = {
            split: (x.contiguous(memory_format=layout) if x.dim() == 4 else x, y)
            for split, (x, y) in self.data.items()
        }
        if self.bn_data is not None and self.bn_data.dim() == 4:
            self.bn_data = self.bn_data.contiguous(memory_format=layout)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        dtype = self.config.dtype if t.is_floating_point() else t.dtype
        return t.to(device=self.config.device, dtype=dtype)

    # --- sizing -------------------------------------------------------------------------------
    def _probe_activation_bytes(self) -> int:
        """Activation bytes per example of one forward pass.

        On CUDA the probe's measured peak. Elsewhere an estimate that does not depend on the
        allocator: the sum of the distinct storages the leaf modules write (an in-place op
        shares its input's), every output kept alive until the pass ends so that no address is
        reused. It counts every activation, not only the live ones — an upper bound, so the
        batch size it gives is the same from run to run (``bn="batch"`` curves depend on it).
        """
        split, (x_all, _) = next(iter(self.data.items()))
        # A copy: a view would share (and count) the storage of the whole split.
        x = self._input(x_all[:8]).clone()
        storages: dict[int, int] = {}
        kept: list[torch.Tensor] = []

        def hook(_mod, _inp, out):
            if isinstance(out, torch.Tensor):
                kept.append(out)
                storages[out.untyped_storage().data_ptr()] = out.untyped_storage().nbytes()

        # Leaf modules only: a container's output is its last child's, counted already.
        leaves = [m for m in self.module.modules() if not any(True for _ in m.children())]
        handles = [m.register_forward_hook(hook) for m in leaves]
        cuda = self.config.device.type == "cuda"
        try:
            self._load_state(self.b)
            if cuda:
                torch.cuda.synchronize(self.config.device)
                torch.cuda.reset_peak_memory_stats(self.config.device)
                before = torch.cuda.memory_allocated(self.config.device)
            with torch.no_grad():
                out = self._forward_checked(x, split)
            self._output_bytes = max(1, math.ceil(_nbytes([out]) / len(x)))
            if cuda:
                peak = torch.cuda.max_memory_allocated(self.config.device) - before
                return max(1, math.ceil(peak / len(x)))
        finally:
            for h in handles:
                h.remove()
            kept.clear()
        return max(1, math.ceil(sum(storages.values()) / len(x)))

    def _pick_batch_size(self) -> int:
        n_max = max(len(x) for x, _ in self.data.values())
        if self.config.batch_size is not None:
            return min(self.config.batch_size, n_max)
        return max(1, min(n_max, _MAX_BATCH, self.config.budget // (4 * self._activation_bytes)))

    def batch_size(self) -> int:
        """Examples per forward pass: as configured, or what a quarter of the budget holds."""
        return self._batch_size

    def chunk_size(self, moving: Sequence[str], n_alpha: int) -> int:
        """Alphas per vectorised pass: as many as the memory budget holds, at least one."""
        per_alpha = _nbytes([self.a[k] for k in moving]) + self._batch_size * self._activation_bytes
        return max(1, min(n_alpha, self.config.budget // max(1, per_alpha)))

    # --- evaluation ---------------------------------------------------------------------------
    def _forward_checked(self, x: torch.Tensor, split: str) -> torch.Tensor:
        try:
            return self.module(x)
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            reason = (str(err).splitlines() or [type(err).__name__])[0]
            raise CkptscopeError(
                f"the model failed on the {split!r} inputs of shape {tuple(x.shape)} "
                f"({reason[:200]}); check that the data fits the adapter (--data / --adapter)."
            ) from None

    def _writes(self, plan: PathPlan) -> tuple[list, list, list]:
        """The module tensors a path writes at each alpha, with their start and end values;
        a tied tensor once (lerping it in place once per name would move it twice)."""
        keys = list({id(self.slots[k]): k for k in reversed(plan.moving)}.values())[::-1]
        return (
            [self.slots[k] for k in keys],
            [plan.start[k] for k in keys],
            [plan.end[k] for k in keys],
        )

    def _load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        keys = [k for k in self.slots if k in state]
        with torch.no_grad():
            torch._foreach_copy_([self.slots[k] for k in keys], [state[k] for k in keys])

    def path(
        self,
        keys: Sequence[str],
        alphas: np.ndarray,
        *,
        hold: str = "end",
        progress: Progress | None = None,
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Evaluate the path on which ``keys`` move and the rest is held.

        Args:
            keys: the group's keys (integer tensors among them do not move).
            alphas: (n,) the points, as from :func:`ckptscope.path.alpha_grid`.
            hold: "end" (the rest at b) or "start" (the rest at a).
            progress: called with the number of alphas just finished.

        Returns:
            split -> (loss, accuracy), each (n,) float64: the mean loss over the split's
            examples and the fraction classified correctly.
        """
        return self.paths([(keys, alphas)], hold=hold, progress=progress)[0]

    def paths(
        self,
        items: Sequence[tuple[Sequence[str], np.ndarray]],
        *,
        hold: str = "end",
        progress: Progress | None = None,
        done: Callable[[int, dict], None] | None = None,
    ) -> list[dict[str, tuple[np.ndarray, np.ndarray]]]:
        """Evaluate several group paths, each ``(keys, alphas)``; one result per item, as
        :meth:`path` returns.

        A path whose upstream part can be hoisted runs alone (hoisting skips more work). Under
        the ``vmap`` strategy the others share vectorised passes: their (group, alpha) points
        are stacked into chunks as large as the memory budget holds, so a small group path
        does not leave the device idle. ``done(i, result)`` is called as item ``i`` finishes.
        """
        results: list = [None] * len(items)
        together: list[tuple[int, PathPlan, np.ndarray]] = []

        def finish(i: int, sums) -> None:
            results[i] = {
                split: (loss / len(self.data[split][0]), correct / len(self.data[split][0]))
                for split, (loss, correct) in sums.items()
            }
            if done:
                done(i, results[i])

        vectorised = self.config.resolved_strategy == "vmap"
        alone = []  # (item, plan, split or None)
        for i, (keys, alphas) in enumerate(items):
            if len(alphas) == 0:
                finish(i, {split: (np.empty(0), np.empty(0)) for split in self.data})
                continue
            # Under bn="batch" the running statistics are gone from the model: they cannot move.
            plan = plan_path(self.a, self.b, [k for k in keys if k in self.a], hold=hold)
            split = self._split_for(plan.moving)
            if split and vectorised and not _has_state(split.prefix):
                split = None  # a prefix of reshapes saves nothing; sharing passes does
            if split is None and vectorised and plan.moving:
                together.append((i, plan, np.asarray(alphas)))
            else:
                alone.append((i, plan, split))
        with self._autocast():
            if together:  # first: in a sweep these are the whole model and the first layers
                self._paths_vmap(together, progress, finish)
            for i, plan, split in alone:
                alphas, sums, fallback = items[i][1], None, progress
                if split:
                    sums, fallback = self._try_hoisted(plan, split, alphas, progress)
                if sums is None and vectorised and plan.moving:
                    sums = self._paths_vmap_one(plan, alphas, fallback)
                elif sums is None:
                    sums = self._path_loop(plan, alphas, fallback)
                finish(i, sums)
        return results

    def _paths_vmap_one(self, plan: PathPlan, alphas: np.ndarray, progress):
        """One path under vmap (a hoisted path that ran out of memory evaluated whole)."""
        got = {}
        self._paths_vmap([(0, plan, np.asarray(alphas))], progress, got.__setitem__)
        return got[0]

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of inputs on the device (channels-last for conv nets)."""
        x = x.to(self.config.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _autocast(self):
        # No weight-cast cache: the weights change in place between forward passes, and a
        # cached low-precision copy would freeze them at the first alpha.
        return torch.autocast(
            self.config.device.type,
            dtype=self.config.autocast,
            enabled=self.config.autocast is not None,
            cache_enabled=False,
        )

    def _try_hoisted(self, plan, split: SplitForward, alphas, progress):
        """The hoisted path, or ``None`` when it ran out of device memory (the plain strategies
        know how to back off). Returns ``(sums, progress)``: the progress callback for the
        fallback, which does not report again the alphas the hoisted attempt reported."""
        reported = 0

        def counting(done: int) -> None:
            nonlocal reported
            reported += done
            if progress:
                progress(done)

        try:
            sums = self._path_hoisted(plan, split, alphas, counting)
        except torch.OutOfMemoryError:
            self._note_oom("this group path evaluated whole (no hoisting)")
            return None, _skip_first(progress, reported)
        except RuntimeError:  # vmap refused the suffix: the whole-path evaluation says why
            if self.config.resolved_strategy != "vmap":
                raise
            return None, _skip_first(progress, reported)
        self.hoisted_paths += 1
        return sums, progress

    def _split_for(self, moving: Sequence[str]) -> SplitForward | None:
        """The forward pass split at ``moving``, or ``None`` when hoisting does not apply."""
        if not (self.config.hoist and moving) or self.config.bn == "recompute":
            return None
        if len(moving) == sum(v.is_floating_point() for v in self.a.values()):
            return None  # the whole model moves: nothing is invariant
        # A tied tensor moves under every name it has: the split must see all of them.
        moving_ids = {id(self.slots[k]) for k in moving}
        key = frozenset(k for k, t in self.slots.items() if id(t) in moving_ids)
        if key not in self._splits:
            if self._traced is None:
                traced = trace(self.module)
                if traced is None:
                    warnings.warn(
                        f"{type(self.module).__name__} cannot be traced by torch.fx; group paths "
                        f"are evaluated whole (no hoisting).",
                        stacklevel=4,
                    )
                self._traced = traced or False
            self._splits[key] = split_forward(self._traced, key) if self._traced else None
        return self._splits[key]

    @torch.no_grad()
    def _path_hoisted(self, plan, split: SplitForward, alphas, progress):
        """The prefix once per batch, the suffix at every alpha (or alpha chunk).

        When the frontiers of a whole split fit in half the memory budget they are computed
        first and kept, and the alphas run outermost (the weights are written once per alpha);
        otherwise batch by batch, the weights written once per batch and alpha.
        """
        from torch.func import functional_call, vmap

        self._load_state(plan.base)
        dev, n = self.config.device, len(alphas)
        # The suffix's name for each tensor it holds (a tied tensor is listed under one name,
        # which need not be the one the group gives it).
        in_suffix = {
            id(t): name
            for name, t in [*split.suffix.named_parameters(), *split.suffix.named_buffers()]
        }
        suffix_moving = {  # the suffix's name -> the group's key
            in_suffix[id(self.slots[k])]: k for k in plan.moving if id(self.slots[k]) in in_suffix
        }
        vectorised = self.config.resolved_strategy == "vmap"
        chunk = self.chunk_size(plan.moving, n) if vectorised else 1
        slots, starts, ends = self._writes(plan)

        # Built once per path: the suffix takes one placeholder per frontier value.
        n_frontier = sum(node.op == "placeholder" for node in split.suffix.graph.nodes)
        _ignore_as_strided_fallback()
        batched = vmap(
            lambda mv, *f: functional_call(split.suffix, mv, f),
            in_dims=(0, *([None] * n_frontier)),
        )

        def weights_at(c: int):
            """Point c's weights into the module (loop) or chunk c's stacked weights (vmap)."""
            if vectorised:
                w = torch.as_tensor(alphas[c : c + chunk], dtype=self.config.dtype, device=dev)
                return {
                    name: stack_points(plan.start[k], plan.end[k], w)
                    for name, k in suffix_moving.items()
                }
            write_point(slots, starts, ends, alphas[c])
            return None

        steps = range(0, n, chunk)

        def suffix_sums(stacked, batches) -> tuple[torch.Tensor, torch.Tensor]:
            """vmap: one chunk's (loss, correct) sums over ``batches`` of (frontier, y)."""
            parts = [self.loss_fn(batched(stacked, *frontier), y) for frontier, y in batches]
            return _total([p[0] for p in parts]), _total([p[1] for p in parts])

        def cat(sums) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.cat([loss for loss, _ in sums]), torch.cat([c for _, c in sums])

        # Progress counts alphas done on every split: with alphas outermost each one (or chunk)
        # reports as it ends on the last split; with batches outermost the path ends at once.
        last = list(self.data)[-1]

        def report(name: str, done: int) -> None:
            if progress and name == last:
                progress(done)

        out = {}
        for name in self.data:
            cached = self._frontiers(split, name)
            if cached is not None and vectorised:  # alphas outermost, a chunk per pass
                sums = []
                for c in steps:
                    sums.append(suffix_sums(weights_at(c), cached))
                    report(name, min(chunk, n - c))
                loss, correct = cat(sums)
            elif cached is not None:  # alphas outermost, one per pass
                deferred = self._deferred(name, n)
                run = deferred.batch_fn(lambda frontier: split.suffix(*frontier))
                for c in steps:
                    weights_at(c)
                    deferred.add([run(frontier, y) for frontier, y in cached])
                    report(name, 1)
                loss, correct = deferred.sums(n)
            else:  # batches outermost: (loss, correct) sums over the alphas per batch
                per_batch = []
                for x, y in self._batches(name):
                    y = y.to(dev, non_blocking=True)
                    frontier = split.prefix(self._input(x))
                    if vectorised:
                        per_batch.append(cat([suffix_sums(weights_at(c), [(frontier, y)])
                                              for c in steps]))
                        continue
                    deferred = self._deferred(name, n, len(y))
                    run = deferred.batch_fn(lambda frontier: split.suffix(*frontier))
                    for c in steps:
                        weights_at(c)
                        deferred.add([run(frontier, y)])
                    per_batch.append(deferred.sums(n))
                loss, correct = _total([p[0] for p in per_batch]), _total([p[1] for p in per_batch])
                report(name, n)
            out[name] = (loss.cpu().numpy(), correct.cpu().numpy())
        return out

    def _frontiers(self, split: SplitForward, name: str) -> list | None:
        """Every batch's (frontier, targets) on data split ``name``, or ``None`` when they would
        take more than half the memory budget (estimated from the first batch)."""
        dev = self.config.device
        cached, limit = [], self.config.budget // 2
        batches = self._batches(name)
        for i, (x, y) in enumerate(batches):
            frontier = split.prefix(self._input(x))
            if i == 0:
                per_batch = _nbytes([t for t in frontier if isinstance(t, torch.Tensor)])
                if per_batch * len(batches) > limit:
                    return None
            cached.append((frontier, y.to(dev, non_blocking=True)))
        return cached

    def _accumulate(self, outputs_fn, split: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum loss and correctness over the split's batches; ``outputs_fn(x) -> (k, B, ...)``.

        Returns float64 tensors (k,) on the device: the caller moves them off it once per path.
        """
        parts = self._over_batches(lambda x, y: self.loss_fn(outputs_fn(x), y), split, k)
        return _total([loss for loss, _ in parts]), _total([correct for _, correct in parts])

    def _over_batches(self, fn, split: str, k: int) -> list:
        """``fn(x, y)`` on each batch of the split, in order; the list of what it returned.

        Under ``bn="interpolate"`` an out-of-memory error on a one-point pass halves the batch
        size and starts the split again (the curves do not depend on it there).
        """
        dev = self.config.device
        while True:
            batch = self._batch_size
            try:
                return [
                    fn(self._input(x), y.to(dev, non_blocking=True))
                    for x, y in self._batches(split)
                ]
            except torch.OutOfMemoryError:
                if self.config.bn != "interpolate":
                    raise CkptscopeError(
                        f"out of device memory at batch size {batch}; under --bn "
                        f"{self.config.bn} the curves depend on the batch size, so it is not "
                        f"lowered automatically: pass a smaller --batch-size."
                    ) from None
                if batch == 1 or k > 1:  # a vmap chunk halves its alphas first (its caller)
                    raise
                self._batch_size = max(1, batch // 2)
                self._note_oom(f"batch size {batch} -> {self._batch_size}")

    def _deferred(self, split: str, n: int, examples: int | None = None) -> _Deferred:
        """A :class:`_Deferred` for ``n`` points on ``split`` (or on one batch of ``examples``),
        holding as many points' outputs as a sixteenth of the memory budget (at most 256 MiB)
        takes; none (a loss call per batch, as it comes) when not even one point fits."""
        examples = len(self.data[split][0]) if examples is None else examples
        per_point = max(1, examples * self._output_bytes)
        room = min(self.config.budget // 16, 256 << 20)
        return _Deferred(self.loss_fn, min(n, room // per_point))

    def _batches(self, split: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The split's (inputs, targets) batches at the current batch size: views, made once
        per batch size when the data lives on the device."""
        key = (split, self._batch_size)
        if key in self._batch_views:
            return self._batch_views[key]
        x_all, y_all = self.data[split]
        batches = [(x_all[lo:hi], y_all[lo:hi]) for lo, hi in self._spans(len(x_all))]
        if not self.streaming:
            self._batch_views[key] = batches
        return batches

    def _spans(self, n: int) -> list[tuple[int, int]]:
        """The (start, stop) of each batch of ``n`` examples.

        Where batch statistics are computed (``bn`` = ``batch`` or ``recompute``), a last batch
        of one example joins the one before: BatchNorm cannot normalise a single example.
        """
        batch = self._batch_size
        spans = [(lo, min(lo + batch, n)) for lo in range(0, n, batch)]
        if self.config.bn != "interpolate" and len(spans) > 1 and spans[-1][1] - spans[-1][0] == 1:
            spans[-2:] = [(spans[-2][0], n)]
        return spans

    def _note_oom(self, change: str) -> None:
        if self.config.device.type == "cuda":
            torch.cuda.empty_cache()
        if not self._oom_warned:
            warnings.warn(f"out of device memory; continuing with {change}.", stacklevel=4)
            self._oom_warned = True

    def _recompute_bn(self) -> None:
        """Re-estimate every BatchNorm's running statistics at the current weights."""
        for m in self.batchnorms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
            m.train()
        for lo, hi in self._spans(len(self.bn_data))[: self.config.bn_batches]:
            self.module(self._input(self.bn_data[lo:hi]))
        for m in self.batchnorms:
            m.eval()

    @torch.no_grad()
    def _path_loop(self, plan, alphas, progress):
        """One forward pass per alpha and batch; the outputs of several alphas go through one
        loss call per batch (:class:`_Deferred`)."""
        self._load_state(plan.base)
        moving, starts, ends = self._writes(plan)
        deferred = {split: self._deferred(split, len(alphas)) for split in self.data}
        forwards = {
            split: pending.batch_fn(lambda x, s=split: self._forward_checked(x, s))
            for split, pending in deferred.items()
        }
        for alpha in alphas:
            if moving:
                write_point(moving, starts, ends, alpha)
            if self.config.bn == "recompute":
                self._recompute_bn()
            for split, pending in deferred.items():
                pending.add(self._over_batches(forwards[split], split, 1))
            if progress:
                progress(1)
        return {split: pending.totals(len(alphas)) for split, pending in deferred.items()}

    @torch.no_grad()
    def _paths_vmap(self, items, progress, finish) -> None:
        """Several paths' (path, alpha) points under ``torch.vmap``, in chunks.

        Every tensor that moves on any of the paths is stacked per point: the interpolated
        value on the points of paths that move it, the held value on the others. The chunk is
        what the memory budget holds of those stacks plus the activations.
        """
        from torch.func import functional_call, vmap

        held = items[0][1].base  # every plan holds the same endpoint
        # functional_call ties aliases itself: pass each tied tensor under its first name only.
        first: dict[int, str] = {}
        for k in held:
            first.setdefault(id(self.slots[k]), k)
        name = {k: first[id(self.slots[k])] for k in held}
        moves = [{name[k]: k for k in plan.moving} for _, plan, _ in items]  # name -> own key
        union = list(dict.fromkeys(c for m in moves for c in m))
        fixed = {k: v for k, v in held.items() if name[k] == k and k not in union}
        owner = np.concatenate([np.full(len(a), j) for j, (_, _, a) in enumerate(items)])
        points = np.concatenate([a for _, _, a in items])
        out = {split: (np.empty(len(points)), np.empty(len(points))) for split in self.data}
        ends = np.cumsum([len(a) for _, _, a in items])  # item j: points up to ends[j]
        chunk = self.chunk_size(union, len(points))
        self._load_state(held)  # for any state the module holds outside its state dict
        _ignore_as_strided_fallback()
        batched = vmap(
            lambda moving, x: functional_call(self.module, (fixed, moving), (x,)),
            in_dims=(0, None),
        )
        dev, dtype = self.config.device, self.config.dtype

        def stacked(lo: int, hi: int) -> dict[str, torch.Tensor]:
            w = torch.as_tensor(points[lo:hi], dtype=dtype, device=dev)
            mine = owner[lo:hi]
            moving = {}
            for c in union:
                rows = [j for j, m in enumerate(moves) if c in m]
                plan, k = items[rows[0]][1], moves[rows[0]][c]
                values = stack_points(plan.start[k], plan.end[k], w)
                on = np.isin(mine, rows)
                if not on.all():  # the points of paths that hold it take the held value
                    mask = torch.as_tensor(on, device=dev).view(-1, *([1] * (values.dim() - 1)))
                    values = torch.where(mask, values, held[c].unsqueeze(0))
                moving[c] = values
            return moving

        lo = 0
        while lo < len(points):
            hi = min(lo + chunk, len(points))
            try:
                moving = stacked(lo, hi)
                sums = {
                    split: self._accumulate(
                        lambda x, moving=moving: batched(moving, x), split, hi - lo
                    )
                    for split in self.data
                }
            except torch.OutOfMemoryError:
                if chunk == 1:
                    raise CkptscopeError(
                        "out of device memory with one alpha per pass; lower --batch-size or "
                        "evaluate on the CPU."
                    ) from None
                moving = sums = None
                chunk = max(1, chunk // 2)
                self._note_oom(f"{chunk} alphas per pass")
                continue
            except RuntimeError as err:  # e.g. an in-place op that writes a moving tensor
                if lo > 0:  # it passed one chunk: not a vmap limitation
                    raise
                reason = (str(err).splitlines() or [type(err).__name__])[0][:160]
                warnings.warn(
                    f"{type(self.module).__name__} cannot be vectorised over alphas ({reason}); "
                    f"these paths are evaluated one alpha at a time (strategy loop).",
                    stacklevel=4,
                )
                for i, plan, alphas in items:
                    finish(i, self._path_loop(plan, alphas, progress))
                return
            for split, (loss, correct) in sums.items():
                out[split][0][lo:hi] = loss.cpu().numpy()
                out[split][1][lo:hi] = correct.cpu().numpy()
            if progress:
                progress(hi - lo)
            for j in np.flatnonzero((ends > lo) & (ends <= hi)):  # the items this chunk ended
                span = slice(ends[j] - len(items[j][2]), ends[j])
                finish(items[j][0], {s: (loss[span], acc[span]) for s, (loss, acc) in out.items()})
            lo = hi


def _skip_first(progress: Progress | None, skip: int) -> Progress | None:
    """``progress`` that swallows the first ``skip`` alphas reported to it."""
    if progress is None or skip == 0:
        return progress
    left = skip

    def report(done: int) -> None:
        nonlocal left
        passed = max(0, done - left)
        left = max(0, left - done)
        if passed:
            progress(passed)

    return report


def _has_state(module: nn.Module) -> bool:
    """Whether a module holds any parameter or buffer (does any weighted work)."""
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _total(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The float64 sum of per-batch sums, each (k,): (k,)."""
    return torch.stack(list(parts)).double().sum(0)


class _Deferred:
    """Forward outputs of consecutive points, kept on the device until one loss call per batch
    covers up to ``size`` of them.

    A loss call is a handful of small kernels; on a small model, one per batch and point is a
    large share of the path. Stacking the outputs into ``(k, B, ...)`` gives the same per-point
    sums (the loss contract is per point) from one call per batch. ``size`` 0 keeps nothing:
    each batch's loss is taken as soon as its output exists (outputs too large to hold).
    """

    def __init__(self, loss_fn: LossFn, size: int):
        self.loss_fn, self.size = loss_fn, size
        self.outputs: list[list[torch.Tensor]] = []  # per pending point: per batch
        self.targets: list[torch.Tensor] = []
        self.done: list[tuple[torch.Tensor, torch.Tensor]] = []  # (k,) float64 sums, in order

    def batch_fn(self, forward: Callable[[object], torch.Tensor]):
        """What to run on each batch ``(x, y)``: keep ``forward(x)``, or with ``size`` 0 take
        its loss sums at once (inside the caller's out-of-memory back-off)."""
        if self.size == 0:
            return lambda x, y: self.loss_fn(forward(x).unsqueeze(0), y)
        return lambda x, y: (forward(x), y)

    def add(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One point's per-batch results of :meth:`batch_fn`. The targets are the split's, cut
        the same way at every point until the batch size changes."""
        if self.size == 0:  # (loss, correct) sums, (1,) each
            self.done.append((_total([b[0] for b in batches]), _total([b[1] for b in batches])))
            return
        targets = [y for _, y in batches]
        # A changed batch size (out-of-memory back-off) cuts the batches differently.
        if self.outputs and [len(y) for y in targets] != [len(y) for y in self.targets]:
            self.flush()
        self.targets = targets
        self.outputs.append([out for out, _ in batches])
        if len(self.outputs) >= self.size:
            self.flush()

    def flush(self) -> None:
        if not self.outputs:
            return
        try:
            parts = [
                self.loss_fn(torch.stack([point[b] for point in self.outputs]), y)
                for b, y in enumerate(self.targets)
            ]
        except torch.OutOfMemoryError:
            parts = None  # out of the handler first: its traceback holds the stacked tensors
        if parts is None:  # the stacked loss did not fit: one point at a time
            try:
                per_point = [
                    [self.loss_fn(point[b].unsqueeze(0), y) for b, y in enumerate(self.targets)]
                    for point in self.outputs
                ]
            except torch.OutOfMemoryError:
                raise CkptscopeError(
                    "out of device memory in the loss of one point; lower --batch-size or "
                    "evaluate on the CPU."
                ) from None
            parts = [
                (torch.cat([p[b][0] for p in per_point]), torch.cat([p[b][1] for p in per_point]))
                for b in range(len(self.targets))
            ]
        self.done.append((_total([p[0] for p in parts]), _total([p[1] for p in parts])))
        self.outputs = []

    def sums(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every point's (loss sum, correct sum), float64 on the device, (n,) each."""
        self.flush()
        if not self.done:
            return torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        loss = torch.cat([loss.reshape(-1) for loss, _ in self.done])
        correct = torch.cat([correct.reshape(-1) for _, correct in self.done])
        return loss, correct

    def totals(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`sums` on the host: one transfer."""
        loss, correct = self.sums(n)
        return loss.cpu().numpy(), correct.cpu().numpy()
