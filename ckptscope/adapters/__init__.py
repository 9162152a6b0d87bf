"""Architecture adapters: how to build a module for a checkpoint, its loss, data and groups.

An :class:`Adapter` is plain data. Register one with ``@ADAPTERS.register(name)`` or refer to
your own as ``pkg.module:attr``, where ``attr`` is an :class:`Adapter`, or a callable returning an
``nn.Module`` (cross-entropy loss, no presets). A *family* (:data:`FAMILIES`) is a parameterised
registry entry ``FAMILY:NAME`` (``timm:resnet18``): its NAME is validated as
``[A-Za-z0-9_.]+`` and picks an architecture inside a library, never code to import. See
``docs/adapters.md``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ckptscope.errors import CkptscopeError
from ckptscope.keys import (
    check_model_keys,
    complete,
    drop_hidden_aliases,
    hidden_aliases,
    model_tensors,
)
from ckptscope.metadata import FAMILY_ARG
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

    def make(self, options: Mapping[str, object], *, like: Mapping[str, torch.Tensor] | None = None,
             where: str = "the checkpoint", source: str | None = None) -> nn.Module:
        """Build the module once :meth:`check` passes (the arguments are its own)."""
        self.check(options, like=like, where=where, source=source)
        return self.build(**options)

    def check(self, options: Mapping[str, object], *,
              like: Mapping[str, torch.Tensor] | None = None, where: str = "the checkpoint",
              source: str | None = None) -> None:
        """Raise a one-line error unless ``build`` takes ``options`` (and the module fits ``like``).

        Args:
            options: the keyword arguments of ``build``.
            like: a state dict the module must fit. The module is built on the meta device,
                which allocates nothing, and its keys and shapes are compared with ``like``'s,
                so options naming sizes beyond the checkpoint's are refused before any memory
                is used.
            where: how to call ``like`` in messages.
            source: where ``options`` came from when not from the user (``"the metadata of
                'a.safetensors'"``). Then the check is strict: options that do not build on the
                meta device are refused, and so is a module holding more values than ``like``.

        Raises:
            CkptscopeError: ``build`` does not take the options, or the module does not fit.
        """
        origin = f" from {source}" if source else ""
        try:
            inspect.signature(self.build).bind(**options)
        except TypeError as err:
            raise CkptscopeError(
                f"adapter {self.name!r}: bad options {_shown(options)}{origin} ({err})."
            ) from None
        if like is None:
            return
        fix = ("pass the options yourself: --adapter-opt KEY=VALUE (Python: adapter_options=...)"
               if source else "pick the adapter and options the checkpoint was saved from")
        try:
            with torch.device("meta"):
                skeleton = self.build(**options)
        except CkptscopeError as err:
            if source is None:
                raise
            raise CkptscopeError(f"{err} (the options come{origin}; {fix})") from None
        except Exception as err:  # a build's failure, whatever its type, is the options' fault
            if source is None:  # the user's: a build that needs real tensors is checked after it
                return
            reason = (str(err).splitlines() or [type(err).__name__])[0][:160]
            raise CkptscopeError(
                f"adapter {self.name!r}: the options {_shown(options)}{origin} do not build a "
                f"module ({reason}); {fix}."
            ) from None
        tensors = model_tensors(skeleton)
        like = drop_hidden_aliases(like, hidden_aliases(skeleton), where)[0]
        check_model_keys(tensors, complete(like, tensors),
                         names=(f"the model ({self.name}, options {_shown(options)}{origin})",
                                where),
                         fix=fix)
        # What a checkpoint holds: the state dict, a tied tensor once (non-persistent buffers,
        # such as BERT's position_ids, are rebuilt by the module, never read from a file).
        kept = {id(t): t for t in skeleton.state_dict(keep_vars=True).values()}
        held = sum(t.numel() for t in kept.values())
        total = sum(t.numel() for t in like.values())
        if source and held > total:
            raise CkptscopeError(
                f"adapter {self.name!r}: the options {_shown(options)}{origin} build a module of "
                f"{held:,} values, more than the {total:,} of {where}; {fix}."
            )


def _shown(options: Mapping[str, object]) -> str:
    """The options for a message, cut to a line's worth (they may come from a file)."""
    text = repr(dict(options))
    return text if len(text) <= 160 else text[:156] + "...}"


ADAPTERS: Registry[Adapter] = Registry("adapter")


@dataclass(frozen=True)
class AdapterFamily:
    """Adapters named ``FAMILY:NAME``, one per architecture name of a library.

    Attributes:
        name: the family (``timm``), the part before the colon.
        make: ``make(NAME) -> Adapter`` for a validated NAME; the same object for the same NAME
            (cache it), so that :func:`registered` recognises it.
        description: one line for listings.
    """

    name: str
    make: Callable[[str], Adapter]
    description: str = ""


FAMILIES: Registry[AdapterFamily] = Registry("adapter family")


def family_adapter(spec: str) -> Adapter | None:
    """The adapter of a ``FAMILY:NAME`` spec whose FAMILY is registered; ``None`` for any other
    spec.

    Raises:
        CkptscopeError: NAME is not ``[A-Za-z0-9_.]+``.
    """
    family, sep, arg = spec.partition(":")
    if not sep or family not in FAMILIES:
        return None
    if not FAMILY_ARG.fullmatch(arg):
        raise CkptscopeError(
            f"adapter {spec[:80]!r}: {family}:NAME takes a name of up to 128 letters, digits, "
            f"'_' and '.' (e.g. {family}:resnet18)."
        )
    return FAMILIES.get(family).make(arg)


def get_adapter(spec: str | Adapter) -> Adapter:
    """Return a registered adapter by name, a family's (``timm:NAME``), or import one from
    ``pkg.module:attr``."""
    if isinstance(spec, Adapter):
        return spec
    if (member := family_adapter(spec)) is not None:
        return member
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


def registered(adapter: Adapter) -> bool:
    """True for an adapter of the registry (a built-in, or one your code registered), or of a
    registered family (``timm:NAME``)."""
    if adapter.name in ADAPTERS:
        return ADAPTERS.get(adapter.name) is adapter
    try:
        return family_adapter(adapter.name) is adapter
    except CkptscopeError:
        return False


def module_name(model: nn.Module) -> str:
    """A label for a user-supplied module in results: its class name."""
    return f"module:{type(model).__qualname__}"


# Register the built-in adapters (transformers and timm are imported only when used).
from ckptscope.adapters import huggingface, mlp, resnet, vgg  # noqa: E402,F401
from ckptscope.adapters import timm as _timm_family  # noqa: E402,F401
