"""``ambient-mri eval``: score reconstruction folders against references (:func:`ambient_mri.evaluate.run_eval`)."""

from __future__ import annotations

from pathlib import Path

import click

from ..evaluate import run_eval


@click.command(name="eval")
@click.option("--recon", "recon_dirs", multiple=True, required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder written by 'ambient-mri recon'; repeat to compare several methods in one table.")
@click.option("--reference", required=True, type=click.Path(exists=True),
              help="Prepared val/test folder (its 'reference') or fastMRI folder (reconstruction_rss/_esc).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Report folder to write.")
@click.option("--foreground/--full-fov", default=False, show_default=True,
              help="Also report every metric inside a foreground mask thresholded from the reference.")
def command(recon_dirs, reference, out, foreground):
    """Score reconstructions against references: per-slice (A-DPS convention) and per-volume (fastMRI
    convention) PSNR, SSIM, NRMSE/NMSE as CSV and JSON, a Markdown table (mean +- std per method and
    acceleration) and reference/reconstruction/error/std figures."""
    res = run_eval(recon_dirs, reference, out, foreground=foreground)
    click.echo(res["markdown"])
    for p in res["figures"]:
        click.echo(f"figure: {p}")
    click.echo(f"tables: {Path(out) / 'summary.md'}, {Path(out) / 'metrics_slices.csv'}, "
               f"{Path(out) / 'metrics_volumes.csv'}, {Path(out) / 'summary.json'}")
