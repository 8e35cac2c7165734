"""The weights of the data against the denoised estimate: the measurement noise ``s^2`` and the prior's error
variance ``v_t = E|x0 - D(x_t)|^2`` (scalar ``ideal`` / ``residual``, or per pixel ``local``), and DC's weight
``mu = s^2 / v_t`` (docs/theory.md, "Noise in the data").

Operators ``A`` are ``operators.SenseOp`` (k-space ``y (B, C, H, W)``) or ``operators.InpaintOp`` (image-domain
``y (B, H, W)``); residuals ``r = y - A D`` have ``y``'s shape; per-item quantities are ``(B, 1, 1)``.
"""

from __future__ import annotations

import torch

from .operators import SenseOp

ERROR_VARS = ("residual", "ideal", "local")  # dc_sampler's prior error variance v_t


def error_variance(sigma, sigma_data: float = 0.5) -> torch.Tensor:
    """``v_t = E|x0 - D(x_t)|^2`` per complex pixel, for an isotropic prior of per-channel variance
    ``sigma_data^2`` (EDM's preconditioning assumption): ``v_t = 2 sigma^2 sd^2 / (sigma^2 + sd^2)``
    (-> ``2 sigma^2`` at low noise, the prior variance ``2 sd^2`` at high noise). A scalar stand-in for
    the denoiser's error covariance ``sigma^2 dD/dx_t`` (Tweedie), which would cost a Jacobian per step."""
    s2 = torch.as_tensor(sigma, dtype=torch.float64) ** 2
    return 2 * s2 * sigma_data**2 / (s2 + sigma_data**2)


def noise_variance(noise_std, batch: int, device) -> torch.Tensor:
    """``s^2`` as ``(batch, 1, 1)`` float32 from a float or a ``(batch,)`` tensor; a NaN is an error here
    (callers resolve unknown noise first, ``recon.resolve_noise``)."""
    s = torch.as_tensor(noise_std, dtype=torch.float32, device=device).reshape(-1)
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError(f"noise_std must be finite and >= 0 (got {s.tolist()[:4]})")
    return s.expand(batch).reshape(batch, 1, 1) ** 2


def _sample_count(A) -> torch.Tensor:
    """``count(M)`` per batch item, ``(B|1, 1, 1)``: measured k-space samples per coil (SENSE) or measured pixels
    (inpainting)."""
    if isinstance(A, SenseOp):
        H, W = A.maps.shape[-2:]
        return A.mask.expand(A.mask.shape[0], 1, H, W).flatten(1).sum(1).reshape(-1, 1, 1)
    return A.mask.flatten(1).sum(1).reshape(-1, 1, 1)


def normal_diagonal(A) -> torch.Tensor:
    """The diagonal of ``A^H A`` per pixel, ``(B|1, H, W)``: ``sum_c |S_c|^2 count(M) / (H W)`` for SENSE (the
    diagonal of ``F^H M F`` is ``count(M) / (H W)``), the 0/1 mask itself for inpainting."""
    if isinstance(A, SenseOp):
        H, W = A.maps.shape[-2:]
        return A.maps.abs().pow(2).sum(1) * _sample_count(A) / (H * W)
    return A.mask.float()


def measured_entries(A) -> torch.Tensor:
    """``m``, the number of measured entries per batch item (coils x samples for SENSE), ``(B|1, 1, 1)``."""
    return _sample_count(A) * (A.maps.shape[1] if isinstance(A, SenseOp) else 1)


def measured_counts(A) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, tr(A^H A))`` per batch item, ``(B, 1, 1)``: :func:`measured_entries` and the trace of the normal
    operator (the sum of :func:`normal_diagonal`)."""
    return measured_entries(A), normal_diagonal(A).flatten(1).sum(1).reshape(-1, 1, 1)


def _excess_residual_energy(r: torch.Tensor, A, noise_var: torch.Tensor) -> torch.Tensor:
    """``||r||^2 - m s^2`` per batch item, ``(B, 1, 1)``: the residual energy the noise does not explain, which
    the moment matches below equate to ``tr(A C_t A^H)``."""
    return r.abs().pow(2).flatten(1).sum(1).reshape(-1, 1, 1) - measured_entries(A) * noise_var


def residual_error_variance(r: torch.Tensor, A, noise_var: torch.Tensor, floor) -> torch.Tensor:
    """Moment estimate of the denoiser's error variance per complex pixel from the data residual
    ``r = y - A D = A (x0 - D) + n``: ``E||r||^2 = tr(A C_t A^H) + m s^2``, so with ``C_t = v I``
    ``v = (||r||^2 - m s^2) / tr(A^H A)``, at least ``floor`` (the ideal denoiser's :func:`error_variance`).
    Unlike the formula it sees an imperfect network, and an ambient denoiser's error that does not vanish
    as ``sigma -> 0`` (it saw only ``M~``). ``(B, 1, 1)``."""
    _, tr = measured_counts(A)
    return (_excess_residual_energy(r, A, noise_var) / tr.clamp_min(1e-12)).clamp_min(float(floor))


def local_error_variance(D: torch.Tensor, r: torch.Tensor, A, noise_var: torch.Tensor, floor,
                         window: int = 3, spread: float = 0.1) -> torch.Tensor:
    """Per-pixel error variance ``v_p = c (P_p + spread mean(P))`` of the denoised estimate ``D (B, H, W)``,
    ``P`` the ``window x window`` local mean of ``|D|^2``: the error is taken to scale with the local signal
    power, as a Wiener filter's does (small where the estimate is empty background, large on the object).
    ``c`` by the moment match of :func:`residual_error_variance` with ``C_t = diag(v)``:
    ``E||r||^2 = sum_p v_p (A^H A)_pp + m s^2``. At least ``floor``. ``(B, H, W)``."""
    P = torch.nn.functional.avg_pool2d(D.abs().pow(2)[:, None], window, 1, window // 2, count_include_pad=False)[:, 0]
    w = P + spread * P.mean((-2, -1), keepdim=True)
    tr_w = (w * normal_diagonal(A)).flatten(1).sum(1).reshape(-1, 1, 1)
    return (_excess_residual_energy(r, A, noise_var) / tr_w.clamp_min(1e-30) * w).clamp_min(float(floor))


def dc_weight(sigma, noise_var: torch.Tensor | None, sigma_data: float = 0.5, error_var=None):
    """The prior's weight ``mu`` in ``D_dc = argmin ||A v - y||^2 + mu ||v - D||^2``.

    Noise-aware (``noise_var = s^2``, ``(B, 1, 1)``): the MAP step for ``y ~ CN(A v, s^2 I)`` and
    ``v ~ CN(D, v_t I)``, ``argmin ||A v - y||^2 / s^2 + ||v - D||^2 / v_t``, i.e. ``mu = s^2 / v_t``
    (``v_t = error_var`` if given, else :func:`error_variance` at ``sigma``): the data never count more than
    the noise allows, and at low ``sigma`` the prior's estimate dominates. ``noise_var=None``: the legacy
    schedule ``mu = sigma^2`` (noise ignored; the data are fitted exactly as ``sigma -> 0``)."""
    if noise_var is None:
        return float(sigma) ** 2
    v = error_variance(sigma, sigma_data) if error_var is None else error_var
    return (noise_var / v).float()
