"""The command that draws a result: ``plot``."""

from __future__ import annotations

from pathlib import Path

import click

from ckptscope.cli.options import check_suffix
from ckptscope.cli.output import save_figure


@click.command()
@click.argument("result", type=click.Path())
@click.option("-o", "--out", type=click.Path(dir_okay=False), required=True,
              help="The figure (.png, .pdf, .svg).")
@click.option("--variable", type=click.Choice(["loss", "accuracy", "both"]), default="loss",
              show_default=True)
@click.option("--layout", type=click.Choice(["split", "run"]), default="split",
              show_default=True, help="One panel per split, or per run (conditions).")
@click.option("--title", default=None)
def plot(result, out, variable, layout, title):
    """Draw a result in the paper's style."""
    from ckptscope.plots import plot_result
    from ckptscope.results import open_result

    check_suffix(out, (".png", ".pdf", ".svg"), "--out")
    if _is_grid_file(result):  # a plane or a surface: contours, loss and accuracy
        from ckptscope.grid_plots import plot_grid_result
        from ckptscope.grids import open_grid

        variables = ("loss", "accuracy") if variable == "both" else (variable,)
        save_figure(plot_grid_result(open_grid(result), variables=variables, title=title),
                    Path(out))
        click.echo(f"wrote {out}")
        return
    ds = open_result(result)
    variables = ("loss", "accuracy") if variable == "both" else (variable,)
    save_figure(plot_result(ds, variables=variables, layout=layout, title=title), Path(out))
    click.echo(f"wrote {out}")


def _is_grid_file(path: str) -> bool:
    """Whether ``path`` holds a grid result (x and y dims, no alpha); unreadable files are
    left to ``open_result``'s error."""
    import xarray as xr

    from ckptscope.grids import is_grid

    try:
        with xr.open_dataset(path, engine="scipy") as ds:
            return is_grid(ds)
    except Exception:  # open_result names what is wrong with the file
        return False
