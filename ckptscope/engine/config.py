"""How to evaluate: the engine's knobs in one frozen, validated dataclass."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ckptscope.engine.placement import resolve_device
from ckptscope.errors import CkptscopeError

STRATEGIES = ("auto", "loop", "vmap")
BN_POLICIES = ("interpolate", "recompute", "batch")

_CPU_BUDGET = 1 << 30  # bytes; a quarter of a small laptop's free memory
_CUDA_FRACTION = 0.5  # of the free device memory


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate.

    Attributes:
        device: where the model and data live (a ``torch.device`` or its name; ``"auto"``:
            CUDA when present).
        dtype: the floating dtype of weights and inputs (float32 by default).
        batch_size: examples per forward pass; ``None`` picks one from the memory budget and
            the activations (:meth:`ckptscope.engine.sizing.Sizes.pick_batch`).
        strategy: ``auto``, ``loop`` or ``vmap`` (see :mod:`ckptscope.engine.strategies`).
        memory_budget: bytes the evaluator may use for replicated tensors and activations;
            ``None``: 1 GiB on the CPU, half the free memory on CUDA.
        bn: BatchNorm running statistics along the path: ``interpolate`` (they follow their
            group, as in the paper), ``recompute`` (re-estimated at every point on
            ``bn_batches`` training batches, a cumulative average in a fixed order, without
            augmentation) or ``batch`` (each evaluation batch normalised by its own statistics).
        bn_batches: training batches for ``recompute``.
        hoist: on a group path, compute the part of the forward pass upstream of the group once
            per batch instead of once per point (:mod:`ckptscope.engine.hoist`); off for
            ``bn="recompute"``, whose statistics change everywhere.
        autocast: run the forward passes under ``torch.autocast`` in this dtype (bfloat16 or
            float16); weights stay in ``dtype`` and losses are summed in float32/float64.
        channels_last: run a conv net (a model with a ``Conv2d``) and its 4-D inputs in
            channels-last layout. ``None``: on CUDA, and on the CPU under the ``loop``
            strategy with batches of 32 examples or more (oneDNN is faster there; with smaller
            batches, and for vectorised convolutions on the CPU, it was not).
        data_size: evaluate on the first ``data_size`` examples of a seeded permutation of each
            split (``None``: all of them). Read where the data is loaded
            (:func:`ckptscope.linear_path`); the evaluator takes the data it is given.
        seed: seed of generated datasets and subsets; ``None``: the checkpoint's recorded
            ``data_seed`` when the data comes from its metadata, else 0. Read where the data is
            loaded, as ``data_size``.
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
    data_size: int | None = None
    seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.device, torch.device):
            object.__setattr__(self, "device", resolve_device(self.device))
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
        if self.memory_budget is not None and self.memory_budget < 1:
            raise CkptscopeError(
                f"memory_budget={self.memory_budget} must be a positive number of bytes."
            )
        if self.data_size is not None and (isinstance(self.data_size, bool)
                                           or int(self.data_size) != self.data_size
                                           or self.data_size < 1):
            raise CkptscopeError(f"data_size={self.data_size!r} must be a positive integer.")
        if self.seed is not None and (isinstance(self.seed, bool) or int(self.seed) != self.seed):
            raise CkptscopeError(f"seed={self.seed!r} must be an integer.")

    @property
    def resolved_strategy(self) -> str:
        # Re-estimating running statistics writes buffers in place: one point at a time.
        if self.bn == "recompute":
            return "loop"
        if self.strategy != "auto":
            return self.strategy
        return "vmap" if self.device.type == "cuda" else "loop"

    @property
    def budget(self) -> int:
        """Bytes for replicated tensors and activations: as configured, or the default."""
        if self.memory_budget is not None:
            return int(self.memory_budget)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * _CUDA_FRACTION)
        return _CPU_BUDGET
