"""BART's 8-coil Poisson-disc brain k-space (``bart_brain8ch_poisson/ksp``) -> one test-style fastMRI volume.

The acquisition is 3-D Cartesian with the readout already transformed (BART dims ``1 x 180 x 230 x 8``:
x = 1, the two phase-encode axes y = 180 and z = 230, coils): every in-plane axis is a phase encode and
the mask is 2-D. We transpose the plane to ``(H, W) = (230, 180)`` -- the longer axis first as in
fastMRI, and the anatomy upright (anterior at the top) like ``head.mat``, ``brain512`` and fastMRI brain.
A transpose commutes with the centred FFT, so k-space, mask and image transpose alike.

Written: ``kspace (1, 8, 230, 180)``, ``mask (230, 180)`` = where k-space is non-zero in any coil,
``acceleration`` = measured ``H W / samples``, ``num_low_frequency`` = side of the largest fully sampled
centred square (``calibration_block`` attr: the largest centred block ``(h, w)``), and BART's own
PICS + 2-set ESPIRiT reconstruction ``img`` as ``bart_pics_reconstruction`` ``(1, 2, 230, 180)``: a
pseudo-reference, **not ground truth** (no fully sampled data exist). The ``ismrmrd_header`` is honest:
encoded = recon matrix = ``(230, 180)`` (no axis is an oversampled readout, so nothing invites
prewhitening from an image corner that holds the aliased object, not noise).
"""

from __future__ import annotations

import os
from pathlib import Path

import click
import numpy as np

from ambient_mri.errors import DataError

from .common import center_block, read_cfl, write_fastmri

BART_DIR = "bart_brain8ch_poisson"


def _plane(a: np.ndarray, name: str, path) -> np.ndarray:
    """BART dims ``(1, Y, Z, C, M, 1...)`` -> ``(C * M, Z, Y)`` (leading axis: coils or map sets)."""
    if a.ndim < 4 or a.shape[0] != 1 or any(d != 1 for d in a.shape[5:]):
        raise DataError(f"'{name}' must have BART dims 1 x Y x Z x C [x M], got {a.shape}", path)
    a = a.reshape(a.shape[1], a.shape[2], -1, order="F")
    return np.ascontiguousarray(np.transpose(a, (2, 1, 0)))


def load_bart(source: str | os.PathLike) -> dict:
    """``{"kspace": (C, H, W), "mask": (H, W) bool, "pics": (M, H, W)}`` with ``(H, W) = (Z, Y)``
    (``source``: the ``bart_brain8ch_poisson`` folder or the data folder above it)."""
    d = Path(source)
    if not (d / "ksp.cfl").exists() and (d / BART_DIR).is_dir():
        d = d / BART_DIR
    k = _plane(read_cfl(d / "ksp"), "ksp", d / "ksp.hdr")
    pics = _plane(read_cfl(d / "img"), "img", d / "img.hdr")
    if pics.shape[1:] != k.shape[1:]:
        raise DataError(f"image plane {pics.shape[1:]} does not match k-space plane {k.shape[1:]}", d / "img.hdr")
    mask = (k != 0).any(axis=0)
    if not mask.any():
        raise DataError("k-space is all zero", d / "ksp.cfl")
    return {"kspace": k, "mask": mask, "pics": pics, "folder": d}


def convert_bart(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write BART's Poisson k-space as a test-style multi-coil fastMRI volume (``out``: a ``.h5`` path or a
    folder, then ``out/bart_brain8ch_poisson.h5``). Returns the path written."""
    out = Path(out)
    if out.suffix != ".h5":
        out = out / f"{BART_DIR}.h5"
    b = load_bart(source)
    mask = b["mask"]
    acs = center_block(mask)
    pics_attrs = {"description": "BART pics (parallel imaging + compressed sensing) with 2 ESPIRiT map sets: "
                                 "a pseudo-reference, NOT ground truth; magnitude = RSS over the sets",
                  "bart_command": "pics ksp2 maps img", "axes": "(slices, map sets, H, W)"}
    return write_fastmri(
        out, b["kspace"][None], recon_size=mask.shape, mask=mask, acceleration=float(mask.size / mask.sum()),
        num_low_frequency=int(min(acs)), acquisition="AXT1", patient_id=BART_DIR,
        datasets={"bart_pics_reconstruction": (b["pics"][None].astype(np.complex64), pics_attrs)},
        extra_attrs={"source": f"{BART_DIR}/ksp.cfl", "calibration_block": np.asarray(acs, np.int64),
                     "mask_kind": "poisson-2d (as acquired)",
                     "orientation": "BART (1, y=180, z=230, coils) -> kspace (slice, coil, H=z, W=y): plane "
                                    "transposed; both in-plane axes are phase encodes"})


@click.command(name="bart")
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path())
def command(source, out):
    """Convert BART's 8-coil Poisson-disc k-space (SOURCE: the bart_brain8ch_poisson folder or
    ../shared/data) to a test-style fastMRI volume OUT (a .h5 path, or a folder) with its 2-D mask and
    BART's PICS result as 'bart_pics_reconstruction' (not ground truth)."""
    path = convert_bart(source, out)
    import h5py

    with h5py.File(path, "r") as f:
        click.echo(f"wrote {path}: kspace {f['kspace'].shape}, R = {f.attrs['acceleration']:.2f}, "
                   f"calibration block {tuple(int(a) for a in f.attrs['calibration_block'])}")
