"""BatchNorm policies held against plain load_state_dict reference loops."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

import ckptscope
from ckptscope.engine import EvalConfig, Evaluator
from ckptscope.errors import CkptscopeError
from tests.conftest import run_path
from tests.reference import reference_path

ALPHAS = np.linspace(0, 1, 5)


def reference_bn(module, a, b, alphas, x, y, *, policy, train_x=None, n_batches=3, bs=10):
    """Per alpha: load_state_dict, then re-estimate or use batch statistics, then evaluate."""
    model = copy.deepcopy(module)
    losses = []
    for alpha in alphas:
        model.load_state_dict(
            {
                k: torch.lerp(a[k], b[k], float(alpha)) if a[k].is_floating_point() else b[k]
                for k in a
            }
        )
        model.eval()
        bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
        with torch.no_grad():
            if policy == "recompute":
                for m in bns:
                    m.reset_running_stats()
                    m.momentum = None
                    m.train()
                for i in range(n_batches):
                    model(train_x[i * bs : (i + 1) * bs])
                for m in bns:
                    m.eval()
            if policy == "batch":
                for m in bns:
                    m.train()  # batch statistics; running-stat updates do not change outputs
            total = sum(
                float(F.cross_entropy(model(x[lo : lo + bs]), y[lo : lo + bs], reduction="sum"))
                for lo in range(0, len(x), bs)
            )
        losses.append(total / len(x))
    return np.array(losses)


@pytest.fixture
def train_x():
    return torch.randn(45, 3, 8, 8, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_batch_policy_matches_reference(conv_pair, image_data, strategy):
    module, a, b = conv_pair
    x, y = image_data["test"]
    ev = Evaluator(
        module,
        image_data,
        loss="cross_entropy",
        config=EvalConfig(strategy=strategy, batch_size=10, bn="batch"),
    )
    loss, _ = run_path(ev, a, b, list(a), ALPHAS)["test"]
    np.testing.assert_allclose(
        loss, reference_bn(module, a, b, ALPHAS, x, y, policy="batch"), rtol=1e-5
    )


def test_recompute_policy_matches_reference(conv_pair, image_data, train_x):
    module, a, b = conv_pair
    x, y = image_data["test"]
    ev = Evaluator(
        module,
        image_data,
        loss="cross_entropy",
        config=EvalConfig(batch_size=10, bn="recompute", bn_batches=3),
        bn_data=train_x,
    )
    loss, _ = run_path(ev, a, b, list(a), ALPHAS)["test"]
    want = reference_bn(module, a, b, ALPHAS, x, y, policy="recompute", train_x=train_x)
    np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_policies_differ_from_interpolate(conv_pair, image_data, train_x):
    module, a, b = conv_pair
    x, y = image_data["test"]
    curves = {}
    for policy in ("interpolate", "recompute", "batch"):
        ev = Evaluator(
            module,
            image_data,
            loss="cross_entropy",
            config=EvalConfig(batch_size=10, bn=policy, bn_batches=3),
            bn_data=train_x,
        )
        curves[policy] = run_path(ev, a, b, list(a), ALPHAS)["test"][0]
    np.testing.assert_allclose(
        curves["interpolate"],
        reference_path(module, a, b, list(a), ALPHAS, x, y, batch_size=10)[0],
        rtol=1e-5,
    )
    assert not np.allclose(curves["interpolate"], curves["recompute"])
    assert not np.allclose(curves["interpolate"], curves["batch"])


def test_recompute_falls_back_to_loop():
    config = EvalConfig(strategy="vmap", bn="recompute")
    assert config.resolved_strategy == "loop"


def test_recompute_needs_train_data_and_batchnorm(conv_pair, image_data, mlp_pair, spiral_small):
    module, a, b = conv_pair
    with pytest.raises(CkptscopeError, match="needs training inputs"):
        Evaluator(module, image_data, loss="cross_entropy", config=EvalConfig(bn="recompute"))
    module, a, b = mlp_pair
    with pytest.raises(CkptscopeError, match="no BatchNorm layer"):
        Evaluator(
            module,
            spiral_small,
            loss="bce",
            config=EvalConfig(bn="recompute"),
            bn_data=spiral_small["train"][0],
        )


def test_linear_path_records_bn_policy(conv_pair, image_data, train_x):
    module, a, b = conv_pair
    data = {"test": image_data["test"], "train": (train_x, torch.zeros(len(train_x)).long())}
    ds = ckptscope.linear_path(
        a,
        b,
        module,
        data,
        alphas=3,
        bn="recompute",
        config=EvalConfig(bn_batches=2, batch_size=10),
        groups={"bn-stats": "bn\\.running"},
    )
    assert ds.attrs["bn_policy"] == "recompute" and ds.attrs["bn_batches"] == 2
    # Recomputed statistics do not depend on the interpolated ones: the group that moves only
    # the running statistics gives a flat curve.
    flat = ds.loss.sel(group="bn-stats").values[0, 0]
    np.testing.assert_allclose(flat, flat[0], rtol=1e-6)


def test_bad_policy():
    with pytest.raises(CkptscopeError, match="BatchNorm policy 'mean'"):
        EvalConfig(bn="mean")


def test_batch_policy_folds_a_last_single_example(conv_pair):
    module, a, b = conv_pair
    g = torch.Generator().manual_seed(3)
    data = {
        "test": (torch.randn(21, 3, 8, 8, generator=g), torch.randint(0, 3, (21,), generator=g))
    }
    ev = Evaluator(
        module, data, loss="cross_entropy", config=EvalConfig(batch_size=10, bn="batch")
    )
    assert ev.context.sizes.spans(21) == [(0, 10), (10, 21)]
    loss, _ = run_path(ev, a, b, list(a), ALPHAS)["test"]
    assert np.isfinite(loss).all()


def test_resume_key_holds_batch_size_and_training_inputs(tmp_path, conv_pair, image_data, train_x):
    module, a, b = conv_pair
    data = {"test": image_data["test"], "train": (train_x, torch.zeros(len(train_x)).long())}
    kwargs = dict(alphas=3, bn="recompute", resume_dir=tmp_path / "partial")
    first = ckptscope.linear_path(a, b, module, data, config=_batches(16), **kwargs)
    other = ckptscope.linear_path(a, b, module, data, config=_batches(4), **kwargs)
    assert "resumed" not in other.attrs["notes"]
    assert not np.allclose(first.loss.values, other.loss.values)
    again = ckptscope.linear_path(a, b, module, data, config=_batches(4), **kwargs)
    assert "resumed 3 of 3 points" in again.attrs["notes"]
    data["train"] = (train_x.flip(0), data["train"][1])
    moved = ckptscope.linear_path(a, b, module, data, config=_batches(4), **kwargs)
    assert "resumed" not in moved.attrs["notes"]


def _batches(size: int) -> EvalConfig:
    return EvalConfig(batch_size=size, bn_batches=2)
