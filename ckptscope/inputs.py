"""What an analysis of a checkpoint pair reads: the two checkpoints, the model they were saved
from, and the evaluation data, each found from what the caller gave or from the checkpoints'
metadata (:func:`ckptscope.linear_path`'s first steps)."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ckptscope.adapters import Adapter, get_adapter, module_name
from ckptscope.checkpoints import Checkpoint, as_checkpoint, check_pair
from ckptscope.data import as_splits, load_data, select_splits
from ckptscope.data.transforms import subset
from ckptscope.engine import EvalConfig
from ckptscope.errors import CkptscopeError

StateSource = str | os.PathLike | Mapping[str, torch.Tensor] | Checkpoint


def load_pair(start: StateSource, end: StateSource) -> tuple[Checkpoint, Checkpoint]:
    """Read both checkpoints, check that they are a pair, and warn about NaN/Inf in either."""
    a, b = as_checkpoint(start), as_checkpoint(end)
    check_pair(a.state, b.state, names=(a.path or "start", b.path or "end"))
    _warn_nonfinite(a, a.path or "start")
    _warn_nonfinite(b, b.path or "end")
    return a, b


def _warn_nonfinite(ckpt: Checkpoint, label: str) -> None:
    bad = sorted(
        k
        for k, v in ckpt.state.items()
        if v.is_floating_point() and not bool(torch.isfinite(v).all())
    )
    if bad:
        warnings.warn(
            f"checkpoint {label} has NaN/Inf in {len(bad)} tensor(s) ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); the curves will hold NaN there.",
            stacklevel=5,
        )


def resolve_model(
    model: nn.Module | str | Adapter | None,
    a: Checkpoint,
    b: Checkpoint,
    adapter_options: Mapping[str, object] | None = None,
) -> tuple[nn.Module, Adapter | None, dict]:
    """Return (module, adapter or None, options) for a module, an adapter, or the metadata."""
    if isinstance(model, nn.Module):
        return model, None, {}
    if model is None:
        model = a.metadata.get("adapter") or b.metadata.get("adapter")
        if model is None:
            raise CkptscopeError(
                "no model given and the checkpoints name no adapter in their metadata; pass "
                "--adapter NAME (e.g. mlp) or a module."
            )
    adapter = get_adapter(model)
    if adapter_options is None:
        stored = a.metadata.get("adapter_options") or b.metadata.get("adapter_options")
        adapter_options = (
            json.loads(stored) if stored and a.metadata.get("adapter") == adapter.name else None
        )
    options = adapter.options_for(a.state, adapter_options)
    return adapter.make(options), adapter, options


def check_model(module: nn.Module, adapter: Adapter | None, a: Checkpoint) -> None:
    """Refuse a module whose keys or shapes are not the checkpoint's."""
    check_pair(
        dict(module.state_dict()),
        a.state,
        names=(
            f"the model ({adapter.name if adapter else module_name(module)})",
            f"the checkpoint {a.path or 'start'}",
        ),
        fix="pick the adapter and options the checkpoint was saved from",
    )


def _data_spec(data, a: Checkpoint, adapter: Adapter | None) -> object:
    if data is not None:
        return data
    spec = a.metadata.get("data") or (adapter.default_data if adapter else None)
    if spec is None:
        raise CkptscopeError("no data given and none is known for this model; pass --data NAME.")
    return spec


@dataclass(frozen=True)
class Inputs:
    """A pair's evaluation data.

    Attributes:
        splits: split -> (inputs, targets), the ones evaluated.
        bn_data: the training inputs ``bn="recompute"`` re-estimates statistics on, or ``None``.
        label: the dataset spec, or ``"in-memory"``.
        spec: the spec or the in-memory data as given.
        seed: the seed of generated data and subsets.
        key: what the data depends on; pairs with equal keys share it.
    """

    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]
    bn_data: torch.Tensor | None
    label: str
    spec: object
    seed: int
    key: tuple


def load_inputs(data: object, a: Checkpoint, adapter: Adapter | None, *, split: str,
                config: EvalConfig, loaded: dict[tuple, Inputs] | None = None) -> Inputs:
    """The splits to evaluate (and the training inputs ``recompute`` needs).

    Args:
        data: as :func:`ckptscope.linear_path` takes it; ``None``: the checkpoint's or the
            adapter's dataset.
        a: the start checkpoint, whose metadata names the data and its seed.
        adapter: the model's adapter, whose default data is the last resort.
        split: ``test``, ``train`` or ``both``.
        config: ``seed`` (``None``: the checkpoint's ``data_seed`` for data from its metadata,
            else 0), ``data_size`` and ``bn``.
        loaded: data loaded earlier in the same call, by key; what this loads is added.
    """
    seed = config.seed
    if seed is None:
        seed = int(a.metadata.get("data_seed", 0)) if data is None else 0
    spec = _data_spec(data, a, adapter)
    key = (spec if isinstance(spec, str) else id(spec), seed, config.data_size, split, config.bn)
    if loaded is not None and key in loaded:
        return loaded[key]
    if isinstance(spec, str):
        every_split, label = load_data(spec, seed=seed), spec
    else:
        every_split, label = as_splits(spec), "in-memory"
    if config.data_size is not None:
        every_split = subset(every_split, config.data_size, seed=seed)
    splits = select_splits(every_split, split)
    bn_data = (every_split["train"][0]
               if config.bn == "recompute" and "train" in every_split else None)
    inputs = Inputs(splits, bn_data, label, spec, seed, key)
    if loaded is not None:
        loaded[key] = inputs
    return inputs
