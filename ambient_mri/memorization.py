"""Memorisation check: for each generated sample, its nearest training image by normalised cross-correlation.

``NCC(a, b) = <a - mean a, b - mean b> / (||a - mean a|| ||b - mean b||)`` on magnitude images (1 = identical up
to brightness and offset). A prior that memorises its training set produces samples whose nearest
training image has NCC close to 1.
"""

from __future__ import annotations

import numpy as np
import torch


def _standardise(x) -> torch.Tensor:
    t = torch.as_tensor(np.abs(np.asarray(x)) if not torch.is_tensor(x) else x.abs(), dtype=torch.float64)
    t = t.reshape(t.shape[0], -1)
    t = t - t.mean(1, keepdim=True)
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)


def nearest_ncc(samples, train, *, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """``samples (N, H, W)``, ``train (M, H, W)`` (complex or magnitude, numpy or torch) ->
    ``(best NCC (N,), index of the nearest training image (N,))``."""
    s = _standardise(samples)
    best = torch.full((s.shape[0],), -2.0, dtype=torch.float64)
    arg = torch.zeros(s.shape[0], dtype=torch.long)
    train = train if torch.is_tensor(train) else np.asarray(train)
    for i in range(0, train.shape[0], chunk):
        t = _standardise(train[i : i + chunk])
        c = s @ t.T
        v, j = c.max(1)
        upd = v > best
        best = torch.where(upd, v, best)
        arg = torch.where(upd, j + i, arg)
    return best.numpy(), arg.numpy()


def summary(ncc: np.ndarray) -> dict:
    """Distribution of nearest-neighbour NCC values: mean, std, quartiles, max, fraction above 0.95."""
    q = np.percentile(ncc, [5, 25, 50, 75, 95])
    return {"n": int(ncc.size), "mean": float(ncc.mean()), "std": float(ncc.std()), "p5": float(q[0]),
            "p25": float(q[1]), "median": float(q[2]), "p75": float(q[3]), "p95": float(q[4]),
            "max": float(ncc.max()), "frac_above_0.95": float((ncc > 0.95).mean())}
