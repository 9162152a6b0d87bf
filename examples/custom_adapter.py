"""A custom adapter: a small conv net, its presets, and a linear path through it.

Run it from the repository root (a few seconds on a CPU; no data is downloaded):

    python examples/custom_adapter.py [OUT_DIR]

It trains the net briefly on synthetic images, saves the initial and trained states to
``OUT_DIR`` (default ``custom-adapter-demo/``) with the adapter named in their metadata, and
prints the whole-model path and one path per block between them. With this folder on
``PYTHONPATH`` the shell finds the adapter (``custom_adapter:ADAPTER``) and the data
(``custom_adapter:test_data``) by their import specs, passed on the command line: ckptscope never
imports code that a file's metadata names (docs/security.md):

    PYTHONPATH=examples ckptscope path custom-adapter-demo/init.safetensors \\
        custom-adapter-demo/final.safetensors --adapter custom_adapter:ADAPTER \\
        --preset blocks --data custom_adapter:test_data

See ``docs/adapters.md``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import ckptscope
from ckptscope import Adapter, CkptscopeError
from ckptscope.adapters.presets import bn_stats


class SmallConvNet(nn.Module):
    """Two 3x3 conv + BN + ReLU + 2x2 max-pool stages, global average pool, a linear head.

    Args:
        num_classes: outputs of ``fc``.
        width: channels of the first conv (the second has twice as many).
    """

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.mean(dim=(2, 3)))


def build(num_classes: int = 10, width: int = 16) -> SmallConvNet:
    """Build the net; its keyword arguments are the adapter's options (``--adapter-opt``)."""
    if num_classes < 1 or width < 1:
        raise CkptscopeError(f"num_classes={num_classes} and width={width} must be >= 1.")
    return SmallConvNet(num_classes, width)


def infer_options(state: Mapping[str, torch.Tensor]) -> dict:
    """Read the options off a state dict's shapes, for checkpoints that carry none.

    Return what can be read and no more: for a state of another model, the key check that
    follows names the missing and unexpected keys.
    """
    options = {}
    if "fc.weight" in state:
        options["num_classes"] = int(state["fc.weight"].shape[0])
    if "conv1.weight" in state:
        options["width"] = int(state["conv1.weight"].shape[0])
    return options


def blocks(keys: Sequence[str]) -> dict[str, str]:
    """One group per conv stage (with its BN) and the head; each regex is ``re.match``-ed."""
    return {"conv1": r"(?:conv1|bn1)\.", "conv2": r"(?:conv2|bn2)\.", "fc": r"fc\."}


ADAPTER = Adapter(
    # The name is recorded in results and checkpoint metadata; the import spec tells a reader
    # which code made the file. ckptscope never imports it from a file: a later `ckptscope path`
    # is given `--adapter custom_adapter:ADAPTER`, and infer_options reads the options back.
    name="custom_adapter:ADAPTER",
    build=build,
    loss=lambda options: "cross_entropy",
    default_data=None,  # no registered data: pass (inputs, targets) or --data
    presets={"blocks": blocks, "bn-stats": bn_stats},
    infer_options=infer_options,
    description="a small CIFAR-shaped conv net (options: num_classes=10, width=16)",
)


def synthetic_images(n: int, *, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images ``(n, 3, 16, 16)`` whose class shifts one colour channel."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 3, 16, 16, generator=g)
    x[torch.arange(n), y % 3] += 0.15
    return x, y


def test_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Return the evaluation set; as a data spec: ``--data custom_adapter:test_data``."""
    return synthetic_images(256, classes=3, seed=1)


def train(steps: int = 100, seed: int = 0) -> tuple[dict, dict, dict]:
    """Train briefly from a seeded init; return (init state, trained state, options)."""
    torch.manual_seed(seed)
    options = {"num_classes": 3, "width": 8}
    model = ADAPTER.make(options)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = synthetic_images(512, classes=3, seed=seed + 2)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for step in range(steps):
        batch = slice((step * 64) % 512, (step * 64) % 512 + 64)
        optimiser.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        optimiser.step()
    return init, model.state_dict(), options


def run(steps: int = 100, seed: int = 0, alphas: int = 11):
    """Train, then return the linear path from init to trained (whole model and per block)."""
    init, final, options = train(steps, seed)
    return ckptscope.linear_path(init, final, ADAPTER, test_data(), groups=blocks(list(final)),
                                 alphas=alphas, adapter_options=options, device="cpu")


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "custom-adapter-demo")
    init, final, options = train()
    metadata = {"adapter": ADAPTER.name, "adapter_options": options}
    for name, state in (("init", init), ("final", final)):
        ckptscope.save_checkpoint(out / f"{name}.safetensors", state, metadata=metadata)
    ds = ckptscope.linear_path(out / "init.safetensors", out / "final.safetensors", ADAPTER,
                               groups=blocks(list(final)), data=test_data(), alphas=11,
                               device="cpu")
    print("test loss on the path from init (alpha=0) to trained (alpha=1)")
    print(f"{'group':<8}" + "".join(f"{a:>7.1f}" for a in ds.alpha.values))
    for group in ds.group.values:
        curve = ds.loss.sel(run=ds.run.values[0], group=group, split="eval").values
        print(f"{group:<8}" + "".join(f"{v:>7.3f}" for v in curve))
    print(f"wrote {out}/init.safetensors and {out}/final.safetensors; the same from the shell:")
    print(f"  PYTHONPATH=examples ckptscope path {out}/init.safetensors {out}/final.safetensors "
          f"--adapter custom_adapter:ADAPTER --preset blocks --data custom_adapter:test_data")
