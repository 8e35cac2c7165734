"""Coil tools: sensitivity maps from measured samples only, the calibration block and norm, coil
compression and coil transforms, and how well the maps explain the data.

Shapes: multi-coil k-space ``(C, H, W)`` or batched ``(B, C, H, W)``, maps the same, complex; masks
``(1, W)`` (lines) or ``(H, W)``. Maps estimated here see only the centred calibration block of k-space
(or, for :data:`MEASURED_MAPS`, every measured sample), so they can be computed from undersampled
training data, never from samples the mask removed. (Coil noise and prewhitening: :mod:`ambient_mri.whitening`.)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import ConfigError
from .espirit import default_kernel_width, default_thresh, espirit_maps_completed, espirit_maps_torch
from .fft import fft2c, ifft2c, rss
from .masks import acs_region

MAPS_METHODS = ("espirit", "lowres", "true", "espirit-torch", "espirit-sake")
MEASURED_MAPS = ("espirit-sake",)  # maps methods that read every measured sample (not only the calibration block)
DEFAULT_MAPS = "espirit-sake"
# revision of each estimator's internal settings, recorded in prepared files (``maps_revision``) so that a
# resumed prep never mixes maps of two revisions; bump it whenever a method's defaults change.
# espirit-sake 2: completion block 24 x 24 with the staged rank hold-out (2026-12-01); absent = 1
MAPS_REVISION = {"espirit-sake": 2}


def maps_methods() -> tuple[str, ...]:
    """Coil-map sources: ``espirit`` (sigpy), ``espirit-torch`` (:mod:`ambient_mri.espirit`),
    ``espirit-sake`` (ESPIRiT after low-rank completion of a larger block), ``lowres``, and ``true`` (the
    maps a simulated input carries)."""
    return MAPS_METHODS


def acs_kspace(kspace, calib: tuple[int, int]):
    """Zero ``kspace (..., H, W)`` outside the centred ``calib = (h, w)`` block."""
    region = acs_region(tuple(kspace.shape[-2:]), calib)
    if isinstance(kspace, torch.Tensor):
        return kspace * torch.from_numpy(region).to(kspace.device)
    return kspace * region


def as_mask2d(mask, H: int, W: int) -> np.ndarray:
    """An input mask ``(W,)``, ``(1, W)`` or ``(H, W)`` as bool ``(1, W)`` or ``(H, W)``."""
    m = np.asarray(mask) != 0
    if m.shape == (W,):
        m = m[None]
    if m.shape not in ((1, W), (H, W)):
        raise ConfigError(f"mask of shape {m.shape} does not fit k-space {H}x{W}")
    return m


def calibration_block(mask: np.ndarray) -> tuple[int, int]:
    """The largest centred fully sampled block of a mask, fastMRI centring (``n`` of ``N`` start at
    ``(N - n + 1) // 2``): line mask ``(1, W)`` -> ``(1, n)`` lines; 2-D ``(H, W)`` -> ``(n, n)``."""
    m = np.asarray(mask, dtype=bool)
    H, W = m.shape
    if H == 1:
        cs = np.concatenate(([0], np.cumsum(m[0])))
        n = np.arange(W + 1)
        start = (W - n + 1) // 2
        full = cs[start + n] - cs[start] == n
        return 1, int(n[full].max())
    ii = np.zeros((H + 1, W + 1), dtype=np.int64)
    ii[1:, 1:] = np.cumsum(np.cumsum(m, 0), 1)
    n = np.arange(min(H, W) + 1)
    t, l = (H - n + 1) // 2, (W - n + 1) // 2
    count = ii[t + n, l + n] - ii[t, l + n] - ii[t + n, l] + ii[t, l]
    full = count == n * n
    return int(n[full].max()), int(n[full].max())


def acs_norm(kspace: np.ndarray, calib: int) -> float:
    """99th percentile of the RSS image of the centred ``calib x calib`` k-space block alone."""
    return float(np.percentile(rss(ifft2c(acs_kspace(kspace, (calib, calib))), dim=0), 99))

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
    import sigpy as sp  # sigpy (with numba) takes seconds to import: only when used
    import sigpy.mri

    C, H, W = kspace.shape
    if calib > min(H, W):
        raise ConfigError(f"calibration width {calib} exceeds the matrix {H}x{W}")
    kw = kernel_width or default_kernel_width((calib, calib))
    thresh = default_thresh(kw) if thresh is None else thresh
    dev = sp.Device(-1 if device is None else device)
    app = sigpy.mri.app.EspiritCalib(np.ascontiguousarray(kspace, dtype=np.complex64), calib_width=calib,
                                     thresh=thresh, kernel_width=kw, crop=crop, max_iter=max_iter,
                                     device=dev, show_pbar=False)
    maps = sp.to_device(app.run(), sp.cpu_device)
    return np.asarray(maps, dtype=np.complex64)


def estimate_maps(kspace_acs: np.ndarray, calib: int, method: str = "espirit", mask: np.ndarray | None = None) -> np.ndarray:
    """Coil maps ``(B, C, H, W)`` complex64 from k-space ``(B, C, H, W)``. ``method``: one of
    :func:`maps_methods` except ``true``.

    ``espirit``, ``espirit-torch``, ``lowres`` read only the centred ``calib x calib`` block (pass k-space
    zero outside it). ``espirit-sake`` (:func:`ambient_mri.espirit.espirit_maps_completed`) reads every
    measured sample: pass the measured k-space and its ``mask`` (broadcastable to ``(B, 1, H, W)``; default
    the non-zero samples); for ``calib < 16`` it completes a larger centred block from them first."""
    k = np.ascontiguousarray(kspace_acs, dtype=np.complex64)
    if method == "espirit-sake":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        m = (np.abs(k) > 0).any(axis=1, keepdims=True) if mask is None else np.array(mask, dtype=bool)
        maps = espirit_maps_completed(torch.from_numpy(k).to(dev), torch.from_numpy(m), calib)
        return maps.detach().cpu().numpy().astype(np.complex64)
    if method == "espirit":
        return np.stack([espirit_maps(s, calib) for s in k]).astype(np.complex64)
    if method == "lowres":
        return np.asarray(lowres_maps(k, (calib, calib)), dtype=np.complex64)
    if method == "espirit-torch":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        maps = espirit_maps_torch(torch.from_numpy(k).to(dev), calib)
        return maps.detach().cpu().numpy().astype(np.complex64)
    raise ConfigError(f"unknown maps method {method!r} (choose from {', '.join(maps_methods())})")

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


def coil_matrix(k_before: np.ndarray, k_after: np.ndarray) -> np.ndarray:
    """The ``C' x C`` matrix ``W`` with ``k_after = W k_before`` over the coil axis of ``(C, H, W)`` k-space
    (least squares over all samples; exact for a linear coil transform such as prewhitening)."""
    A = np.asarray(k_before).reshape(k_before.shape[0], -1)
    B = np.asarray(k_after).reshape(k_after.shape[0], -1)
    return np.linalg.lstsq(A.T, B.T, rcond=None)[0].T.astype(np.complex64)


def apply_coil_matrix(Wm: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """``S'_d = sum_c W_dc S_c``: a coil transform of k-space applied to the maps ``(C, H, W)`` keeps
    ``k = F(S x)`` exact (``W k = F((W S) x)``)."""
    return np.tensordot(Wm, np.asarray(maps), axes=(1, 0)).astype(np.complex64)


def forward_residual(y: np.ndarray, maps: np.ndarray, mask: np.ndarray, x_ref: np.ndarray,
                     noise_std: float) -> tuple[float, float]:
    """``(||y - M F S x_ref|| / ||y||, noise_std sqrt(C n_M) / ||y||)`` for measured k-space ``y (C, H, W)``
    (zero where ``M = 0``), ``n_M`` the measured samples per coil: how far the maps ``S`` explain the data,
    and the part of it that the noise alone explains (the expected ``||n|| / ||y||``)."""
    m = np.broadcast_to(np.asarray(mask, dtype=bool), y.shape[-2:])
    r = m * (np.asarray(y) - fft2c(np.asarray(maps) * np.asarray(x_ref)[None]))
    ny = float(np.linalg.norm(y))
    if ny == 0:
        return math.nan, math.nan
    return float(np.linalg.norm(r)) / ny, float(noise_std) * math.sqrt(y.shape[0] * int(m.sum())) / ny
