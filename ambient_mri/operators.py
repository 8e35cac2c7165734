"""Linear forward operators with ``forward``, ``adjoint`` and ``normal`` (sigpy ``Linop`` style).

Shapes (batched over slices ``B`` and coils ``C``; all complex64 unless stated):

* image ``x``: ``(B, H, W)``; coil maps ``S``: ``(B, C, H, W)``; multi-coil k-space ``y``: ``(B, C, H, W)``.
* mask ``M``: real or bool, its last two axes ``(H, W)`` for a 2-D mask or ``(1, W)`` for a 1-D line
  mask (phase-encode lines are columns, the last axis, as in fastMRI). A leading batch axis is optional:
  ``(W,)``, ``(1, W)``, ``(H, W)``, ``(B, 1, W)`` and ``(B, H, W)`` all broadcast.

``A = M F S`` (multi-coil SENSE), ``A = M F`` (single coil), ``A = M *`` (image-domain inpainting).
"""

from __future__ import annotations

import torch

from .fft import fft2c, ifft2c


def as_mask(mask, like: torch.Tensor) -> torch.Tensor:
    """Return ``mask`` as a real tensor of shape ``(B or 1, H or 1, W)`` on ``like``'s device."""
    m = torch.as_tensor(mask, device=like.device)
    if m.ndim == 1:
        m = m[None]
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"mask must have 1 to 3 axes (got shape {tuple(m.shape)})")
    return m.to(like.real.dtype)


class SenseOp:
    """Multi-coil Cartesian SENSE: ``A x = M F (S x)``; ``A^H y = sum_c conj(S_c) F^-1 (M y_c)``."""

    def __init__(self, maps: torch.Tensor, mask):
        self.maps = maps
        self.mask = as_mask(mask, maps)[:, None]  # (B|1, 1, H|1, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W)`` -> ``(B, C, H, W)``."""
        return self.mask * fft2c(self.maps * x[:, None])

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, H, W)``."""
        return torch.sum(self.maps.conj() * ifft2c(self.mask * y), dim=1)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """``A^H A x``, ``(B, H, W)`` -> ``(B, H, W)`` (the mask is idempotent, so it is applied once)."""
        return torch.sum(self.maps.conj() * ifft2c(self.mask * fft2c(self.maps * x[:, None])), dim=1)


class SingleCoilOp:
    """Single-coil Cartesian: ``A x = M F x``; ``A^H y = F^-1 (M y)``; image and k-space ``(B, H, W)``."""

    def __init__(self, mask, like: torch.Tensor | None = None):
        self.mask = as_mask(mask, like if like is not None else torch.zeros((), dtype=torch.complex64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask.to(x.device) * fft2c(x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return ifft2c(self.mask.to(y.device) * y)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        return ifft2c(self.mask.to(x.device) * fft2c(x))


class InpaintOp:
    """Image-domain corruption (missing pixels or boxes): ``A x = M * x``; self-adjoint, ``A^H A = A``."""

    def __init__(self, mask, like: torch.Tensor | None = None):
        self.mask = as_mask(mask, like if like is not None else torch.zeros((), dtype=torch.complex64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask.to(x.device) * x

    adjoint = forward
    normal = forward


def conjugate_gradient(normal, rhs: torch.Tensor, x0: torch.Tensor | None = None, lam: float = 0.0,
                       iters: int = 30, tol: float = 0.0) -> torch.Tensor:
    """Solve ``(N + lam I) x = rhs`` for Hermitian positive (semi-)definite ``N`` by batched CG.

    ``normal``: callable ``x -> N x`` on ``(B, H, W)``; each batch item is solved independently (its own
    step sizes) and stops updating once its residual norm is below ``max(tol, 10 eps) ||rhs||`` (``eps``
    of the dtype: further steps on a converged, possibly singular, system only amplify rounding).
    ``x0`` is the starting point (zeros by default).
    """
    dims = tuple(range(1, rhs.ndim))

    def op(v):
        return normal(v) + lam * v if lam else normal(v)

    def sq(v):
        return torch.sum(v.abs() ** 2, dim=dims, keepdim=True)

    x = torch.zeros_like(rhs) if x0 is None else x0.clone()
    r = rhs - op(x) if x0 is not None else rhs.clone()
    p = r.clone()
    rr = sq(r)
    rel = max(tol, 10 * torch.finfo(rhs.real.dtype).eps)
    stop = rel**2 * sq(rhs)
    for _ in range(iters):
        active = rr > stop
        if not torch.any(active):
            break
        Ap = op(p)
        pAp = torch.sum((p.conj() * Ap).real, dim=dims, keepdim=True)
        ok = active & (pAp > 0)
        alpha = torch.where(ok, rr / torch.where(ok, pAp, torch.ones_like(pAp)), torch.zeros_like(rr))
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = sq(r)
        beta = torch.where(ok, rr_new / torch.where(ok, rr, torch.ones_like(rr)), torch.zeros_like(rr))
        p = torch.where(ok, r + beta * p, p)
        rr = torch.where(ok, rr_new, rr)
    return x
