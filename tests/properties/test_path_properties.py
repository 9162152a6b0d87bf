"""Invariants of the path, checked on generated states."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptscope.path import plan_path, state_at

floats = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@st.composite
def pairs(draw):
    n = draw(st.integers(1, 6))
    a = torch.tensor(draw(st.lists(floats, min_size=n, max_size=n)), dtype=torch.float32)
    b = torch.tensor(draw(st.lists(floats, min_size=n, max_size=n)), dtype=torch.float32)
    return {"w": a, "v": a * 2}, {"w": b, "v": b - 1}


@settings(max_examples=60, deadline=None)
@given(pairs())
def test_endpoints_reproduced_exactly(pair):
    a, b = pair
    plan = plan_path(a, b, list(a))
    for alpha, want in ((0.0, a), (1.0, b)):
        s = state_at(plan, alpha)
        for k in a:
            assert torch.equal(s[k], want[k])


@settings(max_examples=60, deadline=None)
@given(pairs(), st.floats(0, 1))
def test_group_of_everything_equals_whole_model(pair, alpha):
    a, b = pair
    for hold in ("end", "start"):
        whole = state_at(plan_path(a, b, list(a), hold=hold), alpha)
        group = state_at(plan_path(a, b, ["w", "v"], hold=hold), alpha)
        for k in a:
            assert torch.equal(whole[k], group[k])


@settings(max_examples=60, deadline=None)
@given(pairs(), st.floats(0, 1))
def test_point_lies_on_the_segment(pair, alpha):
    a, b = pair
    s = state_at(plan_path(a, b, list(a)), alpha)
    expected = (1 - alpha) * a["w"].double() + alpha * b["w"].double()
    np.testing.assert_allclose(s["w"].double().numpy(), expected.numpy(), rtol=1e-5, atol=1e-3)


@settings(max_examples=60, deadline=None)
@given(pairs(), st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, -0.5, 1.5]), min_size=1,
                         max_size=5))
def test_fast_forms_equal_state_at_bitwise(pair, alphas):
    from ckptscope.path import stack_points, write_point

    a, b = pair
    plan = plan_path(a, b, list(a))
    stacked = stack_points(a["w"], b["w"], torch.tensor(alphas))
    for i, alpha in enumerate(alphas):
        want = state_at(plan, alpha)
        targets = [torch.empty_like(a[k]) for k in plan.moving]
        write_point(targets, [a[k] for k in plan.moving], [b[k] for k in plan.moving], alpha)
        for k, t in zip(plan.moving, targets, strict=True):
            assert torch.equal(t, want[k])
        assert torch.equal(stacked[i], want["w"])
