"""Training losses, each a small function of a denoiser ``D(x_in, sigma, mask)`` (see ``networks.EDMDenoiser``).

Noise levels follow EDM: ``sigma = exp(P_mean + P_std n)``, ``n ~ N(0, 1)``, weight
``lambda(sigma_eff)`` with ``lambda(s) = (s^2 + sigma_data^2) / (s sigma_data)^2`` and the denoiser's
``sigma_eff = sqrt(sigma^2 + sigma_view^2)`` (``= sigma`` for plain EDM, ``sigma_view = 0``). Every loss
returns one value per batch item, ``(B,)``: the squared error summed over the measured entries and divided
by ``H W`` (so that, fully sampled with ``sum_c |S_c|^2 = 1``, it is the per-pixel image MSE, as in EDM).

* :func:`ambient_kspace_loss` (Aali et al. 2025): ``lambda ||M F S D(A~^H A~ x_t) - y||^2`` from the
  measured k-space ``y = M F S x0`` only, with ``A~ x_t = M~ y + sigma M~ F S eta`` (``M~ <= M``);
* :func:`ambient_image_loss` (Daras et al. 2023, inpainting / block corruption): input ``M~ (y + sigma eta)``,
  loss ``lambda ||M (D - y)||^2`` with ``y = M x0`` an image;
* :func:`edm_loss`: plain EDM denoising of images ``x`` (the FS-EDM oracle on references, or the naive
  ZF-/L1-EDM baselines on zero-filled / L1-wavelet reconstructions of undersampled data).
"""

from __future__ import annotations

import torch

from .fft import fft2c
from .operators import SenseOp


def sample_sigma(batch: int, *, P_mean: float = -1.2, P_std: float = 1.2, generator=None, device=None) -> torch.Tensor:
    """EDM's log-normal training noise levels, ``(B,)``."""
    n = torch.randn(batch, generator=generator, device=device)
    return torch.exp(P_mean + P_std * n)


def edm_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def loss_weight(denoiser, sigma: torch.Tensor) -> torch.Tensor:
    """``lambda(sigma_eff)`` for ``denoiser``: EDM's weight at the noise level its preconditioning assumes,
    ``sigma_eff = denoiser.sigma_eff(sigma)`` (``sqrt(sigma^2 + sigma_view^2)``, see ``networks.EDMDenoiser``).

    Every denoiser the losses take has ``sigma_data`` and ``sigma_eff``; one without is an error, not a
    silent ``lambda(sigma)`` (a wrapper that hid ``sigma_eff`` once trained models with the wrong weight)."""
    return edm_weight(denoiser.sigma_eff(sigma), denoiser.sigma_data)


def _complex_noise(like: torch.Tensor, generator=None) -> torch.Tensor:
    """Circular complex Gaussian with unit variance per real component (EDM's ``eta`` on [Re, Im])."""
    re = torch.randn(like.shape, generator=generator, device=like.device)
    im = torch.randn(like.shape, generator=generator, device=like.device)
    return torch.complex(re, im)


def ambient_input(y: torch.Tensor, maps: torch.Tensor, further_mask: torch.Tensor, sigma: torch.Tensor,
                  eta: torch.Tensor) -> torch.Tensor:
    """The further-corrupted view ``A~^H A~ x_t = A~^H (M~ y + sigma M~ F S eta)``, ``(B, H, W)``, built from
    the measured k-space ``y (B, C, H, W)`` only (valid because ``M~ <= M``)."""
    noise_k = sigma[:, None, None, None] * fft2c(maps * eta[:, None])
    return SenseOp(maps, further_mask).adjoint(y + noise_k)


def ambient_kspace_loss(denoiser, y: torch.Tensor, mask: torch.Tensor, maps: torch.Tensor,
                        further_mask: torch.Tensor, sigma: torch.Tensor, *, eta: torch.Tensor | None = None,
                        domain: str = "kspace", generator=None) -> torch.Tensor:
    """Ambient k-space loss, ``(B,)``.

    ``y``: measured k-space ``(B, C, H, W)``, zero where ``mask`` is 0; ``mask``: training mask M
    (``(B, 1, W)`` or ``(B, H, W)``); ``further_mask``: ``M~ <= M``; ``maps``: ``(B, C, H, W)``;
    ``sigma``: ``(B,)``. ``D = denoiser(A~^H A~ x_t, sigma, M~)``.

    ``domain="kspace"``: ``lambda ||M F S D - y||^2`` (the measured lines of the full training mask M,
    not M~). ``domain="image"``: the reference code's form ``lambda ||A^H (A D - y)||^2 = lambda ||A^H A (D - x0)||^2``;
    both have the minimiser ``E[x0 | A~ x_t, A~]``.
    """
    if eta is None:
        eta = _complex_noise(y[:, 0], generator)
    x_in = ambient_input(y, maps, further_mask, sigma, eta)
    D = denoiser(x_in, sigma, further_mask)
    A = SenseOp(maps, mask)
    r = A.forward(D) - y
    if domain == "image":
        r = A.adjoint(r)
    elif domain != "kspace":
        raise ValueError(f"domain must be 'kspace' or 'image', got {domain!r}")
    H, W = y.shape[-2:]
    return loss_weight(denoiser, sigma) * r.abs().pow(2).flatten(1).sum(1) / (H * W)


def ambient_image_loss(denoiser, y: torch.Tensor, mask: torch.Tensor, further_mask: torch.Tensor,
                       sigma: torch.Tensor, *, eta: torch.Tensor | None = None, generator=None) -> torch.Tensor:
    """Image-domain ambient loss (pixel or box corruption), ``(B,)``: ``y = M x0`` ``(B, H, W)``,
    ``D = denoiser(M~ (y + sigma eta), sigma, M~)``, loss ``lambda ||M (D - y)||^2 / (H W)``."""
    if eta is None:
        eta = _complex_noise(y, generator)
    x_in = further_mask * (y + sigma[:, None, None] * eta)
    D = denoiser(x_in, sigma, further_mask)
    H, W = y.shape[-2:]
    return loss_weight(denoiser, sigma) * (mask * (D - y)).abs().pow(2).flatten(1).sum(1) / (H * W)


def edm_loss(denoiser, x: torch.Tensor, sigma: torch.Tensor, *, eta: torch.Tensor | None = None,
             generator=None) -> torch.Tensor:
    """Plain EDM loss on images ``x (B, H, W)``, ``(B,)``: ``lambda ||D(x + sigma eta; sigma) - x||^2 / (H W)``.

    The denoiser gets no mask (its mask channel, if any, reads as fully observed)."""
    if eta is None:
        eta = _complex_noise(x, generator)
    D = denoiser(x + sigma[:, None, None] * eta, sigma, None)
    H, W = x.shape[-2:]
    return loss_weight(denoiser, sigma) * (D - x).abs().pow(2).flatten(1).sum(1) / (H * W)
