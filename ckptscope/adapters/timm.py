"""timm models: ``timm:NAME`` builds ``timm.create_model(NAME, pretrained=False, ...)``.

``timm`` is imported only when such an adapter builds a module or reads options, and never
downloads anything here: ``pretrained`` is always false and options that would make timm load
weights itself (``pretrained``, ``checkpoint_path``, ``pretrained_cfg*``) are refused; ckptscope
loads the checkpoint. Options are read off the checkpoint's shapes: ``num_classes`` from the
classifier's weight (0 when the checkpoint has no classifier) and ``in_chans`` from the stem's
first convolution, both located through the model's ``pretrained_cfg`` (``classifier``,
``first_conv``), else the last 2-D and the first 4-D weight. ``--adapter-opt`` gives any other
``create_model`` keyword (``drop_rate``, ``global_pool``, ...).

A file may name ``timm:NAME`` in its metadata (a registry entry, NAME validated as
``[A-Za-z0-9_.]+``): it picks an architecture of the installed timm, it imports nothing else.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ckptscope.adapters import FAMILIES, Adapter, AdapterFamily
from ckptscope.errors import CkptscopeError

INSTALL_HINT = "pip install timm"
# create_model keywords that make timm fetch or read weights itself: ckptscope loads them.
_REFUSED = ("pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay")


def _import_timm():
    """The ``timm`` module, or a one-line error with the install hint."""
    try:
        import timm
    except ImportError as err:
        raise CkptscopeError(
            f"the timm:NAME adapters need timm, which cannot be imported ({err}); install it "
            f"with `{INSTALL_HINT}` (ckptscope installs and downloads nothing itself)."
        ) from None
    return timm


def create(name: str, **options: object) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **options)``, with one-line errors.

    Raises:
        CkptscopeError: timm is missing, an option would load weights, or timm refuses the
            name or the options.
    """
    refused = sorted(set(options) & set(_REFUSED))
    if refused:
        raise CkptscopeError(
            f"adapter timm:{name}: option {refused[0]!r} would have timm load weights; ckptscope "
            f"reads them from the checkpoint: leave it out."
        )
    timm = _import_timm()
    try:
        return timm.create_model(name, pretrained=False, **options)
    except CkptscopeError:
        raise
    except Exception as err:  # an unknown name, a bad keyword: whatever timm raises
        first = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise CkptscopeError(
            f"adapter timm:{name}: timm.create_model({name!r}, **{dict(options)!r}) failed "
            f"({first}); check the name (timm.list_models('{name.split('.')[0]}*')) and the "
            f"options (--adapter-opt)."
        ) from None


def _weight(state: Mapping[str, torch.Tensor], module: object, dims: int) -> torch.Tensor | None:
    """``state[module + '.weight']`` when ``module`` names one with ``dims`` dims."""
    if isinstance(module, (tuple, list)):  # several heads (distilled ViTs): the first
        module = module[0] if module else None
    if not isinstance(module, str):
        return None
    weight = state.get(f"{module}.weight")
    return weight if weight is not None and weight.dim() == dims else None


def infer_options(name: str, state: Mapping[str, torch.Tensor]) -> dict:
    """``num_classes`` and ``in_chans`` read off ``state`` for the timm model ``name``.

    The model is built once on the meta device with timm's defaults, for its ``pretrained_cfg``
    (which names the classifier and the first convolution); without one, the last 2-D
    ``*.weight`` is the classifier and the first 4-D one the stem.
    """
    with torch.device("meta"):
        default = create(name)
    cfg = dict(getattr(default, "pretrained_cfg", None) or getattr(default, "default_cfg", None)
               or {})
    weights = [(k, v) for k, v in state.items() if k.endswith(".weight") and v.is_floating_point()]
    options: dict = {}
    classifier = cfg.get("classifier")
    head = _weight(state, classifier, 2)
    if head is None and classifier is None:
        head = next((v for _, v in reversed(weights) if v.dim() == 2), None)
    if head is not None:
        options["num_classes"] = int(head.shape[0])
    elif isinstance(classifier, str) and not any(k.startswith(f"{classifier}.") for k in state):
        options["num_classes"] = 0  # a headless checkpoint (features only)
    stem = _weight(state, cfg.get("first_conv"), 4)
    if stem is None:
        stem = next((v for _, v in weights if v.dim() == 4), None)
    if stem is not None:
        options["in_chans"] = int(stem.shape[1])
    return options


def module_groups(keys: Sequence[str]) -> dict[str, str]:
    """One group per top-level module, in key order (``conv1``, ``layer1``, ..., ``fc``)."""
    names = dict.fromkeys(k.split(".", 1)[0] for k in keys if "." in k)
    return {name: rf"{re.escape(name)}\." for name in names}


_BLOCK = re.compile(r"^((?:[A-Za-z_]\w*\.)*?(?:blocks|layers|stages|layer\d+)\.\d+)\.")


def block_groups(keys: Sequence[str]) -> dict[str, str]:
    """One group per numbered block (``blocks.0``, ``stages.1``, ``layer2.0``), in key order;
    the keys outside any block make no group."""
    blocks = dict.fromkeys(m.group(1) for k in keys if (m := _BLOCK.match(k)))
    if not blocks:
        raise CkptscopeError(
            "preset 'blocks' found no numbered block (blocks.N., layers.N., stages.N., "
            "layerK.N.) among the keys; use --preset modules or --group REGEX."
        )
    return {name: rf"{re.escape(name)}\." for name in blocks}


@functools.cache
def timm_adapter(name: str) -> Adapter:
    """The adapter ``timm:NAME``, one object per name (:func:`ckptscope.adapters.registered`
    recognises it by identity)."""

    def build(**options: object) -> nn.Module:
        return create(name, **options)

    return Adapter(
        name=f"timm:{name}",
        build=build,
        presets={"modules": module_groups, "blocks": block_groups},
        infer_options=functools.partial(infer_options, name),
        description=f"timm.create_model({name!r}, pretrained=False)",
    )


FAMILIES.register("timm")(AdapterFamily(
    name="timm",
    make=timm_adapter,
    description="timm.create_model(NAME, pretrained=False) (options read off the checkpoint: "
                "num_classes, in_chans; needs timm)",
))
