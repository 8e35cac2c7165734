"""``ambient-mri info``: describe a file, a folder, a checkpoint or a run (:func:`ambient_mri.info.describe`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..info import describe, has_errors, render


@click.command(name="info")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON instead of text.")
def command(path, as_json):
    """Describe PATH: a fastMRI-layout .h5 (shapes, coils, header sizes, mask and acceleration), a prepared
    file or dataset folder (split, slices, shapes, mask kind, nominal and actual acceleration, norms), a
    checkpoint .pt or a run folder (what torch.load(weights_only=True) gives: keys, config, step).
    Exit status 1 if any file in a folder could not be read."""
    d = describe(path)
    if as_json:
        click.echo(json.dumps(d, indent=2, default=str))
    else:
        for line in render(d):
            click.echo(line)
    if has_errors(d):
        raise click.exceptions.Exit(1)
