"""VGG-11, with and without BatchNorm, in the common CIFAR form (the paper's appendix F).

``features`` is torchvision's VGG-11 stack, index for index (``features.{i}.*``: 3x3 convs with
padding 1, each followed by BN in ``vgg11_bn``, ReLU, and 2x2 max-pools), so torchvision-style
feature keys load. The classifier is the CIFAR one: after five poolings a 32x32 image is 1x1x512,
and a single ``classifier = nn.Linear(512, num_classes)`` (keys ``classifier.weight``,
``classifier.bias``) maps it to logits, as in the widely used pytorch-cifar models and the
paper's "eight conv layers and the fully connected layer" (table A4). An adaptive average pool
(no parameters) before it lets other input sizes through. 9,231,114 parameters for ``vgg11_bn``
with 10 classes, 9,225,610 for ``vgg11``.

Presets: ``blocks`` (``conv1`` ... ``conv8`` in order, each with its BN, and ``classifier``);
for ``vgg11_bn`` also ``bn-stats``, ``bn-affine`` and ``bn-split:conv1`` ... ``bn-split:conv8``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import torch
from torch import nn

from ckptscope.adapters import ADAPTERS, Adapter
from ckptscope.adapters.presets import (
    Preset,
    alternation,
    bn_affine,
    bn_prefixes,
    bn_split,
    bn_stats,
)
from ckptscope.errors import CkptscopeError

CFG_11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
_CONVS = sum(v != "M" for v in CFG_11)
_FEATURE = re.compile(r"features\.(\d+)\.")
_CLASSIFIER_WEIGHT = re.compile(r"classifier(?:\.(\d+))?\.weight$")


class VGG(nn.Module):
    """A CIFAR VGG: ``features`` as torchvision's, adaptive average pool, one Linear.

    Args:
        cfg: output channels per conv, ``"M"`` for a 2x2 max-pool.
        batchnorm: put a BatchNorm after each conv (``vgg11_bn``).
        num_classes: outputs of the classifier.
        in_channels: input channels of the first conv.

    Initialised as torchvision's VGG: convs kaiming-normal (fan_out, relu) with zero bias, BN
    weight 1 and bias 0, the classifier normal(0, 0.01) with zero bias.
    """

    def __init__(self, cfg: Sequence[int | str] = CFG_11, batchnorm: bool = False,
                 num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        _check_positive(num_classes=num_classes, in_channels=in_channels)
        layers: list[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers.append(nn.Conv2d(channels, int(v), 3, padding=1))
            if batchnorm:
                layers.append(nn.BatchNorm2d(int(v)))
            layers.append(nn.ReLU(inplace=True))
            channels = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _check_positive(**options: object) -> None:
    for name, value in options.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CkptscopeError(f"{name}={value!r} must be a positive integer.")


def _cfg(widths: Sequence[int] | None) -> tuple:
    """VGG-11's layout with the 8 conv widths replaced (Table A4 narrows chosen layers)."""
    if widths is None:
        return CFG_11
    widths = list(widths)
    if len(widths) != _CONVS:
        raise CkptscopeError(
            f"VGG-11 widths {widths} must give {_CONVS} conv widths (default "
            f"{[v for v in CFG_11 if v != 'M']})."
        )
    _check_positive(**{f"widths[{i}]": w for i, w in enumerate(widths)})
    it = iter(widths)
    return tuple(v if v == "M" else next(it) for v in CFG_11)


def vgg11(num_classes: int = 10, in_channels: int = 3,
          widths: Sequence[int] | None = None) -> VGG:
    """VGG-11 without BatchNorm, CIFAR classifier; ``widths``: the 8 conv widths."""
    return VGG(_cfg(widths), batchnorm=False, num_classes=num_classes, in_channels=in_channels)


def vgg11_bn(num_classes: int = 10, in_channels: int = 3,
             widths: Sequence[int] | None = None) -> VGG:
    """VGG-11 with BatchNorm after every conv, CIFAR classifier; ``widths``: the 8 conv widths."""
    return VGG(_cfg(widths), batchnorm=True, num_classes=num_classes, in_channels=in_channels)


def infer_options(state: Mapping[str, torch.Tensor]) -> dict:
    """Read ``num_classes`` (the last classifier weight) and ``in_channels`` (``features.0``)."""
    options = {}
    heads = sorted((int(m.group(1) or 0), k) for k in state if (m := _CLASSIFIER_WEIGHT.match(k)))
    if heads and state[heads[-1][1]].dim() == 2:
        options["num_classes"] = int(state[heads[-1][1]].shape[0])
    first = state.get("features.0.weight")
    if first is not None and first.dim() == 4:
        options["in_channels"] = int(first.shape[1])
    convs = [f"{group[0]}.weight" for group in conv_modules(list(state))]
    widths = [int(state[k].shape[0]) for k in convs if k in state and state[k].dim() == 4]
    if len(widths) == _CONVS and widths != [v for v in CFG_11 if v != "M"]:
        options["widths"] = widths
    return options


def conv_modules(keys: Sequence[str]) -> list[list[str]]:
    """Return, per conv layer in order, its ``features.{i}`` prefixes: the conv, then its BN."""
    indices = sorted({int(m.group(1)) for k in keys if (m := _FEATURE.match(k))})
    norms = set(bn_prefixes(keys))
    layers: list[list[str]] = []
    for i in indices:
        prefix = f"features.{i}"
        if prefix in norms and layers:
            layers[-1].append(prefix)
        else:
            layers.append([prefix])
    return layers


def block_groups(keys: Sequence[str]) -> dict[str, str]:
    """One group per conv layer, ``conv1`` ... ``conv8`` (with its BN), then ``classifier``.

    Together they hold every key of a VGG exactly once.
    """
    groups = {f"conv{n + 1}": alternation(prefixes, r"\.")
              for n, prefixes in enumerate(conv_modules(keys))}
    if any(k.startswith("classifier.") for k in keys):
        groups["classifier"] = r"classifier\."
    if not groups:
        raise CkptscopeError(
            f"preset 'blocks': no VGG keys (features.0., classifier.) among the keys, which start "
            f"with {list(keys)[:5]}; is this a VGG checkpoint?"
        )
    return groups


def conv_split_preset(n: int) -> Preset:
    """Return the preset splitting ``conv{n}`` into its conv, BN affine and BN statistics."""

    def preset(keys: Sequence[str]) -> dict[str, str]:
        layers = conv_modules(keys)
        if not 1 <= n <= len(layers):
            raise CkptscopeError(
                f"preset 'bn-split:conv{n}': the state has {len(layers)} conv layers; keys start "
                f"with {list(keys)[:5]}."
            )
        return bn_split(keys, f"conv{n}", pattern=alternation(layers[n - 1], r"\."))

    preset.__doc__ = f"Conv layer {n} split into conv, BN affine and BN statistics (figure A18)."
    return preset



ADAPTERS.register("vgg11")(Adapter(
    name="vgg11",
    build=vgg11,
    default_data="cifar10",
    presets=MappingProxyType({"blocks": block_groups}),
    infer_options=infer_options,
    description="CIFAR VGG-11 without BN (8 convs, Linear(512, classes); options: "
                "num_classes=10, in_channels=3, widths=[8 conv widths])",
))

ADAPTERS.register("vgg11_bn")(Adapter(
    name="vgg11_bn",
    build=vgg11_bn,
    default_data="cifar10",
    presets=MappingProxyType({
        "blocks": block_groups,
        "bn-stats": bn_stats,
        "bn-affine": bn_affine,
        **{f"bn-split:conv{n}": conv_split_preset(n) for n in range(1, _CONVS + 1)},
    }),
    infer_options=infer_options,
    description="CIFAR VGG-11 with BN (8 convs, Linear(512, classes); options: "
                "num_classes=10, in_channels=3, widths=[8 conv widths])",
))
