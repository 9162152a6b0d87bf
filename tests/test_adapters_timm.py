"""The ``timm:NAME`` adapters, against a stand-in ``timm`` module injected into sys.modules
(timm itself is never installed for the tests)."""

from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

import ckptscope
from ckptscope.adapters import get_adapter, registered
from ckptscope.adapters.timm import block_groups, module_groups
from ckptscope.checkpoints import save_checkpoint
from ckptscope.errors import CkptscopeError
from tests.conftest import run_cli as run


class TinyNet(nn.Module):
    """A timm-style conv net: ``conv_stem``, ``bn1``, ``blocks.N``, ``classifier``."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0):
        super().__init__()
        self.conv_stem = nn.Conv2d(in_chans, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.blocks = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 6, 1))
        self.num_classes = num_classes
        self.classifier = nn.Linear(6, num_classes) if num_classes else nn.Identity()
        self.pretrained_cfg = {"classifier": "classifier", "first_conv": "conv_stem"}

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv_stem(x)))
        x = self.blocks(x).mean((2, 3))
        return self.classifier(x)


@pytest.fixture
def fake_timm(monkeypatch):
    """A ``timm`` module whose ``create_model`` knows ``tinynet``; its calls are recorded."""
    module = types.ModuleType("timm")
    module.calls = []

    def create_model(name, pretrained=False, **kwargs):
        module.calls.append((name, pretrained, dict(kwargs)))
        if name != "tinynet":
            raise RuntimeError(f"Unknown model ({name})")
        return TinyNet(**kwargs)

    module.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", module)
    return module


@pytest.fixture
def pair():
    torch.manual_seed(0)
    a = TinyNet(num_classes=5, in_chans=1).state_dict()
    b = {k: (v + 0.2 * torch.randn_like(v) if v.is_floating_point() and "running" not in k
             else v.clone()) for k, v in a.items()}
    return a, b


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 1, 6, 6, generator=g), torch.randint(0, 5, (24,), generator=g)
    return {"test": (x, y)}


def _reference(state, data):
    """Mean cross entropy and accuracy of a TinyNet loaded with ``state`` (a plain loop)."""
    model = TinyNet(num_classes=5, in_chans=1)
    model.load_state_dict(state)
    model.eval()
    x, y = data["test"]
    with torch.no_grad():
        out = model(x)
    return (nn.functional.cross_entropy(out, y).item(),
            (out.argmax(1) == y).float().mean().item())


def test_timm_adapter_reads_options_and_matches_a_plain_loop(fake_timm, pair, data):
    a, b = pair
    ds = ckptscope.linear_path(a, b, "timm:tinynet", data, alphas=3, groups=["blocks"])
    assert ds.attrs["adapter"] == "timm:tinynet"
    assert ('tinynet', False, {"num_classes": 5, "in_chans": 1}) in fake_timm.calls
    assert all(pretrained is False for _, pretrained, _ in fake_timm.calls)
    for alpha, state in ((0.0, a), (1.0, b)):
        loss, acc = _reference(state, data)
        got = ds.sel(group="all", split="test", alpha=alpha)
        np.testing.assert_allclose(got.loss.item(), loss, rtol=1e-5)
        np.testing.assert_allclose(got.accuracy.item(), acc)
    mid = {k: (0.5 * a[k] + 0.5 * b[k]) if a[k].is_floating_point() else b[k] for k in a}
    np.testing.assert_allclose(ds.loss.sel(group="all", split="test", alpha=0.5).item(),
                               _reference(mid, data)[0], rtol=1e-5)


def test_timm_options_headless_and_fallbacks(fake_timm, pair):
    a, _ = pair
    adapter = get_adapter("timm:tinynet")
    assert adapter is get_adapter("timm:tinynet") and registered(adapter)
    assert adapter.options_for(a, None) == {"num_classes": 5, "in_chans": 1}
    headless = {k: v for k, v in a.items() if not k.startswith("classifier.")}
    assert adapter.options_for(headless, None) == {"num_classes": 0, "in_chans": 1}
    assert adapter.options_for(a, {"drop_rate": 0.1})["drop_rate"] == 0.1


def test_timm_presets(pair):
    keys = list(pair[0])
    assert list(module_groups(keys)) == ["conv_stem", "bn1", "blocks", "classifier"]
    assert block_groups(keys) == {"blocks.0": r"blocks\.0\.", "blocks.1": r"blocks\.1\."}
    assert list(block_groups(["stages.0.blocks.1.w", "stages.1.w", "layer2.0.conv.w"])) == [
        "stages.0", "stages.1", "layer2.0"]
    with pytest.raises(CkptscopeError, match="found no numbered block"):
        block_groups(["fc.weight"])


@pytest.mark.parametrize("spec, options, match", [
    ("timm:nosuchnet", {}, r"timm.create_model\('nosuchnet'.*Unknown model \(nosuchnet\)\); check "
                           r"the name \(timm.list_models\('nosuchnet\*'\)\)"),
    ("timm:tinynet", {"pretrained": True}, "option 'pretrained' would have timm load weights"),
    ("timm:tinynet", {"checkpoint_path": "/x.pth"}, "option 'checkpoint_path' would have timm"),
    ("timm:tinynet", {"widths": 3}, "unexpected keyword argument 'widths'"),
])
def test_timm_bad_names_and_options(fake_timm, spec, options, match):
    with pytest.raises(CkptscopeError, match=match):
        get_adapter(spec).make(options)


@pytest.mark.parametrize("spec", ["timm:../evil", "timm:a/b", "timm:", "timm:x y",
                                  "timm:" + "a" * 129])
def test_timm_name_is_validated(spec):
    with pytest.raises(CkptscopeError, match="takes a name of up to 128 letters"):
        get_adapter(spec)


def test_missing_timm_is_one_line_with_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(CkptscopeError, match=r"need timm, .*install it with `pip install timm`"):
        get_adapter("timm:resnet18").make({})


# --- the command line ----------------------------------------------------------------------
@pytest.fixture
def files(tmp_path, pair, data):
    torch.save(data["test"], tmp_path / "unused.pt")
    a, b = pair

    def save(meta):
        return [str(save_checkpoint(tmp_path / f"{n}.safetensors", s, metadata=meta))
                for n, s in (("a", a), ("b", b))]

    return save


def test_cli_adapter_timm_and_metadata_entry(fake_timm, files, tmp_path, capsys, monkeypatch):
    module = types.ModuleType("timm_test_data")
    g = torch.Generator().manual_seed(1)
    module.DATA = (torch.randn(20, 1, 6, 6, generator=g), torch.randint(0, 5, (20,), generator=g))
    monkeypatch.setitem(sys.modules, "timm_test_data", module)
    plain = files({})
    code, out, err = run(["path", *plain, "--adapter", "timm:tinynet", "--data",
                          "timm_test_data:DATA", "--alphas", "3", "--preset", "blocks"], capsys)
    assert code == 0, err
    assert "blocks.0" in out and "blocks.1" in out
    # A file may name the registry entry timm:NAME: no --adapter needed.
    named = files({"adapter": "timm:tinynet"})
    code, out, err = run(["path", *named, "--data", "timm_test_data:DATA", "--alphas", "3",
                          "--out", str(tmp_path / "r.nc")], capsys)
    assert code == 0, err
    assert ckptscope.open_result(tmp_path / "r.nc").attrs["adapter"] == "timm:tinynet"


@pytest.mark.parametrize("value", ["timm:../evil", "timm:os.system;x"])
def test_cli_metadata_timm_name_is_validated(fake_timm, files, capsys, value):
    code, _, err = run(["path", *files({"adapter": value}), "--data", "spiral"], capsys)
    assert code == 2 and err.count("\n") == 1 and "not a built-in adapter" in err, err
    assert len(fake_timm.calls) == 0


def test_cli_missing_timm_is_one_line(files, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    code, _, err = run(["path", *files({}), "--adapter", "timm:resnet18", "--data", "spiral"],
                       capsys)
    assert code == 2 and err.count("\n") == 1 and "pip install timm" in err, err


def test_list_shows_the_timm_family(capsys):
    code, out, _ = run(["list"], capsys)
    assert code == 0 and "timm:NAME" in out


def test_import_ckptscope_imports_neither_timm_nor_rich():
    code = ("import sys, ckptscope, ckptscope.adapters.timm; "
            "print(sorted(m for m in ('timm', 'rich') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
