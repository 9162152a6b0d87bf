"""`ckptscope path` on every adapter, random endpoints, a CIFAR directory the test writes."""

from __future__ import annotations

import pytest
import torch

from ckptscope.adapters import get_adapter
from ckptscope.checkpoints import save_checkpoint
from ckptscope.cli import main
from ckptscope.data.cifar import CIFAR10
from ckptscope.results import open_result
from tests.test_data_files import write_cifar_python

ADAPTERS = ["resnet18", "resnet34", "resnet50", "vgg11", "vgg11_bn", "mlp"]


def endpoints(tmp_path, name, options):
    torch.manual_seed(0)
    adapter = get_adapter(name)
    paths = []
    for label in ("init", "final"):
        state = adapter.make(options).state_dict()
        meta = {"adapter": name, "adapter_options": options}
        paths.append(save_checkpoint(tmp_path / f"{label}.safetensors", state, metadata=meta))
    return paths


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar_python(root, CIFAR10, n=8)
    return root


@pytest.mark.parametrize("name", ADAPTERS)
def test_path_runs_on_every_adapter(tmp_path, capsys, cifar_dir, name):
    options = {"widths": [3 * 32 * 32, 16, 10]} if name == "mlp" else {}
    a, b = endpoints(tmp_path, name, options)
    adapter = get_adapter(name)
    preset = "blocks" if "blocks" in adapter.presets else "layers"
    out = tmp_path / "r.nc"
    code = main(["path", str(a), str(b), "--data", f"cifar10:{cifar_dir}", "--data-size", "4",
                 "--alphas", "2", "--preset", preset, "--batch-size", "4", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    ds = open_result(out)
    groups = adapter.presets[preset](list(adapter.make(options).state_dict()))
    assert list(ds.group.values) == ["all", *groups]
    assert ds.attrs["adapter"] == name
    assert int(ds.n_examples.item()) == 4
    assert torch.isfinite(torch.as_tensor(ds.loss.values)).all()


def test_resnet18_blocks_sweep_with_bn_policies(tmp_path, capsys, cifar_dir):
    a, b = endpoints(tmp_path, "resnet18", {})
    for policy in ("interpolate", "recompute", "batch"):
        out = tmp_path / f"{policy}.nc"
        code = main(["path", str(a), str(b), "--data", f"cifar10:{cifar_dir}", "--data-size",
                     "4", "--alphas", "2", "--preset", "blocks", "--bn", policy,
                     "--bn-batches", "1", "--batch-size", "4", "--out", str(out)])
        assert code == 0, capsys.readouterr().err
        ds = open_result(out)
        assert ds.attrs["bn_policy"] == policy
        assert list(ds.group.values) == ["all", "stem", "layer1", "layer2", "layer3", "layer4",
                                         "fc"]
