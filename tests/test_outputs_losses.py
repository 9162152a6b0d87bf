"""Model outputs of every wrapping (ckptscope.outputs) and losses with a count (token-level
means over counted targets), through every strategy, held against plain loops."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ckptscope import linear_path
from ckptscope.engine import EvalConfig
from ckptscope.errors import CkptscopeError
from ckptscope.losses import cross_entropy
from ckptscope.outputs import logits_of

ALPHAS = [0.0, 0.25, 0.5, 1.0]


@dataclass
class Output:
    logits: torch.Tensor
    hidden: torch.Tensor | None = None


class ModelOutputLike(OrderedDict):  # how transformers' ModelOutput looks: a dict with attributes
    def __getattr__(self, name):
        return self[name]


def test_logits_of_every_wrapping():
    t = torch.randn(3, 4)
    assert logits_of(t) is t
    assert logits_of((t, torch.zeros(1))) is t
    assert logits_of([t]) is t
    assert logits_of({"logits": t, "loss": torch.zeros(())}) is t
    assert logits_of({"out": t}) is t
    assert logits_of(Output(t, torch.zeros(1))) is t
    assert logits_of(ModelOutputLike(loss=None, logits=t)) is t
    assert logits_of(({"logits": t}, None)) is t  # nested


@pytest.mark.parametrize(
    "output, match",
    [
        ({"a": torch.zeros(1), "b": torch.zeros(1)}, r"mapping with keys \['a', 'b'\] and no "
                                                      r"'logits'"),
        ("text", "returned a str that holds no logits tensor"),
        ((), "returned a tuple that holds no logits tensor"),
        (Output(logits=None), "returned a Output that holds no logits"),
    ],
)
def test_logits_of_refuses_outputs_without_logits(output, match):
    with pytest.raises(CkptscopeError, match=match):
        logits_of(output)


class Tokens(nn.Module):
    """(B, T) token ids -> (B, T, V) logits, wrapped as ``wrap`` says."""

    def __init__(self, vocab=7, width=5, wrap="tensor"):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)
        self.wrap = wrap

    def forward(self, x):
        logits = self.head(torch.tanh(self.mix(self.embed(x))))
        if self.wrap == "dict":
            return {"logits": logits}
        if self.wrap == "tuple":
            return logits, x
        if self.wrap == "dataclass":
            return Output(logits)
        return logits


def _states(seed=0):
    torch.manual_seed(seed)
    a, b = Tokens(), Tokens()
    return a.state_dict(), b.state_dict()


def _tokens(seed=1, n=9, t=6, vocab=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, t), generator=g)
    y = torch.randint(0, vocab, (n, t), generator=g)
    y[torch.rand(n, t, generator=g) < 0.3] = -100  # left out of every sum
    y[0] = -100  # an example with nothing counted
    return x, y


def reference(a, b, x, y, alphas, moving=lambda k: True):
    """A plain loop: lerp, load_state_dict, one forward pass, mean over the counted tokens."""
    model = Tokens().eval()
    out = []
    for alpha in alphas:
        model.load_state_dict({k: (1 - alpha) * a[k] + alpha * b[k] if moving(k) else b[k]
                               for k in a})
        with torch.no_grad():
            logits = model(x)
        keep = y != -100
        out.append((F.cross_entropy(logits[keep].double(), y[keep]).item(),
                    (logits[keep].argmax(-1) == y[keep]).double().mean().item()))
    return np.array(out)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("batch_size", [2, 9])
def test_token_level_curve_is_the_mean_over_counted_tokens(strategy, batch_size):
    a, b = _states()
    x, y = _tokens()
    ds = linear_path(a, b, Tokens(), (x, y), alphas=ALPHAS, groups=["mix."],
                     config=EvalConfig(strategy=strategy, batch_size=batch_size))
    want = reference(a, b, x, y, ALPHAS)
    got = ds.sel(run=ds.run[0], group="all", split="eval")
    np.testing.assert_allclose(got.loss.values, want[:, 0], rtol=1e-6)
    np.testing.assert_allclose(got.accuracy.values, want[:, 1], rtol=1e-12)
    want = reference(a, b, x, y, ALPHAS, moving=lambda k: k.startswith("mix."))
    got = ds.sel(run=ds.run[0], group="mix.", split="eval")
    np.testing.assert_allclose(got.loss.values, want[:, 0], rtol=1e-6)
    # a mean over examples' means would differ: the check above can fail
    counted = (y != -100).sum(1)
    assert counted.min() != counted.max()


@pytest.mark.parametrize("wrap", ["dict", "tuple", "dataclass"])
@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_wrapped_outputs_give_the_tensor_models_curves(wrap, strategy):
    a, b = _states()
    x, y = _tokens()
    config = EvalConfig(strategy=strategy, batch_size=4)
    plain = linear_path(a, b, Tokens(), (x, y), alphas=ALPHAS, groups=["head."], config=config)
    wrapped = linear_path(a, b, Tokens(wrap=wrap), (x, y), alphas=ALPHAS, groups=["head."],
                          config=config)
    np.testing.assert_array_equal(plain.loss.values, wrapped.loss.values)
    np.testing.assert_array_equal(plain.accuracy.values, wrapped.accuracy.values)


def test_cross_entropy_token_level_against_a_per_token_loop():
    g = torch.Generator().manual_seed(4)
    out = torch.randn(3, 4, 5, 6, generator=g)  # (k, B, T, C)
    y = torch.randint(0, 6, (4, 5), generator=g)
    y[1, 2:] = -100
    loss, correct, count = cross_entropy(out, y)
    for p in range(3):
        terms = [(F.cross_entropy(out[p, i, t][None], y[i, t][None]).item(),
                  int(out[p, i, t].argmax() == y[i, t]))
                 for i in range(4) for t in range(5) if y[i, t] != -100]
        assert loss[p].item() == pytest.approx(sum(v for v, _ in terms), rel=1e-6)
        assert correct[p].item() == sum(c for _, c in terms)
        assert count[p].item() == len(terms) == 17


def test_cross_entropy_refuses_outputs_that_do_not_fit_the_targets():
    with pytest.raises(CkptscopeError, match=r"outputs of shape \(4, 5, 6\) per point for "
                                             r"targets of shape \(4,\)"):
        cross_entropy(torch.zeros(2, 4, 5, 6), torch.zeros(4, dtype=torch.long))


def test_regression_loss_with_nan_correct_gives_nan_accuracy():
    torch.manual_seed(0)
    a, b = nn.Linear(3, 1).state_dict(), nn.Linear(3, 1).state_dict()
    x, y = torch.randn(10, 3), torch.randn(10)

    def squared_error(outputs, targets):  # (k, B, 1), (B,)
        err = ((outputs.squeeze(-1) - targets) ** 2).sum(-1)
        return err, torch.full_like(err, float("nan"))

    ds = linear_path(a, b, nn.Linear(3, 1), (x, y), alphas=[0.0, 1.0], loss=squared_error)
    assert np.isnan(ds.accuracy.values).all()
    model = nn.Linear(3, 1)
    model.load_state_dict(b)
    with torch.no_grad():
        want = ((model(x).squeeze(-1) - y) ** 2).mean().item()
    assert ds.loss.sel(group="all").values[0, 0, -1] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_hoisted_suffix_of_a_model_returning_a_dataclass(strategy):
    from ckptscope.engine import Evaluator
    from ckptscope.points import path_points

    a, b = _states()
    x, y = _tokens()
    ev = Evaluator(Tokens(wrap="dataclass"), {"eval": (x, y)}, loss="cross_entropy",
                   config=EvalConfig(strategy=strategy, batch_size=4))
    points = path_points(np.array(ALPHAS), ["head.weight", "head.bias"], every=list(a))
    [curves] = ev.evaluate({"start": a, "end": b}, [points])
    assert ev.hoisted == 1  # the suffix's output went through logits_of
    want = reference(a, b, x, y, ALPHAS, moving=lambda k: k.startswith("head."))
    np.testing.assert_allclose(curves["eval"][0], want[:, 0], rtol=1e-6)


def test_token_level_chunks_pass_the_cache_check_and_resume(tmp_path):
    """The cache's plausibility check counts tokens, not examples, for a token-level loss: a
    rerun reuses every chunk (none is discarded as 'not a whole number')."""
    a, b = _states()
    x, y = _tokens()
    first = linear_path(a, b, Tokens(), (x, y), alphas=ALPHAS, resume_dir=tmp_path / "partial")
    assert any((tmp_path / "partial").iterdir())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a discarded chunk warns
        again = linear_path(a, b, Tokens(), (x, y), alphas=ALPHAS,
                            resume_dir=tmp_path / "partial")
    assert f"resumed {len(ALPHAS)} of {len(ALPHAS)} points" in again.attrs["notes"]
    np.testing.assert_array_equal(first.loss.values, again.loss.values)
