"""The slow, obvious reference: load_state_dict at every point, one plain forward per batch."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F


def reference_path(
    module, a, b, keys, alphas, x, y, *, loss="cross_entropy", hold="end", batch_size=None
):
    """Return (loss, accuracy) arrays over ``alphas`` computed the plain way.

    ``keys`` move (their floating tensors); every other tensor stays at ``hold``. When ``keys``
    hold every tensor (the whole model), the non-float tensors come from the nearer end (a tie
    goes to the end), as docs/semantics.md says.
    """
    weights = np.stack([1 - np.asarray(alphas, dtype=np.float64), np.asarray(alphas)], axis=1)
    held = None if set(a) <= set(keys) else ("end" if hold == "end" else "start")
    return reference_points(module, {"start": a, "end": b}, ("start", "end"), weights, keys,
                            held, x, y, loss=loss, batch_size=batch_size)


def reference_points(module, anchors, names, weights, keys, held, x, y, *, loss="cross_entropy",
                     batch_size=None, bn=None, train_x=None, bn_batches=0):
    """(loss, accuracy) at each row of ``weights`` (n, k) over the anchors ``names``: the moving
    floating tensors as the float64 sum of w_i theta_i, the rest from ``held`` (or, for
    ``None``, the anchor with the largest weight, ties to the later one); ``load_state_dict``
    per point. ``bn``: ``None``/``"interpolate"``, ``"batch"`` (batch statistics) or
    ``"recompute"`` (re-estimated on ``bn_batches`` batches of ``train_x``)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    model = copy.deepcopy(module).eval()
    states = [anchors[n] for n in names]
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    bs = batch_size or len(x)
    losses, accs = [], []
    for w in np.asarray(weights, dtype=np.float64):
        k = len(names)
        rest = states[names.index(held)] if held else states[k - 1 - int(np.argmax(w[::-1]))]
        state = {}
        for key, value in rest.items():
            if key in keys and value.is_floating_point():
                mixed = sum(float(wi) * s[key].double() for wi, s in zip(w, states) if wi != 0)
                state[key] = torch.as_tensor(mixed).to(value.dtype)
            else:
                state[key] = value
        model.load_state_dict(state)
        model.eval()
        total, correct = 0.0, 0.0
        with torch.no_grad():
            if bn == "recompute":
                for m in bns:
                    m.reset_running_stats()
                    m.momentum = None
                    m.train()
                for lo in range(0, bn_batches * bs, bs):
                    model(train_x[lo : lo + bs])
                for m in bns:
                    m.eval()
            if bn == "batch":
                for m in bns:
                    m.train()  # batch statistics; running-stat updates do not change outputs
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
