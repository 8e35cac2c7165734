"""Classical reconstruction baselines for multi-coil Cartesian MRI, ``A = M F S`` (``operators.SenseOp``).

Shapes: k-space ``y`` ``(B, C, H, W)``, coil maps ``(B, C, H, W)``, mask as in ``operators`` (``(W,)``,
``(1, W)``, ``(H, W)``, ``(B, 1, W)`` or ``(B, H, W)``), images ``(B, H, W)``. Inputs may be torch tensors
or numpy arrays; outputs are torch tensors on ``y``'s device.

* :func:`zero_filled`: ``A^H y`` (coil-combined with the maps); :func:`rss_zero_filled`: ``RSS(F^-1 M y)``.
* :func:`cg_sense`: CG on ``(A^H A + lam I) x = A^H y`` (default ``lam = 0.01``: stable at R = 8 with
  estimated maps, where unregularised CG amplifies map errors and noise as it converges).
* :func:`l1_wavelet`: ``min_x 1/2 ||A x - y||^2 + lam ||Psi x||_1`` (``sigpy.mri.app.L1WaveletRecon``,
  FISTA, one slice at a time). ``lam`` acts on the data *as scaled*: our prepared data are divided by
  the 99th percentile of the ACS-only RSS image, so image intensities are O(1) and the A-DPS paper's
  ``lam ~ 1e-3`` is the right order; rescaling the data by ``s`` needs ``lam * s`` for the same result.
* :func:`choose_lambda`: picks ``lam`` on *validation* slices by a sweep.
* :func:`data_consistency`: ``||A x - y|| / ||y||`` per slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from . import metrics
from .errors import ConfigError, DataError
from .fft import ifft2c, rss
from .operators import SenseOp, as_mask, conjugate_gradient

DEFAULT_LAMBDAS = tuple(float(v) for v in np.logspace(-5, -1, 9))  # 1e-5, 3.2e-5, ..., 1e-1


def _tensor(a, device=None) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    if not torch.is_complex(t):
        t = t.to(torch.complex128 if t.dtype == torch.float64 else torch.complex64)
    return t if device is None else t.to(device)


def _inputs(y, maps, mask=None):
    y = _tensor(y)
    maps = _tensor(maps, y.device).to(y.dtype)
    if y.ndim != 4:
        raise DataError(f"k-space must be (B, C, H, W), got shape {tuple(y.shape)}")
    if maps.ndim != 4 or maps.shape[1:] != y.shape[1:] or maps.shape[0] not in (1, y.shape[0]):
        raise DataError(f"coil maps shape {tuple(maps.shape)} does not match k-space shape {tuple(y.shape)}")
    if mask is None:
        return y, maps, None
    m = as_mask(mask, y)
    if m.shape[-1] != y.shape[-1] or m.shape[-2] not in (1, y.shape[-2]) or m.shape[0] not in (1, y.shape[0]):
        raise DataError(f"mask shape {tuple(m.shape)} does not match k-space shape {tuple(y.shape)}")
    if not torch.all(m.flatten(1).sum(1) > 0):
        raise DataError("the sampling mask is empty for at least one slice")
    return y, maps, m


def zero_filled(y, maps, mask) -> torch.Tensor:
    """``A^H y = sum_c conj(S_c) F^-1 (M y_c)``: ``(B, C, H, W)`` -> complex ``(B, H, W)``."""
    y, maps, m = _inputs(y, maps, mask)
    return SenseOp(maps, m).adjoint(y)


def rss_zero_filled(y, mask=None) -> torch.Tensor:
    """``sqrt(sum_c |F^-1 (M y_c)|^2)``: ``(B, C, H, W)`` -> real ``(B, H, W)`` (no maps needed)."""
    y = _tensor(y)
    if y.ndim != 4:
        raise DataError(f"k-space must be (B, C, H, W), got shape {tuple(y.shape)}")
    if mask is not None:
        y = as_mask(mask, y)[:, None] * y
    return rss(ifft2c(y), dim=1)


CG_SENSE_LAMBDA = 0.01


def cg_sense(y, maps, mask, iters: int = 30, lam: float | None = None, tol: float = 0.0, x0=None) -> torch.Tensor:
    """CG-SENSE: ``iters`` conjugate-gradient steps on ``(A^H A + lam I) x = A^H y`` from ``x0`` (zeros),
    every slice solved independently; ``tol`` stops once ``||r|| <= tol ||A^H y||`` for all. -> ``(B, H, W)``.

    ``lam`` (default :data:`CG_SENSE_LAMBDA` = 0.01) is relative to ``A^H A``, whose largest eigenvalue is
    1 for maps with ``sum_c |S_c|^2 = 1`` (ESPIRiT's), so it does not depend on the data scale. Without
    it (``lam=0``) CG semi-converges at R = 8: on SIAT x head-coil data (64 x 64, 2-D Poisson, 8 x 8
    calibration, estimated maps) 10 iterations gave 25.9 dB and 30 gave 23.7 dB, against 26.0 dB for 30
    iterations with ``lam = 0.01`` and 20.3 dB zero-filled (``docs/espirit.md``)."""
    lam = CG_SENSE_LAMBDA if lam is None else float(lam)
    y, maps, m = _inputs(y, maps, mask)
    op = SenseOp(maps, m)
    x0 = None if x0 is None else _tensor(x0, y.device).to(y.dtype)
    return conjugate_gradient(op.normal, op.adjoint(y), x0=x0, lam=lam, iters=iters, tol=tol)


def max_eig(y, maps, mask, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """Largest eigenvalue of ``A^H A`` per slice ``(B,)``, by ``iters`` power iterations from a seeded
    random start (deterministic, unlike sigpy's unseeded ``MaxEig``)."""
    y, maps, m = _inputs(y, maps, mask)
    op = SenseOp(maps, m)
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (y.shape[0],) + tuple(y.shape[-2:])
    real = torch.float64 if y.dtype == torch.complex128 else torch.float32
    v = torch.complex(torch.randn(shape, generator=g, dtype=real), torch.randn(shape, generator=g, dtype=real))
    v = v.to(y.device)
    lam = torch.zeros(y.shape[0], dtype=real, device=y.device)
    for _ in range(iters):
        v = v / torch.linalg.vector_norm(v.flatten(1), dim=1).clamp_min(1e-30)[:, None, None]
        w = op.normal(v)
        lam = torch.linalg.vector_norm(w.flatten(1), dim=1)
        v = w
    return lam


def l1_wavelet(y, maps, mask, lam: float, iters: int = 100, wave_name: str = "db4", *,
               step: float | None = None, show_pbar: bool = False) -> torch.Tensor:
    """L1-wavelet compressed sensing, ``min_x 1/2 ||M F S x - y||^2 + lam ||Psi x||_1``, per slice.

    ``sigpy.mri.app.L1WaveletRecon`` (FISTA, ``iters`` iterations, ``Psi`` = ``wave_name`` wavelet) with the
    mask passed as sigpy's ``weights``. ``lam`` is on the data as scaled (see the module docstring). The
    gradient step is ``1 / max_eig(A^H A)`` from :func:`max_eig` (seeded, so reruns are identical) unless
    ``step`` is given. -> complex ``(B, H, W)`` on ``y``'s device.
    """
    import sigpy as sp  # sigpy (with numba) takes seconds to import: only when used
    import sigpy.mri as mr

    y, maps, m = _inputs(y, maps, mask)
    B, C, H, W = y.shape
    steps = [step] * B if step is not None else (1.0 / max_eig(y, maps, m).clamp_min(1e-12)).tolist()
    y_np = y.detach().cpu().numpy()
    maps_np = maps.detach().cpu().numpy()
    w_np = m.detach().cpu().numpy().astype(np.float32)
    out = np.empty((B, H, W), dtype=y_np.dtype)
    for b in range(B):
        weights = np.ascontiguousarray(np.broadcast_to(w_np[b % w_np.shape[0]], (H, W)))
        app = mr.app.L1WaveletRecon(y_np[b], maps_np[b % maps_np.shape[0]], float(lam), weights=weights,
                                    wave_name=wave_name, device=sp.cpu_device, max_iter=int(iters),
                                    alpha=float(steps[b]), show_pbar=show_pbar)
        out[b] = app.run()
    return torch.from_numpy(out).to(y.device)


def data_consistency(x, y, maps, mask) -> torch.Tensor:
    """``||A x - M y|| / ||M y||`` per slice: image ``(B, H, W)`` against k-space ``(B, C, H, W)`` -> ``(B,)``."""
    y, maps, m = _inputs(y, maps, mask)
    op = SenseOp(maps, m)
    x = _tensor(x, y.device).to(y.dtype)
    if x.shape != (y.shape[0],) + tuple(y.shape[-2:]):
        raise DataError(f"image shape {tuple(x.shape)} does not match k-space shape {tuple(y.shape)}")
    ym = op.mask * y
    num = torch.linalg.vector_norm((op.forward(x) - ym).flatten(1), dim=1)
    return num / torch.linalg.vector_norm(ym.flatten(1), dim=1)


# ----------------------------------------------------------------------------------------------
# Choosing the L1 weight on validation data

_METRICS = {"psnr": True, "ssim": True, "nrmse": False}  # name -> higher is better


@dataclass(frozen=True)
class LambdaChoice:
    """Result of :func:`choose_lambda`: the chosen ``lam``, the ``metric`` and its mean over the validation
    slices for every candidate (``scores``, in ``candidates`` order), and the per-slice values ``(K, S)``."""

    lam: float
    metric: str
    candidates: tuple
    scores: tuple
    per_slice: np.ndarray = field(repr=False)
    iters: int = 100
    wave_name: str = "db4"
    val_slices: int = 0

    def as_dict(self) -> dict:
        """JSON-ready record (store it beside the reconstructions that used ``lam``)."""
        return {"lam": self.lam, "metric": self.metric, "chosen_on": "validation", "val_slices": self.val_slices,
                "iters": self.iters, "wave_name": self.wave_name,
                "candidates": list(self.candidates), "scores": list(self.scores)}


def choose_lambda(val_y, val_maps, val_mask, val_reference, candidates=DEFAULT_LAMBDAS, metric: str = "psnr",
                  iters: int = 100, wave_name: str = "db4") -> LambdaChoice:
    """Sweep the L1-wavelet weight over ``candidates`` on VALIDATION slices and keep the best.

    ``val_y`` ``(S, C, H, W)``, ``val_maps``, ``val_mask``: validation k-space, maps and mask; ``val_reference``
    ``(S, H, W)``: their reference images. Never pass test slices: the chosen ``lam`` is then applied to
    the test set. ``metric``: ``"psnr"`` / ``"ssim"`` (A-DPS convention, per slice, higher is better) or
    ``"nrmse"`` (lower is better), averaged over the slices; ties go to the first candidate.
    """
    if metric not in _METRICS:
        raise ConfigError(f"unknown metric {metric!r} for choose_lambda (choose from {', '.join(_METRICS)})")
    cands = tuple(float(c) for c in candidates)
    if not cands or any(not (c >= 0 and math.isfinite(c)) for c in cands):
        raise ConfigError(f"lambda candidates must be finite and >= 0 (got {candidates})")
    y, maps, m = _inputs(val_y, val_maps, val_mask)
    ref = metrics.magnitude(val_reference)
    if ref.shape != (y.shape[0],) + tuple(y.shape[-2:]):
        raise DataError(f"reference shape {ref.shape} does not match k-space shape {tuple(y.shape)}")
    fn = {"psnr": metrics.psnr_adps_batch, "ssim": metrics.ssim_adps_batch, "nrmse": metrics.nrmse_batch}[metric]
    step = (1.0 / max_eig(y, maps, m).clamp_min(1e-12)).tolist()
    per = []
    for lam in cands:
        x = torch.cat([l1_wavelet(y[b : b + 1], maps[b % maps.shape[0]][None], m[b % m.shape[0]][None], lam,
                                  iters=iters, wave_name=wave_name, step=step[b]) for b in range(y.shape[0])])
        per.append(fn(ref, x))
    per = np.stack(per)
    scores = per.mean(axis=1)
    best = int(np.nanargmax(scores) if _METRICS[metric] else np.nanargmin(scores))
    return LambdaChoice(cands[best], metric, cands, tuple(float(s) for s in scores), per, int(iters), wave_name,
                        int(y.shape[0]))
