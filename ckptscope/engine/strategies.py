"""The three ways to evaluate point sets, one function each, with one signature.

``strategy(context, jobs, progress, finish)``: evaluate every job (one point set each) on the
model and data the :class:`~ckptscope.engine.context.Context` holds, call ``progress(n)`` as
``n`` points finish and ``finish(job.index, sums)`` as each job does, ``sums`` being
split -> (loss sum, correct sum, count), (n,) float64 each (:mod:`ckptscope.losses`).

- :func:`loop`: one forward pass per point. The moving tensors are written in place into the
  module's own parameters (:func:`ckptscope.points.write_point`: no ``load_state_dict``, no
  allocation per point where the anchors are in the module's dtype; a half-precision anchor is
  upcast a block at a time), and the outputs of several points go through one loss call per batch
  (:class:`~ckptscope.engine.deferred.Deferred`). On a CPU this wins: a batched pass of a small
  net does no more useful work per flop than a plain one.
- :func:`vmap`: ``torch.func.functional_call`` under ``torch.vmap`` over a chunk of points, with
  only the moving tensors replicated; several jobs share the chunks. On a GPU this fills the
  device that one small forward pass leaves idle. The chunk comes from the memory budget, so
  peak memory does not grow with the number of points.
- :func:`hoisted`: on a group's point set, the part of the forward pass upstream of the group
  (:mod:`ckptscope.engine.hoist`) once per batch, the rest per point (or chunk, under vmap).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ckptscope.engine.context import Context
from ckptscope.engine.deferred import joined, totals
from ckptscope.engine.hoist import SplitForward
from ckptscope.engine.placement import first_line, ignore_as_strided_fallback
from ckptscope.engine.sizing import nbytes
from ckptscope.errors import CkptscopeError
from ckptscope.identity import aliases, unique
from ckptscope.outputs import logits_of
from ckptscope.points import stack_points, stacking, write_point

Progress = Callable[[int], None]
Finish = Callable[[int, dict], None]


@dataclass
class Job:
    """One point set, ready to run.

    Attributes:
        index: the request's position, as ``finish`` reports it.
        anchors: the anchor names (jobs share vectorised passes only over the same anchors).
        sources: per anchor, its tensors on the device (key -> tensor).
        weights: (n, k) float64, one row per point.
        moving: the floating keys that move, as the module names them.
        rest: (n,) per point, the anchor the tensors that do not move come from.
        split: the forward pass split at the moving tensors (hoisting), or ``None``.
    """

    index: int
    anchors: tuple[str, ...]
    sources: list[dict[str, torch.Tensor]]
    weights: np.ndarray
    moving: tuple[str, ...]
    rest: np.ndarray
    split: SplitForward | None = None

    def __len__(self) -> int:
        return len(self.weights)


def _writes(ctx: Context, job: Job) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """The module tensors a job writes at each point, with every anchor's values for them; a
    tied tensor once (writing it in place once per name would move it twice)."""
    keys = unique(job.moving, ctx.alias)
    return [ctx.slots[k] for k in keys], [[src[k] for k in keys] for src in job.sources]


@torch.no_grad()
def loop(ctx: Context, jobs: Sequence[Job], progress: Progress | None, finish: Finish) -> None:
    """One forward pass per point and batch; the outputs of several points go through one loss
    call per batch."""
    for job in jobs:
        finish(job.index, _loop(ctx, job, progress))


def _loop(ctx: Context, job: Job, progress: Progress | None) -> dict:
    targets, sources = _writes(ctx, job)
    deferred = {split: ctx.deferred(split, len(job)) for split in ctx.data}
    forwards = {
        split: pending.batch_fn(lambda x, s=split: ctx.forward(x, s))
        for split, pending in deferred.items()
    }
    current = -1
    for p, weights in enumerate(job.weights):
        if job.rest[p] != current:  # the tensors that do not move, from their anchor
            current = job.rest[p]
            ctx.load(job.sources[current])
        if targets:
            write_point(targets, sources, weights)
        if ctx.config.bn == "recompute":
            ctx.recompute_bn()
        for split, pending in deferred.items():
            pending.add(ctx.over_batches(forwards[split], split, 1))
        if progress:
            progress(1)
    return {split: pending.totals(len(job)) for split, pending in deferred.items()}


@torch.no_grad()
def vmap(ctx: Context, jobs: Sequence[Job], progress: Progress | None, finish: Finish) -> None:
    """The jobs' points under ``torch.vmap``, in chunks; the jobs share one set of anchors.

    Every tensor that moves in any of the jobs is stacked per point: the point's value on the
    points of jobs that move it, the value of the point's rest anchor on the others. A chunk
    holds what the memory budget allows of those stacks plus the activations, and never spans
    two rest anchors (the tensors no job moves are the module's own, loaded from the chunk's
    rest anchor in the evaluation dtype).
    """
    from torch.func import functional_call
    from torch.func import vmap as vectorise

    sources = jobs[0].sources
    # functional_call ties aliases itself: pass each tied tensor under its first name only.
    name = aliases(ctx.slots, sources[0])
    moves = [{name[k]: k for k in job.moving} for job in jobs]  # name -> the job's own key
    union = list(dict.fromkeys(c for m in moves for c in m))
    owner = np.concatenate([np.full(len(job), j) for j, job in enumerate(jobs)])
    weights = np.concatenate([job.weights for job in jobs])
    rest = np.concatenate([job.rest for job in jobs])
    out = {split: tuple(np.empty(len(weights)) for _ in range(3)) for split in ctx.data}
    ends = np.cumsum([len(job) for job in jobs])  # job j: points up to ends[j]
    chunk = ctx.chunk_size(union, len(weights))
    ignore_as_strided_fallback()
    # The tensors no job moves are the module's own (ctx.load of the chunk's rest anchor,
    # in the evaluation dtype), not passed: an anchor may be held in half precision. The logits
    # are taken inside: vmap returns tensors, not model outputs.
    batched = vectorise(
        lambda moving, x: logits_of(functional_call(ctx.module, moving, (x,))),
        in_dims=(0, None),
    )
    dev, dtype = ctx.config.device, ctx.config.dtype

    def stacked(lo: int, hi: int) -> dict[str, torch.Tensor]:
        at = stacking(weights[lo:hi], dtype=dtype, device=dev)
        held, mine = ctx.slots, owner[lo:hi]  # the rest anchor, loaded (in the eval dtype)
        moving = {}
        for c in union:
            rows = [j for j, m in enumerate(moves) if c in m]
            k = moves[rows[0]][c]
            values = stack_points([src[k] for src in sources], at)
            on = np.isin(mine, rows)
            if not on.all():  # the points of jobs that hold it take the held value
                mask = torch.as_tensor(on, device=dev).view(-1, *([1] * (values.dim() - 1)))
                values = torch.where(mask, values, held[c].unsqueeze(0))
            moving[c] = values
        return moving

    lo, loaded = 0, -1
    while lo < len(weights):
        hi = min(lo + chunk, len(weights))
        hi = lo + int(np.argmax(np.append(rest[lo:hi] != rest[lo], True)))  # one rest anchor
        r = int(rest[lo])
        if r != loaded:  # the tensors that are not passed: the rest anchor's
            ctx.load(sources[r])
            loaded = r
        try:
            moving = stacked(lo, hi)
            sums = {
                split: ctx.accumulate(
                    lambda x, moving=moving: batched(moving, x), split, hi - lo
                )
                for split in ctx.data
            }
        except torch.OutOfMemoryError:
            if chunk == 1:
                raise CkptscopeError(
                    "out of device memory with one point per pass; lower --batch-size or "
                    "evaluate on the CPU."
                ) from None
            moving = sums = None
            chunk = max(1, chunk // 2)
            ctx.note_oom(f"{chunk} points per pass")
            continue
        except RuntimeError as err:  # e.g. an in-place op that writes a moving tensor
            if lo > 0:  # it passed one chunk: not a vmap limitation
                raise
            # One point at a time; a model that fails there too fails with its own message,
            # without the warning that would blame vmap.
            loop(ctx, jobs, progress, finish)
            warnings.warn(
                f"{type(ctx.module).__name__} cannot be vectorised over points "
                f"({first_line(err, 160)}); these were evaluated one point at a time (strategy "
                f"loop).",
                stacklevel=4,
            )
            return
        for split, columns in sums.items():
            for held, column in zip(out[split], columns):
                held[lo:hi] = column.cpu().numpy()
        if progress:
            progress(hi - lo)
        for j in np.flatnonzero((ends > lo) & (ends <= hi)):  # the jobs this chunk ended
            span = slice(ends[j] - len(jobs[j]), ends[j])
            finish(jobs[j].index, {s: tuple(c[span] for c in cols) for s, cols in out.items()})
        lo = hi


def hoisted(ctx: Context, jobs: Sequence[Job], progress: Progress | None, finish: Finish) -> None:
    """Each job with its prefix once per batch and its suffix per point (``loop``) or chunk
    (``vmap``). A job that runs out of device memory, or whose suffix vmap refuses, is
    evaluated whole by the plain strategy, which reports only the points not reported yet."""
    vectorised = ctx.config.resolved_strategy == "vmap"
    for job in jobs:
        reported = 0

        def counting(done: int) -> None:
            nonlocal reported
            reported += done
            if progress:
                progress(done)

        try:
            sums = _hoisted(ctx, job, counting)
        except torch.OutOfMemoryError:
            ctx.note_oom("this point set evaluated whole (no hoisting)")
            sums = None
        except RuntimeError:  # vmap refused the suffix: the whole evaluation says why
            if not vectorised:
                raise
            sums = None
        if sums is not None:
            ctx.hoisted += 1
            finish(job.index, sums)
            continue
        fallback = vmap if vectorised and job.moving else loop
        fallback(ctx, [job], _skip_first(progress, reported), finish)


@torch.no_grad()
def _hoisted(ctx: Context, job: Job, progress: Progress) -> dict:
    """The prefix once per batch, the suffix at every point (or point chunk).

    When the frontiers of a whole split fit in half the memory budget they are computed
    first and kept, and the points run outermost (the weights are written once per point);
    otherwise batch by batch, the weights written once per batch and point.
    """
    from torch.func import functional_call
    from torch.func import vmap as vectorise

    split = job.split
    ctx.load(job.sources[job.rest[0]])
    dev, n = ctx.config.device, len(job)
    # The suffix's name for each tensor it holds (a tied tensor is listed under one name,
    # which need not be the one the group gives it).
    in_suffix = {
        id(t): name
        for name, t in [*split.suffix.named_parameters(), *split.suffix.named_buffers()]
    }
    suffix_moving = {  # the suffix's name -> the group's key
        in_suffix[id(ctx.slots[k])]: k for k in job.moving if id(ctx.slots[k]) in in_suffix
    }
    vectorised = ctx.config.resolved_strategy == "vmap"
    chunk = ctx.chunk_size(job.moving, n) if vectorised else 1
    slots, sources = _writes(ctx, job)

    # Built once per job: the suffix takes one placeholder per frontier value.
    n_frontier = sum(node.op == "placeholder" for node in split.suffix.graph.nodes)
    ignore_as_strided_fallback()
    batched = vectorise(
        lambda mv, *f: logits_of(functional_call(split.suffix, mv, f)),
        in_dims=(0, *([None] * n_frontier)),
    )

    def weights_at(c: int):
        """Point c's weights into the module (loop) or chunk c's stacked weights (vmap)."""
        if vectorised:
            at = stacking(job.weights[c : c + chunk], dtype=ctx.config.dtype, device=dev)
            return {
                name: stack_points([src[k] for src in job.sources], at)
                for name, k in suffix_moving.items()
            }
        write_point(slots, sources, job.weights[c])
        return None

    steps = range(0, n, chunk)

    def suffix_sums(stacked, batches) -> tuple[torch.Tensor, ...]:
        """vmap: one chunk's (loss, correct, count) sums over ``batches`` of (frontier, y)."""
        return totals([ctx.loss_fn(batched(stacked, *frontier), y) for frontier, y in batches])

    # Progress counts points done on every split: with points outermost each one (or chunk)
    # reports as it ends on the last split; with batches outermost the job ends at once.
    last = list(ctx.data)[-1]

    def report(name: str, done: int) -> None:
        if name == last:
            progress(done)

    out = {}
    for name in ctx.data:
        cached = frontiers(ctx, split, name)
        if cached is not None and vectorised:  # points outermost, a chunk per pass
            sums = []
            for c in steps:
                sums.append(suffix_sums(weights_at(c), cached))
                report(name, min(chunk, n - c))
            sums = joined(sums)
        elif cached is not None:  # points outermost, one per pass
            deferred = ctx.deferred(name, n)
            run = deferred.batch_fn(lambda frontier: logits_of(split.suffix(*frontier)))
            for c in steps:
                weights_at(c)
                deferred.add([run(frontier, y) for frontier, y in cached])
                report(name, 1)
            sums = deferred.sums(n)
        else:  # batches outermost: (loss, correct, count) sums over the points per batch
            per_batch = []
            for x, y in ctx.batches(name):
                ctx.where.at(name, x)
                y = y.to(dev, non_blocking=True)
                frontier = split.prefix(ctx.input(x))
                if vectorised:
                    per_batch.append(joined([suffix_sums(weights_at(c), [(frontier, y)])
                                             for c in steps]))
                    continue
                deferred = ctx.deferred(name, n, len(y))
                run = deferred.batch_fn(lambda frontier: logits_of(split.suffix(*frontier)))
                for c in steps:
                    weights_at(c)
                    deferred.add([run(frontier, y)])
                per_batch.append(deferred.sums(n))
            sums = totals(per_batch)
            report(name, n)
        out[name] = tuple(column.cpu().numpy() for column in sums)
    return out


def frontiers(ctx: Context, split: SplitForward, name: str) -> list | None:
    """Every batch's (frontier, targets) on data split ``name``, or ``None`` when they would
    take more than half the memory budget (estimated from the first batch)."""
    dev = ctx.config.device
    cached, limit = [], ctx.sizes.budget // 2
    batches = ctx.batches(name)
    for i, (x, y) in enumerate(batches):
        ctx.where.at(name, x)
        frontier = split.prefix(ctx.input(x))
        if i == 0:
            per_batch = nbytes([t for t in frontier if isinstance(t, torch.Tensor)])
            if per_batch * len(batches) > limit:
                return None
        cached.append((frontier, y.to(dev, non_blocking=True)))
    return cached


def has_state(module: nn.Module) -> bool:
    """Whether a module holds any parameter or buffer (does any weighted work)."""
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _skip_first(progress: Progress | None, skip: int) -> Progress | None:
    """``progress`` that swallows the first ``skip`` points reported to it."""
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
