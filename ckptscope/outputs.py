"""What a model returns, reduced to the tensor a loss reads.

Models return logits in several wrappings: a tensor; a tuple or list whose first element is the
logits (``return_dict=False`` in Hugging Face models, many research codebases); a mapping with a
``logits`` key or a single value; an object with a ``logits`` attribute (a dataclass, or a Hugging
Face ``ModelOutput``, which is also an ``OrderedDict``). :func:`logits_of` takes any of them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ckptscope.errors import CkptscopeError


def logits_of(output: object) -> torch.Tensor:
    """Return the logits tensor in a model's ``output``.

    Args:
        output: a tensor ``(B, ...)``; a tuple or list (its first element, unwrapped again); a
            mapping (its ``logits`` value, else its only value); or an object with a tensor
            ``logits`` attribute.

    Returns:
        The tensor, as the model returned it (no copy).

    Raises:
        CkptscopeError: nothing in ``output`` is a tensor by those rules.
    """
    seen = output
    for _ in range(8):  # a few levels of nesting at most: (logits, aux) inside a dict, say
        if isinstance(output, torch.Tensor):
            return output
        if isinstance(output, Mapping):
            if "logits" in output:
                output = output["logits"]
            elif len(output) == 1:
                output = next(iter(output.values()))
            else:
                raise CkptscopeError(
                    f"the model returned a mapping with keys {sorted(map(str, output))[:8]} and "
                    f"no 'logits'; return the logits tensor, or a mapping with a 'logits' key."
                )
        elif isinstance(output, (tuple, list)) and output:
            output = output[0]
        elif isinstance(getattr(output, "logits", None), torch.Tensor):
            output = output.logits
        else:
            break
    raise CkptscopeError(
        f"the model returned a {type(seen).__name__} that holds no logits tensor; return a "
        f"tensor, a tuple (logits first), a mapping with 'logits', or an object with .logits."
    )
