"""What an analysis of a checkpoint pair reads: the two checkpoints, the model they were saved
from and the evaluation data, each the caller's or what the checkpoints' metadata names,
within the rules of :mod:`ckptscope.metadata` (:func:`ckptscope.linear_path`'s first steps).

A file may name only registry entries (an adapter, a dataset), nothing is imported because a
file says so, and a file's adapter options are checked against its own shapes on the meta
device before a module is built. What the user passes (``--adapter``, ``--data``,
``--adapter-opt``, ``--seed``, the Python arguments) always wins, and then the metadata field
it replaces is not read at all.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ckptscope.adapters import (
    ADAPTERS,
    FAMILIES,
    Adapter,
    get_adapter,
    module_name,
    registered,
)
from ckptscope.checkpoints import Checkpoint, as_checkpoint, check_pair
from ckptscope.data import DATASETS, as_splits, load_data, select_splits
from ckptscope.data.tokens import with_tokenizer
from ckptscope.data.transforms import subset
from ckptscope.engine import EvalConfig
from ckptscope.errors import CkptscopeError
from ckptscope.keys import check_model_keys, match_keys, model_tensors, unwrap_module
from ckptscope.metadata import stored_adapter, stored_data, stored_int, stored_options

StateSource = str | os.PathLike | Mapping[str, torch.Tensor] | Checkpoint


def load_pair(start: StateSource, end: StateSource, *,
              strip_prefix: str | Sequence[str] | None = None) -> tuple[Checkpoint, Checkpoint]:
    """Read both checkpoints, match their keys to each other (:func:`ckptscope.keys.match_keys`:
    prefixes, tied names, BatchNorm counters) and warn about NaN/Inf in either. Whether they
    are a pair is checked once the model is known (:func:`match_model`)."""
    a, b = match_keys(as_checkpoint(start), as_checkpoint(end), strip_prefix=strip_prefix)
    warn_nonfinite(a, a.path or "start")
    warn_nonfinite(b, b.path or "end")
    return a, b


def warn_nonfinite(ckpt: Checkpoint, label: str, *, holds: str = "the curves",
                   stacklevel: int = 5) -> None:
    """Warn when ``ckpt`` has NaN/Inf in a floating tensor, naming up to three of them and
    what will hold NaN there (``holds``)."""
    bad = sorted(
        k
        for k, v in ckpt.state.items()
        if v.is_floating_point() and not bool(torch.isfinite(v).all())
    )
    if bad:
        warnings.warn(
            f"checkpoint {label} has NaN/Inf in {len(bad)} tensor(s) ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); {holds} will hold NaN there.",
            stacklevel=stacklevel,
        )


def _label(ckpt: Checkpoint, default: str) -> str:
    return ckpt.path or default


def choose_adapter(
    model: str | Adapter | None,
    a: Checkpoint,
    b: Checkpoint,
    adapter_options: Mapping[str, object] | None,
) -> tuple[Adapter, dict, str | None]:
    """Return (adapter, options, where the options came from if not the user).

    The checkpoints' metadata counts only as :mod:`ckptscope.metadata` allows: an adapter a
    file names must be a registry entry (nothing is imported for it), and the file's
    ``adapter_options`` are read only when the user gives none and the adapter is that
    registry entry; :meth:`Adapter.make` then checks them on the meta device.
    """
    named = next((c for c in (a, b) if c.metadata.get("adapter")), None)
    label = _label(named, "start") if named is not None else ""
    if model is None:
        if named is not None:
            model = stored_adapter(named.metadata, source=label, known=ADAPTERS,
                                   families=FAMILIES)
        if model is None:
            raise CkptscopeError(
                "no model given and the checkpoints name no adapter in their metadata; pass "
                "--adapter NAME (e.g. mlp) or a module."
            )
    adapter = get_adapter(model)
    source = None
    if (
        adapter_options is None
        and named is not None
        and named.metadata["adapter"] == adapter.name
        and registered(adapter)  # a file's options never reach code the user chose to import
    ):
        adapter_options = stored_options(named.metadata, source=label)
        source = f"the metadata of {label!r}" if adapter_options is not None else None
    return adapter, adapter.options_for(a.state, adapter_options), source


def resolve_model(
    model: nn.Module | str | Adapter | None,
    a: Checkpoint,
    b: Checkpoint,
    adapter_options: Mapping[str, object] | None = None,
) -> tuple[nn.Module, Adapter | None, dict]:
    """Return (module, adapter or None, options) for a module, an adapter, or the metadata.

    A registered adapter is built on the meta device first and compared with ``a``'s shapes,
    so no option, the user's or a file's, allocates beyond the checkpoint's size.
    """
    if isinstance(model, nn.Module):
        return unwrap_module(model), None, {}
    adapter, options, source = choose_adapter(model, a, b, adapter_options)
    like = a.state if registered(adapter) else None
    where = f"the checkpoint {_label(a, 'start')}"
    return adapter.make(options, like=like, where=where, source=source), adapter, options


def match_model(a: Checkpoint, b: Checkpoint, module: nn.Module, adapter: Adapter | None,
                *, layout: Mapping[str, torch.Tensor] | None = None
                ) -> tuple[Checkpoint, Checkpoint]:
    """Match the pair's keys to the model (:func:`ckptscope.keys.match_keys`), then refuse a
    pair whose keys, shapes or kinds of dtype differ, or that the model does not fit (its
    ``layout`` as built, when given: see :func:`pair_model`)."""
    a, b = match_keys(a, b, module=module)
    check_pair(a.state, b.state, names=(a.path or "start", b.path or "end"))
    if layout is None:
        check_model(module, adapter, a)
    else:
        check_pair(layout, a.state, names=(f"the model ({adapter.name})",
                                           f"the checkpoint {_label(a, 'start')}"),
                   fix="pick the adapter and options the checkpoint was saved from")
    return a, b


def check_model(module: nn.Module, adapter: Adapter | None, a: Checkpoint) -> None:
    """Refuse a module whose keys or shapes are not the checkpoint's (naming the model's ties
    among the keys the checkpoint lacks)."""
    check_model_keys(
        model_tensors(module),
        a.state,
        names=(
            f"the model ({adapter.name if adapter else module_name(module)})",
            f"the checkpoint {a.path or 'start'}",
        ),
        fix="pick the adapter and options the checkpoint was saved from",
    )


def data_spec(data, a: Checkpoint, adapter: Adapter | None) -> object:
    """The data given, else the one ``a``'s metadata names (a registered set only), else the
    adapter's default."""
    if data is not None:
        return data
    spec = stored_data(a.metadata, source=_label(a, "start"), known=DATASETS)
    spec = spec or (adapter.default_data if adapter else None)
    if spec is None:
        raise CkptscopeError("no data given and none is known for this model; pass --data NAME.")
    return spec


def data_seed(a: Checkpoint) -> int:
    """The seed ``a``'s metadata records for its generated data (``data_seed``), else 0."""
    stored = stored_int(a.metadata, "data_seed", source=_label(a, "start"))
    return 0 if stored is None else stored


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
        seed = data_seed(a) if data is None else 0
    spec = with_tokenizer(data_spec(data, a, adapter), a.path)  # text: a model folder's
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


def check_stored(start, end, model, data, options: Mapping[str, object]) -> None:
    """Refuse what a pair's metadata names that :func:`linear_path` would refuse, before any
    pair is evaluated (checkpoints already read only; files are read by their own call)."""
    if not (isinstance(start, Checkpoint) and isinstance(end, Checkpoint)):
        return
    start, end = match_keys(start, end, strip_prefix=options.get("strip_prefix") or None)
    adapter = None
    if not isinstance(model, nn.Module):
        adapter, chosen, source = choose_adapter(
            model, start, end, options.get("adapter_options"))
        adapter.check(chosen, like=start.state if registered(adapter) else None, source=source,
                      where=f"the checkpoint {_label(start, 'start')}")
    data_spec(data, start, adapter)
    if data is None and options.get("seed") is None:
        data_seed(start)


def preset_adapter(spec: str | Adapter | None, ckpt: Checkpoint) -> Adapter:
    """The adapter whose group presets to use: ``spec``, else the built-in one ``ckpt``'s
    metadata names (nothing is imported for a file)."""
    spec = spec or stored_adapter(ckpt.metadata, source=_label(ckpt, "start"), known=ADAPTERS,
                                  families=FAMILIES)
    if spec is None:
        raise CkptscopeError("--preset needs an adapter: pass --adapter NAME.")
    return get_adapter(spec)


def pair_model(model: nn.Module | str | Adapter | None, a: Checkpoint, b: Checkpoint,
               adapter_options: Mapping[str, object] | None, *,
               built: dict[tuple, tuple[nn.Module, dict[str, torch.Tensor]]]
               ) -> tuple[nn.Module, Adapter | None, dict, dict[str, torch.Tensor] | None]:
    """:func:`resolve_model`, building an adapter's module once per call of
    :func:`ckptscope.linear_paths`: a later pair with the same adapter and options reuses it (a
    big model is not built again beside the first). The caller then matches the pair to it
    (:func:`match_model`), which refuses a pair the module does not fit.

    Args:
        built: (adapter name, options as JSON) -> (module, layout: its state as meta tensors
            when it was built); filled here.

    Returns:
        (module, adapter or None, options, layout): ``layout`` is ``None`` for a module built
        or given now, else the reused module's layout as built, to check the pair against (the
        evaluator that owns the module may have changed it since: ``bn="batch"`` drops the
        running statistics).
    """
    if isinstance(model, nn.Module):
        return (*resolve_model(model, a, b, adapter_options), None)
    adapter, options, source = choose_adapter(model, a, b, adapter_options)
    key = (adapter.name, json.dumps(options, sort_keys=True, default=str))
    if key not in built:
        module, adapter, options = resolve_model(model, a, b, adapter_options)
        built[key] = module, {k: torch.empty(v.shape, dtype=v.dtype, device="meta")
                              for k, v in module.state_dict().items()}
        return module, adapter, options, None
    where = f"the checkpoint {_label(a, 'start')}"
    adapter.check(options, like=a.state if registered(adapter) else None, where=where,
                  source=source)
    module, layout = built[key]
    return module, adapter, options, layout
