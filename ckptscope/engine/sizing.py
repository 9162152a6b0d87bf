"""How much fits: the activation probe, the batch size, the points per vectorised pass, whether
the data is streamed, the batch spans, and the out-of-memory back-off's notes."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ckptscope.engine.config import EvalConfig

# The automatic batch's cap (bn="interpolate"): 4,096 examples, or more while the batch's
# activations (the probe's estimate) stay under 16 MiB. Measured on 2 cores, 2026-11-30, MLP
# forward passes: a 3x64 MLP (1.5 KB per example) on 6,000 points took 0.71 ms in one batch
# against 0.83 ms as 4,096 + 1,904 at 2 threads (300 interleaved repeats; medians 1.35 and
# 2.08 ms on the busy machine), 1.29 against 1.39 ms at 1 thread; nets with 4 KB per example were
# fastest at 2,048-4,096 examples, and batches of 25-30 MB of activations were 5-12% slower
# than 4,096 examples at 1 thread.
_MAX_BATCH = 4096
_MAX_BATCH_BYTES = 16 << 20


def nbytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes held by ``tensors`` (their elements, not their storages)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def streams(device: torch.device, data_bytes: int, budget: int) -> bool:
    """Whether the evaluation data stays on the CPU and goes to ``device`` batch by batch: only
    on an accelerator, and only when the set would take more than half the memory budget."""
    return device.type != "cpu" and data_bytes > budget // 2


def probe(module: nn.Module, x: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor],
          device: torch.device) -> tuple[int, int]:
    """``(activation bytes, output bytes)`` per example of one forward pass on ``x``.

    On CUDA the activations are the probe's measured peak. Elsewhere an estimate that does not
    depend on the allocator: the sum of the distinct storages the leaf modules write (an
    in-place op shares its input's), every output kept alive until the pass ends so that no
    address is reused. It counts every activation, not only the live ones — an upper bound, so
    the batch size it gives is the same from run to run (``bn="batch"`` curves depend on it).

    Args:
        module: the model, whose leaf modules are hooked.
        x: a few examples, a copy (a view would share, and count, the storage of its split).
        forward: runs the model on ``x`` (with the caller's error handling).
        device: where it runs.
    """
    storages: dict[int, int] = {}
    kept: list[torch.Tensor] = []

    def hook(_mod, _inp, out):
        if isinstance(out, torch.Tensor):
            kept.append(out)
            storages[out.untyped_storage().data_ptr()] = out.untyped_storage().nbytes()

    # Leaf modules only: a container's output is its last child's, counted already.
    leaves = [m for m in module.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    cuda = device.type == "cuda"
    try:
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        with torch.no_grad():
            out = forward(x)
        output_bytes = max(1, math.ceil(nbytes([out]) / len(x)))
        if cuda:
            peak = torch.cuda.max_memory_allocated(device) - before
            return max(1, math.ceil(peak / len(x))), output_bytes
    finally:
        for h in handles:
            h.remove()
        kept.clear()
    return max(1, math.ceil(sum(storages.values()) / len(x))), output_bytes


@dataclass
class Sizes:
    """The sizes chosen for one evaluator, and the back-off that lowers them.

    Attributes:
        config: the evaluator's; its ``budget`` is read where it is needed (on CUDA it is a
            share of the memory free at that moment).
        activation_bytes: per example, from :func:`probe`.
        output_bytes: per example, the model's output.
        batch: examples per forward pass (halved by the out-of-memory back-off).
        fold_single: a last batch of one example joins the one before (where batch statistics
            are computed: BatchNorm cannot normalise a single example).
    """

    config: EvalConfig
    activation_bytes: int
    output_bytes: int
    batch: int = 1
    fold_single: bool = False
    warned: bool = False

    @property
    def budget(self) -> int:
        return self.config.budget

    def pick_batch(self, n_max: int, asked: int | None) -> int:
        """Set and return the batch size: as ``asked`` (at most the largest split), else what
        a quarter of the budget holds, capped at 4,096 examples or 16 MiB of activations,
        whichever is more; a split larger than the cap is cut into equal batches (no short
        last batch: on two threads 4,096 + 1,904 examples took longer than 2 x 3,000).

        Under ``bn="batch"`` and ``bn="recompute"`` the batches are part of what a curve
        measures (their statistics), so there the cap stays 4,096 examples, unbalanced, as
        before 2026-11-30: earlier curves stay reproducible and mergeable."""
        if asked is not None:
            self.batch = min(asked, n_max)
            return self.batch
        n_max = max(1, n_max)
        fits = max(1, self.budget // (4 * self.activation_bytes))
        if self.config.bn != "interpolate":
            self.batch = min(n_max, _MAX_BATCH, fits)
            return self.batch
        cap = max(_MAX_BATCH, _MAX_BATCH_BYTES // self.activation_bytes)
        if fits < min(n_max, cap):  # the budget binds
            self.batch = fits
        else:
            self.batch = -(-n_max // -(-n_max // cap))  # ceil(n / ceil(n / cap))
        return self.batch

    def chunk(self, moving_bytes: int, n: int) -> int:
        """Points per vectorised pass: as many of ``n`` as the budget holds (each replicates
        ``moving_bytes`` and a batch of activations), at least one."""
        per_point = moving_bytes + self.batch * self.activation_bytes
        return max(1, min(n, self.budget // max(1, per_point)))

    def deferred(self, examples: int, n: int) -> int:
        """Points whose outputs on ``examples`` examples fit a sixteenth of the budget (at most
        256 MiB), at most ``n``; 0 when not even one does."""
        per_point = max(1, examples * self.output_bytes)
        room = min(self.budget // 16, 256 << 20)
        return min(n, room // per_point)

    def spans(self, n: int) -> list[tuple[int, int]]:
        """The (start, stop) of each batch of ``n`` examples."""
        spans = [(lo, min(lo + self.batch, n)) for lo in range(0, n, self.batch)]
        if self.fold_single and len(spans) > 1 and spans[-1][1] - spans[-1][0] == 1:
            spans[-2:] = [(spans[-2][0], n)]
        return spans

    def note_oom(self, change: str, device: torch.device) -> None:
        """After an out-of-memory error: free the cache, and warn once per evaluator."""
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if not self.warned:
            warnings.warn(f"out of device memory; continuing with {change}.", stacklevel=5)
            self.warned = True
