"""``ckptscope plane`` and ``ckptscope surface`` as users meet them: files, tables, errors."""

from __future__ import annotations

import numpy as np
import pytest

from ckptscope.checkpoints import save_checkpoint
from ckptscope.directions import load_directions
from ckptscope.grids import open_grid
from tests.conftest import perturbed
from tests.conftest import run_cli as run


@pytest.fixture
def three(tmp_path, mlp_pair):
    _, a, b = mlp_pair
    meta = {"adapter": "mlp", "adapter_options": {"widths": [2, 16, 16, 1]},
            "data": "spiral:60,40"}
    return [save_checkpoint(tmp_path / f"{n}.safetensors", s, metadata=meta)
            for n, s in (("a", a), ("b", b), ("c", perturbed(a, 0.4, 7)))]


def test_plane_command_writes_result_and_figure(three, tmp_path, capsys):
    out, fig = tmp_path / "plane.nc", tmp_path / "plane.png"
    code, stdout, err = run(["plane", *map(str, three), "--grid", "4", "--group", "layers.0",
                             "--out", str(out), "--plot", str(fig), "--plot-group", "layers.0"],
                            capsys)
    assert code == 0, err
    ds = open_grid(out)
    assert ds.attrs["grid_kind"] == "plane" and list(ds.group.values) == ["all", "layers.0"]
    assert fig.stat().st_size > 0
    assert "L(A)" in stdout and "L(C)" in stdout and f"wrote {out}" in stdout
    # `ckptscope plot` draws a grid result too
    code, _, err = run(["plot", str(out), "-o", str(tmp_path / "again.png"),
                        "--variable", "both"], capsys)
    assert code == 0, err


def test_plane_command_ranges(three, tmp_path, capsys):
    out = tmp_path / "p.nc"
    code, _, err = run(["plane", *map(str, three), "--x-range", "-0.5:1.5:5",
                        "--y-range", "0:1:3", "--out", str(out)], capsys)
    assert code == 0, err
    ds = open_grid(out)
    assert ds.x.values[0] == -0.5 and ds.x.values[-1] == 1.5
    np.testing.assert_array_equal(ds.y.values, [0.0, 0.5, 1.0])


@pytest.mark.parametrize("args, match", [
    (["--x-range", "1:0:5"], "x range '1:0:5' needs LO < HI"),
    (["--y-range", "0:1"], "y range '0:1' is not LO:HI:N"),
    (["--out", "p.txt"], "--out 'p.txt' should end in .nc"),
    (["--plot-group", "all"], "--plot-group names the group of the figure; add --plot"),
    (["--plot", "f.png", "--plot-group", "head"], "--plot-group 'head' is not one of"),
])
def test_plane_command_bad_input(three, capsys, args, match):
    code, _, err = run(["plane", *map(str, three), "--grid", "3", *args], capsys)
    assert code == 2 and err.startswith("error: ") and match in err, err
    assert "Traceback" not in err


def test_plane_command_identical_a_b(three, capsys):
    code, _, err = run(["plane", str(three[0]), str(three[0]), str(three[2]), "--grid", "3"],
                       capsys)
    assert code == 2 and "A and B are identical over group 'all'" in err, err


def test_surface_command_saves_and_reuses_directions(three, tmp_path, capsys):
    dirs, out = tmp_path / "dirs.safetensors", tmp_path / "s.nc"
    code, stdout, err = run(["surface", str(three[1]), "--seed", "4", "--grid", "3",
                             "--span", "0.5", "--save-directions", str(dirs),
                             "--out", str(out)], capsys)
    assert code == 0, err
    first = open_grid(out)
    assert first.attrs["direction_seed"] == 4 and first.x.values.tolist() == [-0.5, 0, 0.5]
    assert load_directions(dirs, _state(three[1])).seed == 4
    code, _, err = run(["surface", str(three[1]), "--directions", str(dirs), "--grid", "3",
                        "--span", "0.5", "--out", str(out)], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(open_grid(out).loss.values, first.loss.values)


def test_surface_command_two_checkpoints(three, tmp_path, capsys):
    out = tmp_path / "s.nc"
    code, _, err = run(["surface", str(three[1]), "--directions", f"{three[0]},{three[2]}",
                        "--grid", "3", "--out", str(out), "--plot", str(tmp_path / "s.png")],
                       capsys)
    assert code == 0, err
    assert open_grid(out).anchor.values.tolist() == ["center", "A", "B"]


@pytest.mark.parametrize("args, match", [
    (["--directions", "a,b,c"], "is not random, a .safetensors file or A,B"),
    (["--span", "-1"], "--span -1.0 must be positive"),
    (["--save-directions", "d.pt"], "--save-directions 'd.pt' should end in .safetensors"),
    (["--directions", "missing.safetensors"], "does not exist"),
])
def test_surface_command_bad_input(three, capsys, args, match):
    code, _, err = run(["surface", str(three[1]), "--grid", "3", *args], capsys)
    assert code == 2 and match in err, err


def _state(path):
    from ckptscope.checkpoints import load_checkpoint

    return load_checkpoint(path).state
