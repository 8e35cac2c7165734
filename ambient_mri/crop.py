"""Centre crops of multi-coil k-space ``(C, H, W)`` that keep unsampled samples exactly zero, and of coil
maps ``(C, H, W)`` to match.

* Fully sampled k-space is cropped in image space, fastMRI's ``fft2c(center_crop(ifft2c(k), (h, w)))``;
  the field of view shrinks, the pixel size stays.
* K-space with a line mask ``(1, W)`` keeps the readout crop in image space (a 1-D FFT along ``H`` only,
  :func:`~ambient_mri.fft.ifft1c`) and crops the phase encode in k-space: the ``w`` lines around DC
  (:func:`kspace_window`), so every unsampled line stays exactly zero. A 2-D mask ``(H, W)`` samples the
  readout too, so both axes are cropped in k-space.
* A k-space crop keeps the field of view at a coarser pixel size ``N / n``: maps are resampled onto the
  coarser pixel centres (:func:`regrid`).
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError
from .fft import center_crop, fft1c, fft2c, ifft1c, ifft2c


def kspace_window(n: int, m: int) -> slice:
    """The ``m`` k-space indices around DC (index ``n // 2``) of an axis of ``n``; DC lands on ``m // 2``."""
    start = n // 2 - m // 2
    return slice(start, start + m)


def crop_kspace(kspace: np.ndarray, crop: tuple[int, int], mask: np.ndarray | None = None):
    """Centre crop ``kspace (C, H, W)`` to ``crop = (h, w)``; returns ``(kspace (C, h, w), mask)``.

    No mask (fully sampled): ``fft2c(center_crop(ifft2c(k), (h, w)))``, fastMRI's image crop.
    Line mask ``(1, W)``: ``k' = F_H center_crop_H(F_H^-1 k)`` restricted to the ``w`` phase-encode lines
    around DC, mask ``(1, w)``. 2-D mask ``(H, W)``: the ``h x w`` k-space block around DC, mask ``(h, w)``.
    The output is ``M' k'`` (exactly zero where the cropped mask ``M'`` is 0), complex64.
    """
    h, w = crop
    H, W = kspace.shape[-2:]
    if h > H or w > W:
        raise ConfigError(f"--crop {h} {w} is larger than the {H}x{W} matrix")
    if (h, w) == (H, W):
        return kspace, mask
    if mask is None:
        return fft2c(center_crop(ifft2c(kspace), (h, w))).astype(np.complex64), None
    cols = kspace_window(W, w)
    if mask.shape[0] == 1:
        top = (H - h) // 2
        k = fft1c(ifft1c(kspace, -2)[..., top : top + h, :], -2)[..., cols]
        m = mask[:, cols]
    else:
        rows = kspace_window(H, h)
        k, m = kspace[..., rows, cols], mask[rows, cols]
    return (k * m).astype(np.complex64), m


def crop_maps(maps: np.ndarray, crop: tuple[int, int], mask: np.ndarray | None = None) -> np.ndarray:
    """Maps ``(C, H, W)`` -> ``(C, h, w)`` cropped as :func:`crop_kspace` crops the k-space of the same
    ``mask``: an image-space crop stays an image-space crop of the maps (exact); an axis cropped in k-space
    (the phase encode of a line mask, both axes of a 2-D mask) keeps the field of view at a coarser pixel
    size, so the maps are linearly interpolated onto the coarser pixel centres (:func:`regrid`; smooth maps
    need no more)."""
    h, w = crop
    H, W = maps.shape[-2:]
    if (h, w) == (H, W):
        return maps
    if mask is None:
        return center_crop(maps, (h, w)).astype(np.complex64)
    out = np.asarray(maps)
    if mask.shape[0] == 1:
        top = (H - h) // 2
        out = out[..., top : top + h, :]
    else:
        out = regrid(out, h, -2)
    return regrid(out, w, -1).astype(np.complex64)


def regrid(a: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Resample ``a`` along ``axis`` from ``N`` to ``n`` pixels over the same field of view (k-space crop to
    the ``n`` lines around DC): pixel ``j`` of the coarse grid sits at ``(j - n // 2) N / n`` fine pixels from
    the centre pixel ``N // 2``; linear interpolation of real and imaginary parts, ends held."""
    N = a.shape[axis]
    if n == N:
        return a
    pos = (np.arange(n) - n // 2) * (N / n) + N // 2
    moved = np.moveaxis(a, axis, -1)
    flat = moved.reshape(-1, N)
    grid = np.arange(N)
    out = np.stack([np.interp(pos, grid, r.real) + 1j * np.interp(pos, grid, r.imag) for r in flat])
    return np.moveaxis(out.reshape(moved.shape[:-1] + (n,)), -1, axis)
