"""Commands that look at checkpoints and the registries: ``inspect``, ``distance``, ``list``."""

from __future__ import annotations

import click

from ckptscope.cli.notes import NotePrinter
from ckptscope.cli.options import check_suffix, group_specs, strip_prefix_option
from ckptscope.cli.output import table


def _read(start: str, end: str | None, adapter: str | None, strip_prefixes: tuple[str, ...]):
    """The checkpoints matched to each other, or to the adapter's model when one is given
    (:func:`ckptscope.keys.match_keys`), their notes printed once, and the model (or None)."""
    from ckptscope.checkpoints import load_checkpoint
    from ckptscope.inputs import choose_adapter
    from ckptscope.keys import match_keys

    a = load_checkpoint(start)
    b = load_checkpoint(end) if end else None
    a, b = match_keys(a, b, strip_prefix=strip_prefixes)
    module = None
    if adapter is not None:
        # the options a file's metadata gives its own adapter (a Hugging Face folder's
        # model_dir, a ResNet's width), as for path
        chosen, options, _ = choose_adapter(adapter, a, b or a, None)
        module = chosen.make(options)
        a, b = match_keys(a, b, module=module)
    return a, b, module


def _describe(ckpt, notes: NotePrinter) -> None:
    from ckptscope.checkpoints import describe_dtypes
    from ckptscope.identity import parameter_keys
    from ckptscope.metadata import describe_metadata

    n_params = sum(ckpt.state[k].numel() for k in parameter_keys(ckpt.state))
    click.echo(f"{ckpt.path}  sha256 {ckpt.sha256[:16]}  {len(ckpt.state)} tensors, "
               f"{n_params:,} parameters ({describe_dtypes(ckpt.state)})")
    if ckpt.metadata:  # a file's strings, escaped: they never drive the terminal
        click.echo(f"metadata: {describe_metadata(ckpt.metadata)}")
    notes.checkpoint(ckpt)


@click.command()
@click.argument("start", type=click.Path())
@click.argument("end", type=click.Path(), required=False)
@click.option("--group", "groups", multiple=True, metavar="[NAME=]REGEX")
@click.option("--preset", "presets", multiple=True, metavar="NAME")
@click.option("--adapter", default=None, metavar="NAME|pkg.module:attr")
@click.option("--keys/--no-keys", default=True, show_default=True, help="List every tensor.")
@strip_prefix_option
def inspect(start, end, groups, presets, adapter, keys, strip_prefixes):
    """Show a checkpoint's tensors, how groups resolve, and distances to END."""
    from ckptscope.distance import distances
    from ckptscope.identity import parameter_keys, state_aliases

    a, b, module = _read(start, end, adapter, strip_prefixes)
    specs = group_specs(adapter, presets, groups, a)
    # Against itself when there is no END: the per-group counts without a distance.
    moved = distances(a, b if b is not None else a, groups=specs, module=module)
    notes = NotePrinter()
    for ckpt in (a, b) if b is not None else (a,):
        _describe(ckpt, notes)
    if keys:
        params = parameter_keys(a.state, module)
        tied = state_aliases(a.state)  # one storage under two names: the later is an alias
        width = max(len(k) for k in a.state)
        for k, v in a.state.items():
            kind = (f"tied to {tied[k]}" if tied[k] != k
                    else "param" if k in params else "buffer")
            click.echo(f"  {k.ljust(width)}  {str(tuple(v.shape)):>18}  "
                       f"{str(v.dtype).replace('torch.', ''):>8}  {kind}")
    click.echo("groups:")
    for row in moved.to_dataframe().itertuples():
        line = (f"  {row.Index:<16} {row.pattern:<24} {row.n_tensors:>4} tensors "
                f"{int(row.n_params):>12,} params")
        click.echo(line + (f"  distance {row.relative:.4g}" if b is not None else ""))


@click.command()
@click.argument("start", type=click.Path())
@click.argument("end", type=click.Path())
@click.option("--group", "groups", multiple=True, metavar="[NAME=]REGEX")
@click.option("--preset", "presets", multiple=True, metavar="NAME")
@click.option("--adapter", default=None, metavar="NAME|pkg.module:attr",
              help="Decides which tensors are parameters (default: names ending in "
                   "running_mean/var are buffers).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write the distances (.nc).")
@strip_prefix_option
def distance(start, end, groups, presets, adapter, out, strip_prefixes):
    """Distances between two checkpoints per group (relative as eq. 4, L2, cosine)."""
    from ckptscope.distance import distances
    from ckptscope.result_files import write_netcdf

    check_suffix(out, (".nc",), "--out")
    a, b, module = _read(start, end, adapter, strip_prefixes)
    notes = NotePrinter()
    notes.checkpoint(a)
    notes.checkpoint(b, "end")
    specs = group_specs(adapter, presets, groups, a)
    ds = distances(a, b, groups=specs, module=module)
    if out:
        write_netcdf(ds, out)
    cells = [[str(g), str(p), f"{int(n):,}", f"{r:.4g}", f"{l2:.4g}", f"{c:.4f}"]
             for g, p, n, r, l2, c in zip(ds.group.values, ds.pattern.values,
                                          ds.n_params.values, ds.relative.values, ds.l2.values,
                                          ds.cosine.values, strict=True)]
    click.echo(table(["group", "pattern", "params", "relative (eq. 4)", "L2", "cosine"], cells))
    if out:
        click.echo(f"wrote {out}")


@click.command(name="list")
def list_():
    """List the adapters (with their presets) and the datasets."""
    from ckptscope.adapters import ADAPTERS
    from ckptscope.data import DATASETS

    click.echo("adapters (--adapter NAME, or pkg.module:attr):")
    for name in ADAPTERS:
        adapter = ADAPTERS.get(name)
        click.echo(f"  {name:<10} {adapter.description}")
        if adapter.presets:
            click.echo(f"  {'':<10} presets: {', '.join(sorted(adapter.presets))}")
    from ckptscope.adapters import FAMILIES

    for name in FAMILIES:
        family = FAMILIES.get(name)
        click.echo(f"  {name + ':NAME':<10} {family.description}")
        presets = family.make("NAME").presets  # builds nothing, imports nothing
        if presets:
            click.echo(f"  {'':<10} presets: {', '.join(sorted(presets))}")
    click.echo("datasets (--data NAME[:ARG], or pkg.module:attr):")
    for name in DATASETS:
        click.echo(f"  {name:<14} {DATASETS.get(name).description}")
