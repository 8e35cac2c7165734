"""Lustig's single-coil ``brain512.mat`` (FSE T2 k-space, 201 of 512 phase-encode lines) -> one test-style
single-coil fastMRI volume.

The file's ``mask`` (512, 512) has identical rows: it samples whole *columns*, i.e. phase-encode lines
along our last axis W with the readout along H, exactly fastMRI's convention, so nothing is transposed
(a mask with identical columns would be transposed, with k-space, so that lines become columns; a mask
with neither structure is kept 2-D). Written: ``kspace (1, 512, 512)`` (zero outside the mask),
``mask (512,)``, ``acceleration = W / lines``, ``num_low_frequency`` = the contiguous sampled run around
the centre line, ``sampling_pdf`` attr (the file's 1-D sampling density). The image is ``ifft2c(kspace)``
(the README's ``fftshift(ifft2(ifftshift(data)))`` times ``sqrt(H W)``: our FFT is orthonormal).
Header: encoded = recon matrix = ``(512, 512)`` (the readout is not oversampled).
"""

from __future__ import annotations

import os
from pathlib import Path

import click
import numpy as np

from ambient_mri.errors import DataError

from .common import center_block, center_run, check_finite, load_mat, resolve_input, write_fastmri

BRAIN512_FILE = "brain512_singlecoil/brain512.mat"


def load_brain512(source: str | os.PathLike) -> dict:
    """``{"kspace": (H, W) complex, "mask": (W,) or (H, W) bool, "pdf", "layout", "path"}`` in our
    convention (lines = columns); ``layout`` says what was done ("lines along W", "transposed", "2-D")."""
    path = resolve_input(source, BRAIN512_FILE)
    m = load_mat(path, ("data", "mask"))
    data, mask = m["data"], m["mask"] != 0
    if data.ndim != 2 or not np.iscomplexobj(data):
        raise DataError(f"'data' must be a complex 2-D k-space, got {data.dtype} {data.shape}", path)
    if mask.shape != data.shape:
        raise DataError(f"'mask' shape {mask.shape} differs from 'data' shape {data.shape}", path)
    if not mask.any():
        raise DataError("'mask' is all zero", path)
    check_finite(data, "data", path)
    try:
        pdf = load_mat(path, ("pdf",))["pdf"]
    except DataError:
        pdf = None
    if (mask == mask[:1]).all():
        layout, mask1d = "lines along W (as stored)", mask[0]
    elif (mask == mask[:, :1]).all():
        layout, mask1d = "transposed: the file's lines were rows", mask[:, 0]
        data, mask = data.T, mask.T
        pdf = None if pdf is None else pdf.T
    else:
        layout, mask1d = "2-D mask (no line structure)", None
    if pdf is not None and pdf.shape == data.shape and mask1d is not None:
        pdf = pdf[0]
    return {"kspace": data, "mask": mask if mask1d is None else mask1d, "pdf": pdf, "layout": layout, "path": path}


def convert_brain512(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write ``brain512.mat`` as a test-style single-coil fastMRI volume (``out``: a ``.h5`` path or a
    folder, then ``out/brain512.h5``). Returns the path written."""
    out = Path(out)
    if out.suffix != ".h5":
        out = out / "brain512.h5"
    b = load_brain512(source)
    mask = b["mask"]
    if mask.ndim == 1:
        nlf = center_run(mask)
        accel = float(mask.size / mask.sum())
    else:
        nlf = int(min(center_block(mask)))
        accel = float(mask.size / mask.sum())
    outside = float(np.abs(b["kspace"] * ~np.broadcast_to(mask, b["kspace"].shape)).max())
    attrs = {"source": BRAIN512_FILE, "layout": b["layout"], "kspace_max_outside_mask": outside}
    if b["pdf"] is not None and np.ndim(b["pdf"]) == 1:
        attrs["sampling_pdf"] = np.asarray(b["pdf"], np.float32)
    return write_fastmri(out, b["kspace"][None], recon_size=b["kspace"].shape, mask=mask, acceleration=accel, num_low_frequency=nlf,
                         acquisition="AXT2", patient_id="brain512", extra_attrs=attrs)


@click.command(name="brain512")
@click.argument("source", type=click.Path(exists=True))
@click.argument("out", type=click.Path())
def command(source, out):
    """Convert Lustig's single-coil brain512.mat (SOURCE: the file or ../shared/data) to a test-style
    fastMRI volume OUT (a .h5 path, or a folder that gets brain512.h5) with its 1-D line mask."""
    path = convert_brain512(source, out)
    import h5py

    with h5py.File(path, "r") as f:
        click.echo(f"wrote {path}: kspace {f['kspace'].shape}, mask {f['mask'].shape}, "
                   f"R = {f.attrs['acceleration']:.2f}, {f.attrs['num_low_frequency']} central lines")
