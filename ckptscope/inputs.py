"""The model and data a pair is evaluated with: the user's, or what its checkpoints' metadata
names, within the rules of :mod:`ckptscope.metadata`.

A file may name only registry entries (an adapter, a dataset), nothing is imported because a
file says so, and a file's adapter options are checked against its own shapes on the meta
device before a module is built. What the user passes (``--adapter``, ``--data``,
``--adapter-opt``, ``--seed``, the Python arguments) always wins, and then the metadata field
it replaces is not read at all.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ckptscope.adapters import ADAPTERS, Adapter, get_adapter, registered
from ckptscope.checkpoints import Checkpoint
from ckptscope.data import DATASETS
from ckptscope.errors import CkptscopeError
from ckptscope.metadata import stored_adapter, stored_data, stored_int, stored_options


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
            model = stored_adapter(named.metadata, source=label, known=ADAPTERS)
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
        return model, None, {}
    adapter, options, source = choose_adapter(model, a, b, adapter_options)
    like = a.state if registered(adapter) else None
    where = f"the checkpoint {_label(a, 'start')}"
    return adapter.make(options, like=like, where=where, source=source), adapter, options


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


def check_stored(start, end, model, data, options: Mapping[str, object]) -> None:
    """Refuse what a pair's metadata names that :func:`linear_path` would refuse, before any
    pair is evaluated (checkpoints already read only; files are read by their own call)."""
    if not (isinstance(start, Checkpoint) and isinstance(end, Checkpoint)):
        return
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
    spec = spec or stored_adapter(ckpt.metadata, source=_label(ckpt, "start"), known=ADAPTERS)
    if spec is None:
        raise CkptscopeError("--preset needs an adapter: pass --adapter NAME.")
    return get_adapter(spec)
