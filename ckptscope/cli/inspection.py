"""Commands that look at checkpoints and the registries: ``inspect``, ``distance``, ``list``."""

from __future__ import annotations

import click

from ckptscope.cli.options import check_suffix, group_specs
from ckptscope.cli.output import table


@click.command()
@click.argument("start", type=click.Path())
@click.argument("end", type=click.Path(), required=False)
@click.option("--group", "groups", multiple=True, metavar="[NAME=]REGEX")
@click.option("--preset", "presets", multiple=True, metavar="NAME")
@click.option("--adapter", default=None, metavar="NAME|pkg.module:attr")
@click.option("--keys/--no-keys", default=True, show_default=True, help="List every tensor.")
def inspect(start, end, groups, presets, adapter, keys):
    """Show a checkpoint's tensors, how groups resolve, and distances to END."""
    from ckptscope.checkpoints import describe_dtypes, load_checkpoint
    from ckptscope.distance import distances
    from ckptscope.identity import parameter_keys
    from ckptscope.metadata import describe_metadata

    a = load_checkpoint(start)
    b = load_checkpoint(end) if end else None
    specs = group_specs(adapter, presets, groups, a)
    # Against itself when there is no END: the per-group counts without a distance.
    moved = distances(a, b if b is not None else a, groups=specs, adapter=adapter)
    params = parameter_keys(a.state)
    n_params = sum(a.state[k].numel() for k in params)
    click.echo(f"{a.path}  sha256 {a.sha256[:16]}  {len(a.state)} tensors, {n_params:,} "
               f"parameters ({describe_dtypes(a.state)})")
    if a.metadata:  # a file's strings, escaped: they never drive the terminal
        click.echo(f"metadata: {describe_metadata(a.metadata)}")
    for note in a.notes:
        click.echo(f"note: {note}")
    if keys:
        width = max(len(k) for k in a.state)
        for k, v in a.state.items():
            kind = "param" if k in params else "buffer"
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
def distance(start, end, groups, presets, adapter, out):
    """Distances between two checkpoints per group (relative as eq. 4, L2, cosine)."""
    from ckptscope.checkpoints import load_checkpoint
    from ckptscope.distance import distances
    from ckptscope.results import write_netcdf

    check_suffix(out, (".nc",), "--out")
    a, b = load_checkpoint(start), load_checkpoint(end)
    specs = group_specs(adapter, presets, groups, a)
    ds = distances(a, b, groups=specs, adapter=adapter)
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
