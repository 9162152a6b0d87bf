"""Alignment and repair as a step of :func:`ckptscope.linear_path`'s pipeline."""

from __future__ import annotations

import torch
from torch import nn

from ckptscope.checkpoints import Checkpoint
from ckptscope.errors import CkptscopeError


def check_alignment_options(*, align: str | None, repair: bool, bn: str) -> None:
    """Refuse an unknown alignment method, and ``repair`` with ``bn="batch"``."""
    from ckptscope.align import METHODS

    if align is not None and align not in METHODS:
        raise CkptscopeError(f"align={align!r} is not one of {METHODS} (or None).")
    if repair and bn == "batch":
        raise CkptscopeError("repair=True re-estimates BatchNorm statistics at each point; "
                             "leave bn at 'interpolate' (or pass 'recompute').")


def prepare_pair(a: Checkpoint, b: Checkpoint, module: nn.Module, adapter, data: object, *,
                 align: str | None, repair: bool, seed: int
                 ) -> tuple[Checkpoint, dict, torch.Tensor | None, bool]:
    """B aligned to A when ``align`` names a method; how to repair the points when ``repair``.

    Returns:
        (b, attrs, rescale, recompute): ``b`` aligned (or as given); the result's ``align*`` and
        ``repair`` attrs; REPAIR's inputs (N, ...) for a network without BatchNorm, else
        ``None``; whether BatchNorm statistics are to be recomputed at each point instead.
    """
    from ckptscope.align import _activation_inputs, align_checkpoints
    from ckptscope.align.repair import has_batchnorm

    attrs: dict = {"align": "none", "repair": "none"}
    if align:
        b, found = align_checkpoints(a, b, module, adapter, data, method=align, seed=seed)
        attrs.update(found)
    rescale, recompute = None, False
    if repair and has_batchnorm(module):
        recompute = True
        attrs["repair"] = "bn-recompute"
    elif repair:
        rescale = _activation_inputs(data, a, adapter, seed=seed)
        attrs["repair"] = "rescale"
    return b, attrs, rescale, recompute
