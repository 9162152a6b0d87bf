"""The automatic batch size (ckptscope.engine.sizing.Sizes.pick_batch)."""

from __future__ import annotations

import pytest
import torch

from ckptscope.adapters import get_adapter
from ckptscope.engine import EvalConfig, Evaluator
from ckptscope.engine.sizing import Sizes


def sizes(activation_bytes: int, **config) -> Sizes:
    return Sizes(EvalConfig(**config), activation_bytes=activation_bytes, output_bytes=4)


def test_pick_batch_takes_a_small_nets_split_in_one_batch():
    # A 3x64 MLP holds ~1.5 KB of activations per example: 6,000 of them are 9 MB.
    s = sizes(1540)
    assert s.pick_batch(6000, None) == 6000
    assert s.spans(6000) == [(0, 6000)]


def test_pick_batch_cuts_a_larger_split_into_equal_batches():
    s = sizes(4100)  # 16 MiB hold 4,092 examples: the 4,096-example floor is the cap
    assert s.pick_batch(6000, None) == 3000
    assert s.spans(6000) == [(0, 3000), (3000, 6000)]
    s = sizes(804)  # 16 MiB hold 20,867 examples
    assert s.pick_batch(30000, None) == 15000
    assert s.pick_batch(10001, None) == 10001
    assert s.pick_batch(4096 * 5 + 1, None) == 4096 * 5 + 1


@pytest.mark.parametrize("bn", ["batch", "recompute"])
def test_pick_batch_keeps_4096_where_batches_shape_the_curves(bn):
    s = sizes(1540, bn=bn)
    assert s.pick_batch(6000, None) == 4096
    assert s.spans(6000) == [(0, 4096), (4096, 6000)]


def test_pick_batch_is_the_budgets_where_the_budget_binds():
    s = sizes(1000, memory_budget=4 * 1000 * 45)  # a quarter of the budget holds 45 examples
    assert s.pick_batch(512, None) == 45  # not balanced to 43: the budget is the limit
    assert sizes(1540).pick_batch(6000, 100) == 100
    assert sizes(1540).pick_batch(60, 100) == 60


def test_evaluator_picks_one_batch_for_a_small_mlp():
    torch.manual_seed(0)
    module = get_adapter("mlp").make({"widths": [2, 64, 64, 64, 1]})
    x, y = torch.randn(6000, 2), torch.randint(0, 2, (6000,)).float()
    ev = Evaluator(module, {"test": (x, y)}, loss="bce", config=EvalConfig())
    assert ev.batch_size() == 6000
    ev = Evaluator(module, {"test": (x, y)}, loss="bce", config=EvalConfig(bn="batch"))
    assert ev.batch_size() == 4096
