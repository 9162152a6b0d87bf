"""What a call asks, validated before any work: the engine settings a function takes from its
own keywords (device, dtype, BatchNorm policy), and the options of a path sweep.

Every check here runs before a checkpoint is read, so a bad option costs nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from ckptscope import distributed
from ckptscope.align.steps import check_alignment_options
from ckptscope.engine import EvalConfig
from ckptscope.engine.placement import resolve_device
from ckptscope.errors import CkptscopeError
from ckptscope.keys import prefixes_given
from ckptscope.losses import resolve_loss
from ckptscope.points import HOLDS, alpha_grid
from ckptscope.shape import check_tolerances, endpoint_indices

DTYPES = {"float32": torch.float32, "float64": torch.float64}
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
# EvalConfig fields set by a function's own keywords, not through its config.
_KEYWORD_FIELDS = {"device": "device", "dtype": "dtype", "autocast": "dtype", "bn": "bn"}


def check_config(config: EvalConfig | None, *, dtype: str, caller: str) -> EvalConfig:
    """Refuse a ``dtype`` that is not ``float32``, ``float64``, ``bf16`` or ``fp16`` (autocast),
    and a config that sets what ``caller`` (``linear_path``) takes from its own keywords."""
    if dtype not in DTYPES and dtype not in AUTOCAST:
        raise CkptscopeError(f"dtype {dtype!r} is not one of {sorted(DTYPES) + sorted(AUTOCAST)}.")
    config = config or EvalConfig()
    default = {f.name: f.default for f in fields(EvalConfig)}
    for name, keyword in _KEYWORD_FIELDS.items():
        if getattr(config, name) != default[name]:
            raise CkptscopeError(
                f"config sets {name}={getattr(config, name)}, which {caller} takes from its own "
                f"{keyword}= keyword; pass {keyword}= instead and leave it out of the config."
            )
    return config


def settle_config(config: EvalConfig | None, *, bn: str, dtype: str,
                  device: str | torch.device | None, caller: str) -> EvalConfig:
    """The engine's config with the caller's ``bn``, ``dtype`` and device
    (:func:`check_config` first)."""
    config = check_config(config, dtype=dtype, caller=caller)
    return replace(config, bn=bn, dtype=DTYPES.get(dtype, torch.float32),
                   autocast=AUTOCAST.get(dtype), device=resolve_device(device))


@dataclass(frozen=True)
class PathQuestion:
    """The validated options of :func:`ckptscope.linear_path` / ``linear_paths``: what every
    pair of a call is asked."""

    grid: np.ndarray
    groups: Sequence[str] | Mapping[str, str] | None
    full: bool
    hold: str
    loss: str | Callable | None
    split: str
    dtype: str
    adapter_options: Mapping[str, object] | None
    tolerances: dict
    resume_dir: str | os.PathLike | None
    config: EvalConfig
    rank: int
    size: int
    strip_prefix: tuple[str, ...] = ()
    align: str | None = None
    repair: bool = False


def path_question(*, groups, alphas, full, hold, loss, bn, split, device, dtype,
                  adapter_options, tolerances, resume_dir, config: EvalConfig | None,
                  strip_prefix: str | Sequence[str] | None = None, align=None,
                  repair=False) -> PathQuestion:
    """Validate every option of a path call before any work, and settle the device (the
    process group under ``torchrun``)."""
    check_alignment_options(align=align, repair=repair, bn=bn)
    check_config(config, dtype=dtype, caller="linear_path")
    if hold not in HOLDS:
        raise CkptscopeError(f"hold={hold!r} is not one of {HOLDS}.")
    check_tolerances(**dict(tolerances or {}))  # before the work, not after it
    prefixes = prefixes_given(strip_prefix)
    loss = resolve_loss(loss)  # the user's: a name, pkg.module:attr (imported) or a callable
    grid = alpha_grid(alphas)
    endpoint_indices(grid)  # the shape verdicts need two points in [0, 1]: refused before work
    rank, size, device = distributed.setup(device)
    config = settle_config(config, bn=bn, dtype=dtype, device=device, caller="linear_path")
    return PathQuestion(grid, groups, full, hold, loss, split, dtype, adapter_options,
                        dict(tolerances or {}), resume_dir, config, rank, size, prefixes, align,
                        bool(repair))
