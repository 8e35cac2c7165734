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
* :func:`edm_loss`: plain EDM denoising of images ``x`` (the FS-EDM oracle on references, the naive
  ZF-/L1-EDM baselines on zero-filled / L1-wavelet reconstructions of undersampled data, or an EM round's
  M-step on posterior samples of the training scans).

The trainer uses them through one object per ``loss.kind`` (:func:`build_loss`), each called as
``loss(denoiser, batch, generator) -> (B,)``: it draws ``sigma``, then ``M~`` (:class:`FurtherMask`), then the
noise ``eta``, all from the step's ``generator`` in that order, and calls the function above.
"""

from __future__ import annotations

import torch

from .corruption import Corruption
from .distributed import derived_seed
from .errors import ConfigError
from .fft import fft2c
from .operators import SenseOp


def sample_sigma(batch: int, *, P_mean: float = -1.2, P_std: float = 1.2, generator=None, device=None) -> torch.Tensor:
    """EDM's log-normal training noise levels, ``(B,)``."""
    n = torch.randn(batch, generator=generator, device=device)
    return torch.exp(P_mean + P_std * n)


def edm_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


WEIGHTS = ("edm", "effective")


def loss_weight(denoiser, sigma: torch.Tensor, weight: str = "edm") -> torch.Tensor:
    """The loss weight (config ``loss.weight``): ``"edm"`` is EDM's ``lambda(sigma)`` at the drawn noise level;
    ``"effective"`` is ``lambda(sigma_eff)``, EDM's weight at the level the preconditioning assumes,
    ``sigma_eff = denoiser.sigma_eff(sigma)`` (``sqrt(sigma^2 + sigma_view^2)``, ``networks.EDMDenoiser``).
    The two agree when ``sigma_view = 0``; the minimiser is the same, only the emphasis over noise levels
    differs (docs/training.md says which is trained by default and why).

    Every denoiser the losses take has ``sigma_data`` and ``sigma_eff``; one without is an error (a wrapper
    that hid ``sigma_eff`` once trained models with an undocumented weight)."""
    sigma_eff = denoiser.sigma_eff  # required whichever weight is used
    if weight == "edm":
        return edm_weight(sigma, denoiser.sigma_data)
    if weight == "effective":
        return edm_weight(sigma_eff(sigma), denoiser.sigma_data)
    raise ValueError(f"loss weight must be one of {', '.join(WEIGHTS)}, got {weight!r}")


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
                        domain: str = "kspace", weight: str = "edm", generator=None) -> torch.Tensor:
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
    return loss_weight(denoiser, sigma, weight) * r.abs().pow(2).flatten(1).sum(1) / (H * W)


def ambient_image_loss(denoiser, y: torch.Tensor, mask: torch.Tensor, further_mask: torch.Tensor,
                       sigma: torch.Tensor, *, eta: torch.Tensor | None = None, weight: str = "edm",
                       generator=None) -> torch.Tensor:
    """Image-domain ambient loss (pixel or box corruption), ``(B,)``: ``y = M x0`` ``(B, H, W)``,
    ``D = denoiser(M~ (y + sigma eta), sigma, M~)``, loss ``lambda ||M (D - y)||^2 / (H W)``."""
    if eta is None:
        eta = _complex_noise(y, generator)
    x_in = further_mask * (y + sigma[:, None, None] * eta)
    D = denoiser(x_in, sigma, further_mask)
    H, W = y.shape[-2:]
    return loss_weight(denoiser, sigma, weight) * (mask * (D - y)).abs().pow(2).flatten(1).sum(1) / (H * W)


def edm_loss(denoiser, x: torch.Tensor, sigma: torch.Tensor, *, eta: torch.Tensor | None = None,
             weight: str = "edm", generator=None) -> torch.Tensor:
    """Plain EDM loss on images ``x (B, H, W)``, ``(B,)``: ``lambda ||D(x + sigma eta; sigma) - x||^2 / (H W)``.

    The denoiser gets no mask (its mask channel, if any, reads as fully observed)."""
    if eta is None:
        eta = _complex_noise(x, generator)
    D = denoiser(x + sigma[:, None, None] * eta, sigma, None)
    H, W = x.shape[-2:]
    return loss_weight(denoiser, sigma, weight) * (D - x).abs().pow(2).flatten(1).sum(1) / (H * W)


# ----------------------------------------------------------------------------------------------
# The training losses as objects: loss(denoiser, batch, generator) -> (B,)


class FurtherMask:
    """``M~ = draw(M, generator)`` for a batch of training masks ``M``: redrawn every step from the step's
    generator (``redraw``), or fixed per slice, drawn from a generator seeded by
    ``derived_seed("fixed-further-mask", seed, slice index)`` (the step's generator is then not used)."""

    def __init__(self, draw, *, redraw: bool, seed: int):
        self.draw, self.redraw, self.seed = draw, bool(redraw), int(seed)

    def __call__(self, mask: torch.Tensor, index: torch.Tensor, generator) -> torch.Tensor:
        if self.redraw:
            return self.draw(mask, generator=generator)
        return torch.cat([self.draw(mask[i : i + 1], generator=torch.Generator(device=mask.device).manual_seed(
            derived_seed("fixed-further-mask", self.seed, int(index[i])))) for i in range(len(mask))])


class EDMLoss:
    """Plain EDM on ``batch["image"] (B, H, W)`` (:func:`edm_loss`): the FS-EDM oracle and the naive baselines."""

    def __init__(self, *, P_mean: float = -1.2, P_std: float = 1.2, weight: str = "edm"):
        self.P_mean, self.P_std, self.weight = float(P_mean), float(P_std), weight

    @classmethod
    def from_config(cls, loss, corruption, seed: int):
        return cls(P_mean=loss.P_mean, P_std=loss.P_std, weight=loss.weight)

    def sigma(self, like: torch.Tensor, generator) -> torch.Tensor:
        """``(B,)`` noise levels on ``like``'s device (:func:`sample_sigma`)."""
        return sample_sigma(len(like), P_mean=self.P_mean, P_std=self.P_std, generator=generator, device=like.device)

    def __call__(self, denoiser, batch: dict, generator) -> torch.Tensor:
        x = batch["image"]
        return edm_loss(denoiser, x, self.sigma(x, generator), weight=self.weight, generator=generator)


class AmbientKspaceLoss(EDMLoss):
    """:func:`ambient_kspace_loss` on ``batch["kspace"], ["mask"], ["maps"]``, ``M~`` from ``further``."""

    def __init__(self, further: FurtherMask, *, domain: str = "kspace", P_mean: float = -1.2, P_std: float = 1.2,
                 weight: str = "edm"):
        super().__init__(P_mean=P_mean, P_std=P_std, weight=weight)
        self.further, self.domain = further, domain

    @classmethod
    def from_config(cls, loss, corruption, seed: int):
        """``M~ = corruption.further(M)`` (``corruption.KspaceCorruption``: ``further_accel`` or ``delta``,
        the data's ACS block kept)."""
        return cls(FurtherMask(corruption.further, redraw=loss.redraw, seed=seed), domain=loss.domain,
                   P_mean=loss.P_mean, P_std=loss.P_std, weight=loss.weight)

    def __call__(self, denoiser, batch: dict, generator) -> torch.Tensor:
        y, mask = batch["kspace"], batch["mask"]
        sigma = self.sigma(y, generator)
        return ambient_kspace_loss(denoiser, y, mask, batch["maps"], self.further(mask, batch["index"], generator),
                                   sigma, domain=self.domain, weight=self.weight, generator=generator)


class AmbientImageLoss(EDMLoss):
    """:func:`ambient_image_loss` on ``batch["image"], ["mask"]``, ``M~`` from ``further``."""

    def __init__(self, further: FurtherMask, *, P_mean: float = -1.2, P_std: float = 1.2, weight: str = "edm"):
        super().__init__(P_mean=P_mean, P_std=P_std, weight=weight)
        self.further = further

    @classmethod
    def from_config(cls, loss, corruption, seed: int):
        """``M~ = corruption.further(M)`` (``corruption.ImageCorruption``: the data's corruption, further
        level ``loss.delta``)."""
        return cls(FurtherMask(corruption.further, redraw=loss.redraw, seed=seed), P_mean=loss.P_mean,
                   P_std=loss.P_std, weight=loss.weight)

    def __call__(self, denoiser, batch: dict, generator) -> torch.Tensor:
        y, mask = batch["image"], batch["mask"]
        sigma = self.sigma(y, generator)
        return ambient_image_loss(denoiser, y, mask, self.further(mask, batch["index"], generator), sigma,
                                  weight=self.weight, generator=generator)


LOSSES = {"ambient": AmbientKspaceLoss, "ambient_image": AmbientImageLoss, "oracle": EDMLoss, "naive_zf": EDMLoss,
          "naive_l1": EDMLoss, "em": EDMLoss}


def build_loss(loss, corruption: Corruption, seed: int) -> EDMLoss:
    """The loss object of ``loss.kind`` (``loss``: the config's ``loss`` section; ``corruption``: the run's
    :class:`corruption.Corruption`, whose ``further`` draws ``M~``; ``seed``: the run's seed, for fixed
    further masks)."""
    if loss.kind not in LOSSES:
        raise ConfigError(f"unknown loss.kind {loss.kind!r} (choose from {', '.join(LOSSES)})")
    return LOSSES[loss.kind].from_config(loss, corruption, seed)
