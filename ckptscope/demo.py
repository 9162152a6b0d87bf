"""The embedded default job: train the paper's spiral MLP briefly and look at its paths.

Appendix A: data from eq. 3, two hidden layers of 50 ReLU units, Adam with lr 5e-4, no weight
decay, batch 500, binary cross-entropy. The demo saves theta_i and theta_f as safetensors (with
the adapter and data in their metadata), evaluates the whole-model path and one path per layer,
and writes the result and a figure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import xarray as xr

from ckptscope import __version__
from ckptscope.adapters import get_adapter
from ckptscope.checkpoints import save_checkpoint
from ckptscope.data import load_data
from ckptscope.engine import EvalConfig
from ckptscope.linear import linear_path
from ckptscope.results import save_result
from ckptscope.train import TrainConfig, fit

WIDTHS = [2, 50, 50, 1]
DEMO_TRAIN = TrainConfig(epochs=600, batch_size=500, lr=5e-4, optimizer="adam", seed=0)


@dataclass(frozen=True)
class DemoOutput:
    """What the demo wrote, and the result."""

    start: Path
    end: Path
    result_path: Path
    result: xr.Dataset
    figure: object  # a matplotlib Figure: loss and accuracy along the paths
    history: list[dict]


def run_demo(
    out: str | Path = "ckptscope-demo",
    *,
    seed: int = 0,
    epochs: int | None = None,
    alphas: int = 51,
    on_epoch: Callable[[dict], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DemoOutput:
    """Train, save both endpoints, evaluate the paths, write ``result.nc``; return the figure.

    Args:
        out: the output folder (created).
        seed: seeds the initialisation, the data and the data order.
        epochs: training epochs (default 600, about ten seconds on two CPU cores).
        alphas: points on each path.
        on_epoch, progress: callbacks for the training and evaluation progress.
    """
    import matplotlib.pyplot as plt

    from ckptscope.plots import plot_path

    out = Path(out)
    adapter = get_adapter("mlp")
    options = {"widths": WIDTHS}
    torch.manual_seed(seed)
    module = adapter.make(options)
    metadata = {
        "adapter": "mlp",
        "adapter_options": options,
        "data": "spiral",
        "seed": seed,
        "version": __version__,
    }
    start = save_checkpoint(
        out / "init.safetensors", module.state_dict(), metadata={**metadata, "epoch": 0}
    )
    config = TrainConfig(
        **{
            **DEMO_TRAIN.__dict__,
            "seed": seed,
            **({"epochs": epochs} if epochs is not None else {}),
        }
    )
    history = fit(
        module,
        load_data("spiral", seed=seed),
        loss=adapter.loss(options),
        config=config,
        on_epoch=on_epoch,
    )
    end = save_checkpoint(
        out / "final.safetensors",
        module.state_dict(),
        # The last epoch's metrics, as the trainer records them (`correlate --with
        # final_metrics.test_accuracy` reads them).
        metadata={**metadata, "epoch": config.epochs,
                  **({"final_metrics": history[-1]} if history else {})},
    )
    groups = adapter.presets["layers"](list(module.state_dict()))
    ds = linear_path(
        start, end, groups=groups, alphas=alphas, split="test", progress=progress,
        config=EvalConfig(seed=seed),
    )
    result_path = save_result(ds, out / "result.nc")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    plot_path(ds, variable="loss", ax=axes[0], title="spiral MLP: test loss")
    plot_path(ds, variable="accuracy", ax=axes[1], title="spiral MLP: test accuracy")
    fig.tight_layout()
    return DemoOutput(start, end, result_path, ds, fig, history)
