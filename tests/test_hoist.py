"""Hoisting the alpha-invariant prefix: equal to the plain evaluator, and actually used."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from ckptscope.adapters import get_adapter
from ckptscope.engine import EvalConfig, Evaluator
from ckptscope.engine.deferred import Deferred
from ckptscope.engine.hoist import split_forward, trace
from ckptscope.engine.strategies import frontiers
from tests.conftest import perturbed, run_path
from tests.reference import reference_path

ALPHAS = np.linspace(0, 1, 4)


def curves(module, a, b, data, keys, *, loss="cross_entropy", strategy="loop", hoist=True, bs=8):
    ev = Evaluator(
        module,
        data,
        loss=loss,
        config=EvalConfig(strategy=strategy, batch_size=bs, hoist=hoist),
    )
    return run_path(ev, a, b, keys, ALPHAS)["test"], ev.hoisted


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("group", [r"layers\.1\.", r"layers\.2\."])
def test_hoisted_equals_plain_mlp(mlp_pair, spiral_small, strategy, group):
    import re

    module, a, b = mlp_pair
    keys = [k for k in a if re.match(group, k)]
    (loss, acc), used = curves(module, a, b, spiral_small, keys, loss="bce", strategy=strategy)
    (plain, plain_acc), unused = curves(
        module, a, b, spiral_small, keys, loss="bce", strategy=strategy, hoist=False
    )
    assert used == 1 and unused == 0
    np.testing.assert_allclose(loss, plain, rtol=1e-5)
    np.testing.assert_allclose(acc, plain_acc, atol=1.5 / 150)


@pytest.mark.parametrize(
    "name, group",
    [
        ("resnet18", "layer4."),
        ("resnet18", "fc."),
        ("resnet18", "layer2.1."),
        ("vgg11_bn", "features.8."),
        ("vgg11", "classifier."),
    ],
)
@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_hoisted_equals_reference_conv_nets(name, group, strategy):
    torch.manual_seed(0)
    module = get_adapter(name).make({})
    a = {k: v.clone() for k, v in module.state_dict().items()}
    b = perturbed(a, 0.02, 4)
    b = {k: (v - 7 if not v.is_floating_point() else v) for k, v in b.items()}
    x, y = torch.randn(12, 3, 32, 32), torch.randint(0, 10, (12,))
    keys = [k for k in a if k.startswith(group)]
    (loss, _), used = curves(module, a, b, {"test": (x, y)}, keys, strategy=strategy)
    assert used == 1
    want, _ = reference_path(module, a, b, keys, ALPHAS, x, y, batch_size=8)
    np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_split_forward_skips_when_nothing_to_hoist(conv_pair):
    module, a, _ = conv_pair
    gm = trace(module)
    assert split_forward(gm, ["conv.weight"]) is None  # the first layer: nothing upstream
    assert split_forward(gm, ["unused.weight"]) is None  # the output does not depend on it
    split = split_forward(gm, ["fc.weight", "fc.bias"])
    assert split is not None and split.n_hoisted > 0


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:  # data-dependent control flow: fx cannot trace it
            h = h * 2
        return self.b(h)


def test_untraceable_model_falls_back_with_one_warning():
    torch.manual_seed(0)
    module = Untraceable()
    a = module.state_dict()
    b = perturbed(a, 0.3, 1)
    data = {"test": (torch.randn(9, 2), torch.randint(0, 2, (9,)))}
    ev = Evaluator(module, data, loss="cross_entropy", config=EvalConfig())
    with pytest.warns(UserWarning, match="cannot be traced"):
        loss, _ = run_path(ev, a, b, ["b.weight", "b.bias"], ALPHAS)["test"]
    run_path(ev, a, b, ["b.weight"], ALPHAS)  # no second warning: the trace is not retried
    want, _ = reference_path(module, a, b, ["b.weight", "b.bias"], ALPHAS, *data["test"])
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert ev.hoisted == 0


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_hoisted_batch_outer_when_frontiers_do_not_fit(mlp_pair, spiral_small, strategy):
    module, a, b = mlp_pair
    keys = ["layers.2.weight", "layers.2.bias"]
    results = []
    for budget in (None, 2048):  # 2 KiB: the frontiers of 150 examples (16 floats each) spill
        ev = Evaluator(
            module,
            spiral_small,
            loss="bce",
            config=EvalConfig(strategy=strategy, batch_size=16, memory_budget=budget),
        )
        split = ev.split_for(keys)
        cached = frontiers(ev.context, split, "test")
        assert (cached is None) == (budget is not None)
        results.append(run_path(ev, a, b, keys, ALPHAS)["test"][0])
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6)


class AddInPlace(nn.Module):
    """The suffix would begin by writing into a value the prefix made."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 8), nn.Linear(8, 3)
        self.bias = nn.Parameter(torch.randn(8))

    def forward(self, x):
        h = self.l1(x)
        h.add_(self.bias)
        return self.l2(h)


class ReluAfterSkip(nn.Module):
    """An in-place op of the prefix would run before a suffix op that reads its input."""

    def __init__(self):
        super().__init__()
        self.l1, self.skip, self.l2 = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        h = self.l1(x)
        y = self.skip(h)
        h = nn.functional.relu(h, inplace=True)
        return self.l2(h) + y


class ReluThroughViewAfterSkip(ReluAfterSkip):
    """As :class:`ReluAfterSkip`, the in-place op writing ``h`` through a view of it."""

    def forward(self, x):
        h = self.l1(x)
        y = self.skip(h)
        v = nn.functional.relu(h.view(-1, 8), inplace=True)
        return self.l2(v) + y


class ReluThroughFlattenModuleAfterSkip(ReluAfterSkip):
    """The view is made by a module (``nn.Flatten`` of an already flat tensor)."""

    def __init__(self):
        super().__init__()
        self.flat = nn.Flatten()

    def forward(self, x):
        h = self.l1(x)
        y = self.skip(h)
        v = torch.relu_(self.flat(h))
        return self.l2(v) + y


class TiedAfterPre(nn.Module):
    """As :class:`Tied` behind a first layer, so both uses of the tied weight are downstream of
    anything hoisted."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.enc = nn.Linear(4, 4, bias=False)
        self.mid, self.dec = nn.Linear(4, 4), nn.Linear(4, 4)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.tanh(self.mid(self.enc(torch.tanh(self.pre(x))))))


class Tied(nn.Module):
    """enc.weight and dec.weight are one Parameter."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 4, bias=False)
        self.mid, self.dec = nn.Linear(4, 4), nn.Linear(4, 4)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.tanh(self.mid(self.enc(x))))


@pytest.mark.parametrize(
    "make, keys",
    [
        (AddInPlace, ["bias"]),
        (ReluAfterSkip, ["skip.weight", "skip.bias"]),
        (ReluThroughViewAfterSkip, ["skip.weight", "skip.bias"]),
        (ReluThroughFlattenModuleAfterSkip, ["skip.weight", "skip.bias"]),
        (Tied, ["dec.weight"]),
        (Tied, ["enc.weight"]),
        (TiedAfterPre, ["dec.weight"]),
        (TiedAfterPre, ["mid.weight", "dec.weight", "dec.bias"]),
    ],
)
@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_inplace_ops_and_tied_weights_keep_hoisting_exact(make, keys, strategy):
    torch.manual_seed(0)
    module = make()
    a = {k: v.clone() for k, v in module.state_dict().items()}
    b = perturbed(a, 0.5, 3)
    if make in (Tied, TiedAfterPre):
        b["dec.weight"] = b["enc.weight"]
    g = torch.Generator().manual_seed(1)
    data = {"test": (torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g))}
    with warnings.catch_warnings(record=True) as caught:  # vmap refuses AddInPlace: the loop
        warnings.simplefilter("always")
        (hoisted, _), n_hoisted = curves(module, a, b, data, keys, strategy=strategy)
        (plain, _), _ = curves(module, a, b, data, keys, strategy=strategy, hoist=False)
    vectorisable = not (strategy == "vmap" and make is AddInPlace)
    assert vectorisable == (not any("cannot be vectorised" in str(w.message) for w in caught))
    np.testing.assert_allclose(hoisted, plain, rtol=1e-6)
    if make is TiedAfterPre:  # a tied tensor moves under both names, as the reference has it
        assert n_hoisted == 1
        named = sorted({*keys, "enc.weight", "dec.weight"})
        ref = reference_path(module, a, b, named, ALPHAS, *data["test"])[0]
        np.testing.assert_allclose(hoisted, ref, rtol=1e-6)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_hoisted_progress_moves_per_alpha_and_counts_once_after_a_fallback(
    mlp_pair, spiral_small, strategy, monkeypatch
):
    module, a, b = mlp_pair
    keys = ["layers.2.weight", "layers.2.bias"]
    grid = np.linspace(0, 1, 9)
    data = {"test": spiral_small["test"]}  # 150 points: 3 batches per alpha
    ev = Evaluator(module, data, loss="bce",
                   config=EvalConfig(strategy=strategy, batch_size=64, memory_budget=1 << 20))
    seen = []
    run_path(ev, a, b, keys, grid, progress=seen.append)
    assert ev.hoisted == 1 and sum(seen) == len(grid)
    if strategy == "loop":  # alphas outermost over the cached frontiers: one report per alpha
        assert len(seen) == len(grid)

    # Out of memory after some alphas were reported: the whole-path fallback does not recount.
    original, calls = ev.context.loss_fn, []

    def flaky(outputs, targets):
        calls.append(1)
        # loop: the third alpha's first batch; vmap: the first chunk's second batch
        if len(calls) == (7 if strategy == "loop" else 2):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(outputs, targets)

    monkeypatch.setattr(ev.context, "loss_fn", flaky)
    monkeypatch.setattr(ev.context, "deferred", lambda split, n, examples=None: Deferred(flaky, 0))
    seen = []
    with pytest.warns(UserWarning, match="out of device memory"):
        got = run_path(ev, a, b, keys, grid, progress=seen.append)["test"][0]
    assert sum(seen) == len(grid) and ev.hoisted == 1
    if strategy == "loop":
        assert seen[:2] == [1, 1]  # reported before the fallback, and not again after it
    np.testing.assert_allclose(got, run_path(ev, a, b, keys, grid)["test"][0], rtol=1e-6)
