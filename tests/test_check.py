"""Expectations against results: parsing, files, every operator, JUnit, comparisons."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest

from ckptscope import check as checks
from ckptscope import shape
from ckptscope.check import Expectation, check, compare, load_expectations, parse_expectation
from ckptscope.errors import CkptscopeError
from ckptscope.results import RunInfo, build_result

A = np.linspace(0.0, 1.0, 21)
PLATEAU = np.where(A < 0.8, 2.3, 2.3 - 2.2 * (A - 0.8) / 0.2)        # half drop at 0.9
BARRIER = 2.3 - 2.2 * A
BARRIER[10] += 0.5 + 0.11                                            # 0.5 above alpha = 0.45
MONOTONIC = 0.1 + 2.2 * (np.exp(-5 * A) - np.exp(-5)) / (1 - np.exp(-5))
GROUPS = ["all", "layer3", "fc"]


def make_result(curves=(PLATEAU, BARRIER, MONOTONIC), *, runs=2, alphas=A, groups=GROUPS,
                splits=("train", "test")):
    curves = np.asarray(curves, dtype=np.float64)
    shape_ = (runs, len(groups), len(splits), len(alphas))
    loss = np.broadcast_to(curves[None, :, None, :], shape_).copy()
    accuracy = np.broadcast_to(np.linspace(0.1, 0.9, len(alphas)), shape_).copy()
    return build_result(
        loss=loss, accuracy=accuracy, distance=np.tile([[1.0, 0.4, 0.2]], (runs, 1)),
        alphas=alphas, groups=groups, patterns=[".*", "layer3", "fc"],
        n_tensors=[10, 2, 2], n_params=[1000, 100, 10], splits=list(splits),
        n_examples=[100] * len(splits), runs=[RunInfo(f"seed{r}") for r in range(runs)],
        attrs={"adapter": "mlp"},
    )


@pytest.fixture
def ds():
    return make_result()


# --- parsing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text, want", [
    ("all:shape=plateau", Expectation("all", "shape", "=", "plateau")),
    ("layer3:barrier_height<=0.5", Expectation("layer3", "barrier_height", "<=", 0.5)),
    (" layer3@test : barrier_height >= 1e-3 ", Expectation("layer3", "barrier_height", ">=",
                                                           0.001, split="test")),
    ("*:shape!=invalid", Expectation("*", "shape", "!=", "invalid")),
    ("fc:above_start==0", Expectation("fc", "above_start", "=", 0.0)),
    ("fc:above_start=false", Expectation("fc", "above_start", "=", 0.0)),
    ("blocks.0:(conv|bn):distance<2", Expectation("blocks.0:(conv|bn)", "distance", "<", 2.0)),
    ("all:loss_end>-1", Expectation("all", "loss_end", ">", -1.0)),
])
def test_parse_expectation_forms(text, want):
    got = parse_expectation(text)
    assert got == want
    assert parse_expectation(str(got)) == got  # the canonical text parses back


@pytest.mark.parametrize("text, match", [
    ("all shape=plateau", r"not GROUP\[@SPLIT\]:METRIC OP VALUE"),
    ("all:shape", "not GROUP"),
    ("all:shape~plateau", "not GROUP"),
    (":shape=plateau", "not GROUP"),
    ("all:height<=1", "unknown metric 'height'; known metrics: shape, barrier_height"),
    ("all:shape=bumpy", "shape value 'bumpy' is not a shape; use one of monotonic"),
    ("all:shape<plateau", "shape compares with = or !=, not '<'"),
    ("all:barrier_height<=plateau", "barrier_height takes a number, got 'plateau'"),
    ("all:barrier_height<=nan", "cannot be compared with NaN"),
    ("all@:shape=plateau", "has '@' but no split"),
])
def test_parse_expectation_bad_text_raises(text, match):
    with pytest.raises(CkptscopeError, match=match):
        parse_expectation(text)


def test_expectation_bad_fields_raise():
    with pytest.raises(CkptscopeError, match=r"unknown comparison '=>'.*use one of = != <"):
        Expectation("all", "barrier_height", "=>", 0.5)
    with pytest.raises(CkptscopeError, match="group must be a non-empty string"):
        Expectation(" ", "shape", "=", "barrier")
    with pytest.raises(CkptscopeError, match="an expectation is a string"):
        parse_expectation(3)


# --- checking --------------------------------------------------------------------------------
@pytest.mark.parametrize("text, passed", [
    ("layer3@train:barrier_height=0.5", True),
    ("layer3@train:barrier_height!=0.5", False),
    ("layer3@train:barrier_height<0.6", True),
    ("layer3@train:barrier_height<0.5", False),
    ("layer3@train:barrier_height<=0.5", True),
    ("layer3@train:barrier_height<=0.4", False),
    ("layer3@train:barrier_height>0.4", True),
    ("layer3@train:barrier_height>0.5", False),
    ("layer3@train:barrier_height>=0.5", True),
    ("layer3@train:barrier_height>=0.6", False),
    ("layer3@train:shape=barrier", True),
    ("layer3@train:shape!=barrier", False),
])
def test_check_each_operator(ds, text, passed):
    rows = check(ds, [text])
    assert [r.passed for r in rows] == [passed, passed]  # one row per run
    assert {(r.run, r.group, r.split) for r in rows} == {("seed0", "layer3", "train"),
                                                        ("seed1", "layer3", "train")}


def test_check_verdicts_of_known_curves(ds):
    rows = check(ds, ["all:shape=plateau", "layer3:shape=barrier", "fc:shape=monotonic"])
    assert all(r.passed for r in rows), [r.message for r in rows if not r.passed]
    assert len(rows) == 3 * 2 * 2


def test_check_star_means_every_group_and_split(ds):
    rows = check(ds, "*:shape!=invalid")
    assert len(rows) == 2 * 3 * 2
    assert {r.group for r in rows} == set(GROUPS)
    assert {r.split for r in rows} == {"train", "test"}
    assert all(r.passed for r in rows)
    failing = [r for r in check(ds, "*:shape=monotonic") if not r.passed]
    assert {r.group for r in failing} == {"all", "layer3"}
    assert "shape = barrier (barrier_height 0.5" in next(
        r.message for r in failing if r.group == "layer3")
    assert failing[0].message.endswith("expected = monotonic")


def test_check_split_selects_one_split(ds):
    rows = check(ds, parse_expectation("fc@test:loss_end<0.2"))
    assert [r.split for r in rows] == ["test", "test"]
    assert rows[0].actual == pytest.approx(0.1)
    assert rows[0].passed and rows[0].message == "loss_end = 0.1 < 0.2"


@pytest.mark.parametrize("metric, want", [
    ("loss_start", 2.3), ("loss_end", 0.1), ("acc_start", 0.1), ("acc_end", 0.9),
    ("distance", 0.4), ("half_drop_alpha", None),
])
def test_check_derived_metrics(ds, metric, want):
    rows = check(ds, f"layer3@test:{metric}>=-100")
    if want is None:
        want = float(shape.half_drop_alpha(BARRIER, A))
    assert rows[0].actual == pytest.approx(want)


def test_check_endpoints_skip_extrapolated_alphas():
    alphas = np.linspace(-0.5, 1.5, 41)
    curve = np.interp(alphas, A, MONOTONIC)
    ds = make_result([curve, curve, curve], alphas=alphas)
    assert check(ds, "fc@test:loss_start=2.3")[0].passed
    assert check(ds, "fc@test:loss_end=0.1")[0].passed


def test_check_invalid_curve_fails_with_reason(ds):
    loss = ds["loss"].values.copy()
    loss[1, 2, :, 4] = np.nan  # seed1, fc
    ds = ds.assign(loss=(ds["loss"].dims, loss, ds["loss"].attrs))
    rows = check(ds, ["fc@test:barrier_height<=1", "fc@test:shape!=barrier",
                      "fc@test:shape=invalid", "fc@test:loss_start>0"])
    by = {(str(r.expectation), r.run): r for r in rows}
    for text in ("fc@test:barrier_height<=1", "fc@test:shape!=barrier"):
        assert by[text, "seed0"].passed
        assert not by[text, "seed1"].passed
        assert by[text, "seed1"].message == "curve is invalid (NaN/Inf)"
    assert by["fc@test:shape=invalid", "seed1"].passed
    assert not by["fc@test:shape=invalid", "seed0"].passed
    # The start itself is finite, but nothing on an invalid curve is a measurement (issue #13).
    assert not by["fc@test:loss_start>0", "seed1"].passed
    assert by["fc@test:loss_start>0", "seed1"].message == "curve is invalid (NaN/Inf)"
    assert by["fc@test:loss_start>0", "seed0"].passed


def test_check_undefined_metric_on_valid_curve_fails():
    rising = MONOTONIC[::-1]
    rows = check(make_result([rising, rising, rising]), "all@test:half_drop_alpha>0")
    assert not rows[0].passed
    assert rows[0].message.startswith("half_drop_alpha is undefined (NaN)")


def test_check_classifies_with_given_tolerances(ds):
    assert check(ds, "layer3@test:shape=barrier")[0].passed
    rows = check(ds, "layer3@test:shape=barrier", rtol=0.5)
    assert not rows[0].passed
    assert rows[0].actual == "monotonic"
    # A classified result keeps its own verdicts unless tolerances are given.
    classified = shape.classify(ds, rtol=0.5)
    assert check(classified, "layer3@test:shape=monotonic")[0].passed


def test_check_keeps_recorded_tolerances_not_given(ds):
    classified = shape.classify(ds, atol=0.7)
    assert check(classified, "layer3@test:shape=monotonic")[0].passed
    rows = check(classified, "layer3@test:tolerance=0.7", rtol=0.01)
    assert rows[0].passed, rows[0].message


def test_check_recomputes_a_metric_missing_from_result(ds):
    old = shape.classify(ds).drop_vars("tolerance")  # classified by an older ckptscope
    rows = check(old, "layer3@test:tolerance<1")
    assert rows[0].passed and rows[0].actual == pytest.approx(0.02 * np.ptp(BARRIER))


@pytest.mark.parametrize("text, match", [
    ("layer9:shape=barrier", r"names group 'layer9'; the result has groups "
                             r"\['all', 'layer3', 'fc'\]\. Use one of them or '\*'"),
    ("all@val:shape=barrier", r"names split 'val'; the result has splits \['train', 'test'\]"),
])
def test_check_unknown_group_or_split_raises(ds, text, match):
    with pytest.raises(CkptscopeError, match=match):
        check(ds, text)


# --- files -----------------------------------------------------------------------------------
def test_load_expectations_string_list(tmp_path):
    path = tmp_path / "e.toml"
    path.write_text('expect = ["all:shape=plateau", "layer3@test:barrier_height<=0.5"]\n')
    assert load_expectations(path) == [
        Expectation("all", "shape", "=", "plateau"),
        Expectation("layer3", "barrier_height", "<=", 0.5, split="test"),
    ]


def test_load_expectations_tables(tmp_path, ds):
    path = tmp_path / "e.toml"
    path.write_text(
        '[[expect]]\ngroup = "all"\nsplit = "test"\nmetric = "shape"\nvalue = "plateau"\n\n'
        '[[expect]]\ngroup = "*"\nmetric = "barrier_height"\nop = "<="\nvalue = 1\n\n'
        '[[expect]]\ngroup = "fc"\nmetric = "above_start"\nvalue = false\n'
    )
    exps = load_expectations(path)
    assert exps == [Expectation("all", "shape", "=", "plateau", split="test"),
                    Expectation("*", "barrier_height", "<=", 1.0),
                    Expectation("fc", "above_start", "=", 0.0)]
    assert all(r.passed for r in check(ds, exps))


def test_load_expectations_mixed_inline_tables(tmp_path):
    path = tmp_path / "e.toml"
    path.write_text('expect = ["fc:shape=monotonic", '
                    '{group = "layer3", metric = "shape", value = "barrier"}]\n')
    assert [str(e) for e in load_expectations(path)] == ["fc:shape=monotonic",
                                                         "layer3:shape=barrier"]


@pytest.mark.parametrize("text, match", [
    ("expect = [", "is not valid TOML"),
    ("expected = ['all:shape=plateau']", r"unknown key\(s\) \['expected'\]"),
    ("expect = []", "holds no expectations"),
    ("expect = 'all:shape=plateau'", "holds no expectations"),
    ("expect = ['all:shape=plateau', 'all:height<1']", "expectation 2: unknown metric 'height'"),
    ("expect = [3]", "expectation 1: got int 3; use a string or a table"),
    ("[[expect]]\ngroup = 'all'\nmetric = 'shape'", r"missing key\(s\) \['value'\]"),
    ("[[expect]]\ngroup = 'all'\nmetric = 'shape'\nvalue = 'barrier'\nwhen = 1",
     r"unknown key\(s\) \['when'\]"),
    ("[[expect]]\ngroup = 1\nmetric = 'shape'\nvalue = 'barrier'", "group must be a string"),
])
def test_load_expectations_bad_file_raises(tmp_path, text, match):
    path = tmp_path / "e.toml"
    path.write_text(text)
    with pytest.raises(CkptscopeError, match=match):
        load_expectations(path)


def test_load_expectations_missing_file_raises(tmp_path):
    with pytest.raises(CkptscopeError, match="does not exist"):
        load_expectations(tmp_path / "nope.toml")


# --- JUnit -----------------------------------------------------------------------------------
def test_to_junit_parses_and_counts(ds):
    rows = check(ds, ["all:shape=plateau", "*:shape=monotonic"])
    xml = checks.to_junit(rows)
    root = ET.fromstring(xml)
    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == len(rows) == 4 + 12
    failed = [c for c in cases if c.find("failure") is not None]
    assert int(suite.get("failures")) == int(root.get("failures")) == len(failed) == 8
    assert failed[0].find("failure").get("message").startswith("shape = plateau")
    assert cases[0].get("name") == "all:shape=plateau [run=seed0 group=all split=train]"


def test_to_junit_compare_rows(ds):
    root = ET.fromstring(checks.to_junit(compare(ds, ds), suite="compare"))
    assert root.get("failures") == "0"
    assert root.find("testsuite").get("name") == "compare"


# --- comparing -------------------------------------------------------------------------------
def test_compare_identical_passes(ds):
    rows = compare(ds, ds)
    assert all(r.passed for r in rows)
    assert len(rows) == 3 * 2 * (1 + len(checks.COMPARED))


def test_compare_higher_layer_barrier_fails_with_h_lb(ds):
    higher = BARRIER.copy()
    higher[10] += 0.3
    new = make_result([PLATEAU, higher, MONOTONIC], runs=3)
    rows = {(r.group, r.split, r.metric): r for r in compare(ds, new)}
    row = rows["layer3", "test", "barrier_height"]
    assert not row.passed
    assert row.baseline == pytest.approx(0.5) and row.new == pytest.approx(0.8)
    assert "higher barrier, H-LB" in row.message
    assert rows["layer3", "test", "shape"].passed
    assert rows["fc", "test", "barrier_height"].passed
    back = {(r.group, r.split, r.metric): r for r in compare(new, ds)}
    assert "lower barrier, L-LB" in back["layer3", "test", "barrier_height"].message


def test_compare_changed_verdict_fails(ds):
    new = make_result([PLATEAU, MONOTONIC, MONOTONIC])
    rows = {(r.group, r.split, r.metric): r for r in compare(ds, new)}
    row = rows["layer3", "train", "shape"]
    assert not row.passed
    assert (row.baseline, row.new) == ("barrier", "monotonic")
    assert row.message == "shape changed: barrier (2/2 runs) -> monotonic (2/2 runs)"


def test_compare_uses_baseline_tolerances(ds):
    loose = shape.classify(ds, rtol=0.5)
    rows = {(r.group, r.split, r.metric): r for r in compare(loose, ds)}
    assert rows["layer3", "test", "shape"].new == "monotonic"
    assert rows["layer3", "test", "shape"].passed


def test_compare_invalid_curve_fails(ds):
    loss = ds["loss"].values.copy()
    loss[0, 0, 0, 3] = np.inf
    bad = ds.assign(loss=(ds["loss"].dims, loss, ds["loss"].attrs))
    rows = {(r.group, r.split, r.metric): r for r in compare(ds, bad)}
    assert rows["all", "train", "shape"].message == "new curve is invalid (NaN/Inf)"
    assert not rows["all", "train", "barrier_height"].passed
    assert rows["all", "test", "shape"].passed


def test_compare_majority_verdict():
    assert shape.majority(np.array(["barrier", "monotonic", "monotonic"])) == (
        "monotonic", 2, 3)
    assert shape.majority(np.array(["barrier", "monotonic"]))[0] == "barrier"
    assert shape.majority(np.array(["plateau", "invalid"]))[0] == "invalid"


@pytest.mark.parametrize("other, match", [
    (lambda: make_result([PLATEAU, BARRIER, MONOTONIC], groups=["all", "layer4", "fc"]),
     r"different groups: missing in new \['layer3'\], unexpected in new \['layer4'\]"),
    (lambda: make_result(splits=("test",)), r"different splits: missing in new \['train'\]"),
    (lambda: make_result([np.interp(np.linspace(0, 1, 11), A, c)
                          for c in (PLATEAU, BARRIER, MONOTONIC)], alphas=np.linspace(0, 1, 11)),
     "different alpha grids .* same --alphas"),
])
def test_compare_mismatched_results_raise(ds, other, match):
    with pytest.raises(CkptscopeError, match=match):
        compare(ds, other())
