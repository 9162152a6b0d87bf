"""Align two independently trained networks: permute OTHER's hidden units to match REFERENCE.

Permuting hidden units leaves the function a network computes unchanged, so two networks
trained from different seeds hold their units in unrelated orders, and the straight line
between them crosses a barrier that is largely this symmetry. :func:`align` finds the
permutation (weight matching or activation matching, Git Re-Basin) and returns OTHER permuted;
:func:`alignment` returns the detail too. The permutation classes come from the model's fx
graph (:mod:`ckptscope.align.spec`); :mod:`ckptscope.align.repair` rescales interpolated
networks (REPAIR). See ``docs/alignment.md``.

Example:
    >>> aligned = ckptscope.align("a.safetensors", "b.safetensors", "mlp")  # doctest: +SKIP
    >>> ds = ckptscope.linear_path("a.safetensors", aligned, "mlp")          # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ckptscope.align.activations import activation_matching
from ckptscope.align.apply import apply_permutation, inverse, random_permutations
from ckptscope.align.spec import PermutationSpec, check_spec, spec_from_graph
from ckptscope.align.weights import Matching, weight_matching
from ckptscope.errors import CkptscopeError

METHODS = ("weights", "activations")
ACTIVATION_EXAMPLES = 2048  # examples activation matching correlates over, at most

__all__ = ["METHODS", "Alignment", "PermutationSpec", "align", "alignment", "apply_permutation",
           "inverse", "random_permutations", "spec_from_graph"]


@dataclass(frozen=True)
class Alignment:
    """OTHER aligned to REFERENCE, and how.

    Attributes:
        state: OTHER's state dict with its hidden units permuted (integer buffers and tensors
            no class names are OTHER's own tensors).
        spec: the permutation classes.
        perms: class name -> (n,) int64: unit i of the aligned network is unit ``perms[i]`` of
            OTHER.
        method: ``weights`` or ``activations``.
        seed: the seed of weight matching's visiting order.
        objective_before, objective_after: the matched quantity at the identity and at
            ``perms`` (weights: the summed inner product of the permuted tensors; activations:
            the mean correlation of matched units).
        distance_before, distance_after: ||OTHER - REFERENCE|| / ||REFERENCE|| over the floating
            tensors, before and after.
        sweeps: weight matching's sweeps over the classes (1 for activations).
        note: what was left fixed and why (``""`` if only the input and output axes were).
    """

    state: dict[str, torch.Tensor]
    spec: PermutationSpec
    perms: dict[str, torch.Tensor]
    method: str
    seed: int
    objective_before: float
    objective_after: float
    distance_before: float
    distance_after: float
    sweeps: int
    note: str

    @property
    def permuted(self) -> list[str]:
        """The keys whose tensors were permuted along at least one axis, sorted."""
        return self.spec.permuted

    @property
    def changed(self) -> list[str]:
        """The classes whose permutation is not the identity."""
        return [name for name, p in self.perms.items()
                if not torch.equal(p, torch.arange(len(p)))]


def alignment(reference, other, model: nn.Module | str | None = None, *,
              method: str = "weights", data: object = None, seed: int = 0,
              spec: PermutationSpec | None = None,
              adapter_options: Mapping[str, object] | None = None) -> Alignment:
    """Align ``other`` to ``reference`` and say how (see :func:`align` for the arguments).

    Args:
        spec: the permutation classes; ``None`` derives them from the model's fx graph.
        adapter_options: options for the adapter's ``build``.

    Returns:
        An :class:`Alignment`.
    """
    from ckptscope.inputs import load_pair, match_model, resolve_model

    if method not in METHODS:
        raise CkptscopeError(f"alignment method {method!r} is not one of {METHODS}.")
    if isinstance(seed, bool) or int(seed) != seed:
        raise CkptscopeError(f"seed={seed!r} must be an integer.")
    a, b = load_pair(reference, other)
    module, adapter, _ = resolve_model(model, a, b, adapter_options)
    a, b = match_model(a, b, module, adapter)
    spec = spec or spec_from_graph(module)
    check_spec(spec, a.state)
    if method == "weights":
        found: Matching = weight_matching(spec, a.state, b.state, seed=int(seed))
    else:
        inputs = _activation_inputs(data, a, adapter, seed=int(seed))
        found = activation_matching(spec, module, a.state, b.state, inputs)
    state = apply_permutation(spec, found.perms, b.state)
    return Alignment(state, spec, found.perms, method, int(seed), found.objective_before,
                     found.objective_after, _distance(a.state, b.state),
                     _distance(a.state, state), found.sweeps, spec.note(a.state))


def align(reference, other, model: nn.Module | str | None = None, *, method: str = "weights",
          data: object = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Return ``other``'s state dict with its hidden units permuted to match ``reference``.

    The aligned network computes the same function as ``other`` (to float rounding); aligning
    a network to a permuted copy of itself recovers it exactly, and to itself is the identity.

    Args:
        reference, other: checkpoint paths or state dicts of one architecture.
        model: an ``nn.Module``, an adapter name or ``pkg.module:attr``; ``None``: the adapter
            the checkpoints' metadata names.
        method: ``weights`` (weight matching, no data) or ``activations`` (activation matching
            on ``data``).
        data: for ``activations``: input tensors ``(N, ...)``, ``(inputs, targets)``, a mapping
            split -> pair, or a dataset spec (``digits``); its ``train`` split when it has one,
            at most 2048 examples. ``None``: the checkpoint's or the adapter's dataset.
        seed: weight matching's visiting order (and the subset of a larger dataset).

    Returns:
        key -> tensor, the keys and shapes of ``other``.

    Raises:
        CkptscopeError: the checkpoints are not a pair, fx cannot trace the model, or nothing
            in it can be permuted.
    """
    return alignment(reference, other, model, method=method, data=data, seed=seed).state


def _distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    keys = [k for k, v in a.items() if v.is_floating_point()]
    diff = sum(float(torch.sum((b[k].double() - a[k].double()) ** 2)) for k in keys)
    norm = sum(float(torch.sum(a[k].double() ** 2)) for k in keys)
    return (diff / norm) ** 0.5 if norm > 0 else float("nan")


def _activation_inputs(data, a, adapter, *, seed: int) -> torch.Tensor:
    """(N, ...) inputs for activation matching: the data's train split (else its first)."""
    from ckptscope.data import as_splits, load_data
    from ckptscope.inputs import data_spec

    if isinstance(data, torch.Tensor):
        inputs = data
    else:
        spec = data_spec(data, a, adapter)
        splits = load_data(spec, seed=seed) if isinstance(spec, str) else as_splits(spec)
        inputs = (splits.get("train") or next(iter(splits.values())))[0]
    if len(inputs) > ACTIVATION_EXAMPLES:
        generator = torch.Generator().manual_seed(seed)
        inputs = inputs[torch.randperm(len(inputs), generator=generator)[:ACTIVATION_EXAMPLES]]
    return inputs.float() if inputs.is_floating_point() else inputs


def align_checkpoints(a, b, module: nn.Module, adapter, data: object, *, method: str,
                      seed: int):
    """``b`` aligned to ``a`` as a checkpoint (its path, digest and metadata kept), and what a
    result records of it (``linear_path(..., align=...)``'s step).

    Returns:
        (checkpoint, attrs): attrs ``align``, ``align_seed``, ``align_objective_before``,
        ``align_objective_after``, ``align_distance_before``, ``align_distance_after``,
        ``align_permuted`` (tensors permuted), ``align_note``.
    """
    from ckptscope.checkpoints import Checkpoint

    result = alignment(a, b, module, method=method, seed=seed,
                       data=_activation_inputs(data, a, adapter, seed=seed)
                       if method == "activations" else None)
    attrs = {
        "align": method,
        "align_seed": int(seed),
        "align_objective_before": result.objective_before,
        "align_objective_after": result.objective_after,
        "align_distance_before": result.distance_before,
        "align_distance_after": result.distance_after,
        "align_permuted": len(result.permuted),
        "align_note": result.note,
    }
    notes = (*b.notes, f"B aligned to A by {method} matching (seed {seed})")
    return Checkpoint(result.state, b.path, b.sha256, b.metadata, notes), attrs


PERMUTED_SHOWN = 200  # tensor names listed in a file's metadata, at most (the rest counted)


def aligned_metadata(result: Alignment, other_metadata: Mapping[str, str], *,
                     reference: str = "") -> dict[str, object]:
    """The metadata of an aligned checkpoint: OTHER's own (adapter, options, data), and how it
    was aligned, within :mod:`ckptscope.metadata`'s bounds.

    Fields added: ``role`` (``aligned``), ``align_method``, ``align_seed``, ``align_reference``,
    ``align_objective_before`` / ``_after``, ``align_distance_before`` / ``_after``,
    ``align_classes`` (how many classes), ``align_permuted`` (the permuted tensors, at most
    200 names, then ``"... (N in all)"``) and ``align_note`` (cut to 1,000 characters).
    """
    permuted = result.permuted
    shown = permuted[:PERMUTED_SHOWN] + (
        [f"... ({len(permuted)} in all)"] if len(permuted) > PERMUTED_SHOWN else [])
    return {
        **other_metadata,
        "role": "aligned",
        "align_method": result.method,
        "align_seed": result.seed,
        "align_reference": reference[-500:],
        "align_objective_before": result.objective_before,
        "align_objective_after": result.objective_after,
        "align_distance_before": result.distance_before,
        "align_distance_after": result.distance_after,
        "align_classes": len(result.spec.classes),
        "align_permuted": shown,
        "align_note": result.note[:1000],
    }
