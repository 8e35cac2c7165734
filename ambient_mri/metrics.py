"""Image-quality metrics on magnitude images, in the two conventions the papers report.

* **A-DPS (per slice)**, full field of view:
  ``psnr_adps = 20 log10(max|gt| / RMSE(|gt|, |x|))``,
  ``ssim_adps = skimage SSIM(|gt|, |x|, data_range = max|gt| - min|gt|)``,
  ``nrmse = || |gt| - |x| || / || |gt| ||``.
* **fastMRI (per volume)** ``(S, H, W)``, as ``fastmri.evaluate``:
  ``psnr_fastmri = skimage PSNR(gt, x, data_range = gt.max())`` over the whole volume,
  ``ssim_fastmri = mean_s skimage SSIM(gt[s], x[s], data_range = gt.max())`` (7 x 7 uniform window,
  sample covariance, K1 = 0.01, K2 = 0.03: skimage's defaults),
  ``nmse = ||gt - x||^2 / ||gt||^2``.

Inputs are numpy arrays or torch tensors, complex or real; every metric first takes the magnitude
(the identity on non-negative real images, so fastMRI's RSS targets score exactly as in fastMRI).
Every metric takes an optional boolean ``mask`` (e.g. :func:`foreground_mask`): PSNR / NRMSE / NMSE
are then computed over the masked pixels only (the peak is the masked maximum), and SSIM is the mean
of skimage's SSIM map over the masked pixels that lie at least ``win_size // 2`` pixels inside the
image (skimage drops the same border strip when it averages the full map).
"""

from __future__ import annotations

import math

import numpy as np

from .errors import DataError

WIN_SIZE = 7  # skimage's (and fastMRI's) SSIM window


def magnitude(a) -> np.ndarray:
    """``|a|`` as a float64 numpy array, from numpy or torch (any device), complex or real."""
    if hasattr(a, "detach"):  # torch tensor
        a = a.detach().cpu().numpy()
    return np.abs(np.asarray(a)).astype(np.float64, copy=False)


def _pair(gt, x, ndim: int, mask=None):
    g, r = magnitude(gt), magnitude(x)
    if g.shape != r.shape:
        raise DataError(f"reference shape {g.shape} and reconstruction shape {r.shape} differ")
    if g.ndim != ndim:
        what = "a slice (H, W)" if ndim == 2 else "a volume (S, H, W)"
        raise DataError(f"expected {what}, got an array of shape {g.shape}")
    if mask is None:
        return g, r, None
    m = np.asarray(mask.detach().cpu() if hasattr(mask, "detach") else mask).astype(bool)
    try:
        m = np.broadcast_to(m, g.shape)
    except ValueError:
        raise DataError(f"mask shape {m.shape} does not match image shape {g.shape}") from None
    return g, r, m


def _psnr(peak: float, mse: float) -> float:
    if mse == 0:
        return math.inf
    if not np.isfinite(mse):
        return math.nan
    with np.errstate(divide="ignore"):
        return float(10.0 * np.log10(peak**2 / mse))


def _ssim_map(g: np.ndarray, r: np.ndarray, data_range: float) -> tuple[float, np.ndarray]:
    from skimage.metrics import structural_similarity

    return structural_similarity(g, r, data_range=data_range, full=True)


def _masked_ssim(g, r, data_range: float, m) -> float:
    mssim, smap = _ssim_map(g, r, data_range)
    if m is None:
        return float(mssim)
    inner = np.zeros_like(m)
    p = (WIN_SIZE - 1) // 2
    inner[p : m.shape[0] - p, p : m.shape[1] - p] = True
    sel = m & inner
    return float(smap[sel].mean()) if sel.any() else math.nan


# ----------------------------------------------------------------------------------------------
# A-DPS convention: one slice (H, W)


def psnr_adps(gt, x, mask=None) -> float:
    """``20 log10(max|gt| / RMSE(|gt|, |x|))`` on one slice ``(H, W)`` (over ``mask`` if given); dB."""
    g, r, m = _pair(gt, x, 2, mask)
    if m is not None:
        g, r = g[m], r[m]
    if g.size == 0:
        return math.nan
    return _psnr(float(g.max()), float(np.mean((g - r) ** 2)))


def ssim_adps(gt, x, mask=None) -> float:
    """skimage SSIM of ``|gt|``, ``|x|`` on one slice with ``data_range = max|gt| - min|gt|``.

    With ``mask``: the range is taken over the masked pixels and the SSIM map is averaged over them.
    """
    g, r, m = _pair(gt, x, 2, mask)
    gm = g[m] if m is not None else g
    if gm.size == 0:
        return math.nan
    return _masked_ssim(g, r, float(gm.max() - gm.min()), m)


def nrmse(gt, x, mask=None) -> float:
    """``|| |gt| - |x| || / || |gt| ||`` on one slice (or any array) (over ``mask`` if given)."""
    g, r = magnitude(gt), magnitude(x)
    if g.shape != r.shape:
        raise DataError(f"reference shape {g.shape} and reconstruction shape {r.shape} differ")
    if mask is not None:
        _, _, m = _pair(g, r, g.ndim, mask)
        g, r = g[m], r[m]
    den = np.linalg.norm(g)
    return float(np.linalg.norm(g - r) / den) if den > 0 else math.nan


def psnr_adps_batch(gt, x, mask=None) -> np.ndarray:
    """:func:`psnr_adps` of each slice of ``(S, H, W)`` stacks -> ``(S,)``."""
    g, r, m = _pair(gt, x, 3, mask)
    return np.array([psnr_adps(g[s], r[s], None if m is None else m[s]) for s in range(g.shape[0])])


def ssim_adps_batch(gt, x, mask=None) -> np.ndarray:
    """:func:`ssim_adps` of each slice of ``(S, H, W)`` stacks -> ``(S,)``."""
    g, r, m = _pair(gt, x, 3, mask)
    return np.array([ssim_adps(g[s], r[s], None if m is None else m[s]) for s in range(g.shape[0])])


def nrmse_batch(gt, x, mask=None) -> np.ndarray:
    """:func:`nrmse` of each slice of ``(S, H, W)`` stacks -> ``(S,)``."""
    g, r, m = _pair(gt, x, 3, mask)
    if m is None:
        m = np.ones(g.shape, dtype=bool)
    num = np.sqrt(np.sum(((g - r) ** 2) * m, axis=(1, 2)))
    den = np.sqrt(np.sum((g**2) * m, axis=(1, 2)))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


# ----------------------------------------------------------------------------------------------
# fastMRI convention: one volume (S, H, W)


def psnr_fastmri(gt_vol, x_vol, mask=None) -> float:
    """skimage ``peak_signal_noise_ratio(gt, x, data_range=gt.max())`` over the whole volume ``(S, H, W)``.

    With ``mask``: the MSE over the masked voxels and the peak ``gt[mask].max()``.
    """
    g, r, m = _pair(gt_vol, x_vol, 3, mask)
    if m is None:
        from skimage.metrics import peak_signal_noise_ratio

        mse = float(np.mean((g - r) ** 2))
        if mse == 0 or not np.isfinite(mse):
            return _psnr(float(g.max()), mse)
        return float(peak_signal_noise_ratio(g, r, data_range=float(g.max())))
    g, r = g[m], r[m]
    if g.size == 0:
        return math.nan
    return _psnr(float(g.max()), float(np.mean((g - r) ** 2)))


def ssim_fastmri(gt_vol, x_vol, mask=None) -> float:
    """Mean over slices of skimage SSIM with ``data_range = gt volume max`` (``fastmri.evaluate.ssim``).

    With ``mask``: the peak is the masked volume maximum, each slice's SSIM map is averaged over its
    masked pixels, and slices whose mask is empty are left out of the mean.
    """
    g, r, m = _pair(gt_vol, x_vol, 3, mask)
    peak = float(g.max() if m is None else (g[m].max() if m.any() else math.nan))
    vals = [_masked_ssim(g[s], r[s], peak, None if m is None else m[s]) for s in range(g.shape[0])]
    vals = [v for v in vals if not (m is not None and math.isnan(v))]
    return float(np.mean(vals)) if vals else math.nan


def nmse(gt, x, mask=None) -> float:
    """``||gt - x||^2 / ||gt||^2`` on magnitudes (any shape; fastMRI reports it per volume)."""
    v = nrmse(gt, x, mask)
    return v * v


# ----------------------------------------------------------------------------------------------
# Foreground mask and the one-call evaluation


def foreground_mask(gt, threshold: float = 0.1, *, fill_holes: bool = True, dilate: int = 2) -> np.ndarray:
    """Boolean foreground (e.g. brain) of a reference ``(H, W)`` or ``(S, H, W)``.

    ``|gt| > threshold * max|gt|`` (the max over the whole array passed: pass a volume to threshold every
    slice against the volume's peak), then, slice by slice, holes filled (``scipy.ndimage.
    binary_fill_holes``) and ``dilate`` binary dilations with a 3 x 3 cross.
    """
    from scipy import ndimage

    g = magnitude(gt)
    if g.ndim not in (2, 3):
        raise DataError(f"expected a slice (H, W) or a volume (S, H, W), got shape {g.shape}")
    m = g > threshold * g.max()
    struct = ndimage.generate_binary_structure(2, 1)
    if g.ndim == 3:
        struct = struct[None]  # in-plane only: slices stay independent
    if fill_holes:
        m = ndimage.binary_fill_holes(m, structure=struct)
    if dilate > 0:
        m = ndimage.binary_dilation(m, structure=struct, iterations=int(dilate))
    return m


def evaluate_volume(gt, x, foreground=None) -> dict:
    """Both conventions for one volume ``gt``, ``x`` of shape ``(S, H, W)`` (magnitudes are taken).

    Returns ``psnr_adps``, ``ssim_adps``, ``nrmse_adps``: per-slice ``(S,)`` arrays (A-DPS, full field of
    view) with their ``*_mean`` / ``*_std`` over the slices where the value is finite; ``psnr_fastmri``, ``ssim_fastmri``,
    ``nmse_fastmri``: per-volume floats (fastMRI); ``slices``. With ``foreground`` (a boolean ``(S, H, W)``
    array, or ``True`` for :func:`foreground_mask` of ``gt`` with its defaults) every key is also given
    inside the mask with the suffix ``_fg`` (e.g. ``psnr_adps_fg``), plus ``foreground_fraction``.
    """
    g, r, _ = _pair(gt, x, 3)
    out: dict = {"slices": int(g.shape[0])}

    def fill(suffix, m):
        per_slice = {
            "psnr_adps": psnr_adps_batch(g, r, m),
            "ssim_adps": ssim_adps_batch(g, r, m),
            "nrmse_adps": nrmse_batch(g, r, m),
        }
        for k, v in per_slice.items():
            out[k + suffix] = v
            finite = v[np.isfinite(v)]
            out[k + "_mean" + suffix] = float(finite.mean()) if finite.size else math.nan
            out[k + "_std" + suffix] = float(finite.std()) if finite.size else math.nan
        out["psnr_fastmri" + suffix] = psnr_fastmri(g, r, m)
        out["ssim_fastmri" + suffix] = ssim_fastmri(g, r, m)
        out["nmse_fastmri" + suffix] = nmse(g, r, m)

    fill("", None)
    if foreground is not None and foreground is not False:
        fg = foreground_mask(g) if foreground is True else _pair(g, r, 3, foreground)[2]
        fill("_fg", fg)
        out["foreground_fraction"] = float(np.mean(fg))
    return out


def paired_difference(a, b, *, n_boot: int = 10000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean paired difference ``mean_i (a_i - b_i)`` over the same slices, with a percentile bootstrap
    interval: resample the ``n`` differences with replacement ``n_boot`` times, take the ``(1 - level) / 2``
    and ``(1 + level) / 2`` quantiles of the resampled means. ``a, b (n,)``; non-finite pairs are refused.
    Returns ``{"mean", "lo", "hi", "n", "level"}``."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise DataError(f"paired scores must be two equal 1-D arrays of >= 2 values, got {a.shape} and {b.shape}")
    d = a - b
    if not np.isfinite(d).all():
        raise DataError("paired scores contain NaN or Inf")
    idx = np.random.default_rng(seed).integers(0, d.size, size=(n_boot, d.size))
    means = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(d.mean()), "lo": float(lo), "hi": float(hi), "n": int(d.size), "level": level}
