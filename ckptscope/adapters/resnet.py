"""ResNet-18/34/50 in the CIFAR form the paper trains (appendix A), with torchvision's key names.

The CIFAR form replaces ImageNet's 7x7 stride-2 stem and max-pool by one 3x3 stride-1 conv with 64
channels (the paper: "set the first convolutional layer to have 3 input channels, 64 output
channels, and a kernel size of 3x3"); layer1..layer4, the pooling and ``fc`` are torchvision's.
The state-dict keys are torchvision's (``conv1.weight``, ``bn1.*``, ``layer2.0.downsample.0.*``,
``fc.*``), so a torchvision-style CIFAR checkpoint loads as it is. ResNet-18 with 10 classes has
11,173,962 parameters and 122 state-dict entries (62 parameters, 60 BN buffers).

Presets (see ``docs/adapters.md``): ``blocks`` (stem, layer1..layer4, fc: the paper's B1..B4 and
fc), ``subblocks`` (layer1.0, layer1.1, ...), ``bn-stats``, ``bn-affine`` and ``bn-split:<block>``
(figure A18).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import torch
from torch import nn

from ckptscope.adapters import ADAPTERS, Adapter
from ckptscope.adapters.presets import bn_affine, bn_stats, split_preset
from ckptscope.errors import CkptscopeError

STEM_PATTERN = r"(?:conv1|bn1)\."
_LAYER = re.compile(r"layer(\d+)\.(\d+)\.")


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN and a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1, 3x3 (strided, as torchvision's v1.5), 1x1 convs with BN; expansion 4 (ResNet-50)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _downsample(in_planes: int, out_planes: int, stride: int) -> nn.Sequential | None:
    """The 1x1 conv + BN shortcut (keys ``downsample.0``, ``downsample.1``) where shapes change."""
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_planes))


class ResNet(nn.Module):
    """A CIFAR ResNet: 3x3 stem, no max-pool, four stages, global average pool, ``fc``.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        depths: blocks per stage (``[2, 2, 2, 2]`` for ResNet-18).
        num_classes: outputs of ``fc``.
        in_channels: input channels of the stem.
        width: channels of the stem and of layer1's convs (64; each stage doubles it). Narrow
            widths make small test networks.

    Initialised as torchvision's ResNets: convs kaiming-normal (fan_out, relu), BN weight 1 and
    bias 0, ``fc`` with torch's default ``nn.Linear`` init.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], depths: Sequence[int],
                 num_classes: int = 10, in_channels: int = 3, width: int = 64):
        super().__init__()
        _check_positive(num_classes=num_classes, in_channels=in_channels, width=width)
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        planes, in_planes = width, width
        for i, depth in enumerate(depths):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(depth):
                blocks.append(block(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            planes *= 2
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        self.stages = len(depths)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _check_positive(**options: object) -> None:
    for name, value in options.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CkptscopeError(f"{name}={value!r} must be a positive integer.")


def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]) in the CIFAR form."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels,
                  width=width)


def resnet34(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet:
    """ResNet-34 (BasicBlock, [3, 4, 6, 3]) in the CIFAR form."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels,
                  width=width)


def resnet50(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3]) in the CIFAR form."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels,
                  width=width)


def infer_options(state: Mapping[str, torch.Tensor]) -> dict:
    """Read ``num_classes`` (``fc.weight``) and ``in_channels`` (``conv1.weight``) off a state,
    and ``width`` where it is not 64."""
    options = {}
    if "fc.weight" in state and state["fc.weight"].dim() == 2:
        options["num_classes"] = int(state["fc.weight"].shape[0])
    if "conv1.weight" in state and state["conv1.weight"].dim() == 4:
        options["in_channels"] = int(state["conv1.weight"].shape[1])
        if int(state["conv1.weight"].shape[0]) != 64:
            options["width"] = int(state["conv1.weight"].shape[0])
    return options


def _stages(keys: Sequence[str]) -> list[int]:
    return sorted({int(m.group(1)) for k in keys if (m := _LAYER.match(k))})


def block_groups(keys: Sequence[str]) -> dict[str, str]:
    """The paper's convolutional blocks: ``stem`` (conv1, bn1), ``layer1`` ... ``layer4``, ``fc``.

    Together they hold every key of a ResNet exactly once.
    """
    groups = {}
    if any(re.match(STEM_PATTERN, k) for k in keys):
        groups["stem"] = STEM_PATTERN
    groups.update({f"layer{i}": rf"layer{i}\." for i in _stages(keys)})
    if any(k.startswith("fc.") for k in keys):
        groups["fc"] = r"fc\."
    if not groups:
        raise _not_resnet(keys, "blocks")
    return groups


def subblock_groups(keys: Sequence[str]) -> dict[str, str]:
    """One group per residual block: ``layer1.0``, ``layer1.1``, ..., ``layer4.1`` (ResNet-18)."""
    blocks = sorted({(int(m.group(1)), int(m.group(2))) for k in keys if (m := _LAYER.match(k))})
    if not blocks:
        raise _not_resnet(keys, "subblocks")
    return {f"layer{i}.{j}": rf"layer{i}\.{j}\." for i, j in blocks}


def _not_resnet(keys: Sequence[str], preset: str) -> CkptscopeError:
    return CkptscopeError(
        f"preset {preset!r}: no ResNet keys (conv1, layer1.0., fc) among the keys, which start "
        f"with {list(keys)[:5]}; is this a ResNet checkpoint?"
    )


PRESETS = MappingProxyType({
    "blocks": block_groups,
    "subblocks": subblock_groups,
    "bn-stats": bn_stats,
    "bn-affine": bn_affine,
    "bn-split:stem": split_preset("stem", STEM_PATTERN),
    **{f"bn-split:layer{i}": split_preset(f"layer{i}") for i in range(1, 5)},
})

for _name, _build, _blocks in (("resnet18", resnet18, "BasicBlock [2,2,2,2]"),
                               ("resnet34", resnet34, "BasicBlock [3,4,6,3]"),
                               ("resnet50", resnet50, "Bottleneck [3,4,6,3]")):
    ADAPTERS.register(_name)(Adapter(
        name=_name,
        build=_build,
        default_data="cifar10",
        presets=PRESETS,
        infer_options=infer_options,
        description=f"CIFAR {_name.replace('resnet', 'ResNet-')} ({_blocks}, 3x3 stem, no "
                    f"max-pool; options: num_classes=10, in_channels=3, width=64)",
    ))
