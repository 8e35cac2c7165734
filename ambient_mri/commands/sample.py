"""``ambient-mri sample``: unconditional prior samples from a trained checkpoint (``sampling.run_sample``).

The fixed-mask sampler of the seed paper (``sampling.prior_sample``: EDM Heun, ``d = (x - D(A~^H A~ x;
sigma)) / sigma`` with one further mask ``M~`` drawn from the *training* distribution and held fixed).
K-space models see the view they were trained on, ``A~^H A~ x = S^H F^-1 M~ F S x``, with the coil maps
``S`` of one training slice per sample (read from the checkpoint's training data, or ``--maps-from``);
oracle/naive models get ``M~ = 1``. Outputs in ``--out``: ``samples.png`` (magnitude grid),
``samples.npy`` (complex64 ``(N, H, W)``), ``samples.h5`` (samples, further masks, attributes) and
``sample.json`` (what was run).
"""

from __future__ import annotations

import click

from ..sampling import run_sample


@click.command()
@click.option("--checkpoint", "-c", "checkpoint", required=True,
              help="A training checkpoint (RUN/checkpoint.pt or a snapshot), a run folder (its newest checkpoint), or "
                   "a packaged one by name (demo, siat64-lines-r4).")
@click.option("--n", "n", type=click.IntRange(min=1), default=16, show_default=True, help="Number of samples.")
@click.option("--out", "-o", "out", required=True, type=click.Path(file_okay=False),
              help="Output folder: samples.png (magnitude grid), samples.npy (complex), samples.h5, sample.json.")
@click.option("--steps", type=click.IntRange(min=2), default=18, show_default=True,
              help="Heun steps of the EDM schedule (sigma 80 -> 0.002, rho 7).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the further masks and of the sampler's noise.")
@click.option("--batch", "-b", type=click.IntRange(min=1), default=None,
              help="Samples per network batch (default: all N at once).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where to run the network.")
@click.option("--ema/--no-ema", default=True, show_default=True, help="Use the EMA weights (default) or the raw ones.")
@click.option("--maps-from", "maps_from", type=click.Path(exists=True, file_okay=False),
              help="k-space models: prepared folder whose coil maps the view uses (default: the checkpoint's "
                   "training data folder).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def command(checkpoint, n, out, steps, seed, batch, device, ema, maps_from, quiet):
    """Draw N unconditional samples from a trained prior with the fixed-mask Heun sampler.

    One further mask per sample is drawn from the recorded training distribution and held fixed over
    the steps; k-space models see S^H F^-1 M~ F S x with the coil maps of a random training slice
    (--maps-from, default the training data folder). Oracle and naive models sample with no mask.
    Samples are in the normalised units of the training data.
    """
    info, files = run_sample(checkpoint, n, out, steps=steps, seed=seed, batch=batch, device=device, ema=ema,
                             maps_from=maps_from, progress=not quiet)
    label = " (ORACLE model)" if info["kind"] == "oracle" else ""
    click.echo(f"wrote {n} prior samples{label} to {files['png'].parent}: "
               + ", ".join(p.name for k, p in files.items()))
