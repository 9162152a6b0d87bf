"""Errors of the user's model and loss during an evaluation: one line naming the model, the data
and the error, exit 2 on the command line; ``--debug`` shows the traceback; ``--loss``."""

from __future__ import annotations

import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from ckptscope.checkpoints import save_checkpoint
from ckptscope.engine import EvalConfig, Evaluator
from ckptscope.errors import CkptscopeError
from ckptscope.losses import cross_entropy, resolve_loss
from ckptscope.points import alpha_grid, path_points
from tests.conftest import run_cli as run

# A user package, written to a folder on sys.path: a model that fails at its second forward pass
# (after the probe), losses that raise or return the wrong shapes, and a good custom loss.
USER_CODE = textwrap.dedent('''
    import torch
    from torch import nn
    import torch.nn.functional as F


    class Flaky(nn.Module):
        """A linear classifier whose forward raises once it has run ``ok`` times."""

        def __init__(self, ok=1, error=KeyError):
            super().__init__()
            self.fc = nn.Linear(2, 3)
            self.ok, self.error, self.calls = ok, error, 0

        def forward(self, x):
            self.calls += 1
            if self.calls > self.ok:
                raise self.error("boom in forward\\nsecond line")
            return self.fc(x)


    def flaky():
        return Flaky()


    def raising_loss(outputs, targets):
        raise ZeroDivisionError("bad loss")


    def mean_loss(outputs, targets):  # a mean over everything, not per-point sums
        return F.cross_entropy(outputs.flatten(0, 1), targets.repeat(outputs.shape[0])), None


    def half_ce(outputs, targets):
        k, b, c = outputs.shape
        losses = F.cross_entropy(outputs.reshape(k * b, c), targets.repeat(k), reduction="none")
        return 0.5 * losses.view(k, b).sum(-1), (outputs.argmax(-1) == targets).sum(-1)

    not_callable = 3
''')


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "failing_user_code.py").write_text(USER_CODE)
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop("failing_user_code", None)
    yield "failing_user_code"
    sys.modules.pop("failing_user_code", None)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return {"test": (torch.randn(40, 2, generator=g), torch.randint(0, 3, (40,), generator=g))}


@pytest.fixture
def pair(tmp_path):
    torch.manual_seed(0)
    a = nn.Linear(2, 3).state_dict()
    b = {k: v + 0.3 for k, v in a.items()}
    paths = []
    for name, state in (("a", a), ("b", b)):
        paths.append(str(save_checkpoint(tmp_path / f"{name}.safetensors",
                                         {f"fc.{k}": v for k, v in state.items()})))
    return paths


def _evaluate(module, data, *, loss="cross_entropy", **config):
    ev = Evaluator(module, data, loss=loss, config=EvalConfig(**config), model_name="flaky",
                   data_name="tiny")
    state = {k: v.clone() for k, v in ev.slots.items()}
    moved = {k: v + 0.1 for k, v in state.items()}
    points = path_points(alpha_grid(3), list(state), every=state)
    return ev.evaluate({"start": state, "end": moved}, [points])


# --- the engine ------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("error", [KeyError, AssertionError, RuntimeError, NotImplementedError])
def test_model_error_any_type_is_one_line_naming_model_and_data(user_code, data, strategy,
                                                                 error):
    module = __import__(user_code).Flaky(error=error)
    with pytest.raises(CkptscopeError) as info:
        _evaluate(module, data, strategy=strategy)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("the model failed on the 'test' inputs of shape (40, 2)")
    assert "model flaky, data tiny" in message and "boom in forward" in message
    assert error.__name__ in message and "--debug" in message
    assert "second line" not in message or error is KeyError  # KeyError's text is a repr
    assert isinstance(info.value.__cause__, error)


def test_model_error_in_probe_names_the_shape(user_code, data):
    module = __import__(user_code).Flaky(ok=0, error=TypeError)
    with pytest.raises(CkptscopeError, match=r"'test' inputs of shape \(8, 2\) .*TypeError: boom"):
        Evaluator(module, data, loss="cross_entropy", config=EvalConfig())


def test_model_error_on_hoisted_group_path(user_code, data):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    ev = Evaluator(Two(), data, loss="cross_entropy", config=EvalConfig(strategy="loop"))
    state = {k: v.clone() for k, v in ev.slots.items()}
    points = path_points(alpha_grid(3), ["b.weight", "b.bias"], every=state)
    split = ev.split_for(["b.weight", "b.bias"])
    assert split is not None  # the group path is hoisted: the suffix is called directly

    def broken(*args):
        raise IndexError("suffix broke")

    split.suffix.forward = broken
    with pytest.raises(CkptscopeError, match=r"model Two\): IndexError: suffix broke"):
        ev.evaluate({"start": state, "end": state}, [points])
    assert ev.hoisted == 0


def test_model_error_in_bn_recompute_names_train_split(data):
    class Fussy(nn.BatchNorm1d):
        def forward(self, x):
            if self.training:  # as the re-estimation puts it
                raise ValueError("no training mode here")
            return super().forward(x)

    class Norm(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(2, 3), Fussy(3)

        def forward(self, x):
            return self.bn(self.fc(x))

    bn_data = torch.randn(16, 2)
    ev = Evaluator(Norm(), data, loss="cross_entropy", bn_data=bn_data,
                   config=EvalConfig(bn="recompute", bn_batches=1))
    state = {k: v.clone() for k, v in ev.slots.items()}
    points = path_points(alpha_grid(2), list(state), every=state)
    with pytest.raises(CkptscopeError, match=r"'train' inputs of shape \(16, 2\).*no training"):
        ev.evaluate({"start": state, "end": state}, [points])


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_loss_error_is_one_line_naming_loss_and_shapes(user_code, data, strategy):
    with pytest.raises(CkptscopeError) as info:
        _evaluate(nn.Linear(2, 3), data, loss=__import__(user_code).raising_loss,
                  strategy=strategy)
    message = str(info.value)
    assert "\n" not in message and message.startswith("the loss 'raising_loss' failed on outputs")
    assert "targets of shape (40,)" in message and "ZeroDivisionError: bad loss" in message
    assert "model flaky, data tiny, split 'test'" in message


def test_builtin_loss_on_wrong_target_shape_is_one_line(data):
    bad = {"test": (data["test"][0], torch.zeros(40, 2, dtype=torch.long))}
    match = (r"loss 'cross_entropy' takes outputs .* got outputs of shape \(40, 3\) per point "
             r"for targets of shape \(40, 2\).*\(model flaky, data tiny, split 'test'\)\.$")
    with pytest.raises(CkptscopeError, match=match):
        _evaluate(nn.Linear(2, 3), bad)


@pytest.mark.parametrize("loss, what", [
    (lambda o, t: (o.sum(), (o.argmax(-1) == t).sum(-1)), r"a tensor of shape \(\)"),
    (lambda o, t: o.sum((1, 2)), r"a Tensor"),
    (lambda o, t: (o.sum((1, 2)), None), r"a NoneType"),
    (lambda o, t: (o.sum((1, 2)),) * 4, r"4 values"),
])
def test_loss_result_of_wrong_form_is_refused(data, loss, what):
    with pytest.raises(CkptscopeError, match=rf"returned {what} for \d+ point\(s\).*\(\d+,\)"):
        _evaluate(nn.Linear(2, 3), data, loss=loss)


def test_loss_pair_counts_the_batch_examples(data):
    """A ``(loss_sum, correct)`` loss gains the count of the batch's examples, float64 (k,)."""
    ev = Evaluator(nn.Linear(2, 3), data, loss=lambda o, t: (o.sum((1, 2)), o.sum((1, 2))),
                   config=EvalConfig())
    loss, correct, count = ev.context.loss_fn(torch.ones(2, 5, 3), torch.zeros(5))
    assert count.tolist() == [5.0, 5.0] and count.dtype == torch.float64
    assert loss.tolist() == correct.tolist() == [15.0, 15.0]


def test_out_of_memory_is_not_a_model_failure(data):
    """The back-off handles out-of-memory errors: they are not turned into model failures."""

    class Hungry(nn.Linear):
        def forward(self, x):
            if not hasattr(self, "probed"):
                self.probed = True
                return super().forward(x)
            raise torch.OutOfMemoryError("fake")

    with pytest.raises(torch.OutOfMemoryError):
        _evaluate(Hungry(2, 3), data, strategy="loop", batch_size=1)


def test_keyboard_interrupt_passes_through(data):
    class Stop(nn.Linear):
        calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 1:
                raise KeyboardInterrupt
            return super().forward(x)

    with pytest.raises(KeyboardInterrupt):
        _evaluate(Stop(2, 3), data)


# --- --loss ----------------------------------------------------------------------------------
def test_resolve_loss_names_specs_and_errors(user_code):
    assert resolve_loss("cross_entropy") == "cross_entropy" and resolve_loss(None) is None
    assert resolve_loss(cross_entropy) is cross_entropy
    assert resolve_loss(f"{user_code}:half_ce") is __import__(user_code).half_ce
    with pytest.raises(CkptscopeError, match="unknown loss 'mse'; known: bce, cross_entropy"):
        resolve_loss("mse")
    with pytest.raises(CkptscopeError, match="not a callable"):
        resolve_loss(f"{user_code}:not_callable")
    with pytest.raises(CkptscopeError, match="cannot import 'no_such_pkg.mod'"):
        resolve_loss("no_such_pkg.mod:fn")
    with pytest.raises(CkptscopeError, match="loss 3 is a int"):
        resolve_loss(3)


def test_cli_loss_spec_is_used(user_code, pair, tmp_path, capsys):
    out = tmp_path / "half.nc"
    base = ["path", *pair, "--adapter", f"{user_code}:Flaky", "--adapter-opt", "ok=1000000",
            "--data", f"{user_code}:DATA", "--alphas", "3", "--no-full", "--group", "fc"]
    (tmp_path / "code" / f"{user_code}.py").write_text(
        USER_CODE + "\nDATA = (torch.randn(30, 2, generator=torch.Generator().manual_seed(1)), "
                    "torch.arange(30) % 3)\n")
    code, _, err = run([*base, "--out", str(tmp_path / "full.nc")], capsys)
    assert code == 0, err
    code, _, err = run([*base, "--loss", f"{user_code}:half_ce", "--out", str(out)], capsys)
    assert code == 0, err
    from ckptscope.results import open_result

    full, half = open_result(tmp_path / "full.nc"), open_result(out)
    np.testing.assert_allclose(half.loss.values, 0.5 * full.loss.values, rtol=1e-6)
    np.testing.assert_array_equal(half.accuracy.values, full.accuracy.values)
    assert half.attrs["loss_function"] == "half_ce"


def test_cli_unknown_loss_lists_the_known(pair, capsys):
    code, _, err = run(["path", *pair, "--loss", "hinge"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "unknown loss 'hinge'; known: bce, cross_entropy, or pkg.module:attr" in err


# --- the command line: one line, exit 2; --debug shows the traceback -------------------------
@pytest.fixture
def failing(user_code, pair, tmp_path):
    def argv(kind: str) -> list[str]:
        args = ["path", *pair, "--adapter", f"{user_code}:flaky", "--data",
                f"{user_code}:DATA", "--alphas", "3", "--out", str(tmp_path / "r.nc")]
        if kind == "loss":
            args[4] += "_never"  # a model that does not fail
            args += ["--loss", f"{user_code}:raising_loss"]
        if kind == "shape":
            args[4] += "_never"
            args += ["--loss", "bce"]  # (k, B, 3) logits: not a binary classifier's
        return args

    (tmp_path / "code" / f"{user_code}.py").write_text(
        USER_CODE + textwrap.dedent('''
            DATA = (torch.randn(30, 2), torch.arange(30) % 3)

            def flaky_never():
                return Flaky(ok=10 ** 9)
        '''))
    return argv


@pytest.mark.parametrize("kind, match", [
    ("model", "error: the model failed on the 'eval' inputs of shape (30, 2) (model "),
    ("loss", "error: the loss 'raising_loss' failed on outputs of shape"),
    ("shape", "error: the loss 'bce' failed on outputs of shape"),
])
def test_cli_failure_is_one_line_exit_2(failing, kind, match, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CKPTSCOPE_DEBUG", raising=False)
    code, out, err = run(failing(kind), capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(match), err
    assert "data failing_user_code:DATA" in err
    assert not (tmp_path / "r.nc").exists() and out == ""


@pytest.mark.parametrize("kind", ["model", "loss"])
def test_cli_debug_shows_the_traceback(failing, kind, capsys, monkeypatch):
    monkeypatch.delenv("CKPTSCOPE_DEBUG", raising=False)
    code, _, err = run(["--debug", *failing(kind)], capsys)
    assert code == 2 and "Traceback (most recent call last)" in err
    cause = "KeyError: 'boom in forward" if kind == "model" else "ZeroDivisionError: bad loss"
    assert cause in err and "failing_user_code.py" in err
    assert "The above exception was the direct cause" in err and "CkptscopeError: the " in err


def test_cli_debug_from_environment_and_for_plain_bad_input(pair, capsys, monkeypatch):
    monkeypatch.setenv("CKPTSCOPE_DEBUG", "1")
    code, _, err = run(["path", *pair, "--loss", "hinge"], capsys)
    assert code == 2 and "Traceback" in err and "unknown loss 'hinge'" in err
    monkeypatch.setenv("CKPTSCOPE_DEBUG", "0")
    code, _, err = run(["path", *pair, "--loss", "hinge"], capsys)
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1
    code, _, err = run(["--debug", "path", "nope.safetensors", "x.safetensors"], capsys)
    assert code == 2 and "Traceback" in err


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), RuntimeError("cb")])
def test_callback_errors_pass_through_untouched(data, strategy, error):
    """An error of the caller's ``done`` or ``progress`` (a cache on a full disk) is not the
    model's: it reaches the caller as it was raised, and vmap does not fall back for it."""
    ev = Evaluator(nn.Linear(2, 3), data, loss="cross_entropy",
                   config=EvalConfig(strategy=strategy))
    state = {k: v.clone() for k, v in ev.slots.items()}
    points = path_points(alpha_grid(3), list(state), every=state)

    def fail(*args):
        raise error

    for where in ("done", "progress"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "cannot be vectorised" fallback
            with pytest.raises(type(error)) as info:
                ev.evaluate({"start": state, "end": state}, [points], **{where: fail})
        assert info.value is error
