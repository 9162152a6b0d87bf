"""summarize: verdict counts and metric statistics over runs, held against counts by hand."""

from __future__ import annotations

import csv
import io
import statistics

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptscope
from ckptscope import shape
from ckptscope.errors import CkptscopeError
from ckptscope.results import SHAPES, RunInfo, build_result
from ckptscope.summary import (
    SUMMARIZED,
    curve_metric,
    format_summary,
    summarize,
    summary_frame,
    summary_rows,
)
from tests.study import study_result


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return study_result(tmp_path_factory.mktemp("study"))


def _by_hand(ds, runs, group, split):
    """Counts and statistics the plain way: one curve at a time, Python's statistics module."""
    alpha = ds["alpha"].values
    verdicts, values = [], {m: [] for m in SUMMARIZED}
    for run in runs:
        loss = ds["loss"].sel(run=run, group=group, split=split).values
        acc = ds["accuracy"].sel(run=run, group=group, split=split).values
        verdict = shape.verdict(loss, alpha)
        verdicts.append(verdict)
        if verdict == "invalid":
            continue
        values["barrier_height"].append(shape.barrier_height(loss, alpha))
        values["chord_barrier"].append(shape.chord_barrier(loss, alpha))
        values["peak_alpha"].append(shape.peak_alpha(loss, alpha))
        values["distance"].append(float(ds["distance"].sel(run=run, group=group)))
        values["acc_end"].append(float(acc[-1]))
        values["loss_end"].append(float(loss[-1]))
    return verdicts, values


def _check_cell(cell, verdicts, values):
    assert int(cell["n_run"]) == len(verdicts)
    assert int(cell["n_valid"]) == sum(v != "invalid" for v in verdicts)
    for name in SHAPES:
        assert int(cell["count"].sel(shape=name)) == verdicts.count(name), name
        assert float(cell["fraction"].sel(shape=name)) == pytest.approx(
            verdicts.count(name) / len(verdicts))
    for m, vs in values.items():
        got = cell[m]
        assert float(got.sel(statistic="mean")) == pytest.approx(statistics.fmean(vs), rel=1e-12)
        assert float(got.sel(statistic="median")) == pytest.approx(statistics.median(vs),
                                                                    rel=1e-12)
        if len(vs) > 1:
            assert float(got.sel(statistic="std")) == pytest.approx(statistics.stdev(vs),
                                                                     rel=1e-9, abs=1e-15)
        else:
            assert np.isnan(float(got.sel(statistic="std")))


def test_summarize_matches_counts_by_hand(ds):
    s = summarize(ds)
    assert "condition" not in s.dims
    assert list(s["shape"].values) == list(SHAPES)
    runs = [str(r) for r in ds["run"].values]
    kinds = set()
    for group in ("all", "first", "last"):
        verdicts, values = _by_hand(ds, runs, group, "test")
        kinds |= set(verdicts)
        _check_cell(s.sel(group=group, split="test"), verdicts, values)
    assert len(kinds) > 1  # the study mixes verdicts, so the counts are not trivial
    assert s.attrs["shape_rtol"] == ds.attrs["shape_rtol"]


def test_summarize_by_run_coordinate_sorts_numeric_conditions(ds):
    wd = [5e-4, 0.0, 5e-4, 1e-4, 0.0, 1e-4]
    s = summarize(ds.assign_coords(weight_decay=("run", wd)), by="weight_decay")
    assert list(s["condition"].values) == ["0", "0.0001", "0.0005"]
    runs = np.array([str(r) for r in ds["run"].values])
    for value, label in ((0.0, "0"), (1e-4, "0.0001"), (5e-4, "0.0005")):
        members = list(runs[np.array(wd) == value])
        verdicts, values = _by_hand(ds, members, "all", "test")
        _check_cell(s.sel(condition=label, group="all", split="test"), verdicts, values)


def test_summarize_merged_result_by_run_prefix(ds):
    halves = [ds.isel(run=[0, 1, 2]), ds.isel(run=[3, 4, 5])]
    halves = [h.assign_coords(run=["a", "b", "c"]) for h in halves]
    merged = ckptscope.merge(halves)                   # labels repeat: "0:a" ... "1:c"
    assert "shape" not in merged                       # merge drops verdicts; summarize classifies
    with pytest.raises(CkptscopeError, match="is a merge of .* attribute 'adapter' is the "
                                             "first input's"):
        summarize(merged, by="adapter")
    s = summarize(merged, by="run_prefix")
    assert list(s["condition"].values) == ["0", "1"]
    for label, half in zip(("0", "1"), halves, strict=True):
        runs = [f"{label}:{r}" for r in half["run"].values]
        verdicts, values = _by_hand(merged, runs, "last", "test")
        _check_cell(s.sel(condition=label, group="last", split="test"), verdicts, values)


def test_summarize_several_results_by_attribute(ds):
    a, b = ds.isel(run=[0, 1]).copy(), ds.isel(run=[2, 3, 4]).copy()
    a.attrs["recipe"], b.attrs["recipe"] = "wd-0", "wd-5e-4"
    c = ds.isel(run=[5]).copy()
    c.attrs["recipe"] = "wd-0"
    s = summarize([a, b, c], by="recipe")
    assert list(s["condition"].values) == ["wd-0", "wd-5e-4"]
    assert s["n_run"].values.tolist() == [3, 3]
    runs = [str(r) for r in ds["run"].values]
    verdicts, values = _by_hand(ds, [runs[0], runs[1], runs[5]], "first", "test")
    _check_cell(s.sel(condition="wd-0", group="first", split="test"), verdicts, values)
    # Without `by`, each result is a condition, labelled by its key.
    s = summarize({"x": a, "y": b})
    assert list(s["condition"].values) == ["x", "y"]


def _synthetic(curves, runs=("r0", "r1", "r2")):
    alphas = np.linspace(0, 1, 11)
    loss = np.asarray(curves, dtype=np.float64)[:, None, None, :]
    return build_result(
        loss=loss, accuracy=np.full(loss.shape, 0.5), distance=np.ones((len(runs), 1)),
        alphas=alphas, groups=["all"], patterns=[".*"], n_tensors=[1], n_params=[1],
        splits=["test"], n_examples=[10], runs=[RunInfo(r) for r in runs], attrs={})


def test_summarize_counts_invalid_and_leaves_it_out_of_the_statistics():
    a = np.linspace(0, 1, 11)
    down = 2.0 - a
    bump = 2.0 - a + np.where(a == 0.5, 1.0, 0.0)
    bad = down.copy()
    bad[3] = np.nan
    s = summarize(_synthetic([down, bump, bad])).sel(group="all", split="test")
    assert s["count"].values.tolist() == [1, 1, 0, 1]       # monotonic, barrier, plateau, invalid
    assert int(s["n_valid"]) == 2
    heights = [0.0, shape.barrier_height(bump, a)]
    assert float(s["barrier_height"].sel(statistic="mean")) == pytest.approx(np.mean(heights))
    assert float(s["acc_end"].sel(statistic="mean")) == 0.5   # the invalid run's end left out


def test_summarize_recomputes_and_refuses_forged_verdicts(ds):
    forged = ds.copy(deep=True)
    forged["shape"].values[:] = "plateau"
    with pytest.raises(CkptscopeError, match="stores shape = 'plateau'"):
        summarize(forged)
    # Given tolerances re-classify instead of comparing.
    s = summarize(forged, atol=1e6)
    assert int(s["count"].sel(group="all", split="test", shape="monotonic")) == ds.sizes["run"]
    assert s.attrs["shape_atol"] == 1e6


def test_summarize_refuses_results_with_different_tolerances(ds):
    other = shape.classify(ds, atol=0.5)
    with pytest.raises(CkptscopeError, match="classified with shape_atol=0.5.*--tolerance"):
        summarize([ds, other])


@pytest.mark.parametrize("by, match", [
    ("nope", "no run coordinate or attribute 'nope'.*start_path"),
    ("run_prefix", "run 'seed_0' .* has no ':'"),
])
def test_summarize_bad_by(ds, by, match):
    with pytest.raises(CkptscopeError, match=match):
        summarize(ds, by=by)


def test_summarize_refuses_results_with_other_groups(ds):
    with pytest.raises(CkptscopeError, match="groups .* select the shared ones"):
        summarize([ds, ds.sel(group=["all", "first"])])


def test_summarize_bad_inputs():
    with pytest.raises(CkptscopeError, match="no results given"):
        summarize([])
    with pytest.raises(CkptscopeError, match="not an xarray.Dataset"):
        summarize({"a": "result.nc"})


def test_curve_metric_unknown():
    with pytest.raises(CkptscopeError, match="unknown metric 'speed'; known: barrier_height"):
        curve_metric(None, "speed")


def test_format_summary_forms(ds):
    s = summarize(ds.assign_coords(lr=("run", ["hi", "lo"] * 3)), by="lr")
    text = format_summary(s, "text")
    assert text.splitlines()[0].split()[:4] == ["condition", "group", "split", "runs"]
    assert "invalid" not in text.splitlines()[0]                  # no run is invalid
    md = format_summary(s, "markdown").splitlines()
    assert md[0].startswith("| condition | group |") and md[1].startswith("|---|")
    assert len([line for line in md if line.startswith("| ")]) == 1 + 2 * 3
    rows = list(csv.DictReader(io.StringIO(format_summary(s, "csv"))))
    want = summary_rows(s)
    assert len(rows) == len(want) == 6
    for got, row in zip(rows, want, strict=True):
        for key, value in row.items():
            if isinstance(value, float):
                assert (got[key] == "" and np.isnan(value)) or float(got[key]) == value
            else:
                assert got[key] == str(value)
    with pytest.raises(CkptscopeError, match="format 'html' is not one of text, markdown, csv"):
        format_summary(s, "html")


def test_summary_frame_is_the_rows(ds):
    frame = summary_frame(summarize(ds))
    assert list(frame.columns[:4]) == ["group", "split", "n_run", "n_valid"]
    assert len(frame) == 3
    assert frame["count_barrier"].sum() == int(summarize(ds)["count"].sel(shape="barrier").sum())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0.0, 0.2, 1.0, 3.0, float("nan")]), min_size=6,
                         max_size=6), min_size=1, max_size=7))
def test_summarize_counts_partition_the_runs(curves):
    """Whatever the curves: the verdict counts sum to the runs, invalid ones are the runs with
    NaN, and each count is the number of runs whose own verdict it is."""
    runs = [f"r{i}" for i in range(len(curves))]
    alphas = np.linspace(0, 1, 6)
    loss = np.asarray(curves)[:, None, None, :]
    ds = build_result(loss=loss, accuracy=np.full(loss.shape, 0.5),
                      distance=np.ones((len(runs), 1)), alphas=alphas, groups=["all"],
                      patterns=[".*"], n_tensors=[1], n_params=[1], splits=["test"],
                      n_examples=[5], runs=[RunInfo(r) for r in runs], attrs={})
    cell = summarize(ds).sel(group="all", split="test")
    verdicts = [shape.verdict(np.asarray(c), alphas) for c in curves]
    assert int(cell["count"].sum()) == int(cell["n_run"]) == len(curves)
    assert float(cell["fraction"].sum()) == pytest.approx(1.0)
    assert int(cell["n_valid"]) == sum(not np.isnan(c).any() for c in curves)
    for name in SHAPES:
        assert int(cell["count"].sel(shape=name)) == verdicts.count(name)
