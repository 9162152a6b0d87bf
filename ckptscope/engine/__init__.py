"""The engine: loss and accuracy at points over anchor states, on preloaded data.

One module per concern:

- :mod:`~ckptscope.engine.config`: :class:`EvalConfig`, the knobs;
- :mod:`~ckptscope.engine.placement`: the device, channels-last layout, autocast (shared with
  the trainer);
- :mod:`~ckptscope.engine.sizing`: the probe pass, batch and chunk sizes, streaming, the
  out-of-memory back-off's notes;
- :mod:`~ckptscope.engine.context`: the model and data on the device, and the batch plumbing;
- :mod:`~ckptscope.engine.deferred`: one loss call for the outputs of many points;
- :mod:`~ckptscope.engine.hoist`: the forward graph split at the moving tensors;
- :mod:`~ckptscope.engine.strategies`: ``loop``, ``vmap`` and ``hoisted``, one signature;
- :mod:`~ckptscope.engine.evaluator`: :class:`Evaluator`, which plans a call and dispatches.

Every pass runs in eval mode, without autograd, in float32 unless asked otherwise; the loss is
the sum over all examples divided by N (over the counted tokens, for a loss that returns a
count: :mod:`ckptscope.losses`).
"""

from ckptscope.engine.config import BN_POLICIES, STRATEGIES, EvalConfig
from ckptscope.engine.evaluator import Evaluator

__all__ = ["BN_POLICIES", "STRATEGIES", "EvalConfig", "Evaluator"]
