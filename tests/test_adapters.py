"""The built-in adapters: modules, key names, parameter counts, options, presets, a full path."""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import ckptscope
from ckptscope import ADAPTERS, CkptscopeError, get_adapter
from ckptscope.adapters.mlp import MLP, infer_widths, layer_groups
from ckptscope.adapters.presets import bn_split
from ckptscope.groups import resolve_groups

IMAGE_ADAPTERS = ["resnet18", "resnet34", "resnet50", "vgg11", "vgg11_bn"]
BN_ADAPTERS = ["resnet18", "resnet34", "resnet50", "vgg11_bn"]

# Counted by hand. ResNet: stem 6 entries (conv1.weight + 5 of bn1), a BasicBlock 12 (2 convs,
# 2 BNs of weight, bias, running_mean, running_var, num_batches_tracked), a Bottleneck 18, a
# downsample 6 more, fc 2: ResNet-18 6 + 8 * 12 + 3 * 6 + 2 = 122. VGG-11: 8 convs of weight and
# bias (+ 5 BN entries each for _bn) and the classifier's 2: 18 and 58.
N_KEYS = {"resnet18": 122, "resnet34": 218, "resnet50": 320, "vgg11": 18, "vgg11_bn": 58}
# Published counts of torchvision's ImageNet models minus the 7x7 stem (9,408 -> 1,728 weights)
# and the 1000-class fc; VGG-11 summed layer by layer (convs 9,220,480, BN 5,504, fc 5,130).
N_PARAMS = {"resnet18": 11_173_962, "resnet34": 21_282_122, "resnet50": 23_520_842,
            "vgg11": 9_225_610, "vgg11_bn": 9_231_114}

RESNET18_FIRST_KEYS = [
    "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
    "bn1.num_batches_tracked", "layer1.0.conv1.weight", "layer1.0.bn1.weight",
    "layer1.0.bn1.bias", "layer1.0.bn1.running_mean", "layer1.0.bn1.running_var",
    "layer1.0.bn1.num_batches_tracked", "layer1.0.conv2.weight", "layer1.0.bn2.weight",
]
RESNET18_LAST_KEYS = [
    "layer4.1.conv2.weight", "layer4.1.bn2.weight", "layer4.1.bn2.bias",
    "layer4.1.bn2.running_mean", "layer4.1.bn2.running_var", "layer4.1.bn2.num_batches_tracked",
    "fc.weight", "fc.bias",
]
RESNET18_DOWNSAMPLE_KEYS = [
    "layer2.0.downsample.0.weight", "layer2.0.downsample.1.weight", "layer2.0.downsample.1.bias",
    "layer2.0.downsample.1.running_mean", "layer2.0.downsample.1.running_var",
    "layer2.0.downsample.1.num_batches_tracked",
]
# torchvision's VGG-11 feature indices: conv at 0, 3, 6, 8, 11, 13, 16, 18 (no BN); with BN the
# conv, its BN, ReLU take three slots: convs at 0, 4, 8, 11, 15, 18, 22, 25.
VGG_CONV_INDICES = {"vgg11": [0, 3, 6, 8, 11, 13, 16, 18],
                    "vgg11_bn": [0, 4, 8, 11, 15, 18, 22, 25]}


@pytest.fixture(scope="module")
def states():
    """One state dict per image adapter, built once (ResNet-50 takes a moment)."""
    torch.manual_seed(0)
    return {name: get_adapter(name).make({}).state_dict() for name in IMAGE_ADAPTERS}


def _match(pattern: str, keys) -> list[str]:
    regex = re.compile(pattern)
    return [k for k in keys if regex.match(k)]


# --- modules ------------------------------------------------------------------------------------
def test_adapters_registered_all_covered():
    own_tests = {"mlp", "huggingface"}  # huggingface: tests/test_huggingface.py
    missing = sorted(set(ADAPTERS) - set(IMAGE_ADAPTERS) - own_tests)
    assert not missing, f"add {missing} to IMAGE_ADAPTERS (or to their own tests)"


@pytest.mark.parametrize("name", IMAGE_ADAPTERS)
@pytest.mark.parametrize("num_classes", [10, 100])
def test_adapter_forward_shape(name, num_classes):
    module = get_adapter(name).make({"num_classes": num_classes}).eval()
    with torch.no_grad():
        out = module(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", IMAGE_ADAPTERS)
def test_adapter_counts(name, states):
    state = states[name]
    assert len(state) == N_KEYS[name]
    module = get_adapter(name).make({})
    assert sum(p.numel() for p in module.parameters()) == N_PARAMS[name]


def test_resnet18_keys_torchvision_names(states):
    keys = list(states["resnet18"])
    assert keys[: len(RESNET18_FIRST_KEYS)] == RESNET18_FIRST_KEYS
    assert keys[-len(RESNET18_LAST_KEYS):] == RESNET18_LAST_KEYS
    start = keys.index("layer2.0.downsample.0.weight")
    assert keys[start:start + 6] == RESNET18_DOWNSAMPLE_KEYS
    assert not any("downsample" in k for k in keys if k.startswith(("layer1.", "layer2.1.")))
    assert states["resnet18"]["conv1.weight"].shape == (64, 3, 3, 3)  # the CIFAR stem
    assert states["resnet18"]["fc.weight"].shape == (10, 512)


def test_resnet50_bottleneck_shapes(states):
    state = states["resnet50"]
    assert state["layer1.0.conv1.weight"].shape == (64, 64, 1, 1)
    assert state["layer1.0.conv3.weight"].shape == (256, 64, 1, 1)
    assert state["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert state["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)  # stride on the 3x3 (v1.5)
    assert state["fc.weight"].shape == (10, 2048)


@pytest.mark.parametrize("name", ["vgg11", "vgg11_bn"])
def test_vgg_keys_torchvision_indices(name, states):
    keys = list(states[name])
    convs = sorted({int(k.split(".")[1]) for k in keys
                    if k.startswith("features.") and states[name][k].dim() == 4})
    assert convs == VGG_CONV_INDICES[name]
    assert keys[-2:] == ["classifier.weight", "classifier.bias"]
    assert states[name]["classifier.weight"].shape == (10, 512)
    if name == "vgg11_bn":
        assert "features.1.running_mean" in keys and "features.26.running_var" in keys


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn"])
def test_adapter_init_torchvision_scheme(name, states):
    state = states[name]
    conv = "layer4.0.conv2.weight" if name == "resnet18" else "features.25.weight"
    fan_out = state[conv].shape[0] * state[conv][0, 0].numel()
    assert state[conv].std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.02)
    bn = "layer3.1.bn2" if name == "resnet18" else "features.12"
    assert torch.equal(state[f"{bn}.weight"], torch.ones_like(state[f"{bn}.weight"]))
    assert torch.equal(state[f"{bn}.bias"], torch.zeros_like(state[f"{bn}.bias"]))


@pytest.mark.parametrize("name", IMAGE_ADAPTERS)
def test_infer_options_round_trip(name):
    adapter = get_adapter(name)
    options = {"num_classes": 7, "in_channels": 1}
    state = adapter.make(options).state_dict()
    assert adapter.infer_options(state) == options
    assert adapter.options_for(state, None) == options
    assert adapter.infer_options({}) == {}


@pytest.mark.parametrize("name", IMAGE_ADAPTERS)
def test_adapter_bad_options_raise(name):
    adapter = get_adapter(name)
    with pytest.raises(CkptscopeError, match="num_classes=0 must be a positive integer"):
        adapter.make({"num_classes": 0})
    with pytest.raises(CkptscopeError, match="bad options|widths"):
        adapter.make({"widths": [2, 1]})


def test_adapter_loss_and_data():
    for name in IMAGE_ADAPTERS:
        adapter = get_adapter(name)
        assert adapter.loss({}) == "cross_entropy"
        assert adapter.default_data == "cifar10"
        assert adapter.description


# --- presets ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", IMAGE_ADAPTERS)
def test_presets_every_group_matches(name, states):
    keys = list(states[name])
    for preset, fn in get_adapter(name).presets.items():
        groups = fn(keys)
        assert groups, preset
        for group in resolve_groups(keys, groups, full=False):
            assert group.keys, (preset, group.name)


@pytest.mark.parametrize("name", IMAGE_ADAPTERS)
def test_blocks_cover_every_key_once(name, states):
    keys = list(states[name])
    groups = get_adapter(name).presets["blocks"](keys)
    selected = [k for pattern in groups.values() for k in _match(pattern, keys)]
    assert sorted(selected) == sorted(keys)


def test_resnet18_blocks_names_and_sizes(states):
    keys = list(states["resnet18"])
    groups = get_adapter("resnet18").presets["blocks"](keys)
    sizes = {name: len(_match(p, keys)) for name, p in groups.items()}
    # layer1: 2 blocks x 12; layer2-4: 2 x 12 + a downsample of 6.
    assert sizes == {"stem": 6, "layer1": 24, "layer2": 30, "layer3": 30, "layer4": 30, "fc": 2}


def test_vgg_blocks_conv_with_its_bn(states):
    keys = list(states["vgg11_bn"])
    groups = get_adapter("vgg11_bn").presets["blocks"](keys)
    assert list(groups) == [f"conv{i}" for i in range(1, 9)] + ["classifier"]
    assert _match(groups["conv4"], keys) == [
        "features.11.weight", "features.11.bias", "features.12.weight", "features.12.bias",
        "features.12.running_mean", "features.12.running_var", "features.12.num_batches_tracked"]
    plain = get_adapter("vgg11").presets["blocks"](list(states["vgg11"]))
    assert _match(plain["conv4"], states["vgg11"]) == ["features.8.weight", "features.8.bias"]


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_subblocks_disjoint_one_per_block(name, states):
    keys = list(states[name])
    groups = get_adapter(name).presets["subblocks"](keys)
    depths = {"resnet18": [2, 2, 2, 2], "resnet50": [3, 4, 6, 3]}[name]
    assert list(groups) == [f"layer{i + 1}.{j}" for i, d in enumerate(depths) for j in range(d)]
    selected = [k for p in groups.values() for k in _match(p, keys)]
    assert len(selected) == len(set(selected))
    assert sorted(selected) == sorted(k for k in keys if k.startswith("layer"))


@pytest.mark.parametrize("name", BN_ADAPTERS)
def test_bn_stats_affine_disjoint_exact(name, states):
    keys = list(states[name])
    presets = get_adapter(name).presets
    stats = _match(presets["bn-stats"](keys)["bn-stats"], keys)
    affine = _match(presets["bn-affine"](keys)["bn-affine"], keys)
    norms = [k.rsplit(".", 1)[0] for k in keys if k.endswith(".running_mean")]
    assert stats == [f"{p}.{s}" for p in norms for s in ("running_mean", "running_var")]
    assert affine == [f"{p}.{s}" for p in norms for s in ("weight", "bias")]
    assert not set(stats) & set(affine)


def test_bn_presets_resnet18_counts(states):
    keys = list(states["resnet18"])
    presets = get_adapter("resnet18").presets
    # 20 BN layers: bn1, 16 in the blocks, 3 in the downsamples.
    assert len(_match(presets["bn-stats"](keys)["bn-stats"], keys)) == 40
    assert len(_match(presets["bn-affine"](keys)["bn-affine"], keys)) == 40
    assert not _match(presets["bn-affine"](keys)["bn-affine"], ["layer1.0.conv1.weight"])


@pytest.mark.parametrize("block", ["stem", "layer1", "layer2", "layer3", "layer4"])
def test_bn_split_partitions_block(block, states):
    keys = list(states["resnet18"])
    groups = get_adapter("resnet18").presets[f"bn-split:{block}"](keys)
    assert list(groups) == [f"{block}-conv", f"{block}-bn-affine", f"{block}-bn-stats"]
    parts = [_match(p, keys) for p in groups.values()]
    inside = _match(get_adapter("resnet18").presets["blocks"](keys)[block], keys)
    flat = [k for part in parts for k in part]
    assert len(flat) == len(set(flat))
    assert sorted(flat) == sorted(k for k in inside if not k.endswith("num_batches_tracked"))
    conv, affine, stats = parts
    assert all(k.endswith(".weight") and "bn" not in k and "downsample.1" not in k for k in conv)
    assert all(k.endswith((".weight", ".bias")) for k in affine)
    assert all(k.endswith(("running_mean", "running_var")) for k in stats)


def test_bn_split_layer3_holds_downsample(states):
    keys = list(states["resnet18"])
    groups = bn_split(keys, "layer3")
    assert "layer3.0.downsample.0.weight" in _match(groups["layer3-conv"], keys)
    assert "layer3.0.downsample.1.weight" in _match(groups["layer3-bn-affine"], keys)
    assert "layer3.0.downsample.1.running_var" in _match(groups["layer3-bn-stats"], keys)


def test_vgg_bn_split_conv(states):
    keys = list(states["vgg11_bn"])
    groups = get_adapter("vgg11_bn").presets["bn-split:conv4"](keys)
    assert [_match(p, keys) for p in groups.values()] == [
        ["features.11.weight", "features.11.bias"], ["features.12.weight", "features.12.bias"],
        ["features.12.running_mean", "features.12.running_var"]]


def test_presets_anchored_at_module_boundaries():
    fake = ["layer1x.0.conv1.weight", "layer10.0.conv1.weight", "layer1.10.conv1.weight",
            "module.layer1.0.conv1.weight", "fcx.weight", "conv10.weight", "bn1x.weight",
            "layer1.0.conv1.weight", "layer1.1.conv1.weight", "conv1.weight", "bn1.weight",
            "bn1.running_mean", "fc.weight"]
    blocks = get_adapter("resnet18").presets["blocks"](fake)
    assert _match(blocks["layer1"], fake) == [
        "layer1.10.conv1.weight", "layer1.0.conv1.weight", "layer1.1.conv1.weight"]
    assert _match(blocks["layer10"], fake) == ["layer10.0.conv1.weight"]
    assert _match(blocks["stem"], fake) == ["conv1.weight", "bn1.weight", "bn1.running_mean"]
    assert _match(blocks["fc"], fake) == ["fc.weight"]
    subblocks = get_adapter("resnet18").presets["subblocks"](fake)
    assert _match(subblocks["layer1.1"], fake) == ["layer1.1.conv1.weight"]
    assert _match(subblocks["layer1.10"], fake) == ["layer1.10.conv1.weight"]
    assert _match(subblocks["layer1.0"], fake) == ["layer1.0.conv1.weight"]
    vgg = get_adapter("vgg11").presets["blocks"](["features.0.weight", "features.1.weight",
                                                   "features.10.weight", "features.0x.weight"])
    assert _match(vgg["conv1"], ["features.0.weight", "features.0x.weight",
                                 "features.00.weight"]) == ["features.0.weight"]
    assert _match(vgg["conv2"], ["features.1.weight", "features.10.weight"]) == [
        "features.1.weight"]


def test_bn_presets_without_bn_raise(states):
    keys = list(states["vgg11"])
    with pytest.raises(CkptscopeError, match="no BatchNorm layer"):
        get_adapter("resnet18").presets["bn-stats"](keys)
    with pytest.raises(CkptscopeError, match="no BatchNorm layer"):
        get_adapter("resnet18").presets["bn-affine"](keys)
    with pytest.raises(CkptscopeError, match="block 'conv1'.*no BatchNorm layer"):
        bn_split(keys, "conv1", pattern=r"features\.0\.")
    assert "bn-stats" not in get_adapter("vgg11").presets


def test_presets_wrong_architecture_raise(states):
    with pytest.raises(CkptscopeError, match="is this a ResNet checkpoint"):
        get_adapter("resnet18").presets["blocks"](list(states["vgg11"]))
    with pytest.raises(CkptscopeError, match="is this a VGG checkpoint"):
        get_adapter("vgg11").presets["blocks"](list(states["resnet18"]))
    with pytest.raises(CkptscopeError, match=r"block 'layer9' \(regex 'layer9\\\\\.'\) matched no"):
        bn_split(list(states["resnet18"]), "layer9")
    with pytest.raises(CkptscopeError, match="has 3 conv layers"):
        get_adapter("vgg11_bn").presets["bn-split:conv8"](list(states["vgg11_bn"])[:20])


# --- MLP with BatchNorm -------------------------------------------------------------------------
def test_mlp_default_keys_unchanged():
    keys = list(MLP([2, 5, 5, 1]).state_dict())
    assert keys == [f"layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    assert infer_widths(MLP([2, 5, 5, 1]).state_dict()) == {"widths": [2, 5, 5, 1]}


def test_mlp_batchnorm_keys_forward_infer():
    module = MLP([4, 6, 5, 3], batchnorm=True)
    state = module.state_dict()
    assert [k for k in state if k.startswith("norms.")] == [
        f"norms.{i}.{s}" for i in range(2)
        for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    assert state["norms.1.weight"].shape == (5,)
    assert module.eval()(torch.randn(3, 4)).shape == (3, 3)
    assert infer_widths(state) == {"widths": [4, 6, 5, 3], "batchnorm": True}
    assert get_adapter("mlp").options_for(state, None) == {"widths": [4, 6, 5, 3],
                                                          "batchnorm": True}


def test_mlp_batchnorm_presets():
    keys = list(MLP([4, 6, 5, 3], batchnorm=True).state_dict())
    layers = layer_groups(keys)
    assert _match(layers["layer1"], keys) == ["layers.0.weight", "layers.0.bias"] + [
        f"norms.0.{s}" for s in ("weight", "bias", "running_mean", "running_var",
                                 "num_batches_tracked")]
    assert _match(layers["layer3"], keys) == ["layers.2.weight", "layers.2.bias"]
    presets = get_adapter("mlp").presets
    assert _match(presets["bn-stats"](keys)["bn-stats"], keys) == [
        "norms.0.running_mean", "norms.0.running_var", "norms.1.running_mean",
        "norms.1.running_var"]
    assert len(_match(presets["bn-affine"](keys)["bn-affine"], keys)) == 4
    with pytest.raises(CkptscopeError, match="no BatchNorm layer"):
        presets["bn-stats"](list(MLP([2, 3, 1]).state_dict()))


def test_mlp_batchnorm_bad_value_raises():
    with pytest.raises(CkptscopeError, match="batchnorm='yes' must be true or false"):
        MLP([2, 3, 1], batchnorm="yes")


# --- a whole path -------------------------------------------------------------------------------
def _endpoints(name: str, seed: int) -> tuple[dict, dict]:
    """Two random states; the second with moved BN statistics, so every group matters."""
    adapter = get_adapter(name)
    torch.manual_seed(seed)
    a = adapter.make({}).state_dict()
    b = adapter.make({}).state_dict()
    g = torch.Generator().manual_seed(seed)
    for k, v in b.items():
        if k.endswith("running_mean"):
            v.add_(0.1 * torch.randn(v.shape, generator=g))
        elif k.endswith("running_var"):
            v.mul_(1 + torch.rand(v.shape, generator=g))
    return a, b


def _cifar_like(n: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_linear_path_resnet18_blocks():
    a, b = _endpoints("resnet18", 0)
    x, y = _cifar_like(16, 1)
    groups = get_adapter("resnet18").presets["blocks"](list(a))
    ds = ckptscope.linear_path(a, b, "resnet18", (x, y), groups=groups, alphas=3, device="cpu",
                               config=ckptscope.EvalConfig(batch_size=8))
    assert list(ds.group.values) == ["all", "stem", "layer1", "layer2", "layer3", "layer4", "fc"]
    loss = ds.loss.sel(split="eval").values[0]
    assert loss.shape == (7, 3) and np.isfinite(loss).all()
    # At alpha = 1 every path sits at b; at alpha = 0 the whole model is a.
    np.testing.assert_allclose(loss[:, -1], loss[0, -1], rtol=1e-6)
    module = get_adapter("resnet18").make({})
    module.load_state_dict(a)
    with torch.no_grad():
        reference = torch.nn.functional.cross_entropy(module.eval()(x), y).item()
    assert loss[0, 0] == pytest.approx(reference, rel=1e-5)
    assert ds.attrs["adapter"] == "resnet18"
    assert ds.attrs["adapter_options"] == '{"in_channels": 3, "num_classes": 10}'


def test_linear_path_bn_split_vmap_equals_loop():
    a, b = _endpoints("resnet18", 2)
    x, y = _cifar_like(8, 3, size=16)  # small images: the BN buffers matter, not the pixels
    groups = get_adapter("resnet18").presets["bn-split:layer3"](list(a))
    runs = [ckptscope.linear_path(a, b, "resnet18", (x, y), groups=groups, alphas=3, full=False,
                                  device="cpu",
                                  config=ckptscope.EvalConfig(batch_size=8, strategy=s))
            for s in ("loop", "vmap")]
    assert list(runs[0].group.values) == ["layer3-conv", "layer3-bn-affine", "layer3-bn-stats"]
    np.testing.assert_allclose(runs[1].loss.values, runs[0].loss.values, rtol=1e-4, atol=1e-5)
    assert np.isfinite(runs[0].loss.values).all()


# --- the documented custom adapter --------------------------------------------------------------
def test_custom_adapter_example_imports_by_spec(monkeypatch):
    examples = Path(__file__).resolve().parents[1] / "examples"
    monkeypatch.syspath_prepend(str(examples))
    module = importlib.import_module("custom_adapter")
    adapter = get_adapter("custom_adapter:ADAPTER")
    assert adapter is module.ADAPTER and adapter.name == "custom_adapter:ADAPTER"
    state = adapter.make({"num_classes": 3, "width": 4}).state_dict()
    assert adapter.options_for(state, None) == {"num_classes": 3, "width": 4}
    keys = list(state)
    selected = [k for p in adapter.presets["blocks"](keys).values() for k in _match(p, keys)]
    assert sorted(selected) == sorted(keys)
    ds = module.run(steps=3, alphas=3)
    assert list(ds.group.values) == ["all", "conv1", "conv2", "fc"]
    assert np.isfinite(ds.loss.values).all()


def test_resnet_width_is_read_off_the_checkpoint_when_not_64():
    from ckptscope.adapters.resnet import resnet18

    narrow = resnet18(num_classes=3, width=8).state_dict()
    adapter = get_adapter("resnet18")
    assert adapter.options_for(narrow, None) == {"num_classes": 3, "in_channels": 3, "width": 8}
    assert "width" not in adapter.options_for(resnet18().state_dict(), None)
    module = adapter.make(adapter.options_for(narrow, None), like=narrow)
    assert module.conv1.out_channels == 8 and module.fc.in_features == 64
