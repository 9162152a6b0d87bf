"""The batched evaluator against the plain load_state_dict loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ckptscope.engine import EvalConfig, Evaluator
from ckptscope.errors import CkptscopeError
from tests.conftest import run_path, run_paths
from tests.reference import plain_eval, reference_path, reference_points

ALPHAS = np.linspace(0, 1, 7)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("hold", ["end", "start"])
def test_path_matches_reference_mlp(mlp_pair, spiral_small, strategy, hold):
    module, a, b = mlp_pair
    x, y = spiral_small["test"]
    keys = ["layers.1.weight", "layers.1.bias"]
    ev = Evaluator(
        module,
        {"test": (x, y)},
        loss="bce",
        config=EvalConfig(strategy=strategy, batch_size=64),
    )
    loss, acc = run_path(ev, a, b, keys, ALPHAS, hold=hold)["test"]
    ref_loss, ref_acc = reference_path(module, a, b, keys, ALPHAS, x, y, loss="bce", hold=hold)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(acc, ref_acc, atol=1.5 / len(x))


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize(
    "keys",
    [None, ["bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]],
)
def test_path_matches_reference_conv_bn(conv_pair, image_data, strategy, keys):
    module, a, b = conv_pair
    keys = keys or list(a)
    x, y = image_data["test"]
    ev = Evaluator(
        module,
        image_data,
        loss="cross_entropy",
        config=EvalConfig(strategy=strategy, batch_size=10),
    )
    loss, acc = run_path(ev, a, b, keys, ALPHAS)["test"]
    ref_loss, ref_acc = reference_path(module, a, b, keys, ALPHAS, x, y)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(acc, ref_acc, atol=1.5 / len(x))


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_path_endpoints_equal_plain_evaluation(conv_pair, image_data, strategy):
    module, a, b = conv_pair
    x, y = image_data["test"]
    ev = Evaluator(
        module,
        image_data,
        loss="cross_entropy",
        config=EvalConfig(strategy=strategy, batch_size=10),
    )
    loss, acc = run_path(ev, a, b, list(a), np.array([0.0, 0.5, 1.0]))["test"]
    for i, state in ((0, a), (2, b)):
        ref_loss, ref_acc = plain_eval(module, state, x, y, batch_size=10)
        np.testing.assert_allclose(loss[i], ref_loss[0], rtol=1e-6)
        assert acc[i] == ref_acc[0]


def test_loop_state_at_endpoints_is_bitwise_the_endpoint(conv_pair, image_data):
    module, a, b = conv_pair
    ev = Evaluator(
        module, image_data, loss="cross_entropy", config=EvalConfig(strategy="loop")
    )
    for hold in ("end", "start"):
        for alpha, state in ((0.0, a), (1.0, b)):
            run_path(ev, a, b, list(a), np.array([alpha]), hold=hold)
            for k, v in state.items():  # integer buffers too: the whole model holds nothing
                assert torch.equal(ev.slots[k], v), k


def test_loss_is_sum_over_examples_not_mean_of_batch_means(mlp_pair, spiral_small):
    module, a, b = mlp_pair
    x, y = spiral_small["test"][0][:101], spiral_small["test"][1][:101]
    results = []
    for bs in (101, 10, 7):
        ev = Evaluator(module, {"test": (x, y)}, loss="bce", config=EvalConfig(batch_size=bs))
        results.append(run_path(ev, a, b, list(a), np.array([0.3]))["test"][0][0])
    np.testing.assert_allclose(results, results[0], rtol=1e-6)


def test_vmap_chunking_does_not_change_results(conv_pair, image_data):
    module, a, b = conv_pair
    grid = np.linspace(-0.5, 1.5, 9)
    curves = []
    for budget in (None, 1):  # budget of 1 byte forces one alpha per chunk
        ev = Evaluator(
            module,
            image_data,
            loss="cross_entropy",
            config=EvalConfig(strategy="vmap", batch_size=16, memory_budget=budget),
        )
        curves.append(run_path(ev, a, b, list(a), grid)["test"][0])
    assert ev.chunk_size(list(a), len(grid)) == 1
    np.testing.assert_allclose(curves[0], curves[1], rtol=1e-6)


def test_chunk_size_bounded_by_budget(conv_pair, image_data):
    module, a, b = conv_pair
    ev = Evaluator(
        module,
        image_data,
        loss="cross_entropy",
        config=EvalConfig(strategy="vmap", batch_size=16, memory_budget=200_000),
    )
    small, large = ev.chunk_size(list(a), 10), ev.chunk_size(list(a), 10_000)
    assert small <= 10
    assert large == ev.chunk_size(list(a), 100_000) < 10_000


def test_integer_buffers_come_from_the_held_end_or_the_nearer_one(conv_pair, image_data):
    module, a, b = conv_pair
    key = "bn.num_batches_tracked"
    ev = Evaluator(module, image_data, loss="cross_entropy", config=EvalConfig(strategy="loop"))
    for hold, held in (("end", b), ("start", a)):
        # A group path: from the held end, at every alpha.
        for last in (0.0, 1.0):
            run_path(ev, a, b, ["bn.weight", key], np.array([0.5, last]), hold=hold)
            assert int(ev.slots[key]) == int(held[key])
        # The whole model holds nothing: from the nearer end (a tie goes to the end).
        for grid, nearer in (([0.0, 0.4], a), ([0.6, 0.5], b), ([1.0, -0.5], a), ([0.0, 1.5], b)):
            run_path(ev, a, b, list(a), np.array(grid), hold=hold)
            assert int(ev.slots[key]) == int(nearer[key]), (hold, grid)


def test_progress_reports_every_alpha(mlp_pair, spiral_small):
    module, a, b = mlp_pair
    seen = []
    ev = Evaluator(
        module, spiral_small, loss="bce", config=EvalConfig(strategy="vmap", memory_budget=1)
    )
    run_path(ev, a, b, list(a), ALPHAS, progress=seen.append)
    assert sum(seen) == len(ALPHAS)


def test_model_data_mismatch_is_one_line_error(conv_pair):
    module, a, b = conv_pair
    bad = {"test": (torch.randn(4, 2), torch.zeros(4, dtype=torch.long))}
    with pytest.raises(CkptscopeError, match="the model failed on the 'test' inputs"):
        Evaluator(module, bad, loss="cross_entropy", config=EvalConfig())


def test_eval_config_rejects_bad_values():
    with pytest.raises(CkptscopeError, match="strategy"):
        EvalConfig(strategy="fast")
    with pytest.raises(CkptscopeError, match="batch_size"):
        EvalConfig(batch_size=0)
    with pytest.raises(CkptscopeError, match="data_size=0"):
        EvalConfig(data_size=0)
    with pytest.raises(CkptscopeError, match="seed=1.5"):
        EvalConfig(seed=1.5)
    with pytest.raises(CkptscopeError, match="not a torch device"):
        EvalConfig(device="gpu")
    assert EvalConfig(device="cpu").device == torch.device("cpu")


def test_float64_evaluation_matches_reference_tightly(mlp_pair, spiral_small):
    module, a, b = mlp_pair
    x, y = spiral_small["test"]
    ev = Evaluator(
        module.double(), {"test": (x, y)}, loss="bce", config=EvalConfig(dtype=torch.float64)
    )
    loss, _ = run_path(ev, a, b, list(a), ALPHAS)["test"]
    ref, _ = reference_path(
        module.double(),
        {k: v.double() for k, v in a.items()},
        {k: v.double() for k, v in b.items()},
        list(a),
        ALPHAS,
        x.double(),
        y,
        loss="bce",
    )
    np.testing.assert_allclose(loss, ref, rtol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_cuda_matches_cpu(conv_pair, image_data, strategy):
    module, a, b = conv_pair
    curves = []
    for device in ("cpu", "cuda"):
        ev = Evaluator(
            module,
            image_data,
            loss="cross_entropy",
            config=EvalConfig(device=torch.device(device), strategy=strategy),
        )
        curves.append(run_path(ev, a, b, list(a), ALPHAS)["test"][0])
    np.testing.assert_allclose(curves[0], curves[1], rtol=1e-4)


def test_out_of_memory_halves_chunk_then_batch_and_warns(conv_pair, image_data, monkeypatch):
    module, a, b = conv_pair
    grid = np.linspace(0, 1, 8)
    ev = Evaluator(module, image_data, loss="cross_entropy",
                   config=EvalConfig(strategy="vmap", batch_size=37))
    want = run_path(ev, a, b, list(a), grid)["test"][0]
    calls = []
    original = ev.context.loss_fn

    def flaky(outputs, targets):
        calls.append((outputs.shape[0], outputs.shape[1]))
        if outputs.shape[0] > 2 or outputs.shape[1] > 20:  # "too big" for the device
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(outputs, targets)

    monkeypatch.setattr(ev.context, "loss_fn", flaky)
    with pytest.warns(UserWarning, match="out of device memory"):
        got = run_path(ev, a, b, list(a), grid)["test"][0]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert calls[-1][0] <= 2 and ev.batch_size() <= 20


def test_streams_only_what_does_not_fit_an_accelerator(conv_pair, image_data):
    from ckptscope.engine.sizing import streams

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert streams(cuda, 600, 1000) and not streams(cuda, 500, 1000)
    assert not streams(cpu, 10**12, 1000)  # on the CPU the data is where it is evaluated
    module, a, b = conv_pair
    ev = Evaluator(module, image_data, loss="cross_entropy",
                   config=EvalConfig(memory_budget=1))
    assert not ev.streaming


@pytest.mark.parametrize("size", [1, 2, 3, 7, 50])
def test_deferred_loss_equals_one_call_per_point(size):
    from ckptscope.engine.deferred import Deferred
    from ckptscope.losses import cross_entropy

    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 5, (7,), generator=g)  # the split's targets, the same at every point
    points = []
    for i in range(7):  # the batch size changes after point 4, as after an OOM back-off
        spans = [(0, 4), (4, 7)] if i < 4 else [(0, 2), (2, 4), (4, 6), (6, 7)]
        points.append([(torch.randn(hi - lo, 5, generator=g), y[lo:hi]) for lo, hi in spans])
    deferred = Deferred(cross_entropy, size)
    for batches in points:
        deferred.add(batches)
    loss, correct, count = deferred.totals(7)
    assert (count == 7).all()  # cross_entropy counts every non-ignored target
    for i, batches in enumerate(points):
        want_loss = sum(cross_entropy(out[None], t)[0].double() for out, t in batches)
        want_correct = sum(int((out.argmax(-1) == t).sum()) for out, t in batches)
        assert loss[i] == pytest.approx(float(want_loss), rel=1e-6)
        assert correct[i] == want_correct
    assert deferred.outputs == []


def test_loop_with_few_points_per_loss_call_matches_reference(mlp_pair, spiral_small, monkeypatch):
    from ckptscope.engine.deferred import Deferred

    module, a, b = mlp_pair
    x, y = spiral_small["test"]
    ev = Evaluator(module, {"test": (x, y)}, loss="bce",
                   config=EvalConfig(strategy="loop", batch_size=64))
    # Small outputs: all at once.
    assert ev.context.deferred("test", len(ALPHAS)).size == len(ALPHAS)
    whole = run_path(ev, a, b, list(a), ALPHAS)["test"]
    monkeypatch.setattr(ev.context, "deferred", lambda split, n: Deferred(ev.context.loss_fn, 3))
    loss, acc = run_path(ev, a, b, list(a), ALPHAS)["test"]
    ref_loss, ref_acc = reference_path(module, a, b, list(a), ALPHAS, x, y, loss="bce")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(acc, ref_acc, atol=1.5 / len(x))
    np.testing.assert_allclose(loss, whole[0], rtol=1e-12)


def test_deferral_is_bounded_by_the_memory_budget(conv_pair, image_data):
    module, a, b = conv_pair
    ev = Evaluator(module, image_data, loss="cross_entropy",
                   config=EvalConfig(strategy="loop", memory_budget=16 * 37 * 3 * 4 * 2))
    # 37 examples x 3 classes x 4 bytes per point; a sixteenth of the budget holds two points.
    assert ev.context.deferred("test", 51).size == 2


@pytest.mark.parametrize("budget", [None, 40_000])
def test_group_paths_share_vectorised_passes(mlp_pair, spiral_small, budget):
    module, a, b = mlp_pair
    x, y = spiral_small["test"]
    groups = [list(a), ["layers.0.weight", "layers.0.bias"], ["layers.2.weight"]]
    grids = [ALPHAS, ALPHAS[::2], ALPHAS[1:4]]  # sharded runs give groups different alphas
    ev = Evaluator(module, {"test": (x, y)}, loss="bce",
                   config=EvalConfig(strategy="vmap", batch_size=64, memory_budget=budget))
    calls, finished, progressed = [], [], []
    original = ev.context.accumulate

    def counting(outputs_fn, split, k):
        calls.append(k)
        return original(outputs_fn, split, k)

    ev.context.accumulate = counting
    got = run_paths(ev, a, b, list(zip(groups, grids, strict=True)),
                    progress=progressed.append, done=lambda i, _: finished.append(i))
    # all and layer1 (only a flatten upstream) share passes; layer3 is hoisted on its own.
    assert sorted(finished) == [0, 1, 2] and sum(progressed) == sum(map(len, grids))
    if budget is None:
        assert calls == [len(grids[0]) + len(grids[1])]
    else:
        assert len(calls) > 1 and max(calls) < len(grids[0])
    for keys, grid, result in zip(groups, grids, got, strict=True):
        ref_loss, ref_acc = reference_path(module, a, b, keys, grid, x, y, loss="bce")
        np.testing.assert_allclose(result["test"][0], ref_loss, rtol=1e-5)
        np.testing.assert_allclose(result["test"][1], ref_acc, atol=1.5 / len(x))


def test_cpu_activation_estimate_counts_every_activation_once():
    """The batch size must not depend on what the allocator reused (bn=batch curves do)."""
    from ckptscope.adapters.mlp import MLP

    torch.manual_seed(0)
    # Equal widths: each freed activation is the size of the next one, so an allocator reuses it.
    module = MLP([16, 512, 512, 512, 512, 512, 1]).eval()
    a = b = {k: v.clone() for k, v in module.state_dict().items()}
    data = {"test": (torch.randn(100, 16), torch.randint(0, 2, (100,)).float())}
    outputs = []
    leaves = [m for m in module.modules() if not list(m.children())]
    handles = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for m in leaves]
    try:
        with torch.no_grad():
            module(data["test"][0][:8])
    finally:
        for h in handles:
            h.remove()
    distinct = {o.untyped_storage().data_ptr(): o.untyped_storage().nbytes() for o in outputs}
    want = -(-sum(distinct.values()) // 8)
    sizes = set()
    for _ in range(3):
        ev = Evaluator(module, data, loss="bce", config=EvalConfig())
        sizes.add(ev.context.sizes.activation_bytes)
        junk = [torch.empty(1 << k) for k in range(10, 20)]  # stir the allocator
        del junk
    assert sizes == {want}


def test_outputs_too_large_to_hold_take_their_loss_as_they_come(conv_pair, image_data):
    module, a, b = conv_pair
    ev = Evaluator(module, image_data, loss="cross_entropy",
                   config=EvalConfig(strategy="loop", batch_size=10, memory_budget=16 * 100))
    assert ev.context.deferred("test", len(ALPHAS)).size == 0  # 37 x 3 x 4 bytes > 100 bytes
    events = []
    original = ev.context.loss_fn

    def loss(outputs, targets):
        events.append(("loss", outputs.shape[0]))
        return original(outputs, targets)

    ev.context.loss_fn = loss
    ev.module.register_forward_hook(lambda *_: events.append(("forward", 1)))
    got, _ = run_path(ev, a, b, list(a), ALPHAS)["test"]
    # Never more than one batch's output alive: each forward is followed by its loss.
    assert events == [("forward", 1), ("loss", 1)] * (4 * len(ALPHAS))
    x, y = image_data["test"]
    np.testing.assert_allclose(got, reference_path(module, a, b, list(a), ALPHAS, x, y)[0],
                               rtol=1e-5)


def test_stacked_loss_out_of_memory_falls_back_to_one_point_at_a_time(conv_pair, image_data):
    module, a, b = conv_pair
    ev = Evaluator(module, image_data, loss="cross_entropy",
                   config=EvalConfig(strategy="loop", batch_size=10))
    want = run_path(ev, a, b, list(a), ALPHAS)["test"]
    original, stacked = ev.context.loss_fn, []

    def loss(outputs, targets):
        if outputs.shape[0] > 1:
            stacked.append(outputs.shape[0])
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(outputs, targets)

    ev.context.loss_fn = loss
    ev.context.deferred = lambda split, n, examples=None: _deferred_of(ev, 3)
    got = run_path(ev, a, b, list(a), ALPHAS)["test"]
    assert stacked  # the stacked call was tried and failed
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    np.testing.assert_array_equal(got[1], want[1])


def _deferred_of(ev, size):
    from ckptscope.engine.deferred import Deferred

    return Deferred(ev.context.loss_fn, size)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_an_empty_alpha_list_gives_empty_curves(mlp_pair, spiral_small, strategy):
    module, a, b = mlp_pair
    ev = Evaluator(module, spiral_small, loss="bce",
                   config=EvalConfig(strategy=strategy, batch_size=64, hoist=False))
    empty, full = run_paths(ev, a, b, [(list(a), np.array([])), (list(a), ALPHAS)])
    assert all(loss.shape == acc.shape == (0,) for loss, acc in empty.values())
    assert full["test"][0].shape == (len(ALPHAS),)


def test_activation_probe_does_not_count_the_split_behind_a_view():
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4)).eval()
    a = {k: v.clone() for k, v in module.state_dict().items()}
    data = {"test": (torch.randn(100_000, 16), torch.randint(0, 4, (100_000,)))}
    ev = Evaluator(module, data, loss="cross_entropy", config=EvalConfig())
    # One input row (the flatten) and one output.
    assert ev.context.sizes.activation_bytes <= 4 * (16 + 4)


@pytest.mark.parametrize("keys", [None, ["enc.weight"], ["dec.weight"], ["mid.weight"]])
def test_tied_weights_move_once_under_both_strategies(keys):
    from tests.conftest import perturbed
    from tests.test_hoist import Tied

    torch.manual_seed(0)
    module = Tied()
    a = {k: v.clone() for k, v in module.state_dict().items()}
    b = perturbed(a, 0.5, 3)
    b["dec.weight"] = b["enc.weight"]
    g = torch.Generator().manual_seed(1)
    data = {"test": (torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g))}
    items = [(list(a), ALPHAS), (keys or list(a), ALPHAS[1:5])]
    curves = {}
    for strategy in ("loop", "vmap"):
        ev = Evaluator(module, data, loss="cross_entropy",
                       config=EvalConfig(strategy=strategy, batch_size=8, hoist=False))
        curves[strategy] = [r["test"][0] for r in run_paths(ev, a, b, items)]
    x, y = data["test"]
    for (group, grid), loop, vmap in zip(items, curves["loop"], curves["vmap"], strict=True):
        # A tied tensor moves under every name it has (the reference moves the names given).
        tied = {"enc.weight", "dec.weight"}
        named = sorted(set(group) | tied) if tied & set(group) else group
        ref = reference_path(module, a, b, named, grid, x, y)[0]
        np.testing.assert_allclose(loop, ref, rtol=1e-6)
        np.testing.assert_allclose(vmap, ref, rtol=1e-6)


def test_stacked_loss_fallback_runs_after_the_failed_call_is_released():
    import weakref

    from ckptscope.engine.deferred import Deferred
    from ckptscope.losses import cross_entropy

    stacked, alive_in_fallback = [], []

    def loss(outputs, targets):
        if outputs.shape[0] > 1:
            stacked.append(weakref.ref(outputs))
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        alive_in_fallback.append(stacked[0]() is not None)
        return cross_entropy(outputs, targets)

    deferred = Deferred(loss, 3)
    y = torch.randint(0, 3, (5,))
    for _ in range(3):
        deferred.add([(torch.randn(5, 3), y)])
    assert deferred.sums(3)[0].shape == (3,)
    assert alive_in_fallback == [False, False, False]


def test_vmap_takes_a_tied_tensor_under_the_name_the_checkpoint_has():
    from tests.conftest import perturbed
    from tests.test_hoist import Tied

    torch.manual_seed(0)
    module = Tied()
    a = perturbed(module.state_dict(), 0.0, 1)
    b = perturbed(a, 0.5, 3)
    b["dec.weight"] = b["enc.weight"]
    a.pop("enc.weight"), b.pop("enc.weight")  # a file that stores the tied tensor once
    g = torch.Generator().manual_seed(1)
    data = {"test": (torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g))}
    got = {}
    for strategy in ("loop", "vmap"):
        ev = Evaluator(module, data, loss="cross_entropy",
                       config=EvalConfig(strategy=strategy, batch_size=8, hoist=False))
        got[strategy] = run_path(ev, a, b, list(a), ALPHAS)["test"][0]
    np.testing.assert_allclose(got["vmap"], got["loop"], rtol=1e-6)


@pytest.mark.parametrize(
    "config, batch, expected",
    [
        ({}, 32, True),  # auto is loop on the CPU
        ({}, 31, False),  # small batches: the default layout was faster
        ({"strategy": "vmap"}, 64, False),
        ({"strategy": "vmap", "bn": "recompute"}, 64, True),  # recompute runs loop
        ({"channels_last": True}, 4, True),
        ({"channels_last": False}, 64, False),
    ],
)
def test_channels_last_default_follows_strategy_and_batch_size(image_data, config, batch,
                                                               expected):
    module = _PooledConvNet()
    a = module.state_dict()
    data = {"test": image_data["test"], "train": image_data["test"]}
    ev = Evaluator(module, data, loss="cross_entropy", bn_data=image_data["test"][0],
                   config=EvalConfig(batch_size=batch, **config))
    assert ev.channels_last is expected
    layout = torch.channels_last if expected else torch.contiguous_format
    assert ev.module.conv.weight.is_contiguous(memory_format=layout)
    assert all(x.is_contiguous(memory_format=layout) for x, _ in ev.data.values())
    assert ev.slots["conv.weight"] is ev.module.conv.weight


def test_a_net_without_convolutions_keeps_its_layout(mlp_pair, spiral_small):
    module, a, b = mlp_pair
    config = EvalConfig(channels_last=True)
    assert not Evaluator(module, spiral_small, loss="bce", config=config).channels_last


class _PooledConvNet(torch.nn.Module):
    """Conv, BatchNorm, global average pool: the pool's channels-last path restrides."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(6)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_layout_gives_the_reference_path_quietly(image_data, strategy, channels_last):
    import warnings

    from tests.conftest import perturbed

    torch.manual_seed(0)
    module = _PooledConvNet()
    a = perturbed(module.state_dict(), 0.1, 2)
    b = perturbed(a, 0.3, 3)
    x, y = image_data["test"]
    config = EvalConfig(strategy=strategy, batch_size=10, channels_last=channels_last, hoist=False)
    ev = Evaluator(module, image_data, loss="cross_entropy", config=config)
    assert ev.channels_last is channels_last
    assert ev.module.conv.weight.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    with warnings.catch_warnings(record=True) as caught:  # the filters as they are
        loss, acc = run_path(ev, a, b, list(a), ALPHAS)["test"]
    assert not [w for w in caught if "as_strided_" in str(w.message)]
    ref_loss, ref_acc = reference_path(module, a, b, list(a), ALPHAS, x, y)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(acc, ref_acc, atol=1.5 / len(x))


def test_a_model_that_fails_in_channels_last_keeps_the_default_layout(image_data):
    from tests.conftest import ViewNet, perturbed

    torch.manual_seed(0)
    module = ViewNet()
    a = module.state_dict()
    b = perturbed(a, 0.3, 3)
    x, y = image_data["test"]
    ev = Evaluator(module, image_data, loss="cross_entropy", config=EvalConfig(batch_size=37))
    assert not ev.channels_last
    loss, _ = run_path(ev, a, b, list(a), ALPHAS)["test"]
    np.testing.assert_allclose(loss, reference_path(module, a, b, list(a), ALPHAS, x, y)[0],
                               rtol=1e-5)
    with pytest.raises(CkptscopeError, match="channels-last layout was asked for.*view"):
        Evaluator(module, image_data, loss="cross_entropy",
                  config=EvalConfig(channels_last=True))


class _ScaledConvNet(torch.nn.Module):
    """A conv net with 4-D buffers: ``s1.scale`` and ``s2.scale`` are one tensor (tied),
    ``own`` is another."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.s1, self.s2 = torch.nn.Module(), torch.nn.Module()
        scale = torch.ones(1, 6, 1, 1)
        self.s1.register_buffer("scale", scale)
        self.s2.register_buffer("scale", scale)
        self.register_buffer("own", torch.ones(1, 6, 1, 1))
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x)) * self.s1.scale * self.own + self.s2.scale
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("keys", [["own"], ["s1.scale"], ["s2.scale"], None])
@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_four_d_buffers_move_and_stay_tied_in_channels_last(image_data, keys, strategy):
    from tests.conftest import perturbed

    torch.manual_seed(0)
    module = _ScaledConvNet()
    a = perturbed(module.state_dict(), 0.1, 2)
    a["s2.scale"] = a["s1.scale"]  # one tensor in the module, one value in the checkpoint
    b = perturbed(a, 0.5, 3)
    b["s2.scale"] = b["s1.scale"]
    keys = keys or list(a)
    curves = {}
    for layout in (True, False):
        config = EvalConfig(strategy=strategy, batch_size=37, channels_last=layout)
        ev = Evaluator(module, image_data, loss="cross_entropy", config=config)
        assert ev.channels_last is layout
        assert ev.module.s1.scale is ev.module.s2.scale  # still tied
        assert ev.slots["own"] is ev.module.own
        curves[layout] = run_path(ev, a, b, keys, ALPHAS)["test"][0]
    np.testing.assert_allclose(curves[True], curves[False], rtol=1e-5)
    assert np.ptp(curves[False]) > 1e-3  # the path moves
    if keys == ["own"]:
        x, y = image_data["test"]
        ref = reference_path(module, a, b, keys, ALPHAS, x, y)[0]
        np.testing.assert_allclose(curves[True], ref, rtol=1e-5)


@pytest.mark.parametrize("bn, strategy", [("interpolate", "loop"), ("interpolate", "vmap"),
                                          ("batch", "loop"), ("recompute", "loop")])
@pytest.mark.parametrize("keys", [["fc.weight", "fc.bias"], ["bn.weight", "bn.bias"]])
def test_hoisted_and_bn_policy_paths_agree_across_layouts(image_data, bn, strategy, keys):
    from tests.conftest import perturbed

    torch.manual_seed(0)
    module = _PooledConvNet()
    a = perturbed(module.state_dict(), 0.1, 2)
    b = perturbed(a, 0.3, 3)
    data = {"test": image_data["test"], "train": image_data["test"]}
    curves = []
    for layout in (True, False):
        config = EvalConfig(strategy=strategy, batch_size=37, channels_last=layout, bn=bn)
        ev = Evaluator(module, data, loss="cross_entropy", config=config,
                       bn_data=image_data["test"][0])
        curves.append(run_path(ev, a, b, keys, ALPHAS)["test"][0])
        if bn != "recompute":
            assert ev.hoisted == 1
    np.testing.assert_allclose(curves[0], curves[1], rtol=1e-5)


class _ChattyConvNet(_PooledConvNet):
    def forward(self, x):
        import warnings

        warnings.warn("a warning from the model's forward", stacklevel=1)
        return super().forward(x)


def test_a_models_own_warning_shows_once_under_vmap(image_data):
    import warnings

    torch.manual_seed(0)
    module = _ChattyConvNet()
    a = module.state_dict()
    config = EvalConfig(strategy="vmap", batch_size=5, channels_last=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("default", message="a warning from the model")
        ev = Evaluator(module, image_data, loss="cross_entropy", config=config)
        run_path(ev, a, a, list(a), ALPHAS)  # 8 batches
    assert sum("from the model" in str(w.message) for w in caught) == 1


# --- point sets over three anchors ---------------------------------------------------------------
PLANE = np.array([[1, 0, 0], [0, 1, 0], [0.2, 0.3, 0.5], [-0.5, 1.0, 0.5], [0, 0.5, 0.5],
                  [1 / 3, 1 / 3, 1 / 3], [0, 0, 1]])
GROUPS = {"fc": ["fc.weight", "fc.bias"],
          "bn": ["bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                 "bn.num_batches_tracked"]}


def _three_anchors(conv_pair):
    from tests.conftest import perturbed

    module, a, b = conv_pair
    return module, {"a": a, "b": b, "c": perturbed(a, 0.3, 4)}


@pytest.mark.parametrize("strategy, bn", [("loop", "interpolate"), ("vmap", "interpolate"),
                                          ("loop", "batch"), ("vmap", "batch"),
                                          ("loop", "recompute")])
@pytest.mark.parametrize("group, held", [(None, None), ("fc", "c"), ("bn", "a")])
def test_three_anchor_points_match_the_reference(conv_pair, image_data, strategy, bn, group,
                                                 held):
    from ckptscope.points import PointSet

    module, anchors = _three_anchors(conv_pair)
    names = ("a", "b", "c")
    keys = GROUPS[group] if group else list(anchors["a"])
    train_x = torch.randn(30, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    ev = Evaluator(module, image_data, loss="cross_entropy", bn_data=train_x,
                   config=EvalConfig(strategy=strategy, batch_size=10, bn=bn, bn_batches=3))
    points = PointSet(names, PLANE, tuple(keys), held)
    [got] = ev.evaluate(anchors, [points])
    x, y = image_data["test"]
    want = reference_points(module, anchors, names, PLANE, keys, held, x, y, batch_size=10,
                            bn=bn, train_x=train_x, bn_batches=3)
    np.testing.assert_allclose(got["test"][0], want[0], rtol=1e-5)
    np.testing.assert_allclose(got["test"][1], want[1], atol=1.5 / len(x))
    # A group's upstream part is computed once per batch, except where statistics are
    # re-estimated at every point.
    assert ev.hoisted == (1 if group and bn != "recompute" else 0)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("keys", [None, ["fc.weight", "fc.bias"]])  # whole model; hoisted group
@pytest.mark.parametrize("k", [2, 3])
def test_a_point_equal_to_an_anchor_evaluates_that_anchor_bitwise(conv_pair, image_data,
                                                                  strategy, keys, k, monkeypatch):
    from ckptscope.engine import strategies
    from ckptscope.points import PointSet

    module, anchors = _three_anchors(conv_pair)
    names = ("a", "b", "c")[:k]
    weights = np.vstack([np.eye(k), np.full((1, k), 1 / k), np.eye(k)[::-1]])
    checked = []
    write_point, stack_points = strategies.write_point, strategies.stack_points

    def writing(targets, sources, row):
        write_point(targets, sources, row)
        if (unit := np.flatnonzero(np.asarray(row) == 1)).size and np.count_nonzero(row) == 1:
            assert all(torch.equal(t, s) for t, s in zip(targets, sources[unit[0]], strict=True))
            checked.append(int(unit[0]))

    def stacking(values, at):
        out = stack_points(values, at)
        for row, unit in enumerate(at.exact):
            if unit >= 0:
                assert torch.equal(out[row], values[unit])
                checked.append(int(unit))
        return out

    monkeypatch.setattr(strategies, "write_point", writing)
    monkeypatch.setattr(strategies, "stack_points", stacking)
    ev = Evaluator(module, image_data, loss="cross_entropy",
                   config=EvalConfig(strategy=strategy, batch_size=10))
    moving = tuple(keys or anchors["a"])
    [got] = ev.evaluate(anchors, [PointSet(names, weights, moving, None if keys is None else "b")])
    assert set(checked) == set(range(k))
    assert ev.hoisted == (0 if keys is None else 1)
    if keys is None and strategy == "loop":
        # The anchor itself, non-float tensors too: the same loss as evaluating it alone.
        for i in range(k):
            [alone] = ev.evaluate(anchors, [PointSet((names[i],), [[1.0]], moving)])
            assert got["test"][0][i] == alone["test"][0][0]
        np.testing.assert_array_equal(got["test"][0][k + 1:], got["test"][0][:k][::-1])
