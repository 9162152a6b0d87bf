"""Invariants of the path, checked on generated states."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptscope.points import path_state

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
    for alpha, want in ((0.0, a), (1.0, b)):
        s = path_state(a, b, alpha)
        for k in a:
            assert torch.equal(s[k], want[k])


@settings(max_examples=60, deadline=None)
@given(pairs(), st.floats(0, 1))
def test_group_of_everything_equals_whole_model(pair, alpha):
    a, b = pair
    for hold in ("end", "start"):
        whole = path_state(a, b, alpha, hold=hold)
        group = path_state(a, b, alpha, keys=["w", "v"], hold=hold)
        for k in a:
            assert torch.equal(whole[k], group[k])


@settings(max_examples=60, deadline=None)
@given(pairs(), st.floats(0, 1))
def test_point_lies_on_the_segment(pair, alpha):
    a, b = pair
    s = path_state(a, b, alpha)
    expected = (1 - alpha) * a["w"].double() + alpha * b["w"].double()
    np.testing.assert_allclose(s["w"].double().numpy(), expected.numpy(), rtol=1e-5, atol=1e-3)


@settings(max_examples=60, deadline=None)
@given(pairs(), st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, -0.5, 1.5]), min_size=1,
                         max_size=5))
def test_fast_forms_equal_state_at_bitwise(pair, alphas):
    from ckptscope.points import path_points, stack_points, stacking, write_point

    a, b = pair
    points = path_points(alphas, list(a), every=list(a))
    at = stacking(points.weights, dtype=torch.float32, device=torch.device("cpu"))
    stacked = stack_points([a["w"], b["w"]], at)
    for i, alpha in enumerate(alphas):
        want = path_state(a, b, alpha)
        targets = [torch.empty_like(a[k]) for k in points.moving]
        write_point(targets, [[s[k] for k in points.moving] for s in (a, b)], points.weights[i])
        for k, t in zip(points.moving, targets, strict=True):
            assert torch.equal(t, want[k])
        assert torch.equal(stacked[i], want["w"])
