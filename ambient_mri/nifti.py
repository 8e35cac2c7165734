"""NIfTI magnitude volumes of a prepared file, for radiology viewers (``ambient-mri prep --nifti``).

A prepared file ``<stem>.h5`` gives ``<stem>_zerofilled.nii.gz`` (``RSS(F^-1 y)`` per slice, or ``|image|``
for ``--domain image``) and, for val/test, ``<stem>_reference.nii.gz`` (``|reference|``): float32 arrays
``(W, H, slices)`` with the affine ``diag(dy, dx, dz, 1)`` from the file's ``voxel_size_mm`` ``(dx, dy, dz)``.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import nibabel as nib
import numpy as np

from .fft import ifft2c, rss
from .fsutil import atomic_path


def nifti_path(prepared: Path, out_dir: Path, kind: str) -> Path:
    """``out_dir/<stem>_<kind>.nii.gz``, ``kind`` ``zerofilled`` or ``reference``."""
    return Path(out_dir) / f"{Path(prepared).stem}_{kind}.nii.gz"


def nifti_done(prepared: Path, out_dir: Path) -> bool:
    """Whether every volume :func:`export_nifti` would write for ``prepared`` exists in ``out_dir``."""
    with h5py.File(prepared, "r") as f:
        kinds = ("zerofilled", "reference") if "reference" in f else ("zerofilled",)
    return all(nifti_path(prepared, out_dir, k).exists() for k in kinds)


def export_nifti(prepared: Path, out_dir: Path) -> list[Path]:
    """Write the NIfTI volumes of ``prepared`` into ``out_dir`` (each atomically); returns their paths."""
    written = []
    with h5py.File(prepared, "r") as f:
        vox = np.asarray(f.attrs.get("voxel_size_mm", (1.0, 1.0, 1.0)), dtype=float)
        vols = {}
        if "kspace" in f:
            vols["zerofilled"] = np.stack([rss(ifft2c(f["kspace"][s]), dim=0) for s in range(f["kspace"].shape[0])])
        else:
            vols["zerofilled"] = np.abs(f["image"][()])
        if "reference" in f:
            vols["reference"] = np.abs(f["reference"][()])
    affine = np.diag([vox[1], vox[0], vox[2], 1.0])
    for kind, v in vols.items():
        out = nifti_path(prepared, out_dir, kind)
        img = nib.Nifti1Image(np.ascontiguousarray(np.transpose(v, (2, 1, 0))).astype(np.float32), affine)
        with atomic_path(out, ".nii.gz") as tmp:
            nib.save(img, tmp)
        written.append(out)
    return written
