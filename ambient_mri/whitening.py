"""Coil noise and prewhitening: the noise covariance ``Psi`` of the coils, measured in the image corner,
whitening ``k <- L^-1 k`` with ``Psi = L L^H``, the checks that the corner really is noise, and the noise
level of one prepared sample.

Shapes: multi-coil k-space ``(C, H, W)`` (coils first), masks ``(H, W)`` or ``(1, W)``, covariances ``(C, C)``.
The corner is the ``30 x 30`` top-left corner of the coil images: noise only when the readout is 2x
oversampled (fastMRI's 640 = 2 x 320), where it lies outside the reconstructed field of view; so
:func:`whitening_mode` tries it only then, and :func:`prewhiten_slice` checks every slice's corner.
"""

from __future__ import annotations

import math

import numpy as np

from .coils import as_mask2d
from .fft import ifft2c

NOISE_CORNER = 30  # side of the image corner read for noise


def noise_covariance(samples: np.ndarray) -> np.ndarray:
    """Coil noise covariance ``Psi = X X^H / (N - 1)`` from noise-only samples ``X`` ``(C, N)``."""
    X = np.asarray(samples).reshape(samples.shape[0], -1)
    X = X - X.mean(axis=1, keepdims=True)
    return (X @ X.conj().T) / max(X.shape[1] - 1, 1)


def noise_from_corner(kspace: np.ndarray, size: int = NOISE_CORNER) -> np.ndarray:
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


CORNER_SMOOTH_MAX = 0.25  # the largest share of the noise corner's power allowed to be spatially smooth


def noise_neighbour_correlation(mask: np.ndarray) -> np.ndarray:
    """Correlation between neighbouring pixels of white k-space noise seen through ``mask (H, W)``:
    ``rho_a = |sum_k M(k) exp(2 pi i k_a / N_a)| / sum_k M(k)`` for ``a`` = H, W (the normalised point-spread
    function of ``M`` one pixel from its peak). Fully sampled: ``(0, 0)``. Returns ``(rho_H, rho_W)``."""
    m = np.asarray(mask, dtype=np.float64)
    rho = []
    for axis in (0, 1):
        n = m.shape[axis]
        profile = m.sum(axis=1 - axis)  # samples per frequency along this axis
        phase = np.exp(2j * np.pi * (np.arange(n) - n // 2) / n)
        rho.append(abs(np.sum(profile * phase)) / max(profile.sum(), 1e-30))
    return np.asarray(rho)


def corner_neighbour_correlation(corner_images: np.ndarray) -> np.ndarray:
    """``r_a = |sum_{c,p} conj(I_c(p)) I_c(p + e_a)| / sum_{c,p} |I_c(p)|^2`` (pooled over coils, no mean
    removed) of coil-image patches ``(C, h, w)``: ~0 for white noise, ~1 for a smooth image. Returns
    ``(r_H, r_W)``."""
    x = np.asarray(corner_images, dtype=np.complex128)
    power = np.sum(np.abs(x) ** 2)
    r_h = abs(np.vdot(x[:, :-1], x[:, 1:])) / max(power, 1e-300)
    r_w = abs(np.vdot(x[:, :, :-1], x[:, :, 1:])) / max(power, 1e-300)
    return np.asarray([r_h, r_w])


def corner_smooth_fraction(patch: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """How much of an image-corner patch's power ``(C, h, w)`` is *not* noise, per axis:
    ``f_a = (r_a - rho_a) / (1 - rho_a)`` with ``r_a`` the measured neighbour correlation
    (:func:`corner_neighbour_correlation`) and ``rho_a`` that of white noise through the sampling ``mask``
    (:func:`noise_neighbour_correlation`, ``mask (H, W)``). A corner that is ``f`` smooth image
    (neighbour correlation ~1) and ``1 - f`` noise gives ``f_a ~ f``: ~0 for a genuine noise corner (the
    removed half of a 2x-oversampled readout), large for an aliased object. ``NaN`` where ``rho_a`` is so
    close to 1 that noise and image cannot be told apart. Returns ``(f_H, f_W)``."""
    r = corner_neighbour_correlation(patch)
    rho = noise_neighbour_correlation(mask)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(rho < 0.9, (r - rho) / (1 - rho), np.nan)


def prewhiten_slice(kspace: np.ndarray, corner: int = NOISE_CORNER, mask: np.ndarray | None = None):
    """Whiten ``kspace (C, H, W)`` (zero where ``mask`` is 0; ``None`` = fully sampled) with the noise
    covariance ``Psi`` of the ``corner x corner`` top-left corner of the coil images: ``k <- L^-1 k``,
    ``Psi = L L^H``. Returns ``(whitened k-space, None)``, or ``(kspace, reason)`` when the corner is not
    usable noise: fewer samples than coils, no power, neighbouring pixels more correlated than noise through
    ``mask`` would be (:func:`corner_smooth_fraction` > ``CORNER_SMOOTH_MAX``: an object or its aliases,
    e.g. a readout that is not oversampled), or a singular covariance."""
    C, H, W = kspace.shape
    size = min(corner, H, W)
    if size * size <= C:
        return kspace, f"the {size}x{size} noise corner has fewer samples than the {C} coils"
    noise = noise_from_corner(kspace, size)
    p_noise = float(np.mean(np.abs(noise.astype(np.complex128)) ** 2))
    p_img = float(np.mean(np.abs(ifft2c(kspace).astype(np.complex128)) ** 2))
    if not np.isfinite(p_noise) or p_noise <= 1e-12 * p_img:
        return kspace, f"the {size}x{size} image corner holds no noise"
    m = np.ones((H, W)) if mask is None else np.broadcast_to(as_mask2d(mask, H, W), (H, W))
    f = corner_smooth_fraction(noise.reshape(C, size, size), m)
    if np.isnan(f).any():
        return kspace, f"the sampling mask correlates neighbouring pixels too much to tell noise in the {size}x{size} corner"
    if f.max() > CORNER_SMOOTH_MAX:
        return kspace, (f"the {size}x{size} image corner is not noise: its neighbouring pixels correlate like an image "
                        f"(smooth share {f.max():.2f} > {CORNER_SMOOTH_MAX}: an object or its aliases)")
    cov = noise_covariance(noise)
    ev = np.linalg.eigvalsh(cov)
    if ev.min() <= 1e-10 * ev.max():
        return kspace, "the noise covariance of the image corner is singular"
    return prewhiten(kspace, cov), None


def corner_noise_covariance(kspace: np.ndarray, corner: int = NOISE_CORNER) -> np.ndarray | None:
    """Coil noise covariance ``(C, C)`` of the ``corner x corner`` top-left corner of the coil images of
    ``kspace (C, H, W)`` (noise only when the readout is oversampled), or ``None`` if it holds too few
    samples."""
    C, H, W = kspace.shape
    size = min(corner, H, W)
    if size * size <= C:
        return None
    return noise_covariance(noise_from_corner(kspace, size))


def prepared_noise_std(norm: float, whitened: bool, noise_sigma: float | None = None,
                       corner_cov: np.ndarray | None = None) -> tuple[float, str]:
    """Std of the complex noise of one prepared k-space sample of one coil (``E|n|^2 = noise_std^2``) and
    where it comes from. Crops (orthonormal FFTs, centred windows) keep white noise white with the same
    std, SVD compression too (orthonormal columns), so only whitening and the norm change it:

    1. ``"whitened"``: unit covariance after prewhitening -> ``1 / norm``;
    2. ``"simulated"``: the input's known ``noise_sigma`` (raw units) -> ``noise_sigma / norm``;
    3. ``"image corner"``: ``sqrt(tr Psi / C) / norm`` with ``Psi`` the (compressed) coil covariance of the
       image corner of an oversampled readout (the mean over coils when the noise is not white);
    4. otherwise ``NaN`` (``"unknown"``). (The k-space periphery of non-oversampled data was tried and
       rejected: on SIAT 64 x 64 it overestimated the known sigma 1.6-2.1x, signal remains there.)
    """
    if whitened:
        return 1.0 / float(norm), "whitened"
    if noise_sigma is not None and np.isfinite(noise_sigma) and noise_sigma >= 0:
        return float(noise_sigma) / float(norm), "simulated"
    if corner_cov is not None:
        var = float(np.trace(corner_cov).real) / corner_cov.shape[0]
        if np.isfinite(var) and var > 0:
            return math.sqrt(var) / float(norm), "image corner"
    return math.nan, "unknown"


def whitening_mode(requested: bool | None, vol) -> tuple[bool | str, str | None]:
    """Resolve ``--whiten/--no-whiten`` (``requested``: ``True``, ``False``, ``None`` = automatic) for an open
    volume: ``(whiten, note)`` with ``whiten`` ``True`` (whiten or fail), ``"try"`` (whiten each slice whose
    corner passes :func:`prewhiten_slice`'s checks, else keep it and note why) or ``False``. Automatic =
    ``"try"`` only when the header's readout is 2x oversampled (``vol.readout_oversampled``: then the
    corner lies outside the reconstructed field of view), else ``False``. An explicit ``--whiten`` overrides
    the header (the corner is still checked) and says so in ``note``."""
    if requested is False:
        return False, None
    enc, rec = vol.header["encoding_size"][0], vol.header["recon_size"][0]
    if requested is None:
        return ("try", None) if vol.readout_oversampled else (False, None)
    if not vol.readout_oversampled:
        return True, f"prewhitened on request although the header's readout is not 2x oversampled (encoded {enc}, recon {rec})"
    return True, None


def whitening_note(whitened, notes) -> str | None:
    """One line for the user when slices were left unwhitened: ``"not prewhitened (k of n slices): reason"``
    (``whitened``: per-slice booleans; ``notes``: the slices' warnings), or ``None``."""
    whitened = np.asarray(whitened, dtype=bool)
    reasons = [w for w in notes if w.startswith("not prewhitened")]
    if not reasons or whitened.all():
        return None
    n_off = int((~whitened).sum())
    return f"not prewhitened ({n_off} of {whitened.size} slices): {reasons[0].removeprefix('not prewhitened: ')}"
