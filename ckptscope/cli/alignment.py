"""The ``align`` command: permute OTHER's hidden units to match REF, and save the result."""

from __future__ import annotations

import click

from ckptscope.cli.options import check_suffix, key_values


@click.command()
@click.argument("ref", type=click.Path())
@click.argument("other", type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False), required=True,
              help="The aligned checkpoint (.safetensors).")
@click.option("--adapter", default=None, metavar="NAME|pkg.module:attr",
              help="The architecture (default: from the checkpoint's metadata).")
@click.option("--adapter-opt", "adapter_opts", multiple=True, metavar="KEY=VALUE",
              help="An adapter option, e.g. widths=[64,512,512,512,10]; repeatable.")
@click.option("--method", type=click.Choice(["weights", "activations"]), default="weights",
              show_default=True,
              help="Weight matching (no data) or activation matching (on --data).")
@click.option("--data", default=None, metavar="NAME[:ARG]|pkg.module:attr",
              help="Data for activation matching: its train split, at most 2048 examples "
                   "(default: from the metadata or the adapter).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Weight matching's visiting order (and the data's subset).")
def align(ref, other, out, adapter, adapter_opts, method, data, seed):
    """Permute OTHER's hidden units to match REF; OUT computes OTHER's function."""
    from ckptscope.align import aligned_metadata, alignment
    from ckptscope.checkpoints import load_checkpoint, save_checkpoint

    check_suffix(out, (".safetensors",), "--out")
    a, b = load_checkpoint(ref), load_checkpoint(other)
    result = alignment(a, b, adapter, method=method, data=data, seed=seed,
                       adapter_options=key_values(adapter_opts, "--adapter-opt"))
    save_checkpoint(out, result.state,
                    metadata=aligned_metadata(result, b.metadata, reference=str(ref)))
    click.echo(f"{method} matching (seed {seed}): {len(result.spec.classes)} classes, "
               f"{len(result.changed)} permuted, {len(result.permuted)} tensors")
    what = "inner product" if method == "weights" else "mean correlation"
    click.echo(f"objective ({what}): {result.objective_before:.6g} -> "
               f"{result.objective_after:.6g}")
    click.echo(f"distance to REF (||OTHER - REF|| / ||REF||): {result.distance_before:.4f} -> "
               f"{result.distance_after:.4f}")
    if result.note:
        click.echo(f"note: {result.note}", err=True)
    click.echo(f"wrote {out}")
