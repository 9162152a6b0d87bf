"""Activation matching (Git Re-Basin, Ainsworth et al. 2023, section 3.1).

Run both networks on the same inputs and, per permutation class, correlate every unit of the
reference with every unit of OTHER over the examples (and over positions, for conv channels):

    C[i, j] = cov(a_i, b_j) / (std(a_i) std(b_j))

then permute OTHER's units by the linear assignment that maximises the summed correlation
(``scipy.optimize.linear_sum_assignment``). A class's activations are every node of the fx graph
that holds its channels (a Linear's output, the BatchNorm and ReLU after it; for a residual
stream every block's output), pooled. Classes are matched independently, each in one step.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import fx, nn

from ckptscope.align.spec import PermutationSpec, check_spec
from ckptscope.align.weights import Matching
from ckptscope.engine.failures import Where, from_user_code
from ckptscope.errors import CkptscopeError

_EPS = 1e-12


class _Recorder(fx.Interpreter):
    """Runs a traced module, handing chosen nodes' outputs to a callback."""

    def __init__(self, module: fx.GraphModule, wanted: Mapping[str, int], seen: dict):
        super().__init__(module)
        self.wanted, self.seen = wanted, seen

    def run_node(self, node: fx.Node):
        out = super().run_node(node)
        if node.name in self.wanted and isinstance(out, torch.Tensor):
            dim = self.wanted[node.name]
            self.seen[node.name] = out.detach().movedim(dim, -1).reshape(-1, out.shape[dim])
        return out


class _Moments:
    """Running sums for the cross-correlation of two sets of n units."""

    def __init__(self, n: int):
        self.count = 0
        self.sa = torch.zeros(n, dtype=torch.float64)
        self.sb = torch.zeros(n, dtype=torch.float64)
        self.saa = torch.zeros(n, dtype=torch.float64)
        self.sbb = torch.zeros(n, dtype=torch.float64)
        self.sab = torch.zeros(n, n, dtype=torch.float64)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """a, b: (m, n) activations of the same m samples."""
        a, b = a.double(), b.double()
        self.count += len(a)
        self.sa += a.sum(0)
        self.sb += b.sum(0)
        self.saa += (a * a).sum(0)
        self.sbb += (b * b).sum(0)
        self.sab += a.T @ b

    def correlation(self) -> torch.Tensor:
        """(n, n) C[i, j]: correlation of reference unit i with OTHER's unit j."""
        n = self.count
        ma, mb = self.sa / n, self.sb / n
        cov = self.sab / n - torch.outer(ma, mb)
        sa = (self.saa / n - ma * ma).clamp_min(0).sqrt()
        sb = (self.sbb / n - mb * mb).clamp_min(0).sqrt()
        return cov / (torch.outer(sa, sb) + _EPS)


def _traced(model: nn.Module, state: Mapping[str, torch.Tensor]) -> fx.GraphModule:
    module = copy.deepcopy(model).cpu()  # the states and inputs are on the CPU
    module.load_state_dict(dict(state))
    return fx.symbolic_trace(module.eval())


def activation_matching(spec: PermutationSpec, model: nn.Module,
                        ref: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
                        inputs: torch.Tensor, *, batch_size: int = 256) -> Matching:
    """Permutations of ``other``'s units whose activations correlate best with ``ref``'s.

    Args:
        spec: a spec from :func:`ckptscope.align.spec_from_graph` (its ``sites`` say which
            activations hold each class's units).
        model: the architecture (its own weights are ignored).
        ref, other: state dicts of ``model``.
        inputs: (N, ...) the examples, run in eval mode in batches of ``batch_size``.

    Returns:
        The permutations and the mean correlation of matched units over every class's units,
        before (identity) and after.
    """
    from scipy.optimize import linear_sum_assignment  # scipy loads on first use only

    sizes = check_spec(spec, ref)
    if not spec.sites or not any(spec.sites.values()):
        raise CkptscopeError(
            "activation matching needs the graph nodes that hold each class's units (a spec "
            "derived by spec_from_graph); a spec given by hand has none: use method='weights'."
        )
    if len(inputs) == 0:
        raise CkptscopeError("activation matching needs data: the inputs are empty.")
    wanted = {node: dim for sites in spec.sites.values() for node, dim in sites}
    nets = [_traced(model, ref), _traced(model, other)]
    moments = {name: _Moments(n) for name, n in sizes.items()}
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start:start + batch_size]
            seen: list[dict] = [{}, {}]
            for net, record in zip(nets, seen, strict=True):
                try:
                    _Recorder(net, wanted, record).run(batch)
                except Exception as err:  # the model's failure (data that does not fit it)
                    if not from_user_code(err):
                        raise
                    where = Where(model=type(model).__name__)
                    where.at("train", batch)
                    raise where.model_failed(err) from err
            for name, sites in spec.sites.items():
                for node, _ in sites:
                    if node in seen[0]:
                        moments[name].add(seen[0][node], seen[1][node])
    perms, before, after, units = {}, 0.0, 0.0, 0
    for name, n in sizes.items():
        if moments[name].count == 0:
            perms[name] = torch.arange(n)
            continue
        corr = torch.nan_to_num(moments[name].correlation())
        _, cols = linear_sum_assignment(corr.numpy(), maximize=True)
        found = torch.as_tensor(cols, dtype=torch.int64)
        kept = float(corr.diagonal().sum())
        best = float(corr[torch.arange(n), found].sum())
        # Ties (dead units correlate with nothing) keep their order: aligning a network to
        # itself is the identity.
        perms[name] = found if best > kept + 1e-9 * n else torch.arange(n)
        before += kept
        after += max(best, kept)
        units += n
    units = max(units, 1)
    return Matching(perms, before / units, after / units, 1)
