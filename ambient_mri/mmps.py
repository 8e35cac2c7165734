"""Moment Matching Posterior Sampling (MMPS; Rozet, Andry, Lanusse, Louppe, NeurIPS 2024, arXiv 2405.13712).

Notation as in :mod:`ambient_mri.sampling`: ``x_t = x0 + sigma eta`` with ``E[eta eta^H] = 2 I`` (real and
imaginary parts standard normal), a denoiser ``D(x_t) = D(view(x_t); sigma, M~)``
(:func:`sampling.denoise`), measurements ``y = A x0 + n`` with ``E[n n^H] = s^2 I`` (``noise_std = s``).

MMPS replaces ``p(x0 | x_t)`` by the Gaussian with its first two moments, both given by the denoiser
(Tweedie): ``E[x0 | x_t] = D(x_t)`` and ``Cov[x0 | x_t] = 2 sigma^2 J`` with ``J = dD/dx_t`` (``sigma^2 J_R``
per real channel, ``J_R`` the real ``2n x 2n`` Jacobian; the 2 is this package's ``E|eta|^2 = 2``). Then
``(x0, y)`` given ``x_t`` is jointly Gaussian, and the posterior denoiser is

    E[x0 | x_t, y] ~ D + 2 sigma^2 J^T A^H (s^2 I + 2 sigma^2 A J^T A^H)^-1 (y - A D),

exact when ``p(x0)`` is Gaussian and ``D`` is the exact ``E[x0 | x_t]``. ``J^T v`` is one vector-Jacobian
product through the network (``torch.autograd.grad``); the system in the measurement space, symmetric
positive definite when ``J`` is a covariance (symmetric, positive: an exact clean denoiser's is), is
solved by a few conjugate-gradient steps (:func:`operators.conjugate_gradient`).

Complex data: torch's VJP of a complex output with cotangent ``w`` is ``J_R^T w`` in the real two-channel
view (for a complex-linear ``D(x) = W x`` that is ``W^H w``; ``tests/test_mmps.py`` checks both against an
explicit Jacobian), and the CG above uses real step sizes ``Re <p, Op p>``, i.e. it is CG on the real
representation: both are right for a network that treats real and imaginary parts as two channels.
"""

from __future__ import annotations

import torch

from .error_variance import noise_variance
from .errors import AmbientMRIError
from .operators import conjugate_gradient
from .sampling import View, denoise, prior_sample

NOISE_FLOOR = 1e-4  # smallest noise std used in the MMPS system (prepared units, images of magnitude ~1)


def measurement_noise_var(noise_std, y: torch.Tensor, floor: float = NOISE_FLOOR) -> torch.Tensor:
    """``max(s^2, floor^2)`` shaped to broadcast against ``y (B, ...)``: ``(B, 1, ..., 1)`` in ``y``'s real dtype.

    With ``s = 0`` the MMPS system ``2 sigma^2 A J^T A^H`` alone is singular wherever the denoiser is sure
    (``J ~ 0``); the floor keeps it positive definite and changes the result only where the noise is
    below ``floor`` anyway. ``None`` is an error (resolve unknown noise first, ``recon.resolve_noise``)."""
    if noise_std is None:
        raise ValueError("mmps needs noise_std (the measurement noise std s; 0 means noiseless)")
    s2 = noise_variance(noise_std, y.shape[0], y.device).reshape(-1, *(1,) * (y.ndim - 1))
    return s2.clamp_min(floor**2).to(y.real.dtype)


def tweedie_vjp(denoiser, view, x: torch.Tensor, sigma, A):
    """One forward pass through ``A D(x_t)``: returns ``D (B, H, W)``, ``A D`` (both detached) and the map
    ``JtAh: w -> J^T A^H w`` (``w`` shaped like ``y`` -> ``(B, H, W)``), one VJP per call; the graph is kept
    until ``JtAh(w, last=True)``. ``J^T`` is torch's VJP: ``J_R^T`` in the real two-channel view (module
    docstring)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        D = denoise(denoiser, view, xg, sigma)
        AD = A.forward(D)

    def JtAh(w: torch.Tensor, last: bool = False) -> torch.Tensor:
        (g,) = torch.autograd.grad(AD, xg, grad_outputs=w.to(AD.dtype), retain_graph=not last)
        return g

    return D.detach(), AD.detach(), JtAh


def mmps_mean(denoiser, view, x: torch.Tensor, sigma, y: torch.Tensor, A, *, noise_std, cg_iters: int = 5,
              noise_floor: float = NOISE_FLOOR) -> torch.Tensor:
    """One MMPS posterior-denoiser evaluation, ``E[x0 | x_t, y]`` ``(B, H, W)`` (module docstring):

    ``r = y - A D``; ``w = (s^2 I + 2 sigma^2 A J^T A^H)^-1 r`` by ``cg_iters`` CG steps from 0;
    ``D + 2 sigma^2 J^T A^H w``.

    ``x (B, H, W)``: the iterate ``x_t``; ``sigma``: its noise level (scalar); ``y``: the measurements
    (``(B, C, H, W)`` for ``SenseOp``, ``(B, H, W)`` for ``InpaintOp``; values off the mask are ignored);
    ``noise_std``: ``s``, a float or ``(B,)``, floored at ``noise_floor`` (:func:`measurement_noise_var`).
    Cost: one network forward pass and ``cg_iters + 1`` VJPs. ``cg_iters = 0`` returns ``D``."""
    s2 = measurement_noise_var(noise_std, y, noise_floor)
    c = 2 * float(sigma) ** 2  # Cov[x0 | x_t] = c J
    D, AD, JtAh = tweedie_vjp(denoiser, view, x, sigma, A)
    if cg_iters <= 0:
        return D
    with torch.no_grad():
        r = A.mask * y - AD
        w = conjugate_gradient(lambda v: s2 * v + c * A.forward(JtAh(v)), r, iters=cg_iters)
        return D + c * JtAh(w, last=True)


def mmps(denoiser, view, y: torch.Tensor, A, *, noise_std, steps: int = 25, sigma_min: float = 0.004,
         sigma_max: float = 10.0, rho: float = 7.0, cg_iters: int = 5, noise_floor: float = NOISE_FLOOR,
         generator=None) -> torch.Tensor:
    """MMPS (Rozet et al. 2024): the EDM probability-flow ODE of the posterior, driven by the MMPS posterior
    denoiser ``D_y(x, sigma) = E[x0 | x_t, y]`` (:func:`mmps_mean`), integrated by the package's Heun
    sampler over the EDM schedule (:func:`sampling.prior_sample` with ``D_y`` as its denoiser):

    ``d = (x_i - D_y(x_i, sigma_i)) / sigma_i``, ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d``, with
    Heun's correction except on the last step to ``sigma = 0`` (which returns ``D_y`` at ``sigma_min``).

    Same conventions as :func:`sampling.dps_noise_aware`: ``y (B, C, H, W)`` and ``A = SenseOp`` (or
    ``(B, H, W)`` and ``InpaintOp``), ``view`` the model's view, ``noise_std`` ``s`` (float or ``(B,)``,
    floored at ``noise_floor``), ``generator`` seeds the initial noise (the ODE is deterministic after it).
    Returns the final sample ``(B, H, W)`` complex64. Cost per sample: :func:`nfe` VJPs, plus one forward
    pass per evaluation (``2 steps - 1``).

    The system is positive definite only if ``J`` is (close to) a covariance, symmetric and positive; an
    ambient denoiser's Jacobian is not (it conditions on ``A~ x_t``, not ``x_t``: Tweedie's covariance
    does not apply), its system is indefinite at mid noise levels, and CG can then diverge. A chain that
    ends non-finite raises :class:`errors.AmbientMRIError` naming its batch items.
    """

    def D_y(x_in, sigma, mask=None):  # the posterior denoiser, as prior_sample calls a denoiser
        return mmps_mean(denoiser, view, x_in, sigma.reshape(-1)[0], y, A, noise_std=noise_std, cg_iters=cg_iters,
                         noise_floor=noise_floor)

    x = prior_sample(D_y, View("clean"), A.adjoint(y).shape, steps=steps, sigma_min=sigma_min, sigma_max=sigma_max,
                     rho=rho, generator=generator, device=y.device)
    bad = ~torch.isfinite(torch.view_as_real(x)).flatten(1).all(1)
    if bad.any():
        items = bad.nonzero().flatten().tolist()[:8]
        raise AmbientMRIError(f"mmps diverged (non-finite result) for batch items {items}: "
                              "the denoiser's Jacobian does not act as a positive-definite covariance in the CG "
                              "system (as for an ambient denoiser); use another method")
    return x


def nfe(steps: int, cg_iters: int = 5) -> int:
    """VJPs per sample of :func:`mmps`: ``(2 steps - 1) x (cg_iters + 1)`` (Heun); each of the ``2 steps - 1``
    evaluations also takes one forward pass."""
    return (2 * steps - 1) * (cg_iters + 1)
