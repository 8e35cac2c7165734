"""Samplers: prior (fixed-mask Heun), A-DPS, A-OS, FS-DPS, and our fast DC sampler, batched over samples.

Notation (design.md section 6): EDM schedule ``sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho``
followed by ``sigma_N = 0``; a denoiser ``D(x_in; sigma, M~)`` (``networks.EDMDenoiser``); the model's
*view* of an iterate, ``x_in = view(x)``: ``A~^H A~ x = S^H F^-1 M~ F S x`` for k-space ambient models
(``M~`` drawn once from the training further-mask distribution and held fixed, independent of the test
mask), ``M~ * x`` for image-domain ambient models, ``x`` itself for oracle/naive models.
Measurements ``y = A x0 + n`` ``(B, C, H, W)`` with test operator ``A = M F S`` (``operators.SenseOp``) and
complex measurement noise ``E|n|^2 = s^2`` per k-space sample and coil (``noise_std = s``, prepared units).
Noise convention of the diffusion: ``x_sigma = x0 + sigma eta`` with real and imaginary parts of ``eta``
standard normal (``E|eta|^2 = 2``), as in EDM with two real channels.
All samplers take a ``torch.Generator`` so one seed gives one posterior sample per batch item.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .checkpoint import load_denoiser
from .corruption import Corruption, from_dict
from .distributed import resolve_device
from .error_variance import (ERROR_VARS, dc_weight, error_variance, local_error_variance, noise_variance,
                             residual_error_variance)
from .errors import AmbientMRIError, ConfigError
from .fsutil import atomic_path, make_dir, sha256_file, write_json
from .operators import InpaintOp, SenseOp, conjugate_gradient

DC_CG_ITERS = 20  # chosen on the demo and SIAT validation splits (docs/recon.md); 5 until 2026-12-06
DC_ERROR_VAR = "local"  # chosen on the demo and SIAT validation splits (docs/recon.md); "residual" until 2026-12-06
METHODS = ("adps", "aos", "fsdps", "dc", "adps-noise", "fsdps-noise", "mmps")
MMPS_CG_ITERS = 5  # mmps.mmps's default
FURTHER = ("independent", "within")  # how M~ is drawn: from the training distribution, or inside the test mask


def edm_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device=None) -> torch.Tensor:
    """``steps`` EDM noise levels from ``sigma_max`` down to ``sigma_min``, then a final 0: ``(steps + 1,)``."""
    i = torch.arange(steps, dtype=torch.float64, device=device)
    s = (sigma_max ** (1 / rho) + i / max(steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)]).float()


def _randn_complex(shape, generator, device):
    re = torch.randn(shape, generator=generator, device=device)
    im = torch.randn(shape, generator=generator, device=device)
    return torch.complex(re, im)


class View:
    """The model's view of an image ``x (B, H, W)``, and the conditioning mask it is given."""

    def __init__(self, domain: str, further_mask: torch.Tensor | None = None, maps: torch.Tensor | None = None):
        self.domain, self.mask = domain, further_mask
        if domain == "kspace":
            if maps is None:  # single-coil image space: A~^H A~ x = F^-1 M~ F x
                maps = torch.ones((further_mask.shape[0], 1, 1, 1), dtype=torch.complex64, device=further_mask.device)
            self.op = SenseOp(maps, further_mask)
        elif domain == "image":
            self.op = InpaintOp(further_mask, like=torch.zeros((), dtype=torch.complex64, device=further_mask.device))
        elif domain == "clean":
            self.op, self.mask = None, None
        else:
            raise ValueError(f"unknown model domain {domain!r}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.op is None else self.op.normal(x)


def model_view(meta: dict, batch: int, *, shape, maps=None, seed: int = 0, device=None, within=None) -> View:
    """Draw the fixed further mask for ``batch`` chains and build the view.

    ``meta["corruption"]``: the model's :class:`corruption.Corruption` (or its recorded dict), used at the
    test matrix ``shape``. ``within=None`` (published A-DPS): ``M~ = corruption.draw(batch, seed)``, from the
    training distribution independently of the test mask (for data with their own masks, ``M`` from the
    bank of training masks). ``within=M_test``: ``corruption.within(M_test, batch, seed)``, the training
    further-corruption rule applied to the test mask, so ``M~ <= M_test``. ``maps (batch, C, H, W)``: the
    coil maps of the k-space view ``S^H F^-1 M~ F S``; None means single-coil (``S = 1``)."""
    corruption = from_dict(meta["corruption"])
    if corruption.domain == "clean":
        return View("clean")
    corruption = corruption.at(shape)
    fm = corruption.draw(batch, seed) if within is None else corruption.within(within, batch, seed)
    return View(corruption.domain, fm.to(device), maps)


def make_operator(y: torch.Tensor, maps: torch.Tensor | None, mask) -> SenseOp | InpaintOp:
    """The test operator: ``SenseOp(maps, mask)`` for k-space ``y (B, C, H, W)``, or ``InpaintOp(mask)`` for an
    image-domain measurement ``y (B, H, W)`` (``maps`` None)."""
    if maps is None:
        return InpaintOp(mask, like=y)
    return SenseOp(maps, mask)


def denoise(denoiser, view: View, x: torch.Tensor, sigma) -> torch.Tensor:
    """``D(view(x); sigma, M~)``."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
    return denoiser(view(x), s, view.mask)


@torch.no_grad()
def prior_sample(denoiser, view: View, shape, *, steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Unconditional samples ``(B, H, W)`` with the fixed-mask Heun sampler (seed paper):
    ``d = (x - D(view(x); sigma)) / sigma``, Heun's 2nd-order correction except on the last step."""
    B = view.mask.shape[0] if view.mask is not None else shape[0]
    H, W = shape[-2:]
    t = edm_sigmas(steps, sigma_min, sigma_max, rho, device)
    x = _randn_complex((B, H, W), generator, device) * t[0]
    for i in range(steps):
        s, s_next = t[i], t[i + 1]
        d = (x - denoise(denoiser, view, x, s)) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d2 = (x_next - denoise(denoiser, view, x_next, s_next)) / s_next
            x_next = x + (s_next - s) * 0.5 * (d + d2)
        x = x_next
    return x


def adps(denoiser, view: View, y: torch.Tensor, A: SenseOp, *, steps: int = 500, sigma_min: float = 0.004,
         sigma_max: float = 10.0, rho: float = 7.0, step_size: float = 1.0, generator=None) -> torch.Tensor:
    """A-DPS (Aali et al. 2025), exactly as published: Euler over the EDM schedule with a normalised DPS step
    and the gradient taken through the network,

    ``D = D(view(x_i); sigma_i)``, ``r = y - A D``,
    ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (x_i - D) / sigma_i - (l / ||r||) grad_{x_i} ||r||^2``.

    Used with an oracle model (``view`` = identity) this is FS-DPS. Returns the last denoised estimate
    ``(B, H, W)``; ``steps`` network evaluations.
    """
    t = edm_sigmas(steps, sigma_min, sigma_max, rho, y.device)
    x = _randn_complex(A.adjoint(y).shape, generator, y.device) * t[0]
    for i in range(steps):
        s, s_next = t[i], t[i + 1]
        x = x.detach().requires_grad_(True)
        D = denoise(denoiser, view, x, s)
        r = y - A.forward(D)
        rnorm2 = r.abs().pow(2).flatten(1).sum(1)
        (grad,) = torch.autograd.grad(rnorm2.sum(), x)
        with torch.no_grad():
            step = (step_size / rnorm2.sqrt().clamp_min(1e-12))[:, None, None]
            x = x + (s_next - s) * (x - D) / s - step * grad
            last = D
    return last.detach()


def dps_noise_aware(denoiser, view: View, y: torch.Tensor, A: SenseOp, *, noise_std, steps: int = 500,
                    sigma_min: float = 0.004, sigma_max: float = 10.0, rho: float = 7.0, step_size: float = 1.0,
                    generator=None) -> torch.Tensor:
    """Noise-aware DPS (ours; FS-DPS / A-DPS with the likelihood step sized by the noise, not normalised).

    The conditional probability-flow ODE ``dx/dsigma = (x - D)/sigma - sigma grad_x log p(y | x_sigma)``
    with DPS's Gaussian approximation ``p(y | x_sigma) ~ CN(A D, (s^2 + v_t) I)`` (``v_t``:
    :func:`error_variance`, ``s``: ``noise_std``), one Euler step per ``sigma_i``:

    ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (x_i - D) / sigma_i
               - l (sigma_i - sigma_{i+1}) sigma_i / (s^2 + v_t) grad_{x_i} ||y - A D||^2``,

    ``D = D(view(x_i); sigma_i)``, gradient through the network; ``l = step_size`` (1 = the ODE itself).
    Unlike the published normalised step ``l / ||r||``, the data weight stays bounded by ``1 / s^2`` as
    ``sigma -> 0``, so the chain does not fit the measurement noise. Returns the last denoised estimate.
    """
    t = edm_sigmas(steps, sigma_min, sigma_max, rho, y.device)
    x = _randn_complex(A.adjoint(y).shape, generator, y.device) * t[0]
    s2 = noise_variance(noise_std, x.shape[0], y.device)
    sd = float(getattr(denoiser, "sigma_data", 0.5))
    for i in range(steps):
        s, s_next = t[i], t[i + 1]
        x = x.detach().requires_grad_(True)
        D = denoise(denoiser, view, x, s)
        r = y - A.forward(D)
        (grad,) = torch.autograd.grad(r.abs().pow(2).sum(), x)
        with torch.no_grad():
            w = step_size * float(s - s_next) * float(s) / (s2 + float(error_variance(s, sd)))
            x = x + (s_next - s) * (x - D) / s - w * grad
            last = D
    return last.detach()


@torch.no_grad()
def aos(denoiser, y: torch.Tensor, A: SenseOp, *, domain: str = "kspace", sigma: float = 0.003) -> torch.Tensor:
    """A-OS, one step: ``x = D(A^H y; sigma = 0.003)`` conditioned on the TEST mask (in distribution only
    when the test acceleration is at least the training ``R~``). One network evaluation."""
    x_in = A.adjoint(y)
    mask = A.mask[:, 0] if isinstance(A, SenseOp) else A.mask
    mask = mask.expand(x_in.shape[0], *mask.shape[-2:])
    s = torch.full((x_in.shape[0],), sigma, device=y.device)
    return denoiser(x_in, s, mask if domain != "clean" else None)


def dc_sampler(denoiser, view: View, y: torch.Tensor, A: SenseOp, *, steps: int = 25, sigma_min: float = 0.004,
               sigma_max: float = 10.0, rho: float = 7.0, cg_iters: int = DC_CG_ITERS, lam: float | None = None,
               noise_std=None, error_var: str = DC_ERROR_VAR, churn: float = 0.0, heun: bool = True,
               window: int = 3, spread: float = 0.1, generator=None) -> torch.Tensor:
    """Ours: EDM Heun with data consistency by a few CG steps instead of back-propagation (DDS-style).

    Each evaluation replaces the denoised estimate ``D`` by ``D_dc = argmin ||A v - y||^2 + mu ||v - D||^2``,
    approximately (``cg_iters`` CG steps started at ``D``; the default 20 was chosen on validation data, 5 left the
    step unconverged: docs/recon.md), then takes the Heun step with
    ``d = (x - D_dc) / sigma``. ``mu``: ``lam`` if given (fixed), else :func:`dc_weight` — ``s^2 / v_t``
    with ``noise_std = s`` (a float or ``(B,)``; 0 = exact projection) and ``v_t`` from ``error_var``:
    ``local`` (default, :data:`DC_ERROR_VAR`): per pixel (:func:`local_error_variance` with ``window``,
    ``spread``), ``D_dc = argmin ||A v - y||^2 / s^2 + sum_p |v_p - D_p|^2 / v_p``, solved as ``D + h u`` with
    ``h = v^(1/2)``, ``(h A^H A h + s^2) u = h A^H (y - A D)`` (the ``mu`` form's iterates when ``v`` is
    uniform); ``residual`` (:func:`residual_error_variance`) or ``ideal`` (:func:`error_variance`), one value
    per slice; or the legacy ``sigma_i^2`` when ``noise_std`` is None. ``churn`` > 0 adds EDM's stochastic
    noise injection.
    No gradients through the network; ``2 steps - 1`` network evaluations with Heun. Returns the final
    data-consistent estimate.
    """
    if error_var not in ERROR_VARS:
        raise ValueError(f"unknown error_var {error_var!r} (choose from {', '.join(ERROR_VARS)})")
    t = edm_sigmas(steps, sigma_min, sigma_max, rho, y.device)
    rhs0 = A.adjoint(y)
    y_meas = A.mask * y  # raw test files may hold values off the mask
    s2 = None if noise_std is None else noise_variance(noise_std, rhs0.shape[0], y.device)
    sd = float(getattr(denoiser, "sigma_data", 0.5))

    def D_dc(x, s):
        D = denoise(denoiser, view, x, s)
        if cg_iters <= 0:
            return D
        if lam is None and s2 is not None and error_var == "local":
            r = y_meas - A.forward(D)
            h = local_error_variance(D, r, A, s2, error_variance(s, sd), window, spread).sqrt().to(D.dtype)
            u = conjugate_gradient(lambda u: h * A.normal(h * u) + s2 * u, h * A.adjoint(r), iters=cg_iters)
            return D + h * u
        if lam is not None:
            mu = lam
        elif s2 is not None and error_var == "residual":
            v = residual_error_variance(y_meas - A.forward(D), A, s2, error_variance(s, sd))
            mu = dc_weight(s, s2, sd, v)
        else:
            mu = dc_weight(s, s2, sd)
        return conjugate_gradient(lambda v: A.normal(v) + mu * v, rhs0 + mu * D, x0=D, iters=cg_iters)

    with torch.no_grad():
        x = _randn_complex(rhs0.shape, generator, y.device) * t[0]
        last = None
        for i in range(steps):
            s, s_next = t[i], t[i + 1]
            if churn > 0:
                gamma = min(churn / steps, 2**0.5 - 1)
                s_hat = s * (1 + gamma)
                x = x + (s_hat**2 - s**2).sqrt() * _randn_complex(x.shape, generator, y.device)
                s = s_hat
            last = D_dc(x, s)
            d = (x - last) / s
            x_next = x + (s_next - s) * d
            if heun and s_next > 0:
                d2 = (x_next - D_dc(x_next, s_next)) / s_next
                x_next = x + (s_next - s) * 0.5 * (d + d2)
            x = x_next
        return last if s_next > 0 else x


@dataclass
class Posterior:
    """K posterior samples per scan: ``samples (K, B, H, W)``, their ``mean`` and per-pixel ``std`` of the
    complex samples (``std`` of the magnitude is ``mag_std``), network evaluations per sample, wall time."""

    samples: torch.Tensor
    nfe: int
    seconds: float

    @property
    def mean(self) -> torch.Tensor:
        return self.samples.mean(0)

    @property
    def std(self) -> torch.Tensor:
        return (self.samples - self.mean).abs().pow(2).mean(0).sqrt()

    @property
    def mag_std(self) -> torch.Tensor:
        return self.samples.abs().std(0, unbiased=False)


def nfe(method: str, steps: int, cg_iters: int = MMPS_CG_ITERS) -> int:
    """Network evaluations per sample (``mmps``: ``2 steps - 1`` forward passes, each followed by
    ``cg_iters + 1`` vector-Jacobian products)."""
    return {"adps": steps, "fsdps": steps, "adps-noise": steps, "fsdps-noise": steps, "aos": 1,
            "dc": 2 * steps - 1, "mmps": (2 * steps - 1) * (cg_iters + 2)}[method]


DEFAULT_STEPS = {"adps": 500, "fsdps": 500, "adps-noise": 500, "fsdps-noise": 500, "aos": 1, "dc": 25, "mmps": 25}
NOISE_AWARE = ("dc", "adps-noise", "fsdps-noise", "mmps")  # samplers that weight the data by the noise level


def posterior(method: str, denoiser, meta: dict, y: torch.Tensor, maps: torch.Tensor | None, mask, *,
              samples: int = 1, seed: int = 0, steps: int | None = None, noise_std=None,
              further: str = "independent", **kwargs) -> Posterior:
    """Run ``method`` in :data:`METHODS` on a batch of scans, ``K = samples`` chains per scan in one
    batch (scans repeated K times), one generator seeded by ``seed``.

    ``y``: k-space ``(B, C, H, W)`` with ``maps (B, C, H, W)``, or an image-domain measurement ``(B, H, W)``
    with ``maps=None`` (inpainting); ``mask`` broadcasts as in ``operators``. ``fsdps`` is ``adps`` with an
    oracle model (``meta["corruption"]["domain"] == "clean"``); ``adps-noise`` / ``fsdps-noise`` run
    :func:`dps_noise_aware`. ``noise_std``: ``s`` (float or ``(B,)``) for the noise-aware methods (``dc``,
    ``*-noise``, ``mmps``: :func:`mmps.mmps`; ignored by the published ``adps``/``fsdps``/``aos``); ``None`` gives ``dc`` its legacy
    weight. ``further``: ``independent`` (published: ``M~`` from the training distribution) or ``within``
    (``M~`` drawn inside the test mask, :func:`model_view`).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    if further not in FURTHER:
        raise ValueError(f"unknown further-mask rule {further!r} (choose from {', '.join(FURTHER)})")
    K, B = samples, y.shape[0]
    H, W = y.shape[-2:]
    dev = y.device
    rep = (K,) + (1,) * (y.ndim - 1)
    yk = y.repeat(*rep)
    mk = None if maps is None else maps.repeat(K, 1, 1, 1)
    m = torch.as_tensor(mask, device=dev)
    if m.ndim == 3 and m.shape[0] == B and B > 1:
        m = m.repeat(K, 1, 1)
    A = make_operator(yk, mk, m)
    noise_k = None
    if noise_std is not None and method in NOISE_AWARE:
        noise_k = torch.as_tensor(noise_std, dtype=torch.float32, device=dev).reshape(-1).expand(B).repeat(K)
    domain = from_dict(meta["corruption"]).domain
    g = torch.Generator(device=dev).manual_seed(int(seed))
    steps = steps or DEFAULT_STEPS[method]
    t0 = time.perf_counter()
    if method == "aos":
        out = aos(denoiser, yk, A, domain=domain)
    else:
        within = None
        if further == "within":
            within = A.mask[:, 0] if isinstance(A, SenseOp) else A.mask
        view = model_view(meta, B * K, shape=(H, W), maps=mk if domain == "kspace" else None, seed=seed, device=dev,
                          within=within)
        if method == "dc":
            out = dc_sampler(denoiser, view, yk, A, steps=steps, generator=g, noise_std=noise_k, **kwargs)
        elif method == "mmps":
            from .mmps import mmps  # mmps builds on this module (prior_sample, denoise), so it is imported here

            if noise_k is None:
                raise ValueError("--method mmps needs noise_std")
            out = mmps(denoiser, view, yk, A, steps=steps, generator=g, noise_std=noise_k, **kwargs)
        elif method in ("adps-noise", "fsdps-noise"):
            if noise_k is None:
                raise ValueError(f"--method {method} needs noise_std")
            out = dps_noise_aware(denoiser, view, yk, A, steps=steps, generator=g, noise_std=noise_k, **kwargs)
        else:
            out = adps(denoiser, view, yk, A, steps=steps, generator=g, **kwargs)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return Posterior(out.detach().reshape(K, B, H, W), nfe(method, steps, kwargs.get("cg_iters", MMPS_CG_ITERS)),
                     time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------
# Prior samples of a trained model (``ambient-mri sample`` and the trainer's sample grids)


def training_maps(data_root, n: int, *, shape=None, seed: int = 0) -> tuple:
    """Coil maps of ``n`` training slices drawn at random (seeded) from the prepared files in ``data_root``:
    ``(maps (n, C, H, W) complex64, [(file name, slice), ...])``. A missing folder, no readable ``maps``,
    or maps of another matrix than ``shape`` raise a one-line :class:`AmbientMRIError`."""
    root = Path(data_root)
    files = sorted(p for p in root.glob("*.h5") if not p.name.startswith(".")) if root.is_dir() else []
    counts = []
    for p in files:
        try:
            with h5py.File(p, "r") as f:
                if "maps" in f and f["maps"].ndim == 4:
                    counts.append((p, f["maps"].shape[0], f["maps"].shape))
        except (OSError, RuntimeError, KeyError, ValueError):
            continue
    if not counts:
        raise AmbientMRIError(f"{root}: no prepared files with coil maps (the prior sampler of a k-space model needs "
                              "the training maps: give --maps-from PREPARED_TRAIN_DIR)")
    if shape is not None and tuple(counts[0][2][-2:]) != tuple(shape):
        raise AmbientMRIError(f"{counts[0][0]}: coil maps are {tuple(counts[0][2][-2:])}, the model's matrix is "
                              f"{tuple(shape)}")
    index = [(p, s) for p, S, _ in counts for s in range(S)]
    pick = np.random.default_rng(int(seed)).integers(0, len(index), size=n)
    out, names = [], []
    for i in pick:
        p, s = index[int(i)]
        with h5py.File(p, "r") as f:
            m = f["maps"][s]
        if m.shape != counts[0][2][1:]:
            raise AmbientMRIError(f"{p}: coil maps of shape {m.shape} differ from {counts[0][2][1:]} in "
                                  f"{counts[0][0].name}")
        out.append(m)
        names.append((p.name, s))
    maps = torch.from_numpy(np.stack(out).astype(np.complex64))
    if not torch.isfinite(torch.view_as_real(maps)).all():
        raise AmbientMRIError(f"{root}: coil maps hold NaN or Inf")
    return maps, names


def draw_prior_samples(denoiser, corruption, n: int, *, steps: int = 18, seed: int = 0, batch: int | None = None,
                       device="cpu", progress: bool = False, maps=None):
    """``n`` prior samples ``(n, H, W)`` complex64 (CPU) and the further masks they used (``(n, h, W)`` bool;
    all ones for oracle/naive models).

    ``corruption``: the model's :class:`corruption.Corruption` (or its recorded dict). ``M~`` of sample ``i``
    is ``corruption.draw(n, seed)[i]``, held fixed over the steps; the noise comes from one
    ``torch.Generator(device)`` seeded with ``seed`` and consumed batch after batch (so the samples depend on
    ``batch``). Per batch of ``b`` samples this calls :func:`prior_sample` ``(denoiser, View(domain,
    M~[i:i+b]), (b, H, W), steps=steps, generator=g)`` (``kspace``: ``View("kspace", M~, maps[i:i+b])``, the
    view ``S^H F^-1 M~ F S x`` a k-space model was trained on; ``image``; ``clean``: ``View("clean")``).

    ``maps``: ``(n, C, H, W)`` coil maps for a k-space model (:func:`training_maps`). ``None`` means
    single-coil identity maps, correct only for a model trained on single-coil data.
    """
    try:
        corruption = from_dict(corruption)
        H, W = corruption.shape
        fmasks = corruption.draw(n, seed)
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise AmbientMRIError(f"cannot draw the training further masks of the recorded corruption "
                              f"({' '.join(str(e).split())[:200]})") from None
    domain = corruption.domain
    batch = batch or n
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(int(seed))
    out = []
    bar = tqdm(total=n, desc="prior samples", unit="img", disable=not progress, leave=False)
    with torch.no_grad():
        for start in range(0, n, batch):
            m = fmasks[start : start + batch].to(device)
            mb = None if maps is None or domain != "kspace" else maps[start : start + batch].to(device)
            view = View("clean") if domain == "clean" else View(domain, m.float(), mb)
            x = prior_sample(denoiser, view, (len(m), H, W), steps=steps, generator=g, device=device)
            out.append(x.detach().to("cpu", torch.complex64))
            bar.update(len(m))
    bar.close()
    return torch.cat(out), fmasks


def magnitude_grid(samples, ncol: int | None = None, pad: int = 2):
    """``(N, H, W)`` complex -> uint8 ``(rows (H + pad), cols (W + pad))`` grid of magnitudes, each image
    scaled by its own 99.5th percentile."""
    x = np.abs(np.asarray(samples))
    n, H, W = x.shape
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    grid = np.zeros((nrow * (H + pad) + pad, ncol * (W + pad) + pad), dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, ncol)
        scale = np.percentile(x[i], 99.5)
        img = np.clip(x[i] / scale, 0, 1) if scale > 0 and np.isfinite(scale) else np.zeros_like(x[i])
        grid[pad + r * (H + pad) : pad + r * (H + pad) + H, pad + c * (W + pad) : pad + c * (W + pad) + W] = img
    return (grid * 255 + 0.5).astype(np.uint8)


def save_grid(samples, path, ncol: int | None = None) -> Path:
    """Write :func:`magnitude_grid` as a PNG, atomically."""
    path = Path(path)
    with atomic_path(path, ".png.tmp") as tmp:
        Image.fromarray(magnitude_grid(samples, ncol)).save(tmp, format="PNG")
    return path


def sample_grid(denoiser, corruption, path, n: int, *, steps: int = 18, seed: int = 0, device="cpu",
                maps_from=None) -> Path:
    """Draw ``n`` prior samples of a model (:func:`draw_prior_samples`) and save their magnitude grid as a PNG
    at ``path``. A k-space model sees the coil maps of ``n`` training slices from the prepared folder
    ``maps_from`` (:func:`training_maps`, seeded by ``seed``), as ``ambient-mri sample`` does."""
    corruption = from_dict(corruption)
    maps = None
    if corruption.domain == "kspace":
        maps, _ = training_maps(maps_from, n, shape=corruption.shape, seed=seed)
    x, _ = draw_prior_samples(denoiser, corruption, n, steps=steps, seed=seed, device=device, maps=maps)
    return save_grid(x, path)


def write_outputs(out_dir, samples, fmasks, info: dict) -> dict:
    """``samples.png``, ``samples.npy``, ``samples.h5`` and ``sample.json`` in ``out_dir`` (atomic)."""
    out_dir = Path(out_dir)
    x = samples.numpy().astype(np.complex64)
    files = {"png": out_dir / "samples.png", "npy": out_dir / "samples.npy", "h5": out_dir / "samples.h5",
             "json": out_dir / "sample.json"}
    save_grid(x, files["png"])
    with atomic_path(files["npy"], ".npy.tmp") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, x)
    with atomic_path(files["h5"], ".h5.tmp") as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("samples", data=x)
            f.create_dataset("further_mask", data=fmasks.numpy().astype(bool))
            for k, v in info.items():
                f.attrs[k] = v if isinstance(v, (int, float, str)) else json.dumps(v)
    write_json(files["json"], dict(info, files={k: v.name for k, v in files.items()}))
    return files


def run_sample(checkpoint, n: int, out, *, steps: int = 18, seed: int = 0, batch: int | None = None,
               device: str = "auto", ema: bool = True, maps_from=None, progress: bool = True) -> tuple[dict, dict]:
    """``ambient-mri sample``: ``n`` prior samples of a checkpoint (:func:`draw_prior_samples`, k-space models
    with the coil maps of training slices from ``maps_from`` or the recorded training folder) written by
    :func:`write_outputs` into ``out``. Returns ``(info, files)``."""
    make_dir(out)  # an unwritable output folder: one line now, not after drawing the samples
    dev = resolve_device(device, option="--device")
    den, meta = load_denoiser(checkpoint, ema=ema, device=dev)
    recorded = meta["training"]["corruption"]
    corruption = from_dict(recorded)
    maps, maps_info = None, None
    if corruption.domain == "kspace":
        root = maps_from or (meta["training"].get("data") or {}).get("root")
        if root is None:
            raise ConfigError("the checkpoint records no training data folder: give --maps-from PREPARED_TRAIN_DIR")
        maps, names = training_maps(root, n, shape=corruption.shape, seed=seed)
        maps_info = {"from": os.fspath(Path(root).resolve()), "slices": [list(v) for v in names]}
    samples, fmasks = draw_prior_samples(den, corruption, n, steps=steps, seed=seed, batch=batch, device=dev,
                                         progress=progress, maps=maps)
    if not torch.isfinite(torch.view_as_real(samples)).all():
        raise AmbientMRIError("the sampler produced NaN or Inf (is the checkpoint trained?)", meta["path"])
    shown = {k: v for k, v in corruption.to_dict().items() if k != "bank"}  # the bank: its size only
    if getattr(corruption, "bank", None) is not None:
        shown["bank"] = {"masks": len(corruption.bank), "seen": corruption.bank.seen,
                         "distinct": corruption.bank.distinct}
    info = {"checkpoint": os.fspath(Path(meta["path"]).resolve()), "checkpoint_sha256": sha256_file(meta["path"]),
            "step": meta["step"], "kind": meta["training"].get("kind"), "ema": meta["ema"], "n": n, "steps": steps,
            "seed": seed, "batch": batch or n, "device": str(dev), "corruption": shown, "sampler": "fixed-mask Heun",
            "maps": maps_info}
    return info, write_outputs(out, samples, fmasks, info)
