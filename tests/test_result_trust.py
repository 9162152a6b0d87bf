"""A result is trusted for its curves only (issue #12 section 2; issue #13 items 2 and 8).

- ``check`` and ``compare`` recompute verdicts and metrics from the loss with the recorded
  tolerances and refuse a result whose stored ones disagree;
- every claim about an invalid curve fails, except ``shape=invalid``;
- results are validated for types and non-empty dims before ``check``, ``compare``, ``merge`` or
  ``plot`` writes anything;
- expectation files are bounded (size, encoding, nesting, count).

Results are built with ``build_result`` (classified as ``ckptscope path`` classifies them), then
forged with xarray and written with ``to_netcdf(engine="scipy")``. Every refusal is checked
through the CLI: exit status 2, one line on stderr, no traceback, no output file.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ckptscope import shape  # noqa: E402
from ckptscope.check import COMPARED  # noqa: E402
from ckptscope.errors import CkptscopeError  # noqa: E402
from ckptscope.results import RunInfo, build_result, validate_result  # noqa: E402
from tests.conftest import run_cli as run

A = np.linspace(0.0, 1.0, 11)
BARRIER = 1.0 - 0.8 * A
BARRIER[5] += 0.3                                  # 0.22 above the running minimum
MONOTONIC = 0.2 + 0.8 * np.exp(-5 * A)
COMMANDS = ("check", "compare", "merge", "plot")


def make_result(curves=(BARRIER, MONOTONIC), *, alphas=A, runs=2, **tolerances):
    """A result classified as ``ckptscope path`` classifies it: groups ``all`` and ``fc`` (one
    curve each, the same in every run), split ``test``, runs ``0``, ``1``, ..."""
    curves = np.asarray(curves, dtype=np.float64)
    dims = (runs, len(curves), 1, len(alphas))
    loss = np.broadcast_to(curves[None, :, None, :], dims).copy()
    return build_result(
        loss=loss, accuracy=np.full(dims, 0.5), distance=np.full((runs, len(curves)), 0.3),
        alphas=alphas, groups=["all", "fc"], patterns=[".*", "fc"], n_tensors=[4, 2],
        n_params=[100, 10], splits=["test"], n_examples=[50],
        runs=[RunInfo(str(r)) for r in range(runs)],
        attrs={"adapter": "mlp", **shape.shape_attrs(**tolerances)},
        extra=shape.shape_variables(loss, alphas, **tolerances),
    )


def with_values(ds, name, values):
    """``ds`` with ``name``'s values replaced (same dims and attrs)."""
    return ds.assign({name: (ds[name].dims, values, ds[name].attrs)})


def write(ds, path):
    ds.to_netcdf(path, engine="scipy")
    return path


def assert_refused(code, err, *needles):
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def command(name, path, tmp_path):
    """The argv of one command reading ``path`` (as the new result for compare, against a
    genuine baseline), and the files it would write."""
    out = {"check": tmp_path / "report.xml", "compare": tmp_path / "compare.xml",
           "merge": tmp_path / "merged.nc", "plot": tmp_path / "figure.png"}[name]
    if name == "check":
        return ["check", path, "--expect", "all:loss_end<5", "--junit", out], out
    if name == "compare":
        baseline = write(make_result(), tmp_path / "baseline.nc")
        return ["compare", baseline, path, "--junit", out], out
    return [name, path, "-o", out], out


# --- check and compare recompute: stored verdicts that disagree are refused ------------------
@pytest.mark.parametrize("expect", ["all:shape=barrier", "*:barrier_height<=10"])
def test_check_refuses_all_nan_curve_stored_as_barrier(tmp_path, capsys, expect):
    ds = make_result()
    loss = ds["loss"].values.copy()
    loss[0, 0] = np.nan  # run 0, group all: the stored shape still says barrier
    path = write(with_values(ds, "loss", loss), tmp_path / "nan.nc")
    report = tmp_path / "report.xml"
    code, _, err = run(["check", path, "--expect", expect, "--junit", report], capsys)
    assert_refused(code, err, f"{str(path)!r} stores shape = 'barrier' for run '0', group "
                              f"'all', split 'test', but its loss curve gives 'invalid'",
                   "ckptscope merge RESULT -o NEW.nc", "--tolerance")
    assert not report.exists()


def test_check_refuses_a_stored_shape_edited_to_plateau(tmp_path, capsys):
    ds = make_result()
    verdicts = ds["shape"].values.copy()
    verdicts[1, 0, 0] = "plateau"
    path = write(with_values(ds, "shape", verdicts), tmp_path / "edited.nc")
    code, _, err = run(["check", path, "--expect", "all:shape=plateau"], capsys)
    assert_refused(code, err, "stores shape = 'plateau' for run '1', group 'all'",
                   "gives 'barrier' (shape_rtol 0.02, shape_atol 0.01, shape_plateau_alpha 0.75)")


@pytest.mark.parametrize("name", shape.METRICS)
def test_check_refuses_an_edited_metric(tmp_path, capsys, name):
    ds = make_result()
    values = ds[name].values.copy()
    values[1, 1, 0] += 0.25  # run 1, group fc
    path = write(with_values(ds, name, values), tmp_path / "edited.nc")
    code, _, err = run(["check", path, "--expect", "fc:shape=monotonic"], capsys)
    assert_refused(code, err, f"stores {name} = ", "for run '1', group 'fc', split 'test'")


@pytest.mark.parametrize("name, curve, stored", [
    ("barrier_height", MONOTONIC, np.nan),          # NaN stored for a number
    ("half_drop_alpha", MONOTONIC[::-1], 0.5),      # a number stored for NaN (the loss rises)
], ids=["nan-stored", "number-stored"])
def test_check_nan_against_a_number_is_a_disagreement(tmp_path, capsys, name, curve, stored):
    ds = make_result([BARRIER, curve])
    values = ds[name].values.copy()
    values[0, 1, 0] = stored
    path = write(with_values(ds, name, values), tmp_path / "edited.nc")
    code, _, err = run(["check", path, "--expect", "all:shape=barrier"], capsys)
    assert_refused(code, err, f"stores {name} = {stored!r} for run '0', group 'fc'")


def test_check_accepts_float_round_off_in_stored_metrics(tmp_path, capsys):
    ds = make_result()
    path = write(with_values(ds, "barrier_height", ds["barrier_height"].values * (1 + 1e-13)),
                 tmp_path / "r.nc")
    code, out, err = run(["check", path, "--expect", "all:barrier_height>0.2"], capsys)
    assert code == 0, out + err


def test_check_tolerance_option_replaces_stored_verdicts(tmp_path, capsys):
    ds = make_result()
    path = write(with_values(ds, "shape", np.full(ds["shape"].shape, "plateau")),
                 tmp_path / "edited.nc")
    argv = ["check", path, "--tolerance", "rtol=0.02", "--expect"]
    code, out, err = run([*argv, "all:shape=barrier"], capsys)
    assert code == 0, out + err
    code, out, _ = run([*argv, "all:shape=plateau"], capsys)
    assert code == 1 and "shape = barrier" in out


def test_check_recomputes_with_the_recorded_tolerances(tmp_path, capsys):
    ds = make_result(rtol=0.5)  # the rise (0.22) is under 0.5 x range (0.8): no barrier
    assert set(ds["shape"].values.ravel()) == {"monotonic"}
    path = write(ds, tmp_path / "loose.nc")
    code, out, err = run(["check", path, "--expect", "all:shape=monotonic"], capsys)
    assert code == 0, out + err


def test_check_refuses_an_edited_recorded_tolerance(tmp_path, capsys):
    path = write(make_result().assign_attrs(shape_rtol=0.5), tmp_path / "edited.nc")
    code, _, err = run(["check", path, "--expect", "all:shape=barrier"], capsys)
    assert_refused(code, err, "stores shape = 'barrier' for run '0', group 'all'",
                   "gives 'monotonic' (shape_rtol 0.5,")


@pytest.mark.parametrize("cmd", COMMANDS)
@pytest.mark.parametrize("key, value", [
    ("shape_rtol", "abc"), ("shape_rtol", np.nan), ("shape_atol", -1.0),
    ("shape_plateau_alpha", 2.0),
])
def test_bad_recorded_tolerance_is_refused(tmp_path, capsys, cmd, key, value):
    path = write(make_result().assign_attrs({key: value}), tmp_path / "bad.nc")
    argv, out = command(cmd, path, tmp_path)
    code, _, err = run(argv, capsys)
    assert_refused(code, err, f"records {key}=")
    if cmd != "plot":  # plot draws one result: "the result" is named enough
        assert f"{str(path)!r} records {key}=" in err
    assert not out.exists()


@pytest.mark.parametrize("side", ["baseline", "new"])
def test_compare_refuses_a_result_whose_stored_verdicts_disagree(tmp_path, capsys, side):
    genuine = write(make_result(), tmp_path / "genuine.nc")
    ds = make_result()
    forged = write(with_values(ds, "shape", np.full(ds["shape"].shape, "monotonic")),
                   tmp_path / "forged.nc")
    pair = [forged, genuine] if side == "baseline" else [genuine, forged]
    report = tmp_path / "compare.xml"
    code, _, err = run(["compare", *pair, "--junit", report], capsys)
    assert_refused(code, err, f"{str(forged)!r} stores shape = 'monotonic' for run '0', group "
                              f"'all'")
    assert not report.exists()


# --- invalid curves: only shape=invalid holds --------------------------------------------------
@pytest.mark.parametrize("expect, status", [
    ("all:loss_end<0.5", 1),                     # issue #13: passed with exit 0
    ("all:loss_start>0", 1),
    ("all:acc_end>=0", 1),
    ("all:distance>0", 1),
    ("all:barrier_height<=10", 1),
    ("all:shape!=barrier", 1),                   # a claim that the curve has another shape
    ("all:shape!=invalid", 1),
    ("all:shape=monotonic", 1),
    ("all:shape=invalid", 0),
    ("fc:loss_end<0.5", 0),                      # the valid curve beside it is unaffected
])
def test_check_invalid_curve_bears_out_only_shape_invalid(tmp_path, capsys, expect, status):
    ds = make_result([[1.0, np.nan, 0.2], [1.0, 0.5, 0.2]], alphas=[0.0, 0.5, 1.0])
    path = write(ds, tmp_path / "invalid.nc")
    code, out, err = run(["check", path, "--expect", expect], capsys)
    assert code == status, out + err
    if status:
        assert "curve is invalid (NaN/Inf)" in out


def test_compare_fails_every_row_of_an_invalid_curve(tmp_path, capsys):
    grid = [0.0, 0.5, 1.0]
    baseline = write(make_result([[1.0, 0.5, 0.2]] * 2, alphas=grid), tmp_path / "base.nc")
    new = write(make_result([[1.0, np.nan, 0.2], [1.0, 0.5, 0.2]], alphas=grid),
                tmp_path / "new.nc")
    code, out, _ = run(["compare", baseline, new], capsys)
    assert code == 1
    failed = [line.split() for line in out.splitlines() if line.startswith("FAIL")]
    # The endpoints are finite and equal to the baseline's, yet no row passes for group all.
    assert {row[3] for row in failed if row[1] == "all"} == {"shape", *COMPARED}
    assert all("new curve is invalid (NaN/Inf)" in " ".join(row) for row in failed)
    assert not [row for row in failed if row[1] == "fc"]


# --- types and empty dims: refused before anything is written ---------------------------------
def _int8_alpha(ds):
    # 0, 1, 2, ...: strictly increasing, with 0 and 1 on the grid, as integers.
    return ds.assign_coords(alpha=np.arange(ds.sizes["alpha"], dtype=np.int8))


FORGED_TYPES = {
    "loss-strings": (lambda ds: ds.assign(loss=ds["loss"].astype(str)), "'loss' holds strings"),
    "loss-int8": (lambda ds: ds.assign(loss=(ds["loss"] * 10).astype(np.int8)),
                  "'loss' holds int8 values"),
    "accuracy-strings": (lambda ds: ds.assign(accuracy=ds["accuracy"].astype(str)),
                         "'accuracy' holds strings"),
    "accuracy-int8": (lambda ds: ds.assign(accuracy=ds["accuracy"].astype(np.int8)),
                      "'accuracy' holds int8 values"),
    "distance-strings": (lambda ds: ds.assign(distance=ds["distance"].astype(str)),
                         "'distance' holds strings"),
    "distance-int8": (lambda ds: ds.assign(distance=ds["distance"].astype(np.int8)),
                      "'distance' holds int8 values"),
    "alpha-strings": (lambda ds: ds.assign_coords(alpha=ds["alpha"].values.astype(str)),
                      "'alpha' holds strings"),
    "alpha-int8": (_int8_alpha, "'alpha' holds int8 values"),
}


@pytest.mark.parametrize("cmd", COMMANDS)
@pytest.mark.parametrize("forge", FORGED_TYPES)
def test_result_of_wrong_types_is_refused_and_nothing_written(tmp_path, capsys, cmd, forge):
    mutate, holds = FORGED_TYPES[forge]
    path = write(mutate(make_result()), tmp_path / "forged.nc")
    argv, out = command(cmd, path, tmp_path)
    code, _, err = run(argv, capsys)
    assert_refused(code, err, "is not a valid ckptscope result", holds,
                   "expected real floats (float32 or float64)")
    assert not out.exists()


FORGED_SHAPES = {
    "shape-numbers": (lambda v: np.zeros(v.shape), "'shape' holds float64 values"),
    "shape-unknown": (lambda v: np.full(v.shape, "bumpy"),
                      "'shape' holds 'bumpy', not one of monotonic, barrier, plateau, invalid"),
    "metric-strings": (lambda v: v.astype(str), "holds strings"),
    "metric-int8": (lambda v: v.astype(np.int8), "holds int8 values"),
}


@pytest.mark.parametrize("cmd", COMMANDS)
@pytest.mark.parametrize("forge", FORGED_SHAPES)
def test_result_with_malformed_shape_variables_is_refused(tmp_path, capsys, cmd, forge):
    mutate, holds = FORGED_SHAPES[forge]
    ds = make_result()
    name = "shape" if forge.startswith("shape") else "above_start"
    path = write(with_values(ds, name, mutate(ds[name].values)), tmp_path / "forged.nc")
    argv, out = command(cmd, path, tmp_path)
    code, _, err = run(argv, capsys)
    assert_refused(code, err, "is not a valid ckptscope result", holds)
    assert not out.exists()


@pytest.mark.parametrize("cmd", COMMANDS)
def test_result_with_zero_runs_is_refused_and_nothing_written(tmp_path, capsys, cmd):
    # Issue #13 item 8: check crashed (exit 1) after writing its JUnit report; merge and plot
    # wrote outputs.
    path = write(make_result().isel(run=[]), tmp_path / "empty.nc")
    argv, out = command(cmd, path, tmp_path)
    code, _, err = run(argv, capsys)
    assert_refused(code, err, "has no runs (the 'run' dim is empty)")
    assert not out.exists()


def test_result_with_a_non_integer_schema_is_refused(tmp_path, capsys):
    path = write(make_result().assign_attrs(ckptscope_schema="one"), tmp_path / "forged.nc")
    code, _, err = run(["check", path, "--expect", "all:loss_end<5"], capsys)
    assert_refused(code, err, "attribute 'ckptscope_schema' is 'one', expected an integer")


@pytest.mark.parametrize("dim", ["run", "group", "split", "alpha"])
def test_validate_result_refuses_an_empty_dim(dim):
    with pytest.raises(CkptscopeError, match=f"has no {dim}s"):
        validate_result(make_result().isel({dim: []}))


@pytest.mark.parametrize("mutate, match", [
    (lambda ds: ds.assign(loss=ds["loss"].astype(complex)), "'loss' holds complex128 values"),
    (lambda ds: ds.assign(accuracy=ds["accuracy"] > 0), "'accuracy' holds bool values"),
    (lambda ds: ds.assign(loss=ds["loss"].astype(object)),
     r"'loss' holds Python objects \(float\)"),
    (lambda ds: ds.assign_coords(run=[0, 1]), "'run' holds int64 values, expected strings"),
    (lambda ds: ds.assign_coords(pattern=("group", [1, 2])), "'pattern' holds int64 values"),
    (lambda ds: ds.assign_coords(n_examples=("split", [50.5])),
     "'n_examples' holds float64 values, expected integers"),
    (lambda ds: ds.assign(shape=ds["shape"].isel(split=0)),
     r"'shape' has dims \('run', 'group'\), expected \('run', 'group', 'split'\)"),
])
def test_validate_result_checks_types(mutate, match):
    with pytest.raises(CkptscopeError, match=match):
        validate_result(mutate(make_result()))


def test_build_result_labels_runs_with_strings():
    ds = build_result(loss=np.zeros((1, 1, 1, 2)), accuracy=np.zeros((1, 1, 1, 2)),
                      distance=np.zeros((1, 1)), alphas=[0, 1], groups=["all"], patterns=[".*"],
                      n_tensors=[1], n_params=[1], splits=["test"], n_examples=[1],
                      runs=[RunInfo(0)], attrs={})
    assert ds["run"].values.tolist() == ["0"]


# --- plot draws verdicts from the curves -------------------------------------------------------
def test_plot_legend_shows_verdicts_recomputed_from_the_curves():
    from ckptscope.plots import plot_path

    ds = make_result()
    ax = plot_path(with_values(ds, "shape", np.full(ds["shape"].shape, "plateau")))
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    plt.close(ax.figure)
    assert labels == ["full model (barrier 2/2)", "fc (monotonic 2/2)"]


# --- expectation files are bounded --------------------------------------------------------------
@pytest.mark.parametrize("content, match", [
    (b"expect = " + b"[" * 5000 + b"]" * 5000, "nests arrays or tables too deeply"),
    (b"expect = [" + b"{a = " * 5000 + b"1" + b"}" * 5000 + b"]",
     "nests arrays or tables too deeply"),
    (b'expect = ["all:shape=barrier"]\n# caf\xe9\n', "is not UTF-8 text (byte 0xe9 at offset"),
    (b'expect = ["all:shape=barrier"]\n#' + b"x" * (1 << 20),
     "is larger than 1048576 bytes (1 MiB)"),
    (b"expect = [" + b'"all:loss_end<5",' * 10_001 + b"]",
     "holds 10001 expectations, more than 10000"),
], ids=["nested-arrays", "nested-tables", "latin-1", "over-1-MiB", "too-many"])
def test_check_refuses_a_bad_expectations_file(tmp_path, capsys, content, match):
    result = write(make_result(), tmp_path / "r.nc")
    toml = tmp_path / "expect.toml"
    toml.write_bytes(content)
    report = tmp_path / "report.xml"
    code, _, err = run(["check", result, "--expect", toml, "--junit", report], capsys)
    assert_refused(code, err, f"{str(toml)!r}", match)
    assert not report.exists()
