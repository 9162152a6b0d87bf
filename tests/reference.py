"""The slow, obvious reference: load_state_dict at every alpha, one plain forward per batch."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F


def reference_path(
    module, a, b, keys, alphas, x, y, *, loss="cross_entropy", hold="end", batch_size=None
):
    """Return (loss, accuracy) arrays over ``alphas`` computed the plain way."""
    model = copy.deepcopy(module).eval()
    held = b if hold == "end" else a
    losses, accs = [], []
    for alpha in alphas:
        state = {}
        for k in held:
            if k in keys and a[k].is_floating_point():
                state[k] = (1 - alpha) * a[k].double() + alpha * b[k].double()
            else:
                state[k] = held[k]
        model.load_state_dict({k: v.to(held[k].dtype) for k, v in state.items()})
        total, correct = 0.0, 0.0
        bs = batch_size or len(x)
        with torch.no_grad():
            for lo in range(0, len(x), bs):
                out = model(x[lo : lo + bs])
                t = y[lo : lo + bs]
                if loss == "bce":
                    logits = out.reshape(-1)
                    total += float(
                        F.binary_cross_entropy_with_logits(
                            logits, t.to(logits.dtype), reduction="sum"
                        )
                    )
                    correct += float(((logits > 0) == (t > 0.5)).sum())
                else:
                    total += float(F.cross_entropy(out, t, reduction="sum"))
                    correct += float((out.argmax(-1) == t).sum())
        losses.append(total / len(x))
        accs.append(correct / len(x))
    return np.array(losses), np.array(accs)


def plain_eval(module, state, x, y, *, loss="cross_entropy", batch_size=None):
    """Loss and accuracy of one state, the plain way."""
    return reference_path(module, state, state, [], [0.0], x, y, loss=loss, batch_size=batch_size)
