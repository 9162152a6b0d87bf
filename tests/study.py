"""Small multi-run results for the study tests (summarize, correlate, report): tiny MLP
checkpoints written as trainer-like files, evaluated by ``linear_paths``."""

from __future__ import annotations

from pathlib import Path

import torch

import ckptscope
from ckptscope.adapters.mlp import MLP
from ckptscope.checkpoints import save_checkpoint

WIDTHS = [2, 8, 8, 1]
DATA = "spiral:60,50"
GROUPS = {"first": r"layers\.0\.", "last": r"layers\.2\."}
# Per run: how far the end moves from the start (the barrier grows with it) and the test
# accuracy the "trainer" recorded for the run.
SCALES = (0.2, 0.6, 1.0, 1.5, 2.2, 3.0)
ACCURACIES = (0.91, 0.88, 0.84, 0.86, 0.71, 0.65)


def write_runs(folder: Path, *, n: int = 6, prefix: str = "seed_") -> dict[str, tuple[str, str]]:
    """Write ``n`` (init, final) pairs like the trainer's, ``final_metrics`` in the final's
    metadata; return run label -> (init path, final path)."""
    pairs = {}
    for i in range(n):
        torch.manual_seed(100 + i)
        start = MLP(WIDTHS).state_dict()
        g = torch.Generator().manual_seed(200 + i)
        end = {k: v + SCALES[i] * torch.randn(v.shape, generator=g) for k, v in start.items()}
        meta = {"adapter": "mlp", "adapter_options": {"widths": WIDTHS}, "data": DATA,
                "seed": i}
        run = folder / f"{prefix}{i}"
        a = save_checkpoint(run / "init.safetensors", start, metadata={**meta, "role": "init"})
        b = save_checkpoint(run / "final.safetensors", end, metadata={
            **meta, "role": "final",
            "final_metrics": {"epoch": 10, "test_accuracy": ACCURACIES[i], "test_loss": 0.3}})
        pairs[f"{prefix}{i}"] = (str(a), str(b))
    return pairs


def study_result(folder: Path, *, n: int = 6, prefix: str = "seed_", alphas: int = 11):
    """A classified result of ``n`` runs, groups all, first, last, on the spiral test split."""
    pairs = write_runs(folder, n=n, prefix=prefix)
    return ckptscope.linear_paths(pairs, "mlp", DATA, groups=GROUPS, alphas=alphas)
