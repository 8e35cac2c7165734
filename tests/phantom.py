"""A simulated multi-coil problem with known image, coil maps and noise (a test fixture, not package code)."""

import math

import numpy as np
import sigpy
import sigpy.mri
import torch

from ambient_mri.fft import fft2c
from ambient_mri.masks import kspace_mask


def phantom_problem(shape=(64, 64), coils: int = 8, accel: float = 4.0, mask_kind: str = "poisson",
                    noise: float = 0.0, slices: int = 1, seed: int = 0) -> dict:
    """Shepp-Logan phantom with a smooth phase, ``coils`` birdcage maps normalised to ``sum_c |S_c|^2 = 1``,
    a ``mask_kind`` mask (``ambient_mri.masks.kspace_mask``, seeded) and complex Gaussian noise of std
    ``noise`` on the sampled points. Returns complex64 tensors ``x`` ``(B, H, W)``, ``y``, ``maps``
    ``(B, C, H, W)``, ``mask`` ``(B, H|1, W)`` (bool), with ``B = slices`` (slice ``b`` has mask seed
    ``seed + b`` and a slightly different phase)."""
    H, W = shape
    rng = np.random.default_rng(seed)
    base = np.abs(sigpy.shepp_logan((H, W), dtype=np.complex128))
    yy, xx = np.mgrid[-1 : 1 : H * 1j, -1 : 1 : W * 1j]
    xs = np.stack([base * np.exp(1j * (0.8 + 0.1 * b) * np.pi * (0.6 * xx + 0.4 * yy**2)) for b in range(slices)])
    mps = sigpy.mri.birdcage_maps((coils, H, W), dtype=np.complex128)
    mps = mps / np.sqrt(np.sum(np.abs(mps) ** 2, axis=0, keepdims=True))
    maps = np.broadcast_to(mps, (slices, coils, H, W))
    mask = np.stack([kspace_mask(mask_kind, (H, W), accel, seed=seed + b).mask for b in range(slices)])
    k = fft2c(maps * xs[:, None])
    k = k + noise * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape)) / math.sqrt(2)
    y = k * mask[:, None]
    c64 = lambda a: torch.from_numpy(np.ascontiguousarray(a).astype(np.complex64))  # noqa: E731
    return {"x": c64(xs), "y": c64(y), "maps": c64(maps), "mask": torch.from_numpy(mask)}
