"""Architecture adapters: how to build a module for a checkpoint, its loss, data and groups.

An :class:`Adapter` is plain data. Register one with ``@ADAPTERS.register(name)`` or refer to
your own as ``pkg.module:attr``, where ``attr`` is an :class:`Adapter`, or a callable returning an
``nn.Module`` (cross-entropy loss, no presets). See ``docs/adapters.md``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ckptscope.errors import CkptscopeError
from ckptscope.registry import Registry, import_object, is_import_spec

Preset = Callable[[Sequence[str]], dict[str, str]]


@dataclass(frozen=True)
class Adapter:
    """An architecture.

    Attributes:
        name: the registry name, recorded in results and checkpoint metadata.
        build: ``build(**options) -> nn.Module``.
        loss: a loss name for given options (``loss(options) -> "cross_entropy" | "bce"``).
        default_data: the dataset spec used when none is given.
        presets: preset name -> ``preset(keys) -> {group name: regex}``.
        infer_options: ``infer_options(state) -> options`` read off a state dict's shapes, used
            when a checkpoint carries no options.
        description: one line for listings.
    """

    name: str
    build: Callable[..., nn.Module]
    loss: Callable[[Mapping[str, object]], str] = lambda options: "cross_entropy"
    default_data: str | None = None
    presets: Mapping[str, Preset] = field(default_factory=dict)
    infer_options: Callable[[Mapping[str, torch.Tensor]], dict] | None = None
    description: str = ""

    def options_for(self, state: Mapping[str, torch.Tensor] | None,
                    given: Mapping[str, object] | None) -> dict:
        """Return the build options: ``given`` on top of those inferred from ``state``."""
        options = {}
        if self.infer_options and state:
            try:
                options = dict(self.infer_options(state))
            except Exception:  # a foreign state dict: the key check reports the mismatch
                options = {}
        options.update(given or {})
        return options

    def make(self, options: Mapping[str, object]) -> nn.Module:
        """Build the module, turning a bad option into a one-line error."""
        try:
            inspect.signature(self.build).bind(**options)
        except TypeError as err:
            raise CkptscopeError(
                f"adapter {self.name!r}: bad options {dict(options)} ({err})."
            ) from None
        return self.build(**options)


ADAPTERS: Registry[Adapter] = Registry("adapter")


def get_adapter(spec: str | Adapter) -> Adapter:
    """Return a registered adapter by name, or import one from ``pkg.module:attr``."""
    if isinstance(spec, Adapter):
        return spec
    if spec in ADAPTERS or not is_import_spec(spec):
        return ADAPTERS.get(spec)
    obj = import_object(spec, what="adapter")
    if isinstance(obj, Adapter):
        return obj
    if callable(obj):
        return Adapter(name=spec, build=obj)
    raise CkptscopeError(
        f"adapter {spec!r} is a {type(obj).__name__}, not an Adapter or a callable."
    )


def module_name(model: nn.Module) -> str:
    """A label for a user-supplied module in results: its class name."""
    return f"module:{type(model).__qualname__}"


# Register the built-in adapters.
from ckptscope.adapters import mlp, resnet, vgg  # noqa: E402,F401
