"""correlate: held against scipy.stats on the result's own variables; outcomes; errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import ckptscope
from ckptscope.correlation import (
    METHODS,
    _resampled,
    bootstrap_interval,
    correlate,
    statistic,
)
from ckptscope.errors import CkptscopeError
from ckptscope.results import RunInfo, build_result
from tests.study import ACCURACIES, study_result

SCIPY = {"spearman": stats.spearmanr, "kendall": stats.kendalltau, "pearson": stats.pearsonr}


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return study_result(tmp_path_factory.mktemp("study"))


def _own(ds, name, group="all", split="test"):
    """A per-run value read straight off the result's variables, the obvious way."""
    if name == "acc_end":
        return ds["accuracy"].sel(group=group, split=split).isel(alpha=-1).values
    if name == "loss_end":
        return ds["loss"].sel(group=group, split=split).isel(alpha=-1).values
    if name == "distance":
        return ds["distance"].sel(group=group).values
    return ds[name].sel(group=group, split=split).values


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("with_, y_name", [("acc_end", "acc_end"), ("loss_end", "loss_end"),
                                           ("first:distance", "distance")])
def test_correlate_matches_scipy_on_the_results_variables(ds, method, with_, y_name):
    c = correlate(ds, "all:barrier_height", with_, method=method)
    x = _own(ds, "barrier_height")
    y = _own(ds, y_name, group="first" if y_name == "distance" else "all")
    want = SCIPY[method](x, y)
    assert c.statistic == pytest.approx(float(want.statistic), rel=1e-12, abs=1e-15)
    assert c.pvalue == pytest.approx(float(want.pvalue), rel=1e-9, abs=1e-300)
    assert c.n == ds.sizes["run"] and c.x == tuple(x) and c.y == tuple(y)
    assert c.runs == tuple(str(r) for r in ds["run"].values)
    assert np.isnan(c.interval).all() and c.bootstrap == 0


def test_correlate_with_trainer_metadata(ds):
    c = correlate(ds, "last:peak_alpha", "final_metrics.test_accuracy", method="kendall")
    want = stats.kendalltau(_own(ds, "peak_alpha", group="last"), ACCURACIES)
    assert c.y == ACCURACIES
    assert (c.statistic, c.pvalue) == pytest.approx((want.statistic, want.pvalue))
    assert c.outcome == "final_metrics.test_accuracy" and c.metric == "last@test:peak_alpha"


def test_correlate_metadata_relative_paths_resolve_against_root(ds, tmp_path, monkeypatch):
    ends = [Path(p) for p in ds["end_path"].values]
    base = ends[0].parents[1]
    moved = ds.assign_coords(end_path=("run", [str(p.relative_to(base)) for p in ends]))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CkptscopeError, match="does not exist; run from the folder.*--root"):
        correlate(moved, "all:barrier_height", "final_metrics.test_accuracy")
    c = correlate(moved, "all:barrier_height", "final_metrics.test_accuracy", root=base)
    assert c.y == ACCURACIES


def test_correlate_with_a_csv_keyed_by_run(ds, tmp_path):
    runs = [str(r) for r in ds["run"].values]
    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    order = [4, 0, 5, 2, 1, 3]  # rows in any order; extra rows ignored
    lines = ["wd,run,score"] + [f"{i / 10},{runs[i]},{values[i]}" for i in order] + \
            ["0.9,other,7"]
    table = tmp_path / "outcomes.csv"
    table.write_text("\n".join(lines) + "\n")
    c = correlate(ds, "all:barrier_height", f"{table}:score")
    want = stats.spearmanr(_own(ds, "barrier_height"), values)
    assert c.statistic == pytest.approx(want.statistic) and c.y == tuple(values)
    assert c.outcome == "outcomes.csv:score"
    with pytest.raises(CkptscopeError, match=r"columns \['wd', 'score'\].*name one"):
        correlate(ds, "all:barrier_height", str(table))
    # A mapping or a pandas Series works the same way.
    mapping = dict(zip(runs, values, strict=True))
    assert correlate(ds, "all:barrier_height", mapping).statistic == c.statistic
    assert correlate(ds, "all:barrier_height", pd.Series(mapping)).statistic == c.statistic


def test_correlate_drops_runs_with_missing_values(ds, tmp_path):
    runs = [str(r) for r in ds["run"].values]
    table = tmp_path / "t.csv"
    table.write_text("run,y\n" + "".join(
        f"{r},{'' if i == 2 else ('NA' if i == 4 else i * i)}\n" for i, r in enumerate(runs)))
    c = correlate(ds, "all:barrier_height", str(table), method="pearson")
    assert c.n == 4 and c.dropped == (runs[2], runs[4])
    x = np.delete(_own(ds, "barrier_height"), [2, 4])
    want = stats.pearsonr(x, [0, 1, 9, 25])
    assert c.statistic == pytest.approx(want.statistic)


def test_correlate_on_a_merged_result(ds):
    halves = [ds.isel(run=[0, 1, 2]), ds.isel(run=[3, 4, 5])]
    merged = ckptscope.merge(halves)
    c = correlate(merged, "last:barrier_height", "acc_end")
    want = stats.spearmanr(_own(ds, "barrier_height", "last"), _own(ds, "acc_end", "last"))
    assert c.statistic == pytest.approx(want.statistic) and c.n == 6


@pytest.mark.parametrize("method", METHODS)
def test_bootstrap_matches_a_scipy_loop_over_the_same_draws(method):
    rng = np.random.default_rng(5)
    x = np.round(rng.normal(size=9), 1)            # ties, as small rounded data have
    y = np.round(x + rng.normal(size=9), 1)
    low, high, used = bootstrap_interval(x, y, method=method, resamples=300, seed=3,
                                         confidence=0.9)
    picks = np.random.default_rng(3).integers(0, 9, size=(300, 9))
    ref = [SCIPY[method](x[i], y[i]).statistic for i in picks
           if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0]
    assert used == len(ref)
    assert (low, high) == pytest.approx(tuple(np.quantile(ref, [0.05, 0.95])), rel=1e-9)
    rows = _resampled(x[picks], y[picks], method)
    finite = rows[np.isfinite(rows)]
    np.testing.assert_allclose(finite, ref, rtol=1e-9, atol=1e-12)


def test_correlate_bootstrap_is_seeded(ds):
    def run(seed):
        return correlate(ds, "all:barrier_height", "final_metrics.test_accuracy",
                         method="pearson", bootstrap=200, seed=seed)

    a, b, c = run(1), run(1), run(2)
    assert a == b and a.interval != c.interval
    assert a.interval[0] <= a.statistic <= a.interval[1]
    assert "95% bootstrap interval" in str(a) and "seed 1" in str(a)


def test_statistic_is_scipys():
    x, y = np.array([1.0, 2, 3, 4, 5]), np.array([2.0, 1, 4, 3, 5])
    for method in METHODS:
        want = SCIPY[method](x, y)
        assert statistic(x, y, method) == (float(want.statistic), float(want.pvalue))


# --- errors ----------------------------------------------------------------------------------
def test_correlate_too_few_runs(ds):
    with pytest.raises(CkptscopeError, match="only 2 run.* needs at least 3"):
        correlate(ds.isel(run=[0, 1]), "all:barrier_height", "acc_end")


def test_correlate_constant_column(ds, tmp_path):
    runs = [str(r) for r in ds["run"].values]
    with pytest.raises(CkptscopeError, match="is 0.5 for all 6 runs, so it cannot correlate"):
        correlate(ds, "all:barrier_height", dict.fromkeys(runs, 0.5))


@pytest.mark.parametrize("metric, with_, kwargs, match", [
    ("all:barrier_height", "acc_end", {"method": "cosine"}, "method 'cosine' is not one of"),
    ("all:barrier_height", "acc_end", {"bootstrap": -1}, "bootstrap must be"),
    ("all:barrier_height", "acc_end", {"confidence": 1.5}, "confidence must be in"),
    ("all:speed", "acc_end", {}, "unknown metric 'speed'"),
    ("all:shape", "acc_end", {}, "shape is a verdict"),
    ("barrier_height", "acc_end", {}, "names no group"),
    ("fc:barrier_height", "acc_end", {}, "names group 'fc'; the result has groups"),
    ("all@train:barrier_height", "acc_end", {}, "names split 'train'"),
    ("all:barrier_height", "final_metrics.top5", {}, "final_metrics has no 'top5'; it holds"),
    ("all:barrier_height", "learning_rate", {}, "has no metadata field 'learning_rate'; it has"),
    ("all:barrier_height", "role", {}, "role is 'final', not a number"),
    ("all:barrier_height", "x:y:z", {}, "neither a metric"),
    ("all:barrier_height", "missing.csv", {}, "table 'missing.csv' does not exist"),
])
def test_correlate_bad_input(ds, metric, with_, kwargs, match):
    with pytest.raises(CkptscopeError, match=match):
        correlate(ds, metric, with_, **kwargs)


def test_correlate_refuses_a_changed_checkpoint(ds, tmp_path):
    from ckptscope.checkpoints import load_checkpoint, save_checkpoint

    end = Path(str(ds["end_path"].values[0]))
    copy = tmp_path / "final.safetensors"
    ckpt = load_checkpoint(end)
    meta = {**ckpt.metadata, "final_metrics": '{"test_accuracy": 0.99}'}
    save_checkpoint(copy, ckpt.state, metadata=meta)
    paths = [str(copy)] + [str(p) for p in ds["end_path"].values[1:]]
    with pytest.raises(CkptscopeError, match="has changed since the result was made"):
        correlate(ds.assign_coords(end_path=("run", paths)), "all:barrier_height",
                  "final_metrics.test_accuracy")


def test_correlate_csv_errors(ds, tmp_path):
    runs = [str(r) for r in ds["run"].values]
    cases = {
        "run,y\n" + "".join(f"{r},1\n" for r in runs[:-1]): "no value for run",
        "run,y\n" + "".join(f"{r},abc\n" for r in runs): "is 'abc', not a number",
        "run,y\n" + "".join(f"{r},1\n" for r in runs) + f"{runs[0]},2\n": "repeats",
        "run\n": "needs a header and rows",
        "run,y\n" + f"{runs[0]},1,2\n": "line 2 has 3 cells",
    }
    for i, (text, match) in enumerate(cases.items()):
        path = tmp_path / f"t{i}.csv"
        path.write_text(text)
        with pytest.raises(CkptscopeError, match=match):
            correlate(ds, "all:barrier_height", str(path))
    with pytest.raises(CkptscopeError, match="has no column 'z'"):
        correlate(ds, "all:barrier_height", f"{tmp_path / 't0.csv'}:z")


def test_correlate_needs_a_split_when_there_are_several():
    alphas = np.linspace(0, 1, 5)
    loss = np.random.default_rng(0).random((4, 1, 2, 5))
    ds = build_result(loss=loss, accuracy=np.full(loss.shape, 0.5), distance=np.ones((4, 1)),
                      alphas=alphas, groups=["all"], patterns=[".*"], n_tensors=[1],
                      n_params=[1], splits=["train", "test"], n_examples=[5, 5],
                      runs=[RunInfo(str(i)) for i in range(4)], attrs={})
    with pytest.raises(CkptscopeError, match="splits \\['train', 'test'\\]; name one: all@train"):
        correlate(ds, "all:barrier_height", "loss_end")
    c = correlate(ds, "all@train:barrier_height", "loss_end")
    assert c.outcome == "all@train:loss_end"
    with pytest.raises(CkptscopeError, match="in-memory state"):
        correlate(ds, "all@train:barrier_height", "final_metrics.test_accuracy")


def test_correlate_refuses_a_torch_end_file(ds, tmp_path):
    import torch

    path = tmp_path / "final.pt"
    torch.save({"w": torch.zeros(1)}, path)
    from ckptscope.outcomes import checkpoint_metadata

    with pytest.raises(CkptscopeError, match="not a safetensors file, so it carries no metadata"):
        checkpoint_metadata(path)
    assert os.path.exists(path)


def test_correlate_on_selected_runs(ds):
    labels = [str(r) for r in ds["run"].values]
    c = correlate(ds, "all:barrier_height", "acc_end", runs="seed_[1-4]")
    assert c.runs == tuple(labels[1:5])
    sub = ds.isel(run=slice(1, 5))
    want = stats.spearmanr(_own(sub, "barrier_height"), _own(sub, "acc_end"))
    assert c.statistic == pytest.approx(want.statistic)
    assert correlate(ds, "all:barrier_height", "acc_end", runs=labels[1:5]) == c
    with pytest.raises(CkptscopeError, match="no run matches 'i-f:\\*'; the runs are"):
        correlate(ds, "all:barrier_height", "acc_end", runs="i-f:*")
    with pytest.raises(CkptscopeError, match="has no run\\(s\\) \\['x'\\]"):
        correlate(ds, "all:barrier_height", "acc_end", runs=["x", labels[0]])
