"""``head8ch/head.mat`` (8 fully sampled coil images of one axial brain slice) -> one fastMRI volume.

``kspace[0] = fft2c(moveaxis(data, -1, 0))``: ``(1, 8, 256, 256)``, train/val style (fully sampled, with
``reconstruction_rss``), so undersampling can be simulated by ``ambient-mri prep`` and scored.
"""

from __future__ import annotations

import os
from pathlib import Path

import click
import numpy as np

from ambient_mri.errors import DataError

from .common import check_finite, load_mat, resolve_input, write_fastmri

HEAD_FILE = "head8ch/head.mat"


def head8ch_kspace(source: str | os.PathLike) -> np.ndarray:
    """Multi-coil k-space ``(1, C, H, W)`` complex64 of ``head.mat`` (``source``: the file or the data folder)."""
    from ambient_mri.fft import fft2c

    path = resolve_input(source, HEAD_FILE)
    data = load_mat(path, ("data",))["data"]
    if data.ndim != 3 or not np.iscomplexobj(data):
        raise DataError(f"'data' must be complex (H, W, coils), got {data.dtype} {data.shape}", path)
    check_finite(data, "data", path)
    return fft2c(np.moveaxis(data, -1, 0).astype(np.complex64))[None]


def convert_head8ch(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write ``head.mat`` as a fully sampled multi-coil fastMRI volume; ``out`` is a ``.h5`` path or a folder
    (then ``out/head8ch.h5``). Returns the path written."""
    out = Path(out)
    if out.suffix != ".h5":
        out = out / "head8ch.h5"
    k = head8ch_kspace(source)
    return write_fastmri(out, k, acquisition="AXT1", patient_id="head8ch",
                         extra_attrs={"source": HEAD_FILE, "description": "fastMRI layout of head.mat: kspace = "
                                      "fft2c of its coil images (coil axis moved first), fully sampled"})


@click.command(name="head8ch")
@click.argument("source", type=click.Path(exists=True))
@click.argument("out", type=click.Path())
def command(source, out):
    """Convert head.mat (SOURCE: the file or the ../shared/data folder) to a fully sampled 8-coil fastMRI
    volume OUT (a .h5 path, or a folder that gets head8ch.h5)."""
    click.echo(f"wrote {convert_head8ch(source, out)}")
