"""``ambient-mri demo``: the whole pipeline on built-in demo data (:func:`ambient_mri.demo.run_demo`)."""

from __future__ import annotations

from pathlib import Path

import click

from ..demo import run_demo


@click.command(name="demo")
@click.option("--out", default="ambient_mri_demo", show_default=True, type=click.Path(file_okay=False),
              help="Working folder (data, prepared splits, runs, reconstructions, report). Reused when rerun.")
@click.option("--train-steps", default=150, show_default=True, help="Steps of the short training run.")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="Use this checkpoint instead of the packaged demo checkpoint.")
@click.option("--adps-steps", default=100, show_default=True,
              help="A-DPS steps (on the first test volume only, to keep the demo short); 0 skips A-DPS.")
@click.option("--dc-steps", default=25, show_default=True, help="Steps of our fast DC sampler (2 N - 1 NFEs).")
@click.option("--samples", default=1, show_default=True,
              help="Posterior samples per scan for the DC sampler (2 or more add standard-deviation maps; slower).")
@click.option("--progress/--no-progress", default=False, show_default=True, help="Show progress bars.")
def command(out, train_steps, checkpoint, adps_steps, dc_steps, samples, progress):
    """Run the whole pipeline (data -> prep -> train -> recon -> eval) on built-in demo data and print a
    PSNR/SSIM table and the figures written. Takes a few minutes on 2 CPU cores."""
    res = run_demo(out, train_steps=train_steps, checkpoint=checkpoint, adps_steps=adps_steps, dc_steps=dc_steps,
                   samples=samples, progress=progress)
    click.echo("\nHeld-out demo test scans (PSNR/SSIM on magnitudes; A-DPS convention per slice, fastMRI per volume):\n")
    click.echo(res["markdown"])
    click.echo("Figures:")
    for p in res["figures"]:
        click.echo(f"  {p}")
    click.echo(f"Tables: {Path(out) / 'report'}/R*/summary.md (CSV and JSON beside them)")
    click.echo(f"Done in {res['seconds']:.0f} s.")
