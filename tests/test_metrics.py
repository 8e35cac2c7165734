import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ambient_mri import metrics as M
from ambient_mri.errors import DataError


# --- fastMRI's evaluate definitions (ecosystem.md 4.4), ported here as an independent oracle ---------


def fm_mse(gt, pred):
    return np.mean((gt - pred) ** 2)


def fm_nmse(gt, pred):
    return np.linalg.norm(gt - pred) ** 2 / np.linalg.norm(gt) ** 2


def fm_psnr(gt, pred, maxval=None):
    maxval = gt.max() if maxval is None else maxval
    return peak_signal_noise_ratio(gt, pred, data_range=maxval)


def fm_ssim(gt, pred, maxval=None):
    assert gt.ndim == 3
    maxval = gt.max() if maxval is None else maxval
    vals = [structural_similarity(gt[s], pred[s], data_range=maxval) for s in range(gt.shape[0])]
    return np.array([np.mean(vals)])  # fastMRI returns a shape-(1,) array


# --- fixtures ----------------------------------------------------------------------------------


def phantom_volume(rng, S=3, H=32, W=32, noise=0.05):
    yy, xx = np.mgrid[-1 : 1 : H * 1j, -1 : 1 : W * 1j]
    base = (xx**2 / 0.7 + yy**2 / 0.9 < 0.8).astype(float) + 0.5 * ((xx - 0.2) ** 2 + yy**2 < 0.1)
    gt = np.stack([base * (1 + 0.3 * s) for s in range(S)])  # slices with different peaks
    pred = np.abs(gt + noise * rng.standard_normal(gt.shape))
    return gt, pred


# --- hand-computed values ----------------------------------------------------------------------


def test_hand_computed_4x4():
    gt = np.ones((4, 4))
    gt[0, 0] = 2.0  # max |gt| = 2, ||gt||^2 = 15 + 4 = 19
    x = gt.copy()
    x[3, 3] += 0.5  # MSE = 0.25 / 16 = 1/64, RMSE = 1/8
    expect_psnr = 20 * math.log10(2 / (1 / 8))  # = 20 log10 16
    assert M.psnr_adps(gt, x) == pytest.approx(expect_psnr, abs=1e-12)
    assert M.psnr_adps(gt, x) == pytest.approx(24.0823996531, abs=1e-9)
    assert M.nrmse(gt, x) == pytest.approx(0.5 / math.sqrt(19), abs=1e-12)
    assert M.nmse(gt, x) == pytest.approx(0.25 / 19, abs=1e-12)
    # as a one-slice volume the fastMRI PSNR uses the same peak here
    assert M.psnr_fastmri(gt[None], x[None]) == pytest.approx(expect_psnr, abs=1e-12)


def test_complex_and_torch_inputs_use_magnitude():
    gt = np.ones((4, 4))
    gt[0, 0] = 2.0
    x = gt.copy()
    x[3, 3] += 0.5
    phase = np.exp(1j * np.linspace(0, 3, 16).reshape(4, 4))
    ref = M.psnr_adps(gt, x)
    assert M.psnr_adps(gt * phase, x * phase.conj()) == pytest.approx(ref, abs=1e-12)
    assert M.psnr_adps(torch.from_numpy(gt * phase).to(torch.complex64), torch.from_numpy(x)) == pytest.approx(
        ref, abs=1e-5)
    assert M.nrmse(torch.from_numpy(gt), -torch.from_numpy(x)) == pytest.approx(0.5 / math.sqrt(19), abs=1e-12)


def test_identical_images():
    rng = np.random.default_rng(0)
    gt, _ = phantom_volume(rng)
    assert M.psnr_adps(gt[0], gt[0]) == math.inf
    assert M.psnr_fastmri(gt, gt) == math.inf
    assert M.ssim_adps(gt[0], gt[0]) == pytest.approx(1.0)
    assert M.ssim_fastmri(gt, gt) == pytest.approx(1.0)
    assert M.nrmse(gt, gt) == 0.0 and M.nmse(gt, gt) == 0.0


def test_shape_mismatch_raises_dataerror():
    with pytest.raises(DataError, match="differ"):
        M.psnr_adps(np.ones((8, 8)), np.ones((8, 9)))
    with pytest.raises(DataError, match="volume"):
        M.psnr_fastmri(np.ones((8, 8)), np.ones((8, 8)))


# --- against skimage directly ------------------------------------------------------------------


def test_adps_matches_skimage(rng):
    gt = rng.standard_normal((40, 36)) + 1j * rng.standard_normal((40, 36))
    x = gt + 0.3 * (rng.standard_normal(gt.shape) + 1j * rng.standard_normal(gt.shape))
    g, r = np.abs(gt), np.abs(x)
    assert M.psnr_adps(gt, x) == pytest.approx(peak_signal_noise_ratio(g, r, data_range=g.max()), abs=1e-10)
    assert M.ssim_adps(gt, x) == pytest.approx(structural_similarity(g, r, data_range=g.max() - g.min()),
                                               abs=1e-12)
    assert M.nrmse(gt, x) == pytest.approx(np.linalg.norm(g - r) / np.linalg.norm(g), abs=1e-12)


def test_batch_helpers_match_per_slice(rng):
    gt, pred = phantom_volume(rng)
    for batch, single in ((M.psnr_adps_batch, M.psnr_adps), (M.ssim_adps_batch, M.ssim_adps),
                          (M.nrmse_batch, M.nrmse)):
        got = batch(gt, pred)
        assert got.shape == (gt.shape[0],)
        np.testing.assert_allclose(got, [single(gt[s], pred[s]) for s in range(gt.shape[0])], rtol=1e-12)


# --- against fastMRI's evaluate definitions ------------------------------------------------------


@pytest.mark.parametrize("noise", [0.02, 0.1, 0.3])
def test_fastmri_convention_matches_port(rng, noise):
    gt, pred = phantom_volume(rng, noise=noise)
    assert M.psnr_fastmri(gt, pred) == pytest.approx(fm_psnr(gt, pred), abs=1e-10)
    assert M.ssim_fastmri(gt, pred) == pytest.approx(fm_ssim(gt, pred).item(), abs=1e-12)
    assert M.nmse(gt, pred) == pytest.approx(fm_nmse(gt, pred), rel=1e-12)
    assert M.psnr_fastmri(gt, pred) == pytest.approx(10 * np.log10(gt.max() ** 2 / fm_mse(gt, pred)), abs=1e-10)


def test_conventions_differ_when_slice_peaks_differ(rng):
    gt, pred = phantom_volume(rng, noise=0.05)  # slice s has peak 1.5 (1 + 0.3 s)
    per_slice = M.psnr_adps_batch(gt, pred)
    vol_peak = [fm_psnr(gt[s], pred[s], maxval=gt.max()) for s in range(gt.shape[0])]
    # A-DPS uses each slice's own peak: lower than with the volume peak except on the brightest slice
    assert np.all(per_slice[:-1] < np.array(vol_peak[:-1]) - 1.0)
    assert per_slice[-1] == pytest.approx(vol_peak[-1], abs=1e-10)
    # and A-DPS SSIM uses max - min of the slice, fastMRI the volume max
    assert M.ssim_adps(gt[0], pred[0]) != pytest.approx(structural_similarity(gt[0], pred[0], data_range=gt.max()))


# --- foreground mask and masked variants --------------------------------------------------------


def test_foreground_mask_fills_holes_and_dilates():
    yy, xx = np.mgrid[:32, :32]
    r2 = (yy - 16) ** 2 + (xx - 16) ** 2
    img = ((r2 < 100) & (r2 >= 16)).astype(float)  # a ring: hole of radius 4
    m0 = M.foreground_mask(img, dilate=0, fill_holes=False)
    assert not m0[16, 16] and m0.sum() == ((r2 < 100) & (r2 >= 16)).sum()
    m1 = M.foreground_mask(img, dilate=0)
    np.testing.assert_array_equal(m1, r2 < 100)
    m2 = M.foreground_mask(img, dilate=2)
    assert m2.sum() > m1.sum() and m2[16, 16 + 11] and not m2[16, 16 + 12]  # radius 9.x grows by 2
    # threshold: a faint blob below 10 % of the peak is background
    img2 = img.copy()
    img2[0:3, 0:3] = 0.05
    assert not M.foreground_mask(img2)[1, 1]
    # volume: threshold against the volume peak, slices independent
    vol = np.stack([img, 0.05 * img, np.zeros_like(img)])
    mv = M.foreground_mask(vol, dilate=1)
    assert mv[0].sum() > 0 and mv[1].sum() == 0 and mv[2].sum() == 0


def test_full_mask_equals_unmasked(rng):
    gt, pred = phantom_volume(rng, S=2)
    full = np.ones(gt.shape, dtype=bool)
    assert M.psnr_adps(gt[0], pred[0], full[0]) == pytest.approx(M.psnr_adps(gt[0], pred[0]), abs=1e-12)
    assert M.ssim_adps(gt[0], pred[0], full[0]) == pytest.approx(M.ssim_adps(gt[0], pred[0]), abs=1e-12)
    assert M.nrmse(gt[0], pred[0], full[0]) == pytest.approx(M.nrmse(gt[0], pred[0]), abs=1e-12)
    assert M.psnr_fastmri(gt, pred, full) == pytest.approx(M.psnr_fastmri(gt, pred), abs=1e-10)
    assert M.ssim_fastmri(gt, pred, full) == pytest.approx(M.ssim_fastmri(gt, pred), abs=1e-12)


def test_masked_metrics_ignore_errors_outside(rng):
    gt, _ = phantom_volume(rng, S=2)
    fg = M.foreground_mask(gt)
    pred = gt + 5.0 * ~fg  # wrong only outside the mask
    assert M.psnr_adps(gt[0], pred[0], fg[0]) == math.inf
    assert M.psnr_fastmri(gt, pred, fg) == math.inf
    assert M.nrmse(gt, pred, fg) == 0.0
    assert M.psnr_adps(gt[0], pred[0]) < 20
    # masked SSIM = mean of skimage's SSIM map over the mask (inside the 3-pixel border)
    noisy = np.abs(gt + 0.1 * rng.standard_normal(gt.shape))
    g0 = gt[0]
    _, smap = structural_similarity(g0, noisy[0], data_range=g0[fg[0]].max() - g0[fg[0]].min(), full=True)
    inner = np.zeros_like(fg[0])
    inner[3:-3, 3:-3] = True
    assert M.ssim_adps(g0, noisy[0], fg[0]) == pytest.approx(smap[fg[0] & inner].mean(), abs=1e-12)


def test_evaluate_volume(rng):
    gt, pred = phantom_volume(rng, S=3, noise=0.1)
    out = M.evaluate_volume(torch.from_numpy(gt), pred)
    assert out["slices"] == 3
    np.testing.assert_allclose(out["psnr_adps"], M.psnr_adps_batch(gt, pred))
    np.testing.assert_allclose(out["ssim_adps"], M.ssim_adps_batch(gt, pred))
    np.testing.assert_allclose(out["nrmse_adps"], M.nrmse_batch(gt, pred))
    assert out["psnr_adps_mean"] == pytest.approx(out["psnr_adps"].mean())
    assert out["psnr_adps_std"] == pytest.approx(out["psnr_adps"].std())
    assert out["psnr_fastmri"] == pytest.approx(fm_psnr(gt, pred))
    assert out["ssim_fastmri"] == pytest.approx(fm_ssim(gt, pred).item())
    assert out["nmse_fastmri"] == pytest.approx(fm_nmse(gt, pred))
    assert not any(k.endswith("_fg") for k in out)
    out_fg = M.evaluate_volume(gt, pred, foreground=True)
    fg = M.foreground_mask(gt)
    assert out_fg["foreground_fraction"] == pytest.approx(fg.mean())
    assert out_fg["psnr_fastmri_fg"] == pytest.approx(M.psnr_fastmri(gt, pred, fg))
    np.testing.assert_allclose(out_fg["ssim_adps_fg"], M.ssim_adps_batch(gt, pred, fg))
    assert out_fg["psnr_fastmri"] == out["psnr_fastmri"]


@pytest.mark.slow  # importing MONAI takes several seconds
def test_monai_ssim_differs_from_fastmri_convention(rng):
    """Why we use skimage: MONAI's SSIMMetric (Gaussian 11 by default; population covariance even with
    a uniform 7 window) does not reproduce fastMRI's SSIM."""
    monai_metrics = pytest.importorskip("monai.metrics")
    gt, pred = phantom_volume(rng, S=2, noise=0.1)
    ours = M.ssim_fastmri(gt, pred)
    t = lambda a: torch.from_numpy(a[:, None]).float()  # noqa: E731  (S, 1, H, W)
    for kw in ({}, {"kernel_type": "uniform", "win_size": 7}):
        m = monai_metrics.SSIMMetric(spatial_dims=2, data_range=float(gt.max()), **kw)
        monai_vals = m(t(pred), t(gt)).flatten().numpy()
        assert abs(monai_vals.mean() - ours) > 1e-4
    # the uniform-7 variant is skimage with population covariance
    pop = [structural_similarity(gt[s], pred[s], data_range=gt.max(), use_sample_covariance=False) for s in range(2)]
    np.testing.assert_allclose(monai_vals, pop, atol=1e-5)


def test_paired_difference_bootstrap_interval():
    rng = np.random.default_rng(0)
    b = rng.normal(30, 3, size=60)  # slice-to-slice spread much larger than the effect
    a = b + 0.5 + rng.normal(0, 0.2, size=60)
    r = M.paired_difference(a, b)
    # known answer: the mean difference, and an interval close to mean +- 1.96 sd / sqrt(n) of the differences
    d = a - b
    assert r["mean"] == pytest.approx(d.mean())
    half = 1.96 * d.std(ddof=1) / np.sqrt(d.size)
    assert r["lo"] == pytest.approx(d.mean() - half, abs=0.3 * half)
    assert r["hi"] == pytest.approx(d.mean() + half, abs=0.3 * half)
    assert r["lo"] > 0  # pairing removes the slice spread: unpaired, +0.5 dB would be invisible in 3 dB of spread
    assert M.paired_difference(b, a)["hi"] < 0
    same = M.paired_difference(b + 1.0, b)
    assert same["lo"] == pytest.approx(1.0) and same["hi"] == pytest.approx(1.0)
    with pytest.raises(DataError):
        M.paired_difference(a, b[:-1])
    with pytest.raises(DataError):
        M.paired_difference(np.r_[a[:-1], np.nan], b)
