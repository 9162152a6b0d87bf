"""Shape metrics and verdicts: known curves, a slow reference, invariants, datasets."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ckptscope import shape
from ckptscope.errors import CkptscopeError
from ckptscope.results import RunInfo, build_result, open_result, save_result

A = np.linspace(0.0, 1.0, 51)
RTOL, ATOL = shape.DEFAULT_RTOL, shape.DEFAULT_ATOL


def convex_decay(a=A, *, top=2.3, bottom=0.1, rate=5.0):
    return bottom + (top - bottom) * (np.exp(-rate * a) - np.exp(-rate)) / (1 - np.exp(-rate))


def bumped(a=A, *, height=0.5, at=0.5, width=0.08):
    return 1.5 - 1.4 * a + height * np.exp(-(((a - at) / width) ** 2))


def plateau_drop(a=A, *, until=0.8, top=2.3, bottom=0.1):
    return np.where(a < until, top, top - (top - bottom) * (a - until) / (1 - until))


def make_result(curves, *, alphas=A, runs=1, splits=("test",), groups=None):
    """A result whose every run and split holds ``curves`` (one per group)."""
    curves = np.asarray(curves, dtype=np.float64)
    groups = list(groups or ["all", *(f"g{i}" for i in range(1, len(curves)))])
    loss = np.broadcast_to(curves[None, :, None, :],
                           (runs, len(groups), len(splits), len(alphas))).copy()
    return build_result(
        loss=loss, accuracy=np.full(loss.shape, 0.5), distance=np.ones((runs, len(groups))),
        alphas=alphas, groups=groups, patterns=groups, n_tensors=[1] * len(groups),
        n_params=[10] * len(groups), splits=list(splits), n_examples=[100] * len(splits),
        runs=[RunInfo(str(r)) for r in range(runs)], attrs={"adapter": "mlp"},
    )


# --- the slow, obvious reference -------------------------------------------------------------
def ref_metrics(loss, alpha):
    """Every metric by plain loops over the points with alpha in [0, 1]."""
    pts = [(a, v) for a, v in zip(alpha, loss, strict=True) if -1e-9 <= a <= 1 + 1e-9]
    a = [p[0] for p in pts]
    L = [p[1] for p in pts]
    n = len(L)
    if not all(math.isfinite(v) for v in L):
        return None
    height = 0.0
    for i in range(n):
        height = max(height, L[i] - min(L[: i + 1]))
    chord = -math.inf
    for i in range(n):
        t = (a[i] - a[0]) / (a[-1] - a[0])
        chord = max(chord, L[i] - ((1 - t) * L[0] + t * L[-1]))
    peak = max(L)
    peak_at = a[L.index(peak)]
    half = math.nan
    if L[-1] < L[0]:
        target = (L[0] + L[-1]) / 2
        for i in range(1, n):
            if L[i] <= target:
                gap = L[i - 1] - L[i]  # 0 only when the halved sum rounds (subnormal losses)
                half = a[i - 1] + ((L[i - 1] - target) / gap if gap > 0 else 0.0) * (
                    a[i] - a[i - 1])
                break
    return {"barrier_height": height, "chord_barrier": chord,
            "midpoint_barrier": peak - (L[0] + L[-1]) / 2, "peak_alpha": peak_at,
            "half_drop_alpha": half, "tolerance": max(RTOL * (peak - min(L)), ATOL)}


FAST = {"barrier_height": shape.barrier_height, "chord_barrier": shape.chord_barrier,
        "midpoint_barrier": shape.midpoint_barrier, "peak_alpha": shape.peak_alpha,
        "half_drop_alpha": shape.half_drop_alpha, "tolerance": shape.tolerance}

finite = st.floats(-100, 100, allow_nan=False, allow_infinity=False)


@st.composite
def curve_and_grid(draw, min_size=2, max_size=25):
    n = draw(st.integers(min_size, max_size))
    loss = draw(arrays(np.float64, n, elements=finite))
    inner = draw(st.lists(st.floats(0.01, 0.99), min_size=n - 2, max_size=n - 2, unique=True))
    alpha = np.sort(np.array([0.0, *inner, 1.0]))
    assume(np.all(np.diff(alpha) > 1e-6))
    return loss, alpha


@given(curve_and_grid())
@example((np.array([0.0, 0.0, -5e-324]), np.array([0.0, 0.5, 1.0])))  # (0 + L_1) / 2 rounds to 0
@example((np.array([0.0, 1.0, 1.0, -5e-324]), np.array([0.0, 0.25, 0.5, 1.0])))
@settings(max_examples=200, deadline=None)
def test_metrics_match_reference_loop(case):
    loss, alpha = case
    want = ref_metrics(loss, alpha)
    for name, fn in FAST.items():
        got = fn(loss, alpha)
        assert np.isclose(got, want[name], rtol=1e-9, atol=1e-9, equal_nan=True), name


def test_metrics_batched_equal_one_by_one():
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(3, 4, 2, A.size)).cumsum(axis=-1)
    batch[1, 2, 0, 7] = np.nan
    for name, fn in FAST.items():
        got = fn(batch, A)
        assert got.shape == (3, 4, 2)
        for idx in np.ndindex(3, 4, 2):
            assert np.isclose(got[idx], fn(batch[idx], A), equal_nan=True), name
    names = shape.verdict(batch, A)
    assert names[1, 2, 0] == "invalid"
    for idx in np.ndindex(3, 4, 2):
        assert names[idx] == shape.verdict(batch[idx], A)


# --- curves whose shape is known by construction ---------------------------------------------
def test_verdict_convex_decay_is_monotonic():
    loss = convex_decay()
    assert shape.verdict(loss, A) == "monotonic"
    assert shape.barrier_height(loss, A) == 0.0
    assert shape.half_drop_alpha(loss, A) < 0.2


def test_verdict_bump_is_barrier_with_its_height():
    loss = [1.0, 0.8, 0.6, 0.9, 0.4, 0.2, 0.0]
    assert shape.verdict(loss) == "barrier"
    assert shape.barrier_height(loss) == pytest.approx(0.3)
    assert shape.chord_barrier(loss) == pytest.approx(0.4)  # 0.9 above the chord's 0.5
    assert shape.midpoint_barrier(loss) == pytest.approx(0.5)
    assert shape.peak_alpha(loss) == 0.0
    assert shape.above_start(loss) == 0.0
    assert shape.half_drop_alpha(loss) == pytest.approx(0.5 + 0.8 / 6)


def test_verdict_smooth_bump_height_and_peak():
    loss = bumped(height=0.5)
    assert shape.verdict(loss, A) == "barrier"
    # The bump sits on a slope of -1.4, which eats into its rising side: the rise above the
    # running minimum is well under the bump's 0.5, yet far above the tolerance.
    assert 0.25 < shape.barrier_height(loss, A) < 0.5
    assert shape.barrier_height(loss, A) > 5 * shape.tolerance(loss, A)
    assert shape.peak_alpha(loss, A) == 0.0  # the bump stays below the start
    assert shape.above_start(loss, A, tol=0.0) == 0.0


def test_above_start_when_rising_above_the_start():
    loss = [1.0, 1.5, 2.0, 0.2]
    assert shape.above_start(loss, tol=0.1) == 1.0
    assert shape.above_start(loss, tol=1.5) == 0.0
    assert shape.peak_alpha(loss) == pytest.approx(2 / 3)


def test_verdict_flat_then_drop_is_plateau():
    loss = plateau_drop(until=0.8)
    assert shape.half_drop_alpha(loss, A) == pytest.approx(0.9)
    assert shape.verdict(loss, A) == "plateau"
    assert shape.verdict(loss, A, plateau_alpha=0.95) == "monotonic"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_verdict_nonfinite_is_invalid(bad):
    loss = convex_decay()
    loss[10] = bad
    assert shape.verdict(loss, A) == "invalid"
    for fn in FAST.values():
        assert math.isnan(fn(loss, A))
    assert math.isnan(shape.above_start(loss, A))


def test_verdict_flat_with_float_noise_is_not_barrier():
    rng = np.random.default_rng(0)
    for _ in range(20):
        loss = 2.302585 + 1e-7 * rng.standard_normal(A.size)
        assert shape.verdict(loss, A) != "barrier"
        assert shape.barrier_height(loss, A) > 0  # the jitter is there, just under the floor
    assert shape.verdict(np.full(A.size, 0.7), A) == "monotonic"


@pytest.mark.parametrize("end", [-1e-7, 1e-7, -0.5e-2])
def test_verdict_flat_curve_is_monotonic_whichever_way_its_end_jitters(end):
    # Within the tolerance (atol 1e-2) the curve is flat: a drop that small is no plateau.
    loss = np.full(A.size, 2.302585)
    loss[-1] += end
    assert shape.verdict(loss, A) == "monotonic"
    # With a floor below the jitter it is a real drop (late: a plateau), or a real rise.
    assert shape.verdict(loss, A, atol=1e-9) == ("plateau" if end < 0 else "barrier")


def test_verdict_small_real_bump_is_barrier():
    # A rise of 3% of the range counts at the default rtol of 2%.
    loss = np.linspace(2.0, 1.0, 21)
    loss[10:] += 0.03 + (loss[9] - loss[10])
    assert shape.barrier_height(loss) == pytest.approx(0.03)
    assert shape.verdict(loss) == "barrier"
    assert shape.verdict(loss, rtol=0.05) != "barrier"


def test_metrics_ignore_alphas_outside_unit_interval():
    alpha = np.linspace(-0.5, 1.5, 41)
    inside = (alpha >= 0) & (alpha <= 1 + 1e-12)
    loss = np.full(alpha.size, np.nan)
    loss[inside] = convex_decay(alpha[inside])
    loss[alpha > 1.2] = 50.0  # diverging extrapolation is not a barrier
    assert shape.verdict(loss, alpha) == "monotonic"
    assert shape.peak_alpha(loss, alpha) == 0.0
    assert shape.barrier_height(loss, alpha) == 0.0


def test_metrics_use_first_and_last_alpha_when_0_and_1_are_off_grid():
    alpha = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
    loss = np.array([1.0, 0.9, 1.2, 0.5, 0.0])
    assert shape.chord_barrier(loss, alpha) == pytest.approx(1.2 - 0.5)
    assert shape.midpoint_barrier(loss, alpha) == pytest.approx(1.2 - 0.5)
    assert shape.half_drop_alpha(loss, alpha) == pytest.approx(0.5 + (1.2 - 0.5) / 0.7 * 0.2)


def test_unit_interval_tolerates_float_grid_error():
    alpha = np.array([-1e-12, 0.5, 1.0000000000000002, 1.1])
    assert shape.unit_interval(alpha).tolist() == [True, True, True, False]
    assert shape.endpoint_indices(alpha) == (0, 2)


@pytest.mark.parametrize("loss, alpha, match", [
    ([1.0, 0.5], [1.0, 2.0], r"1 point\(s\) in \[0, 1\].*include 0 and 1"),
    ([1.0, 0.5, 0.2], [0.0, 1.0], "alpha has shape"),
    ([1.0, 0.5, 0.2], [0.0, 0.5, 0.5], "strictly increasing"),
    ([1.0, 0.5], [0.0, np.nan], "strictly increasing"),
    (1.0, None, "needs an alpha axis"),
])
def test_metrics_bad_grid_raises(loss, alpha, match):
    with pytest.raises(CkptscopeError, match=match):
        shape.barrier_height(loss, alpha)


@pytest.mark.parametrize("options, match", [
    ({"rtol": -0.1}, "rtol must be a finite number >= 0"),
    ({"atol": float("nan")}, "atol must be"),
    ({"plateau_alpha": 0.0}, r"plateau_alpha must be in \(0, 1\]"),
    ({"plateau_alpha": True}, "plateau_alpha must be"),
])
def test_verdict_bad_options_raise(options, match):
    with pytest.raises(CkptscopeError, match=match):
        shape.verdict(convex_decay(), A, **options)


# --- invariants ------------------------------------------------------------------------------
# Dyadic curves (k / 64, small k) make shifts and power-of-two scalings exact in float64, so
# verdicts must match exactly; nothing is left to rounding luck.
dyadic_curve = arrays(np.float64, st.integers(2, 30),
                      elements=st.integers(-640, 640).map(lambda k: k / 64))


@given(dyadic_curve, st.integers(-6400, 6400).map(lambda k: k / 64))
@settings(max_examples=200, deadline=None)
def test_verdict_shift_invariant(loss, c):
    assert shape.verdict(loss + c) == shape.verdict(loss)
    assert shape.barrier_height(loss + c) == shape.barrier_height(loss)
    assert shape.chord_barrier(loss + c) == pytest.approx(shape.chord_barrier(loss), abs=1e-12)
    assert shape.above_start(loss + c, tol=0.1) == shape.above_start(loss, tol=0.1)


@given(dyadic_curve, st.integers(-8, 8))
@settings(max_examples=200, deadline=None)
def test_verdict_power_of_two_scaling_exact(loss, k):
    c = 2.0**k
    # The floor atol is in loss units, so it scales with the loss for the verdict to be kept.
    assert (shape.verdict(loss * c, atol=ATOL * c)
            == shape.verdict(loss, atol=ATOL))
    for name in ("barrier_height", "chord_barrier", "midpoint_barrier", "tolerance"):
        fn = FAST[name]
        got = fn(loss * c, atol=ATOL * c) if name == "tolerance" else fn(loss * c)
        want = fn(loss, atol=ATOL) if name == "tolerance" else fn(loss)
        assert got == want * c
    assert shape.peak_alpha(loss * c) == shape.peak_alpha(loss)
    assert np.array_equal(shape.half_drop_alpha(loss * c), shape.half_drop_alpha(loss),
                          equal_nan=True)


@given(curve_and_grid(), st.floats(0.01, 100))
@settings(max_examples=200, deadline=None)
def test_heights_scale_with_positive_factor(case, c):
    loss, alpha = case
    for name in ("barrier_height", "chord_barrier", "midpoint_barrier"):
        fn = FAST[name]
        assert np.isclose(fn(loss * c, alpha), c * fn(loss, alpha), rtol=1e-9, atol=1e-9)
    # Away from the thresholds, verdicts survive any positive scale when atol is 0.
    tol = shape.tolerance(loss, alpha, atol=0.0)
    margin = 1e-6 * (np.ptp(loss) + 1)
    assume(abs(shape.barrier_height(loss, alpha) - tol) > margin)
    assume(abs((loss[0] - loss[-1]) - tol) > margin)
    half = shape.half_drop_alpha(loss, alpha)
    assume(math.isnan(half) or abs(half - shape.DEFAULT_PLATEAU_ALPHA) > 1e-6)
    assert shape.verdict(loss * c, alpha, atol=0.0) == shape.verdict(loss, alpha, atol=0.0)


@st.composite
def clear_curve(draw):
    """A curve that is plainly monotonic, barrier or plateau, and its verdict."""
    kind = draw(st.sampled_from(["monotonic", "barrier", "plateau"]))
    top = draw(st.floats(0.5, 5))
    if kind == "monotonic":
        loss = convex_decay(top=top, bottom=0.05 * top, rate=draw(st.floats(2, 8)))
    elif kind == "barrier":
        loss = top * bumped(height=draw(st.floats(0.3, 1.0)), at=draw(st.floats(0.3, 0.7)))
        # Clear: the slope under the bump eats into it, so insist on a rise of 3 tolerances.
        assume(shape.barrier_height(loss, A) >= 3 * shape.tolerance(loss, A))
    else:
        loss = plateau_drop(until=draw(st.floats(0.8, 0.95)), top=top, bottom=0.05 * top)
    return loss, kind


@given(clear_curve(), st.integers(0, 2**32 - 1), st.floats(0.0, 0.24))
@settings(max_examples=200, deadline=None)
def test_verdict_noise_below_tolerance_keeps_clear_verdicts(case, seed, fraction):
    loss, kind = case
    assert shape.verdict(loss, A) == kind
    # Each point moves by at most a quarter of the clean tolerance: rises of at most half of it.
    amp = fraction * shape.tolerance(loss, A)
    noise = np.random.default_rng(seed).uniform(-amp, amp, size=A.size)
    assert shape.verdict(loss + noise, A) == kind


@given(st.lists(st.floats(2 * ATOL, 10), min_size=1, max_size=30), st.floats(-10, 10))
@settings(max_examples=200, deadline=None)
def test_verdict_reversed_strictly_decreasing_is_barrier(steps, top):
    loss = top - np.concatenate([[0.0], np.cumsum(steps)])
    assert shape.verdict(loss) != "barrier"
    rising = loss[::-1]
    assert shape.verdict(rising) == "barrier"
    assert shape.barrier_height(rising) == pytest.approx(loss[0] - loss[-1])


def test_shape_module_does_not_import_torch():
    tree = ast.parse(Path(shape.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
            if node.module == "ckptscope":
                imported |= {alias.name for alias in node.names}
    assert "torch" not in imported
    # Its ckptscope imports stay torch-free too.
    for name in imported & {"results", "errors"}:
        source = (Path(shape.__file__).parent / f"{name}.py").read_text()
        assert "import torch" not in source


# --- datasets --------------------------------------------------------------------------------
def test_classify_adds_verdicts_and_metrics():
    curves = [plateau_drop(), bumped(), convex_decay()]
    ds = make_result(curves, runs=2, splits=("train", "test"))
    out = shape.classify(ds)
    assert out["shape"].dims == ("run", "group", "split")
    assert out["shape"].sel(run="1", split="test").values.tolist() == [
        "plateau", "barrier", "monotonic"]
    for name in ("shape", *shape.METRICS):
        assert out[name].attrs["description"]
        assert out[name].dims == ("run", "group", "split")
    assert out["barrier_height"].sel(run="0", group="g1", split="train") == pytest.approx(
        shape.barrier_height(bumped(), A))
    assert out.attrs["shape_rtol"] == RTOL
    assert out.attrs["shape_atol"] == ATOL
    assert out.attrs["shape_plateau_alpha"] == shape.DEFAULT_PLATEAU_ALPHA
    assert out.attrs["adapter"] == "mlp"
    assert "shape" not in ds.data_vars and "shape_rtol" not in ds.attrs  # input untouched


def test_classify_equals_per_curve_verdicts():
    rng = np.random.default_rng(1)
    curves = rng.normal(size=(4, A.size)).cumsum(axis=-1)
    out = shape.classify(make_result(curves), rtol=0.1, plateau_alpha=0.6)
    for g, curve in enumerate(curves):
        assert out["shape"].values[0, g, 0] == shape.verdict(curve, A, rtol=0.1,
                                                             plateau_alpha=0.6)
        assert out["tolerance"].values[0, g, 0] == shape.tolerance(curve, A, rtol=0.1)


def test_classify_invalid_curve_has_nan_metrics():
    bad = convex_decay()
    bad[3] = np.nan
    out = shape.classify(make_result([convex_decay(), bad]))
    assert out["shape"].values[0, :, 0].tolist() == ["monotonic", "invalid"]
    for name in shape.METRICS:
        assert np.isnan(out[name].values[0, 1, 0]), name


def test_classify_saves_and_reopens(tmp_path):
    out = shape.classify(make_result([plateau_drop(), bumped()], runs=2))
    back = open_result(save_result(out, tmp_path / "r.nc"))
    assert back["shape"].values.tolist() == out["shape"].values.tolist()
    assert back.attrs["shape_rtol"] == RTOL
    for name in shape.METRICS:
        np.testing.assert_array_equal(back[name].values, out[name].values)


def test_classify_twice_replaces_verdicts():
    ds = shape.classify(make_result([bumped(height=0.3)]))
    assert ds["shape"].item() == "barrier"
    again = shape.classify(ds, rtol=0.5)
    assert again["shape"].item() != "barrier"
    assert again.attrs["shape_rtol"] == 0.5


@pytest.mark.parametrize("kwargs, match", [
    ({"variable": "distance"}, r"cannot classify 'distance'.*\['accuracy', 'loss'\]"),
    ({"variable": "nope"}, "cannot classify 'nope'"),
    ({"rtol": -1.0}, "rtol must be"),
])
def test_classify_bad_arguments_raise(kwargs, match):
    with pytest.raises(CkptscopeError, match=match):
        shape.classify(make_result([convex_decay()]), **kwargs)


def test_classify_not_a_result_raises():
    ds = make_result([convex_decay()]).drop_vars("distance")
    with pytest.raises(CkptscopeError, match="variable 'distance' is missing"):
        shape.classify(ds)


def test_classify_too_few_alphas_in_unit_interval_raises():
    ds = make_result([[1.0, 0.5, 0.2]], alphas=[1.0, 1.5, 2.0])
    with pytest.raises(CkptscopeError, match="at least two"):
        shape.classify(ds)


def test_aggregate_fraction_mean_std():
    ds = make_result([bumped(), convex_decay()], runs=3)
    loss = ds["loss"].values.copy()
    loss[2, 0] = convex_decay()   # run 2 has no barrier in the first group
    loss[1, 1, 0, 5] = np.nan     # run 1 is invalid in the second group
    ds = ds.assign(loss=(ds["loss"].dims, loss, ds["loss"].attrs))
    agg = shape.aggregate(ds)
    assert agg["barrier_fraction"].sel(split="test").values.tolist() == pytest.approx([2 / 3, 0])
    assert agg["n_valid"].sel(split="test").values.tolist() == [3, 2]
    np.testing.assert_allclose(agg["loss_mean"].values, loss.mean(axis=0))
    np.testing.assert_allclose(agg["loss_std"].values, loss.std(axis=0, ddof=1))
    assert agg.attrs["n_run"] == 3
    assert agg.attrs["shape_rtol"] == RTOL


def test_aggregate_single_run_std_is_nan():
    agg = shape.aggregate(make_result([convex_decay()]))
    assert np.isnan(agg["loss_std"].values).all()
    assert agg["barrier_fraction"].item() == 0.0
