"""The evaluator: built once per (model, data, settings), it evaluates point sets over anchors.

A path is one call; a sweep over checkpoint pairs is one call per pair on the same evaluator,
so the data is moved to the device once, the probe pass runs once, and the forward graph is
traced once per group (:mod:`ckptscope.engine.hoist`), however many pairs there are.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from itertools import groupby

import numpy as np
import torch
from torch import fx, nn

from ckptscope.engine import strategies
from ckptscope.engine.config import EvalConfig
from ckptscope.engine.context import Context, Data
from ckptscope.engine.failures import from_user_code
from ckptscope.engine.hoist import SplitForward, split_forward, trace
from ckptscope.engine.strategies import Job, Progress
from ckptscope.errors import CkptscopeError
from ckptscope.identity import tied
from ckptscope.losses import LossFn
from ckptscope.points import PointSet

State = Mapping[str, torch.Tensor]
Curves = dict[str, tuple[np.ndarray, np.ndarray]]


class Evaluator:
    """Holds one model and the evaluation data on the device, and evaluates point sets.

    Args:
        module, data, loss, config, bn_data, own_module: as
            :class:`ckptscope.engine.context.Context` takes them (the model is copied to the
            device unless it is the evaluator's own; the data is moved there once, or streamed).
        model_name, data_name: what to call the model and the data when they fail
            (:mod:`ckptscope.engine.failures`); by default the model's class, and no data name.

    Example:
        >>> ev = Evaluator(module, {"test": (x, y)}, loss="cross_entropy",
        ...                config=EvalConfig())                             # doctest: +SKIP
        >>> points = path_points(alpha_grid(51), list(a), every=list(a))   # doctest: +SKIP
        >>> [curves] = ev.evaluate({"start": a, "end": b}, [points])       # doctest: +SKIP
        >>> loss, accuracy = curves["test"]                                 # doctest: +SKIP
    """

    def __init__(self, module: nn.Module, data: Data, *, loss: str | LossFn,
                 config: EvalConfig, bn_data: torch.Tensor | None = None,
                 own_module: bool = False, model_name: str | None = None,
                 data_name: str | None = None):
        self.config = config
        self.context = Context(module, data, loss=loss, config=config, bn_data=bn_data,
                               own_module=own_module, model_name=model_name,
                               data_name=data_name)
        self._traced: fx.GraphModule | bool | None = None  # traced on the first group
        self._splits: dict[frozenset, SplitForward | None] = {}

    # --- what it holds -----------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        """The private copy of the model, on the device."""
        return self.context.module

    @property
    def slots(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer of :attr:`module` under every name."""
        return self.context.slots

    @property
    def data(self) -> Data:
        return self.context.data

    @property
    def channels_last(self) -> bool:
        return self.context.channels_last

    @property
    def streaming(self) -> bool:
        return self.context.streaming

    @property
    def hoisted(self) -> int:
        """Point sets evaluated with hoisting so far."""
        return self.context.hoisted

    def batch_size(self) -> int:
        """Examples per forward pass: as configured, or chosen from the probe and the budget
        (:meth:`ckptscope.engine.sizing.Sizes.pick_batch`)."""
        return self.context.sizes.batch

    def chunk_size(self, moving: Sequence[str], n: int) -> int:
        """Points per vectorised pass: as many of ``n`` as the memory budget holds."""
        return self.context.chunk_size(moving, n)

    # --- evaluation --------------------------------------------------------------------------
    def evaluate(
        self,
        anchors: Mapping[str, State],
        requests: Sequence[PointSet],
        *,
        progress: Progress | None = None,
        done: Callable[[int, Curves], None] | None = None,
    ) -> list[Curves]:
        """Evaluate point sets over named anchor states.

        Args:
            anchors: name -> state (keys as ``module.state_dict()``), moved to the device for
                this call (on the CPU used as they are: a memory-mapped checkpoint is not
                copied, and half-precision tensors are upcast one at a time as points are
                computed).
            requests: the point sets (:class:`ckptscope.points.PointSet`).
            progress: called with the number of points just finished.
            done: called as ``done(i, curves)`` as request ``i`` finishes.

        Returns:
            Per request, split -> (loss, accuracy), each (n,) float64: the mean loss over the
            split's examples (or the tokens the loss counts) and the fraction correct.

        A request whose upstream part can be hoisted runs alone (hoisting skips more work).
        Under the ``vmap`` strategy the others share vectorised passes: their points are
        stacked into chunks as large as the memory budget holds, so a small group does not
        leave the device idle.

        Raises:
            CkptscopeError: the model or the loss raised (one line naming the model, the data
                and the error's first line; the original is its ``__cause__``).
        """
        ctx = self.context
        results: list = [None] * len(requests)
        # The callbacks' errors (a full disk under a cache's store) are theirs, not the model's.
        progress, done = _callback(progress), _callback(done)

        def finish(i: int, sums) -> None:
            # Divided by what the loss counted: the examples, or the tokens of token-level
            # targets (:mod:`ckptscope.losses`); nothing counted is a NaN mean.
            with np.errstate(invalid="ignore", divide="ignore"):
                results[i] = {
                    split: (loss / count, correct / count)
                    for split, (loss, correct, count) in sums.items()
                }
            if done:
                done(i, results[i])

        names = list(dict.fromkeys(name for points in requests for name in points.anchors))
        missing = [name for name in names if name not in anchors]
        if missing:
            raise CkptscopeError(
                f"the point sets name anchors {missing} that were not given (given: "
                f"{sorted(anchors)}); pass a state for each."
            )
        placed = {name: ctx.place(anchors[name]) for name in names}
        jobs = []
        for i, points in enumerate(requests):
            if len(points) == 0:
                finish(i, {split: (np.empty(0),) * 3 for split in ctx.data})
                continue
            sources = [placed[name] for name in points.anchors]
            # Under bn="batch" the running statistics are gone from the model: they cannot move.
            keys = [k for k in points.moving if k in sources[0]]
            moving = tuple(k for k in keys if sources[0][k].is_floating_point())
            jobs.append(Job(i, points.anchors, sources, points.weights, moving, points.rest()))
        _settle_rests(jobs, ctx.slots)

        vectorised = self.config.resolved_strategy == "vmap"
        together, alone = [], []
        for job in jobs:
            split = self._split_for(job)
            if split and vectorised and not strategies.has_state(split.prefix):
                split = None  # a prefix of reshapes saves nothing; sharing passes does
            if split is None and vectorised and job.moving:
                together.append(job)
            else:
                job.split = split
                alone.append(job)
        try:
            with ctx.autocast():
                # First: in a sweep these are the whole model and the first layers.
                for _, shared in groupby(together, key=lambda job: job.anchors):
                    strategies.vmap(ctx, list(shared), progress, finish)
                for job in alone:
                    run = strategies.hoisted if job.split else strategies.loop
                    run(ctx, [job], progress, finish)
        except _CallbackError as err:
            raise err.error from None
        except Exception as err:
            # The model called outside Context.forward (vectorised, split for hoisting, the
            # BatchNorm re-estimation): the batch in flight was noted on the way in.
            if not from_user_code(err):
                raise
            raise ctx.where.model_failed(err) from err
        return results

    def _split_for(self, job: Job) -> SplitForward | None:
        """The forward pass split at the job's moving tensors, or ``None`` when hoisting does
        not apply: nothing moves, everything does, the tensors that do not move change from
        point to point, or the statistics are re-estimated everywhere."""
        if not (self.config.hoist and job.moving) or self.config.bn == "recompute":
            return None
        if len(set(job.rest.tolist())) > 1:
            return None
        if len(job.moving) == sum(v.is_floating_point() for v in job.sources[0].values()):
            return None  # the whole model moves: nothing is invariant
        # A tied tensor moves under every name it has: the split must see all of them.
        key = tied(job.moving, self.context.slots)
        if key not in self._splits:
            if self._traced is None:
                traced = trace(self.context.module)
                if traced is None:
                    warnings.warn(
                        f"{type(self.context.module).__name__} cannot be traced by torch.fx; "
                        f"group paths are evaluated whole (no hoisting).",
                        stacklevel=4,
                    )
                self._traced = traced or False
            self._splits[key] = split_forward(self._traced, key) if self._traced else None
        return self._splits[key]

    def split_for(self, moving: Sequence[str]) -> SplitForward | None:
        """The forward pass split at ``moving`` (as a group held at one anchor), or ``None``."""
        sources = [self.context.slots]
        job = Job(0, ("held",), sources, np.ones((1, 1)), tuple(moving), np.zeros(1, np.intp))
        return self._split_for(job)


class _CallbackError(Exception):
    """An error of a caller's callback (``progress``, ``done``), carried out of the strategies
    untouched: neither their fallbacks (which catch ``RuntimeError``) nor the model's error
    message apply to it."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def _callback(fn: Callable | None) -> Callable | None:
    """``fn``, whose errors travel as :class:`_CallbackError`."""
    if fn is None:
        return None

    def call(*args):
        try:
            return fn(*args)
        except Exception as err:
            raise _CallbackError(err) from err

    return call


def _settle_rests(jobs: Sequence[Job], slots: Mapping[str, torch.Tensor]) -> None:
    """Where a job's tensors that do not move are equal at two anchors, take them from the
    anchor the call uses most (ties to the later one): fewer state loads under ``loop``, and
    fewer vectorised chunks cut at a change of rest anchor under ``vmap``. A whole-model path
    whose non-float tensors agree at both ends is one rest anchor, as on a group path."""
    if not jobs:
        return
    counts: dict[tuple[str, int], int] = {}
    for job in jobs:
        for r in job.rest.tolist():
            counts[job.anchors, r] = counts.get((job.anchors, r), 0) + 1
    for job in jobs:
        used = sorted(set(job.rest.tolist()))
        if len(used) == 1:
            continue
        moved = tied(job.moving, slots)
        others = [k for k in job.sources[0] if k not in moved]

        def equal(u: int, m: int, job: Job = job, others: list = others) -> bool:
            return all(torch.equal(job.sources[u][k], job.sources[m][k]) for k in others)

        best = {}
        for u in used:
            same = [m for m in range(len(job.anchors)) if m == u or equal(u, m)]
            best[u] = max(same, key=lambda m: (counts.get((job.anchors, m), 0), m))
        job.rest = np.array([best[r] for r in job.rest.tolist()], dtype=np.intp)
