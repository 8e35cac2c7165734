"""fastMRI ``.h5`` layout: writing volumes (for converters, the demo and tests) and parsing the header.

Layout (``facebookresearch/fastMRI``): ``kspace`` ``(slices, coils, H, W)`` complex64 (single-coil:
``(slices, H, W)``), ``reconstruction_rss`` ``(slices, h, w)`` float32 = centre crop of the RSS of
``|ifft2c(kspace)|`` (single-coil: ``reconstruction_esc``), ``ismrmrd_header`` (XML bytes with the
encoded and recon matrix sizes), attributes ``acquisition``, ``max``, ``norm``, ``patient_id``; test
and challenge files are already undersampled and carry ``mask`` ``(W,)`` plus the attributes
``acceleration`` and ``num_low_frequency``. As an extension, ``mask`` may be 2-D ``(H, W)`` (Poisson-disc
data). Phase-encode lines are the last axis.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import numpy as np

from .fft import center_crop, ifft2c, rss
from .fsutil import atomic_path

ISMRMRD_NS = "http://www.ismrm.org/ISMRMRD"


def make_header(encoded: tuple[int, int], recon: tuple[int, int], fov_mm: tuple[float, float] | None = None) -> bytes:
    """Minimal ``ismrmrd_header`` XML: encodedSpace/reconSpace matrix sizes (x = readout H, y = phase W),
    field of view, and the phase-encode limits (``kspace_encoding_step_1``) fastMRI reads."""
    fov = fov_mm or (float(encoded[0]), float(encoded[1]))

    def space(tag, size, f):
        return (f"<{tag}><matrixSize><x>{size[0]}</x><y>{size[1]}</y><z>1</z></matrixSize>"
                f"<fieldOfView_mm><x>{f[0]}</x><y>{f[1]}</y><z>5.0</z></fieldOfView_mm></{tag}>")

    W = encoded[1]
    xml = (f'<?xml version="1.0" encoding="utf-8"?>\n<ismrmrdHeader xmlns="{ISMRMRD_NS}"><encoding>'
           + space("encodedSpace", encoded, fov)
           + space("reconSpace", recon, (fov[0] * recon[0] / encoded[0], fov[1] * recon[1] / encoded[1]))
           + "<encodingLimits><kspace_encoding_step_1><minimum>0</minimum>"
           f"<maximum>{W - 1}</maximum><center>{W // 2}</center></kspace_encoding_step_1></encodingLimits>"
           "</encoding></ismrmrdHeader>")
    return xml.encode()


def parse_header(xml: bytes | str) -> dict:
    """Encoding and recon matrix sizes, FOV and phase-encode padding from an ``ismrmrd_header``.

    Returns ``{"encoding_size": (x, y, z), "recon_size": (x, y, z), "encoding_fov_mm": (x, y, z),
    "padding_left": int, "padding_right": int}`` (padding as fastMRI's ``SliceDataset`` computes it).
    Raises ``ValueError`` if the XML does not parse or lacks these fields.
    """
    root = ET.fromstring(xml)
    ns = {"m": ISMRMRD_NS}

    def num(path, cast=int):
        el = root.find(path, ns)
        if el is None or el.text is None:
            raise ValueError(f"header has no {path.replace('m:', '')}")
        return cast(float(el.text)) if cast is int else cast(el.text)

    enc = "m:encoding/m:encodedSpace"
    rec = "m:encoding/m:reconSpace"
    out = {
        "encoding_size": tuple(num(f"{enc}/m:matrixSize/m:{a}") for a in "xyz"),
        "recon_size": tuple(num(f"{rec}/m:matrixSize/m:{a}") for a in "xyz"),
        "encoding_fov_mm": tuple(num(f"{enc}/m:fieldOfView_mm/m:{a}", float) for a in "xyz"),
    }
    lim = "m:encoding/m:encodingLimits/m:kspace_encoding_step_1"
    try:
        center, maximum = num(f"{lim}/m:center"), num(f"{lim}/m:maximum")
        left = out["encoding_size"][1] // 2 - center
        out["padding_left"], out["padding_right"] = left, left + maximum + 1
    except ValueError:
        out["padding_left"], out["padding_right"] = 0, out["encoding_size"][1]
    return out


def write_volume(path: str | os.PathLike, kspace: np.ndarray, *, recon_size: tuple[int, int] | None = None,
                 mask: np.ndarray | None = None, acceleration: float | None = None,
                 num_low_frequency: int | None = None, acquisition: str = "AXT2",
                 patient_id: str | None = None, extra_attrs: dict | None = None) -> Path:
    """Write one fastMRI-layout volume atomically.

    ``kspace``: ``(S, C, H, W)`` multi-coil or ``(S, H, W)`` single-coil (complex). Without ``mask`` the
    file is train/val style and gets a reference (``reconstruction_rss`` multi-coil, ``reconstruction_esc``
    and ``reconstruction_rss`` single-coil) cropped to ``recon_size`` (default ``min(H, W)`` square);
    with ``mask`` it is test style: ``kspace`` is zeroed outside the mask, which is stored with
    ``acceleration`` and ``num_low_frequency``, and no reference is written.
    """
    path = Path(path)
    kspace = np.asarray(kspace).astype(np.complex64)
    if kspace.ndim not in (3, 4):
        raise ValueError(f"kspace must be (S, C, H, W) or (S, H, W), got {kspace.shape}")
    H, W = kspace.shape[-2:]
    recon_size = tuple(recon_size or (min(H, W), min(H, W)))
    with atomic_path(path, ".h5.tmp") as tmp, h5py.File(tmp, "w") as f:
        if mask is not None:
            mask = np.asarray(mask).astype(bool)
            kspace = kspace * mask
            f.create_dataset("mask", data=mask)
            f.attrs["acceleration"] = float(acceleration if acceleration is not None else mask.size / mask.sum())
            f.attrs["num_low_frequency"] = int(num_low_frequency or 0)
        f.create_dataset("kspace", data=kspace)
        if mask is None:
            coil_img = ifft2c(kspace)
            target = rss(coil_img, dim=1) if kspace.ndim == 4 else np.abs(coil_img)
            target = np.ascontiguousarray(center_crop(target, recon_size)).astype(np.float32)
            key = "reconstruction_rss" if kspace.ndim == 4 else "reconstruction_esc"
            f.create_dataset(key, data=target)
            if kspace.ndim == 3:
                f.create_dataset("reconstruction_rss", data=target)
            f.attrs["max"] = float(target.max())
            f.attrs["norm"] = float(np.linalg.norm(target))
        f.create_dataset("ismrmrd_header", data=np.bytes_(make_header((H, W), recon_size)))
        f.attrs["acquisition"] = acquisition
        f.attrs["patient_id"] = patient_id or path.stem
        for k, v in (extra_attrs or {}).items():
            f.attrs[k] = v
    return path
