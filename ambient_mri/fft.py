"""Centred, orthonormal FFTs (fastMRI's ``fft2c``, sigpy's ``sp.fft``).

``fft2c(x) = fftshift(fft2(ifftshift(x), norm="ortho"))`` over the last two axes; ``ifft2c`` is its inverse
and adjoint. Works on any leading batch shape, torch complex tensors on any device, or numpy arrays.
``fft1c`` / ``ifft1c`` are the same along one axis of a numpy array (prep crops the readout with them).
"""

from __future__ import annotations

import numpy as np
import torch

_DIMS = (-2, -1)


def _centred(transform, x: np.ndarray, axes: tuple) -> np.ndarray:
    """``fftshift(transform(ifftshift(x)))`` over ``axes``, orthonormal (``transform``: ``np.fft.fftn`` / ``ifftn``)."""
    return np.fft.fftshift(transform(np.fft.ifftshift(x, axes=axes), axes=axes, norm="ortho"), axes=axes)


def fft2c(x):
    """Image ``(..., H, W)`` -> k-space ``(..., H, W)``, DC at ``(H // 2, W // 2)``."""
    if isinstance(x, np.ndarray):
        return _centred(np.fft.fftn, x, _DIMS)
    x = torch.fft.ifftshift(x, dim=_DIMS)
    return torch.fft.fftshift(torch.fft.fft2(x, dim=_DIMS, norm="ortho"), dim=_DIMS)


def ifft2c(k):
    """K-space ``(..., H, W)`` -> image ``(..., H, W)``; the inverse (and adjoint) of :func:`fft2c`."""
    if isinstance(k, np.ndarray):
        return _centred(np.fft.ifftn, k, _DIMS)
    k = torch.fft.ifftshift(k, dim=_DIMS)
    return torch.fft.fftshift(torch.fft.ifft2(k, dim=_DIMS, norm="ortho"), dim=_DIMS)


def fft1c(x: np.ndarray, axis: int) -> np.ndarray:
    """Centred orthonormal 1-D FFT of ``x`` along ``axis``, DC at index ``n // 2`` (numpy)."""
    return _centred(np.fft.fftn, x, (axis,))


def ifft1c(k: np.ndarray, axis: int) -> np.ndarray:
    """The inverse (and adjoint) of :func:`fft1c` along ``axis``."""
    return _centred(np.fft.ifftn, k, (axis,))


def rss(x, dim: int = -3):
    """Root-sum-of-squares coil combination ``sqrt(sum_c |x_c|^2)`` over ``dim`` (coils)."""
    if isinstance(x, np.ndarray):
        return np.sqrt(np.sum(np.abs(x) ** 2, axis=dim))
    return torch.sqrt(torch.sum(x.abs() ** 2, dim=dim))


def to_channels(x: torch.Tensor) -> torch.Tensor:
    """Complex ``(B, H, W)`` -> real ``(B, 2, H, W)`` = [Re, Im]."""
    return torch.stack((x.real, x.imag), dim=1)


def to_complex(x: torch.Tensor) -> torch.Tensor:
    """Real ``(B, 2, H, W)`` = [Re, Im] -> complex ``(B, H, W)``."""
    return torch.complex(x[:, 0].float(), x[:, 1].float())


def center_crop(x, shape):
    """Crop the last two axes of ``x`` to ``shape = (h, w)`` around the centre (fastMRI's convention)."""
    h, w = shape
    H, W = x.shape[-2:]
    if h > H or w > W:
        raise ValueError(f"cannot crop {H}x{W} to {h}x{w}")
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top : top + h, left : left + w]


def center_pad(x, shape):
    """Zero-pad the last two axes of ``x`` to ``shape`` around the centre; the inverse of :func:`center_crop`."""
    h, w = shape
    H, W = x.shape[-2:]
    if h < H or w < W:
        raise ValueError(f"cannot pad {H}x{W} to {h}x{w}")
    top, left = (h - H) // 2, (w - W) // 2
    if isinstance(x, np.ndarray):
        out = np.zeros(x.shape[:-2] + (h, w), dtype=x.dtype)
    else:
        out = x.new_zeros(x.shape[:-2] + (h, w))
    out[..., top : top + H, left : left + W] = x
    return out
