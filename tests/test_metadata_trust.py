"""A checkpoint's metadata is inert (issue #12, section 1).

A file may name only built-in adapters and datasets; nothing it names is imported or called; its
fields are bounded JSON data; its adapter options are checked against its own shapes on the meta
device before anything is allocated. Each case goes through the CLI entry and through Python, and
proves that nothing ran: a marker file stays absent, a planted module stays out of
``sys.modules``, a spy sees no call.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ckptscope
from ckptscope.adapters.mlp import MLP
from ckptscope.checkpoints import Checkpoint, save_checkpoint
from ckptscope.cli import main
from ckptscope.errors import CkptscopeError
from ckptscope.results import open_result

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = [2, 8, 8, 1]
DATA = "spiral:40,30"
FAST = ["--alphas", "2", "--device", "cpu"]
MAX_FIELDS, MAX_FIELD_BYTES = 64, 16384  # ckptscope.metadata's bounds (literal: the tests also
#                                          run against code from before that module)
WIDE = {"widths": [2, 20000, 20000, 1]}  # the issue's 1.6 GB module, in a file of 1 KB


def mlp_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in MLP(WIDTHS).state_dict().items()}


def forge(folder: Path, meta: dict[str, str], name: str = "a") -> str:
    """A small MLP checkpoint whose header holds ``ckptscope.<key>: value``, strings as given."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    save_file(mlp_state(), str(path), metadata={f"ckptscope.{k}": v for k, v in meta.items()})
    return str(path)


def forged_pair(folder: Path, meta: dict[str, str]) -> list[str]:
    return [forge(folder, meta, "a"), forge(folder, meta, "b")]


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_refusal(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.fixture
def no_user_code(monkeypatch):
    """Fail at once if ckptscope resolves any ``pkg.module:attr`` (the only door to user code)."""

    def refuse(spec, *, what):
        raise AssertionError(f"ckptscope imported {what} {spec!r}")

    monkeypatch.setattr("ckptscope.adapters.import_object", refuse)
    monkeypatch.setattr("ckptscope.data.import_object", refuse)


def plant(folder: Path, name: str) -> Path:
    """A module ``name`` on ``sys.path`` whose import-time code creates a marker; return it."""
    marker = folder / f"{name}-was-imported"
    (folder / f"{name}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nADAPTER = DATA = None\n"
    )
    return marker


# --- (1) an import spec for the adapter, with options that would run a command ------------------
def test_adapter_import_spec_in_metadata_runs_nothing(tmp_path, capsys, no_user_code):
    marker = tmp_path / "MARK"
    meta = {"adapter": "os:system", "adapter_options": json.dumps({"command": f"touch {marker}"})}
    files = forged_pair(tmp_path, meta)
    code, _, err = cli(["path", *files, *FAST], capsys)
    assert_one_line_refusal(code, err, "names adapter 'os:system' in its metadata",
                            "never imports code named by a file",
                            "--adapter os:system", "(Python: model='os:system')")
    with pytest.raises(CkptscopeError, match="never imports code named by a file"):
        ckptscope.linear_path(*files, alphas=2, device="cpu")
    # A Checkpoint built in Python is held to the same rule.
    with pytest.raises(CkptscopeError, match="never imports code named by a file"):
        ckptscope.linear_path(Checkpoint(mlp_state(), metadata=meta), mlp_state(1), alphas=2)
    assert not marker.exists()


def test_adapter_import_spec_in_metadata_as_the_issue_runs_it(tmp_path):
    meta = {"adapter": "os:system", "adapter_options": json.dumps({"command": "touch MARK"})}
    files = forged_pair(tmp_path, meta)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "ckptscope", "path", *files], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    assert not (tmp_path / "MARK").exists()


def test_a_files_options_never_reach_code_the_user_names(tmp_path, capsys):
    marker = tmp_path / "MARK"
    meta = {"adapter": "os:system", "adapter_options": json.dumps({"command": f"touch {marker}"})}
    files = forged_pair(tmp_path, meta)
    # Following the refusal's advice imports os.system, but the file's options stay out of it.
    code, _, err = cli(["path", *files, "--adapter", "os:system", "--data", DATA, *FAST], capsys)
    assert_one_line_refusal(code, err, "adapter 'os:system': bad options {}")
    with pytest.raises(CkptscopeError, match="bad options"):
        ckptscope.linear_path(*files, "os:system", DATA, alphas=2, device="cpu")
    # The user's own adapter: the file's adapter and options are not used at all.
    code, _, err = cli(["path", *files, "--adapter", "mlp", "--data", DATA, *FAST], capsys)
    assert code == 0, err
    assert not marker.exists()


# --- (2) an import spec for the data -----------------------------------------------------------
@pytest.mark.parametrize("adapter", [None, "mlp"])
def test_data_import_spec_in_metadata_is_never_called(tmp_path, capsys, monkeypatch, adapter):
    called = []
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: called.append(a) or str(tmp_path))
    files = forged_pair(tmp_path, {"adapter": "mlp", "data": "tempfile:mkdtemp"})
    flags = ["--adapter", adapter] if adapter else []
    code, _, err = cli(["path", *files, *flags, *FAST], capsys)
    assert_one_line_refusal(code, err, "names dataset 'tempfile:mkdtemp' in its metadata",
                            "--data tempfile:mkdtemp", "(Python: data='tempfile:mkdtemp')")
    with pytest.raises(CkptscopeError, match="never imports code named by a file"):
        ckptscope.linear_path(*files, adapter, alphas=2, device="cpu")
    # The user's data wins, and the file's data field is not read.
    out = tmp_path / "r.nc"
    code, _, err = cli(["path", *files, *flags, "--data", DATA, "--out", out, *FAST], capsys)
    assert code == 0, err
    assert open_result(out).attrs["data"] == DATA
    ds = ckptscope.linear_path(*files, adapter, DATA, alphas=2, device="cpu")
    assert ds.attrs["data"] == DATA
    assert called == []


def test_a_bad_pair_is_refused_before_any_pair_is_evaluated(tmp_path, capsys, monkeypatch):
    called = []
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: called.append(a) or str(tmp_path))
    good = forged_pair(tmp_path / "good", {"adapter": "mlp", "data": DATA})
    bad = forged_pair(tmp_path / "bad", {"adapter": "mlp", "data": "tempfile:mkdtemp"})
    out = tmp_path / "r.nc"
    code, _, err = cli(["path", "--pair", *good, "--pair", *bad, "--out", out, *FAST], capsys)
    assert_one_line_refusal(code, err, "tempfile:mkdtemp")
    assert called == []
    assert not out.exists() and not (tmp_path / "r.nc.partial").exists()  # nothing evaluated


# --- (3) a module on the path, named by a file -------------------------------------------------
@pytest.mark.parametrize("form", ["{}:ADAPTER", "{}.sub:ADAPTER", "{}"])
@pytest.mark.parametrize("field", ["adapter", "data"])
def test_a_module_on_the_path_named_by_a_file_is_never_imported(tmp_path, capsys, monkeypatch,
                                                                 field, form):
    name = f"planted_{field}_{len(form)}"
    marker = plant(tmp_path, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    meta = {"adapter": "mlp", "data": DATA, field: form.format(name)}
    files = forged_pair(tmp_path, meta)
    code, _, err = cli(["path", *files, *FAST], capsys)
    assert not marker.exists() and name not in sys.modules, err
    what = {"adapter": "adapter", "data": "dataset"}[field]
    assert_one_line_refusal(code, err, f"names {what} {form.format(name)!r} in its metadata")
    with pytest.raises(CkptscopeError, match="in its metadata"):
        ckptscope.linear_path(*files, alphas=2, device="cpu")
    assert not marker.exists() and name not in sys.modules


# --- (4) options that would allocate far beyond the checkpoint ---------------------------------
@pytest.fixture
def no_wide_layer(monkeypatch):
    """Fail at once if a Linear with a side of 20000 is built off the meta device: that is the
    issue's 1.6 GB allocation (on the meta device nothing is allocated)."""
    real = torch.nn.Linear.__init__

    def spy(self, in_features, out_features, *args, **kwargs):
        if max(in_features, out_features) >= 20000 and torch.empty(0).device.type != "meta":
            raise AssertionError(f"allocated Linear({in_features}, {out_features})")
        real(self, in_features, out_features, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Linear, "__init__", spy)


def test_wide_options_in_a_small_file_are_refused_before_allocating(tmp_path, capsys,
                                                                    no_wide_layer):
    files = forged_pair(tmp_path, {"adapter": "mlp", "adapter_options": json.dumps(WIDE),
                                   "data": DATA})
    assert Path(files[0]).stat().st_size < 2048
    code, _, err = cli(["path", *files, *FAST], capsys)
    assert_one_line_refusal(code, err, "from the metadata of", "do not match",
                            "layers.0.weight (20000, 2) vs (8, 2)", "--adapter-opt")
    with pytest.raises(CkptscopeError, match="from the metadata of"):
        ckptscope.linear_path(*files, alphas=2, device="cpu")
    with pytest.raises(CkptscopeError, match="from the metadata of"):
        ckptscope.linear_path(*files, "mlp", DATA, alphas=2, device="cpu")
    # The same options from the user are checked against the checkpoint before allocating too.
    code, _, err = cli(["path", *files, "--adapter-opt", "widths=[2,20000,20000,1]", *FAST],
                       capsys)
    assert_one_line_refusal(code, err, "do not match", "(20000, 2) vs (8, 2)")
    with pytest.raises(CkptscopeError, match="do not match"):
        ckptscope.linear_path(*files, "mlp", DATA, adapter_options=WIDE, alphas=2)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads Linux's VmHWM")
def test_wide_options_keep_peak_memory_small(tmp_path):
    """The process's own peak RSS: torch alone is a few hundred MB, the module 1.6 GB.

    VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child started from a large
    test process would report the parent's size.
    """
    files = forged_pair(tmp_path, {"adapter": "mlp", "adapter_options": json.dumps(WIDE),
                                   "data": DATA})
    script = ("import re, sys\nfrom ckptscope.cli import main\ncode = main(sys.argv[1:])\n"
              "status = open('/proc/self/status').read()\n"
              "print(code, re.search(r'VmHWM:\\s*(\\d+) kB', status).group(1))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", script, "path", *files, *FAST], env=env,
                         capture_output=True, text=True, timeout=300)
    code, peak_kib = res.stdout.split()
    assert code == "2", res.stderr
    assert int(peak_kib) < 1_200_000, f"peak RSS {int(peak_kib) / 1e6:.2f} GB"


def test_options_the_adapter_does_not_take_are_refused(tmp_path, capsys):
    marker = tmp_path / "MARK"
    files = forged_pair(tmp_path, {"adapter": "mlp", "data": DATA, "adapter_options": json.dumps(
        {"widths": WIDTHS, "command": f"touch {marker}"})})
    code, _, err = cli(["path", *files, *FAST], capsys)
    assert_one_line_refusal(code, err, "bad options", "from the metadata of",
                            "unexpected keyword argument 'command'")
    assert not marker.exists()


# --- (5) unbounded values ----------------------------------------------------------------------
@pytest.mark.parametrize("meta, match", [
    ({"adapter_options": json.dumps({"widths": WIDTHS, "pad": "x" * 20000})},
     r"'ckptscope.adapter_options' holds 20,0\d\d bytes, more than the 16,384"),
    ({"notes": "x" * (1 << 20)}, r"'ckptscope.notes' holds 1,048,576 bytes"),
    ({f"field{i}": "1" for i in range(MAX_FIELDS)}, r"holds 6\d ckptscope metadata fields"),
    ({"k" * 200: "1"}, r"metadata field name of 200 characters"),
    ({"adapter_options": '{"widths": ' + "[" * 5000 + "]" * 5000 + "}"}, r"nests 5001 deep"),
    ({"adapter_options": json.dumps({"widths": [[[[[[[[[2]]]]]]]]]})}, r"nests 10 deep"),
    ({"adapter_options": '{"widths": [2, 8, 8, NaN]}'}, r"NaN is not JSON data"),
    ({"adapter_options": '{"widths": [2, 8, 8, 1e999]}'}, r"1e999 overflows a float"),
    ({"adapter_options": '{"widths": [2, 8, 8, 1'}, r"is not JSON data \(not JSON"),
    ({"adapter_options": "[2, 8, 8, 1]"}, r"is a JSON list, not an object of options"),
    ({"data_seed": "9" * 5000}, r"the integer 9{24}\.\.\. exceeds 64 bits"),
    ({"data_seed": "-1"}, r"'ckptscope.data_seed' = '-1' is not an integer in \[0, "),
    ({"data_seed": "1.5"}, r"is not an integer in"),
    ({"data_seed": "true"}, r"is not an integer in"),
    ({"data": "spiral:2000000,1"}, r"sizes from 1 to 1,000,000"),
])
def test_unbounded_metadata_is_refused_in_one_line(tmp_path, capsys, meta, match):
    files = forged_pair(tmp_path, {"adapter": "mlp", "data": DATA, **meta})
    code, _, err = cli(["path", *files, *FAST], capsys)
    assert_one_line_refusal(code, err)
    assert re.search(match, err), err
    with pytest.raises(CkptscopeError, match=match):
        ckptscope.linear_path(*files, alphas=2, device="cpu")


def test_a_field_the_user_overrides_is_not_read(tmp_path, capsys):
    meta = {"adapter": "mlp", "data": "spiral:9999999,1", "data_seed": "NaN",
            "adapter_options": "[[[[[[[[[[[["}
    files = forged_pair(tmp_path, meta)
    code, _, err = cli(["path", *files, "--data", DATA, "--adapter-opt", "widths=[2,8,8,1]",
                        *FAST], capsys)
    assert code == 0, err


def test_save_checkpoint_refuses_what_load_checkpoint_would(tmp_path):
    with pytest.raises(CkptscopeError, match=f"more than the {MAX_FIELD_BYTES:,}"):
        save_checkpoint(tmp_path / "c.safetensors", mlp_state(), metadata={"config": "x" * 20000})
    assert list(tmp_path.iterdir()) == []


def test_a_finished_runs_rate_is_read_as_a_bounded_number(tmp_path):
    from ckptscope.train.reproduce import _from_disk

    for value, expected in (("12.5", 12.5), ("null", math.nan)):
        save_checkpoint(tmp_path / "final.safetensors", mlp_state(),
                        metadata={"images_per_second": value})
        rate = _from_disk(tmp_path).images_per_second
        assert rate == expected or (math.isnan(rate) and math.isnan(expected))
    save_checkpoint(tmp_path / "final.safetensors", mlp_state(),
                    metadata={"images_per_second": "fast"})
    with pytest.raises(CkptscopeError, match="'ckptscope.images_per_second' is not JSON data"):
        _from_disk(tmp_path)


def test_inspect_shows_metadata_escaped(tmp_path, capsys):
    path = forge(tmp_path, {"adapter": "mlp", "note": "\x1b[2J\nerror: forged\u202e"})
    code, out, err = cli(["inspect", path, "--no-keys"], capsys)
    assert code == 0, err
    assert "\x1b" not in out and "\u202e" not in out
    assert not any(line.startswith("error:") for line in out.splitlines())
    assert "note=\\x1b[2J\\nerror: forged\\u202e" in out


# --- (6) --preset reads the adapter from a file ------------------------------------------------
@pytest.mark.parametrize("command", ["path", "inspect", "distance"])
def test_preset_with_an_import_spec_in_metadata_imports_nothing(tmp_path, capsys, monkeypatch,
                                                                command):
    name = f"planted_preset_{command}"
    marker = plant(tmp_path, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    files = forged_pair(tmp_path, {"adapter": f"{name}:ADAPTER", "data": DATA})
    extra = FAST if command == "path" else []
    code, _, err = cli([command, *files, "--preset", "layers", *extra], capsys)
    assert not marker.exists() and name not in sys.modules, err
    assert_one_line_refusal(code, err, f"--adapter {name}:ADAPTER")
    # A built-in adapter named by the file still gives its presets.
    files = forged_pair(tmp_path / "ok", {"adapter": "mlp", "data": DATA})
    code, out, err = cli([command, *files, "--preset", "layers", *extra], capsys)
    assert code == 0 and "layer3" in out, err


# --- (7) what ckptscope writes, and what the user names, still work ----------------------------
def test_files_ckptscope_writes_evaluate_with_no_flags(tmp_path, capsys):
    meta = {"adapter": "mlp", "adapter_options": {"widths": WIDTHS}, "data": DATA, "data_seed": 3}
    a = save_checkpoint(tmp_path / "a.safetensors", mlp_state(0), metadata=meta)
    b = save_checkpoint(tmp_path / "b.safetensors", mlp_state(1), metadata=meta)
    out = tmp_path / "r.nc"
    code, _, err = cli(["path", a, b, "--preset", "layers", "--out", out, *FAST], capsys)
    assert code == 0, err
    for ds in (open_result(out), ckptscope.linear_path(a, b, alphas=2, device="cpu")):
        assert ds.attrs["adapter"] == "mlp" and ds.attrs["data"] == DATA
        assert ds.attrs["data_seed"] == 3
        assert json.loads(ds.attrs["adapter_options"])["widths"] == WIDTHS


def test_a_trainer_run_evaluates_with_no_flags(tmp_path, capsys):
    from ckptscope.train import load_recipe, override
    from ckptscope.train.run import run

    recipe = override(load_recipe("mlp-spiral-fig1a"), {"epochs": 1, "data": "spiral:64,32"})
    result = run(recipe, seed=0, out=tmp_path / "run")
    code, out, err = cli(["path", result.init, result.final, "--preset", "layers", *FAST], capsys)
    assert code == 0 and "layer3" in out, err


def test_a_sweep_of_a_recipe_naming_user_code_evaluates(tmp_path):
    """The sweep evaluates with the recipe's adapter and data (the user's), not the metadata's."""
    from ckptscope.train import load_recipe, override
    from ckptscope.train.sweep import sweep

    recipe = override(load_recipe("resnet18-cifar10"), {
        "epochs": 1, "steps_per_epoch": 1, "batch_size": 4, "eval_batch_size": 64,
        "random_labels_epochs": 1, "augment": [], "data": "tests.test_train_run:tiny_images",
        "adapter": "tests.conftest:ViewNet", "adapter_options": {"classes": 10}})
    out = sweep(recipe, seeds=[0], out=tmp_path, alphas=2)
    assert out.result.attrs["adapter"] == "tests.conftest:ViewNet"
    assert out.result.attrs["data"] == "tests.test_train_run:tiny_images"


def test_custom_adapter_passed_by_the_user_still_works(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    import custom_adapter

    init, final, options = custom_adapter.train(steps=2)
    meta = {"adapter": custom_adapter.ADAPTER.name, "adapter_options": options}
    files = [save_checkpoint(tmp_path / f"{n}.safetensors", s, metadata=meta)
             for n, s in (("init", init), ("final", final))]
    data = ["--data", "custom_adapter:test_data"]
    code, _, err = cli(["path", *files, "--preset", "blocks", *data, *FAST], capsys)
    assert_one_line_refusal(code, err, "--adapter custom_adapter:ADAPTER")
    out = tmp_path / "r.nc"
    code, _, err = cli(["path", *files, "--adapter", "custom_adapter:ADAPTER", "--preset",
                        "blocks", *data, "--out", out, *FAST], capsys)
    assert code == 0, err
    ds = open_result(out)
    assert list(ds.group.values) == ["all", "conv1", "conv2", "fc"]
    assert json.loads(ds.attrs["adapter_options"]) == options  # read off the shapes
    ds = ckptscope.linear_path(*files, "custom_adapter:ADAPTER", "custom_adapter:test_data",
                               alphas=2, device="cpu")
    assert ds.attrs["adapter"] == "custom_adapter:ADAPTER"
