"""Checkpoints other tools wrote: prefixes, Lightning files, tied weights, BatchNorm counters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ckptscope
from ckptscope.adapters import Adapter
from ckptscope.checkpoints import load_checkpoint, save_checkpoint
from ckptscope.distance import distances
from ckptscope.errors import CkptscopeError
from ckptscope.keys import match_keys, unwrap_module
from tests.reference import reference_path

VOCAB, DIM = 11, 6


class TiedLM(nn.Module):
    """A token classifier whose output layer's weight *is* its embedding (GPT-2's tie)."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, DIM)
        self.h = nn.Linear(DIM, DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, x):
        return self.lm_head(torch.tanh(self.h(self.wte(x))))


class ShiftNet(nn.Module):
    """BatchNorm (with its counter) and an integer buffer that moves the logits: which end's
    integer buffer a point uses shows in the loss."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.register_buffer("shift", torch.zeros(3, dtype=torch.int64))

    def forward(self, x):
        return self.bn(self.fc(x)) + self.shift.float()


class Wrapped(nn.Module):
    """A network under an attribute, as a LightningModule or DDP holds it."""

    def __init__(self, inner: nn.Module, name: str = "module"):
        super().__init__()
        setattr(self, name, inner)
        self.name = name

    def forward(self, x):
        return getattr(self, self.name)(x)


def states(module: nn.Module, seed: int) -> tuple[dict, dict]:
    """Two endpoints of ``module`` (ties kept: one tensor under both names)."""
    torch.manual_seed(seed)
    a = {k: v.clone() for k, v in module.state_dict().items()}
    if "lm_head.weight" in a:
        a["lm_head.weight"] = a["wte.weight"]
    b = {}
    for k, v in a.items():
        if k == "lm_head.weight":
            continue
        b[k] = v + 0.3 * torch.randn(v.shape) if v.is_floating_point() else v + 2
    if "lm_head.weight" in a:
        b["lm_head.weight"] = b["wte.weight"]
    if "bn.running_var" in b:
        b["bn.running_var"] = a["bn.running_var"] * 1.5
    return a, b


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(VOCAB, (48,), generator=g), torch.randint(VOCAB, (48,), generator=g)


@pytest.fixture
def features():
    g = torch.Generator().manual_seed(1)
    return torch.randn(40, 4, generator=g), torch.randint(3, (40,), generator=g)


def without(state: dict, *keys: str) -> dict:
    return {k: v.clone() for k, v in state.items() if k not in keys}


# --- tied weights ----------------------------------------------------------------------------
@pytest.mark.parametrize("strategy, end_kind", [("loop", "torch"), ("vmap", "cloned")])
def test_missing_tied_alias_follows_its_tie(tmp_path, tokens, strategy, end_kind):
    module = TiedLM()
    a, b = states(module, 0)
    start = tmp_path / "init.safetensors"  # save_pretrained's file: the alias left out
    save_file(without(a, "lm_head.weight"), str(start))
    if end_kind == "torch":
        end = tmp_path / "final.pt"
        torch.save(b, end)  # torch.save keeps the tie: one storage under both names
        where = " here, tied in the other checkpoint"
    else:
        end = save_checkpoint(tmp_path / "final.safetensors", b)  # both names, two copies
        where = ""  # the model's tie decides
    x, y = tokens
    ds = ckptscope.linear_path(str(start), str(end), module, (x, y), alphas=5,
                               groups={"head": "lm_head", "emb": "wte", "h": "h"},
                               config=ckptscope.EvalConfig(strategy=strategy, hoist=False))
    grid = np.linspace(0, 1, 5)
    for group, keys in {"all": list(a), "head": ["lm_head.weight", "wte.weight"],
                        "emb": ["wte.weight", "lm_head.weight"], "h": ["h.weight", "h.bias"]
                        }.items():
        loss, acc = reference_path(module, a, b, keys, grid, x, y)
        np.testing.assert_allclose(ds.loss.sel(group=group, split="eval").values[0], loss,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ds.accuracy.sel(group=group, split="eval").values[0], acc)
    # Counted once: the distance over the model's unique parameters.
    unique = ["wte.weight", "h.weight", "h.bias"]
    d2 = sum(float((b[k].double() - a[k].double()).pow(2).sum()) for k in unique)
    x2 = sum(float(a[k].double().pow(2).sum()) for k in unique)
    assert ds.distance.sel(group="all").item() == pytest.approx(math.sqrt(d2 / x2), rel=1e-9)
    assert int(ds.n_params.sel(group="all")) == sum(a[k].numel() for k in unique)
    assert int(ds.n_params.sel(group="head")) == a["wte.weight"].numel()
    assert (f"{start}: lm_head.weight follows its tie to wte.weight (stored once{where})"
            in ds.attrs["notes"])


def test_tied_alias_missing_in_both_files(tmp_path, tokens):
    module = TiedLM()
    a, b = states(module, 1)
    pair = []
    for name, state in (("a", a), ("b", b)):
        pair.append(tmp_path / f"{name}.safetensors")
        save_file(without(state, "lm_head.weight"), str(pair[-1]))
    ds = ckptscope.linear_path(str(pair[0]), str(pair[1]), module, tokens, alphas=3)
    loss, _ = reference_path(module, a, b, list(a), np.linspace(0, 1, 3), *tokens)
    np.testing.assert_allclose(ds.loss.sel(group="all", split="eval").values[0], loss, rtol=1e-5)


def test_match_keys_follows_the_model_tie_with_one_tensor():
    module = TiedLM()
    a, b = states(module, 2)
    ca, cb = match_keys(ckptscope.Checkpoint(without(a, "lm_head.weight")),
                        ckptscope.Checkpoint(without(b, "lm_head.weight")), module=module)
    assert ca.state["lm_head.weight"] is ca.state["wte.weight"]
    assert cb.state["lm_head.weight"] is cb.state["wte.weight"]
    assert ca.notes == ("lm_head.weight follows its tie to wte.weight (stored once)",)
    again, _ = match_keys(ca, cb, module=module)  # matched: nothing to do, no second note
    assert again.notes == ca.notes


def test_pair_ties_follow_the_other_checkpoints_storage():
    module = TiedLM()
    a, b = states(module, 3)
    ca, cb = match_keys(ckptscope.Checkpoint(without(a, "lm_head.weight")),
                        ckptscope.Checkpoint(b))
    assert ca.state["lm_head.weight"] is ca.state["wte.weight"]
    assert "tied in the other checkpoint" in ca.notes[0]
    assert cb.notes == ()


def test_distance_counts_a_followed_tie_once(tmp_path):
    module = TiedLM()
    a, b = states(module, 4)
    save_file(without(a, "lm_head.weight"), str(tmp_path / "a.safetensors"))
    torch.save(b, tmp_path / "b.pt")
    ds = distances(str(tmp_path / "a.safetensors"), str(tmp_path / "b.pt"))
    unique = ["wte.weight", "h.weight", "h.bias"]
    assert int(ds.n_params.sel(group="all")) == sum(a[k].numel() for k in unique)


def test_tied_names_with_different_values_are_refused(tmp_path, tokens):
    module = TiedLM()
    a, b = states(module, 5)
    untied = {k: v.clone() for k, v in a.items()}
    untied["lm_head.weight"] = untied["wte.weight"] + 1
    with pytest.raises(CkptscopeError,
                       match=r"lm_head.weight is tied to wte.weight in the model, but start "
                             r"holds different values under the two names"):
        ckptscope.linear_path(untied, b, module, tokens, alphas=3)


def test_missing_tie_is_named_in_the_key_error(tokens):
    module = TiedLM()
    a, b = states(module, 6)
    bare = without(a, "lm_head.weight", "wte.weight")
    with pytest.raises(CkptscopeError, match=r"only in the model \(module:TiedLM\): "
                       r"lm_head.weight, wte.weight.*lm_head.weight is tied to wte.weight in "
                       r"the model: a checkpoint must hold at least one name of each tie"):
        ckptscope.linear_path(bare, without(b, "lm_head.weight", "wte.weight"), module, tokens)


def test_adapter_check_knows_ties_and_counters():
    adapter = Adapter(name="tied", build=TiedLM)
    a, _ = states(TiedLM(), 7)
    adapter.check({}, like=without(a, "lm_head.weight"))  # the alias follows its tie
    with pytest.raises(CkptscopeError, match="lm_head.weight is tied to wte.weight"):
        adapter.check({}, like=without(a, "lm_head.weight", "wte.weight"))
    shift = Adapter(name="shift", build=ShiftNet)
    s, _ = states(ShiftNet(), 7)
    shift.check({}, like=without(s, "bn.num_batches_tracked"))
    with pytest.raises(CkptscopeError,
                       match=r"only in the model \(shift, options \{\}\): bn.running_mean\)"):
        shift.check({}, like=without(s, "bn.running_mean"))


# --- prefixes --------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.",
                                    "_orig_mod.module."])
def test_wrapper_prefixes_are_stripped_on_reading(tmp_path, prefix):
    a, _ = states(ShiftNet(), 0)
    path = tmp_path / "ddp.safetensors"
    save_file({prefix + k: v for k, v in a.items()}, str(path))
    ckpt = load_checkpoint(path)
    assert sorted(ckpt.state) == sorted(a)
    parts = [p + "." for p in prefix.split(".") if p]
    assert ckpt.stripped == tuple(parts)
    assert ckpt.notes == tuple(f"stripped prefix {p!r} from {len(a)} keys" for p in parts)


def test_wrapper_prefix_is_kept_when_the_model_has_it(tmp_path, features):
    inner = ShiftNet()
    model = Wrapped(inner)  # a model whose own keys start with module.
    a, b = states(inner, 1)
    paths = []
    for name, state in (("a", a), ("b", b)):
        paths.append(tmp_path / f"{name}.pt")
        torch.save({"module." + k: v for k, v in state.items()}, paths[-1])
    ds = ckptscope.linear_path(str(paths[0]), str(paths[1]), model, features, alphas=3,
                               groups=["module.fc"])
    assert list(ds.group.values) == ["all", "module.fc"]
    assert f"{paths[0]}: kept prefix 'module.': the model's keys have it" in ds.attrs["notes"]
    loss, _ = reference_path(inner, a, b, list(a), np.linspace(0, 1, 3), *features)
    np.testing.assert_allclose(ds.loss.sel(group="all", split="eval").values[0], loss, rtol=1e-5)


def test_wrapped_modules_are_unwrapped(features):
    inner = ShiftNet()
    assert unwrap_module(nn.DataParallel(inner)) is inner
    assert unwrap_module(torch.compile(nn.DataParallel(inner))) is inner
    assert unwrap_module(inner) is inner
    a, b = states(inner, 16)
    ds = ckptscope.linear_path(a, b, nn.DataParallel(inner), features, alphas=3)
    loss, _ = reference_path(inner, a, b, list(a), np.linspace(0, 1, 3), *features)
    np.testing.assert_allclose(ds.loss.sel(group="all", split="eval").values[0], loss, rtol=1e-5)
    assert ds.attrs["adapter"] == "module:ShiftNet"


def test_other_prefix_is_stripped_when_the_other_side_lacks_it(tmp_path, features):
    module = ShiftNet()
    a, b = states(module, 2)
    torch.save({"net." + k: v for k, v in b.items()}, tmp_path / "b.pt")
    ds = ckptscope.linear_path(a, str(tmp_path / "b.pt"), module, features, alphas=3)
    assert (f"{tmp_path / 'b.pt'}: stripped prefix 'net.' from {len(b)} keys (the other "
            f"checkpoint's keys lack it)") in ds.attrs["notes"]
    loss, _ = reference_path(module, a, b, list(a), np.linspace(0, 1, 3), *features)
    np.testing.assert_allclose(ds.loss.sel(group="all", split="eval").values[0], loss, rtol=1e-5)


def test_other_prefix_on_both_sides_is_stripped_for_the_model(features):
    module = ShiftNet()
    a, b = states(module, 3)
    ds = ckptscope.linear_path({"net." + k: v for k, v in a.items()},
                               {"net." + k: v for k, v in b.items()}, module, features, alphas=3)
    assert f"start: stripped prefix 'net.' from {len(a)} keys (the model's keys lack it)" in \
        ds.attrs["notes"]


def test_prefix_shared_by_both_sides_stays_without_a_model():
    a, b = states(ShiftNet(), 4)
    ca, cb = match_keys(ckptscope.Checkpoint({"net." + k: v for k, v in a.items()}),
                        ckptscope.Checkpoint({"net." + k: v for k, v in b.items()}))
    assert all(k.startswith("net.") for k in ca.state) and ca.notes == cb.notes == ()


def test_explicit_strip_prefix(tmp_path, features):
    module = ShiftNet()
    a, b = states(module, 5)
    torch.save({"net." + k: v for k, v in a.items()}, tmp_path / "a.pt")
    torch.save({"net." + k: v for k, v in b.items()}, tmp_path / "b.pt")
    ca, cb = match_keys(load_checkpoint(tmp_path / "a.pt"), load_checkpoint(tmp_path / "b.pt"),
                        strip_prefix="net")  # the dot is added
    assert sorted(ca.state) == sorted(a) and ca.stripped == ("net.",)
    assert ca.notes == (f"stripped prefix 'net.' from {len(a)} keys (as asked)",)
    ds = ckptscope.linear_path(ca, cb, module, features, alphas=3, strip_prefix=["net."])
    assert ds.attrs["notes"].count("stripped prefix 'net.'") == 2  # once per file, not again


def test_explicit_prefix_already_stripped_on_reading_is_accepted(tmp_path):
    a, b = states(ShiftNet(), 6)
    torch.save({"module." + k: v for k, v in a.items()}, tmp_path / "a.pt")
    ca, _ = match_keys(load_checkpoint(tmp_path / "a.pt"), ckptscope.Checkpoint(b),
                       strip_prefix="module.")
    assert ca.notes == (f"stripped prefix 'module.' from {len(a)} keys",)


@pytest.mark.parametrize("prefix, match", [
    ("model.", r"strip prefix 'model\.' \(--strip-prefix, strip_prefix=\) is not on every key "
               r"of 'start' or 'end' \(their keys start with bn\., fc\., net\., shift\.\); give"),
    ("", r"strip prefix '' .* is empty"),
    ("..", r"strip prefix '\.\.' .* is empty"),
])
def test_wrong_explicit_prefix_is_one_line(prefix, match, features):
    a, b = states(ShiftNet(), 7)
    with pytest.raises(CkptscopeError, match=match) as err:
        ckptscope.linear_path(a, {"net." + k: v for k, v in b.items()}, ShiftNet(), features,
                              strip_prefix=prefix)
    assert "\n" not in str(err.value)


# --- Lightning -------------------------------------------------------------------------------
def lightning(state: dict, **extra) -> dict:
    return {
        "epoch": 3, "global_step": 1200, "pytorch-lightning_version": "2.4.0",
        "state_dict": {"model." + k: v for k, v in state.items()},
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 3}}}},
        "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.5)}},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}},
                              "param_groups": [{"lr": 0.1, "params": [0]}]}],
        "lr_schedulers": [{"last_epoch": 3}],
        "hyper_parameters": {"lr": 0.1, "hidden": 3},
        **extra,
    }


def test_lightning_checkpoint_is_read_with_one_note(tmp_path, features):
    module = ShiftNet()
    a, b = states(module, 8)
    torch.save(lightning(b), tmp_path / "b.ckpt")
    ckpt = load_checkpoint(tmp_path / "b.ckpt")
    assert sorted(ckpt.state) == sorted(b)
    assert ckpt.notes == (
        "Lightning 2.4.0 checkpoint (epoch 3, global_step 1200): optimizer states and 4 other "
        "trainer key(s) (callbacks, hyper_parameters, loops, ...) ignored",
        f"stripped prefix 'model.' from {len(b)} keys",
    )
    ds = ckptscope.linear_path(a, str(tmp_path / "b.ckpt"), module, features, alphas=3)
    loss, _ = reference_path(module, a, b, list(a), np.linspace(0, 1, 3), *features)
    np.testing.assert_allclose(ds.loss.sel(group="all", split="eval").values[0], loss, rtol=1e-5)


def test_lightning_prefix_is_stripped_once(tmp_path):
    inner = Wrapped(ShiftNet(), "model")  # a network whose own keys start with model.
    a, _ = states(inner, 9)
    torch.save(lightning(a), tmp_path / "a.ckpt")
    assert sorted(load_checkpoint(tmp_path / "a.ckpt").state) == sorted(a)


def test_model_prefix_outside_lightning_is_left_alone(tmp_path):
    a, _ = states(ShiftNet(), 10)
    torch.save({"model." + k: v for k, v in a.items()}, tmp_path / "plain.pt")
    assert all(k.startswith("model.") for k in load_checkpoint(tmp_path / "plain.pt").state)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_lightning_checkpoint_with_unsafe_objects_is_refused(tmp_path):
    a, _ = states(ShiftNet(), 11)
    marker = tmp_path / "pwned"
    torch.save(lightning(a, hyper_parameters=Payload(str(marker))), tmp_path / "evil.ckpt")
    with pytest.raises(CkptscopeError, match="could run code"):
        load_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_plain_wrapper_note_names_ignored_keys(tmp_path):
    a, _ = states(ShiftNet(), 12)
    torch.save({"model": a, "epoch": 2, "optimizer": {"lr": 0.1}}, tmp_path / "a.pt")
    assert load_checkpoint(tmp_path / "a.pt").notes == (
        "read the state dict under 'model', 2 other key(s) ignored (epoch, optimizer)",)


# --- BatchNorm counters ----------------------------------------------------------------------
def test_missing_counter_is_filled_from_the_other_side(tmp_path, features):
    module = ShiftNet()
    a, b = states(module, 13)
    save_file(without(a, "bn.num_batches_tracked"), str(tmp_path / "old.safetensors"))
    ds = ckptscope.linear_path(str(tmp_path / "old.safetensors"), b, module, features,
                               alphas=[0, 0.25, 0.5, 0.75, 1])
    assert (f"{tmp_path / 'old.safetensors'}: filled 1 missing num_batches_tracked counter(s) "
            f"from end (BatchNorm counters never move)") in ds.attrs["notes"]
    # The integer buffer `shift` still comes from the nearer end (start below 0.5).
    filled = dict(a, **{"bn.num_batches_tracked": b["bn.num_batches_tracked"]})
    loss, _ = reference_path(module, filled, b, list(a), [0, 0.25, 0.5, 0.75, 1], *features)
    np.testing.assert_allclose(ds.loss.sel(group="all", split="eval").values[0], loss, rtol=1e-5)
    held, _ = reference_path(module, filled, b, ["bn.running_mean", "bn.running_var"],
                             [0, 0.25, 0.5, 0.75, 1], *features)
    assert not np.allclose(loss, held)  # the reference can tell the ends' `shift` apart


def test_counters_missing_from_both_files_are_zero_when_the_model_has_them(features):
    module = ShiftNet()
    a, b = states(module, 14)
    ca, cb = match_keys(ckptscope.Checkpoint(without(a, "bn.num_batches_tracked")),
                        ckptscope.Checkpoint(without(b, "bn.num_batches_tracked")), module=module)
    for c in (ca, cb):
        assert c.state["bn.num_batches_tracked"].dtype == torch.int64
        assert int(c.state["bn.num_batches_tracked"]) == 0
        assert c.notes == ("set 1 missing num_batches_tracked counter(s) to 0: the model has "
                           "them and no checkpoint does (BatchNorm counters never move)",)


def test_counter_filled_without_a_model_between_files():
    a, b = states(ShiftNet(), 15)
    ca, cb = match_keys(ckptscope.Checkpoint(without(a, "bn.num_batches_tracked"),
                                             path="a.pt"), ckptscope.Checkpoint(b, path="b.pt"))
    assert torch.equal(ca.state["bn.num_batches_tracked"], b["bn.num_batches_tracked"])
    assert ca.notes == ("filled 1 missing num_batches_tracked counter(s) from b.pt (BatchNorm "
                        "counters never move)",)


# --- the command line ------------------------------------------------------------------------
def token_data():
    """Evaluation data for ``--data tests.test_loading:token_data``."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(VOCAB, (32,), generator=g), torch.randint(VOCAB, (32,), generator=g)


def cli(argv, capsys):
    from ckptscope.cli import main

    code = main([str(x) for x in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_path_follows_a_tie_and_says_so_once(tmp_path, capsys):
    a, b = states(TiedLM(), 20)
    paths = [tmp_path / "init.safetensors", tmp_path / "final.safetensors"]
    for path, state in zip(paths, (a, b), strict=True):
        save_file(without(state, "lm_head.weight"), str(path))  # save_pretrained's files
    code, stdout, err = cli(["path", *paths, "--pair", *paths, "--alphas", 3,
                             "--adapter", "tests.test_loading:TiedLM",
                             "--data", "tests.test_loading:token_data", "--group", "lm_head"],
                            capsys)
    assert code == 0, err
    for path in paths:
        line = f"note: {path}: lm_head.weight follows its tie to wte.weight (stored once)"
        assert err.splitlines().count(line) == 1, err
    assert "lm_head" in stdout


def test_cli_path_lightning_and_ddp_pair_with_a_preset(tmp_path, mlp_pair, capsys):
    _, a, b = mlp_pair
    torch.save({"module." + k: v for k, v in a.items()}, tmp_path / "ddp.pt")
    torch.save(lightning(b), tmp_path / "last.ckpt")
    start, end = tmp_path / "ddp.pt", tmp_path / "last.ckpt"
    code, stdout, err = cli(["path", start, end, "--pair", start, end, "--adapter", "mlp",
                             "--adapter-opt", "widths=[2,16,16,1]", "--data", "spiral:120,90",
                             "--alphas", 3, "--preset", "layers"], capsys)
    assert code == 0, err
    lines = err.splitlines()
    for line in (f"note: {start}: stripped prefix 'module.' from {len(a)} keys",
                 f"note: {end}: Lightning 2.4.0 checkpoint (epoch 3, global_step 1200): "
                 f"optimizer states and 4 other trainer key(s) (callbacks, hyper_parameters, "
                 f"loops, ...) ignored",
                 f"note: {end}: stripped prefix 'model.' from {len(b)} keys"):
        assert lines.count(line) == 1, err
    assert "layer1" in stdout


def test_cli_inspect_prints_both_files_notes_and_names_ties(tmp_path, capsys):
    a, b = states(TiedLM(), 21)
    torch.save(lightning(a), tmp_path / "a.ckpt")  # a torch file keeps the tie
    save_file(without(b, "lm_head.weight"), str(tmp_path / "b.safetensors"))
    code, stdout, err = cli(["inspect", tmp_path / "a.ckpt", tmp_path / "b.safetensors",
                             "--group", "lm_head"], capsys)
    assert code == 0, err
    assert f"note: {tmp_path / 'a.ckpt'}: stripped prefix 'model.' from 4 keys" in err
    assert (f"note: {tmp_path / 'b.safetensors'}: lm_head.weight follows its tie to wte.weight "
            f"(stored once here, tied in the other checkpoint)") in err
    row = next(x for x in stdout.splitlines() if x.strip().startswith("lm_head.weight"))
    assert row.endswith("tied to wte.weight") and "buffer" not in row
    group = next(x for x in stdout.split("groups:")[1].splitlines() if "lm_head" in x)
    assert f"{VOCAB * DIM:>12,} params" in group and "nan" not in group


def test_cli_inspect_fills_a_missing_counter(tmp_path, capsys):
    a, b = states(ShiftNet(), 22)
    save_file(without(a, "bn.num_batches_tracked"), str(tmp_path / "old.safetensors"))
    torch.save(b, tmp_path / "new.pt")
    code, _, err = cli(["inspect", tmp_path / "old.safetensors", tmp_path / "new.pt",
                        "--no-keys"], capsys)
    assert code == 0, err
    assert (f"note: {tmp_path / 'old.safetensors'}: filled 1 missing num_batches_tracked "
            f"counter(s) from {tmp_path / 'new.pt'} (BatchNorm counters never move)") in err


def test_cli_strip_prefix(tmp_path, capsys):
    a, b = states(ShiftNet(), 23)
    for name, state in (("a", a), ("b", b)):
        torch.save({"net." + k: v for k, v in state.items()}, tmp_path / f"{name}.pt")
    pa, pb = tmp_path / "a.pt", tmp_path / "b.pt"
    code, stdout, err = cli(["distance", pa, pb, "--strip-prefix", "net.", "--group", "fc"],
                            capsys)
    assert code == 0, err
    assert f"note: {pa}: stripped prefix 'net.' from {len(a)} keys (as asked)" in err
    assert "fc" in stdout
    code, _, err = cli(["inspect", pa, "--strip-prefix", "model."], capsys)
    assert code == 2
    assert err.startswith("error: strip prefix 'model.' (--strip-prefix, strip_prefix=) is not "
                          f"on every key of '{pa}' (their keys start with net.); give")
    assert len(err.strip().splitlines()) == 1


def test_cli_notes_print_whole_once_and_split_cleanly_from_the_result(tmp_path, mlp_pair,
                                                                      capsys):
    """A result joins its notes with '; ': a note holding '; ' came back cut in two, and its
    first half was printed a second time (a bf16 file's note, a Lightning file's)."""
    _, a, b = mlp_pair
    save_file({k: v.to(torch.bfloat16) for k, v in a.items()}, str(tmp_path / "a.safetensors"))
    torch.save(lightning(b), tmp_path / "last.ckpt")
    start, end, out = tmp_path / "a.safetensors", tmp_path / "last.ckpt", tmp_path / "r.nc"
    code, _, err = cli(["path", start, end, "--adapter", "mlp", "--adapter-opt",
                        "widths=[2,16,16,1]", "--data", "spiral:120,90", "--alphas", 3,
                        "--out", out], capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert len(notes) == len(set(notes)) >= 3, err
    for note in notes:  # no note is the head of another
        assert not any(other != note and other.startswith(note) for other in notes), err
    recorded = ckptscope.open_result(out).attrs["notes"].split("; ")
    assert {f"note: {n}" for n in recorded} == set(notes)
