"""Shared fixtures: small models and data, built deterministically."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ckptscope.adapters.mlp import MLP


class SmallConvNet(nn.Module):
    """A conv net with BatchNorm (float and integer buffers) for evaluator tests."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = nn.functional.max_pool2d(x, 2)
        return self.fc(x.flatten(1))


class ViewNet(nn.Module):
    """A conv net on 3x8x8 images that flattens with ``.view``, which channels-last layout does
    not allow."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, classes)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc(h.view(h.size(0), -1))


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models on a shared 2-core machine run many times faster
    (``pytestmark = pytest.mark.usefixtures("one_thread")`` in a training test module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def spiral_recipe(**changes):
    """The spiral MLP's recipe (Fig. 1a) on 64 + 32 spiral points, with ``changes``
    (``epochs=3``)."""
    from ckptscope.train import load_recipe, override

    return override(load_recipe("mlp-spiral-fig1a"), {"data": "spiral:64,32", **changes})


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """Run ``ckptscope ARGV`` in process: (exit code, stdout, stderr); paths may be Paths."""
    from ckptscope.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def perturbed(state: dict, scale: float, seed: int) -> dict:
    """A second endpoint: floats moved by noise; BN running var kept positive; ints bumped."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if not v.is_floating_point():
            out[k] = v + 7
        elif k.endswith("running_var"):
            out[k] = v * (1 + torch.rand(v.shape, generator=g))
        else:
            out[k] = v + scale * torch.randn(v.shape, generator=g)
    return out


@pytest.fixture
def mlp_pair():
    torch.manual_seed(0)
    module = MLP([2, 16, 16, 1])
    a = {k: v.clone() for k, v in module.state_dict().items()}
    return module, a, perturbed(a, 0.5, 1)


@pytest.fixture
def conv_pair():
    torch.manual_seed(0)
    module = SmallConvNet()
    a = perturbed(module.state_dict(), 0.1, 2)
    a = {k: (v - 7 if not v.is_floating_point() else v) for k, v in a.items()}
    return module, a, perturbed(a, 0.3, 3)


@pytest.fixture
def spiral_small():
    from ckptscope.data import load_data

    return load_data("spiral:200,150", seed=0)


@pytest.fixture
def image_data():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(37, 3, 8, 8, generator=g)
    y = torch.randint(0, 3, (37,), generator=g)
    return {"test": (x, y)}


def run_path(ev, a, b, keys, alphas, *, hold="end", progress=None):
    """One path on an evaluator, ``a`` and ``b`` the anchors (what ``linear_path`` asks)."""
    from ckptscope.points import path_points

    points = path_points(alphas, keys, hold=hold, every=list(a))
    return ev.evaluate({"start": a, "end": b}, [points], progress=progress)[0]


def run_paths(ev, a, b, items, *, hold="end", progress=None, done=None):
    """Several paths, each ``(keys, alphas)``, in one call of the evaluator."""
    from ckptscope.points import path_points

    requests = [path_points(alphas, keys, hold=hold, every=list(a)) for keys, alphas in items]
    return ev.evaluate({"start": a, "end": b}, requests, progress=progress, done=done)
