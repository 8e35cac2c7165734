"""Coil tools: sensitivity maps from the ACS region only, coil compression, noise prewhitening.

Shapes: multi-coil k-space ``(C, H, W)`` or batched ``(B, C, H, W)``, maps the same, complex.
Maps estimated here see only the centred calibration block of k-space (so they can be computed
from undersampled training data), never the rest.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import ConfigError
from .fft import fft2c, ifft2c, rss
from .masks import acs_region


def acs_kspace(kspace, calib: tuple[int, int]):
    """Zero ``kspace (..., H, W)`` outside the centred ``calib = (h, w)`` block."""
    region = acs_region(tuple(kspace.shape[-2:]), calib)
    if isinstance(kspace, torch.Tensor):
        return kspace * torch.from_numpy(region).to(kspace.device)
    return kspace * region


def lowres_maps(kspace, calib: tuple[int, int], *, eps: float = 1e-3, window: bool = True):
    """Low-resolution ACS maps (fastMRI VarNet's starting point): coil images of the ACS block divided by
    their RSS, ``S_c = x_c / sqrt(sum_c |x_c|^2 + (eps max RSS)^2)``.

    ``window``: taper the ACS block with a Hann window first (less ringing). ``kspace``: ``(..., C, H, W)``.
    """
    is_torch = isinstance(kspace, torch.Tensor)
    k = kspace if is_torch else torch.from_numpy(np.ascontiguousarray(kspace))
    H, W = k.shape[-2:]
    block = torch.from_numpy(acs_region((H, W), calib).astype(np.float32)).to(k.device)
    if window:
        block = block * _hann_block((H, W), calib).to(k.device)
    img = ifft2c(k * block)
    r = rss(img, dim=-3)
    floor = eps * r.flatten(-2).amax(-1)[..., None, None]
    maps = img / torch.sqrt(r**2 + floor**2)[..., None, :, :]
    return maps if is_torch else maps.numpy()


def _hann_block(shape, calib):
    out = torch.zeros(shape)
    h, w = min(calib[0], shape[0]), min(calib[1], shape[1])
    wy = torch.hann_window(h + 2, periodic=False, dtype=torch.float64)[1:-1] if h > 1 else torch.ones(1)
    wx = torch.hann_window(w + 2, periodic=False, dtype=torch.float64)[1:-1] if w > 1 else torch.ones(1)
    ys, xs = (shape[0] - h + 1) // 2, (shape[1] - w + 1) // 2
    out[ys : ys + h, xs : xs + w] = (wy[:, None] * wx[None, :]).float()
    return out


def espirit_maps(kspace: np.ndarray, calib: int, *, kernel_width: int | None = None, thresh: float | None = None,
                 crop: float = 0.0, max_iter: int = 100, device=None) -> np.ndarray:
    """ESPIRiT maps (one set, like BART ``ecalib -m 1 -c0``) with ``sigpy.mri.app.EspiritCalib``.

    ``kspace``: ``(C, H, W)``; only its centred ``calib x calib`` block is read. ``kernel_width`` and
    ``thresh`` default to :func:`ambient_mri.espirit.default_kernel_width` (3 for an 8 x 8 block, 6 from
    17 on) and :func:`ambient_mri.espirit.default_thresh`. ``device``: a sigpy device (``-1`` CPU, ``0`` first GPU).
    """
    import sigpy as sp
    import sigpy.mri

    C, H, W = kspace.shape
    if calib > min(H, W):
        raise ConfigError(f"calibration width {calib} exceeds the matrix {H}x{W}")
    from .espirit import default_kernel_width, default_thresh

    kw = kernel_width or default_kernel_width((calib, calib))
    thresh = default_thresh(kw) if thresh is None else thresh
    dev = sp.Device(-1 if device is None else device)
    app = sigpy.mri.app.EspiritCalib(np.ascontiguousarray(kspace, dtype=np.complex64), calib_width=calib,
                                     thresh=thresh, kernel_width=kw, crop=crop, max_iter=max_iter,
                                     device=dev, show_pbar=False)
    maps = sp.to_device(app.run(), sp.cpu_device)
    return np.asarray(maps, dtype=np.complex64)


def coil_compress(kspace, n_virtual: int, calib: tuple[int, int] | None = None):
    """SVD coil compression to ``n_virtual`` virtual coils (like BART ``cc -p N`` on a reference region).

    ``kspace``: ``(C, H, W)`` (one slice). The compression matrix is the leading ``n_virtual`` left
    singular vectors of the coil-by-sample matrix of the ``calib`` block (all samples if ``None``).
    Returns ``(compressed (n_virtual, H, W), U (C, n_virtual))`` with ``compressed = U^H kspace``.
    """
    C = kspace.shape[0]
    if not 1 <= n_virtual <= C:
        raise ConfigError(f"cannot compress {C} coils to {n_virtual} virtual coils")
    ref = kspace if calib is None else kspace[:, acs_region(kspace.shape[-2:], calib)]
    ref = np.asarray(ref).reshape(C, -1)
    U, _, _ = np.linalg.svd(ref, full_matrices=False)
    U = U[:, :n_virtual]
    out = np.tensordot(U.conj().T, np.asarray(kspace), axes=(1, 0))
    return out.astype(np.complex64), U.astype(np.complex64)


def noise_covariance(samples: np.ndarray) -> np.ndarray:
    """Coil noise covariance ``Psi = X X^H / (N - 1)`` from noise-only samples ``X`` ``(C, N)``."""
    X = np.asarray(samples).reshape(samples.shape[0], -1)
    X = X - X.mean(axis=1, keepdims=True)
    return (X @ X.conj().T) / max(X.shape[1] - 1, 1)


def noise_from_corner(kspace: np.ndarray, size: int = 30) -> np.ndarray:
    """Noise samples ``(C, size * size)`` from the top-left ``size x size`` corner of the coil images of
    ``kspace (C, H, W)`` (outside the object for fastMRI's 2x-oversampled readout)."""
    img = ifft2c(np.asarray(kspace))
    return img[:, :size, :size].reshape(img.shape[0], -1)


def whitening_matrix(cov: np.ndarray) -> np.ndarray:
    """``W = L^-1`` with ``Psi = L L^H`` (Cholesky), so that whitened noise has identity covariance."""
    L = np.linalg.cholesky(cov + 1e-12 * np.trace(cov).real / cov.shape[0] * np.eye(cov.shape[0]))
    return np.linalg.inv(L)


def prewhiten(kspace: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Apply ``W = L^-1`` over the coil axis of ``kspace (..., C, H, W)``."""
    Wm = whitening_matrix(cov).astype(np.complex64)
    return np.einsum("dc,...chw->...dhw", Wm, np.asarray(kspace)).astype(np.complex64)
