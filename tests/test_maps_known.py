"""Coil maps, the forward model and the noise level against known answers: simulated data whose true maps
and noise are known (``phantom_problem``: birdcage maps x Shepp-Logan; files written here with
``sim_coil_maps`` and ``noise_sigma`` as the simulating converters write them). No ``../shared/data``
except the one ``shared_data`` test, which skips without it."""

import json
import math
import numpy as np
import pytest
import torch

from ambient_mri import baselines as B
from tests.phantom import phantom_problem
from ambient_mri import metrics as M
from ambient_mri.coils import DEFAULT_MAPS, acs_kspace, estimate_maps, forward_residual
from ambient_mri.crop import crop_kspace, crop_maps
from ambient_mri.errors import ConfigError
from ambient_mri.fft import center_crop, fft2c, ifft2c
from ambient_mri.prep import PrepOptions, run_prep
from ambient_mri.whitening import prepared_noise_std

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

N, COILS, R, CALIB, NOISE = 64, 8, 8.0, 8, 0.005


def map_correlation(est, true, inside):
    """Mean over ``inside`` of ``|sum_c S_est,c conj(S_true,c)| / (||S_est|| ||S_true||)`` per pixel: 1 for
    maps equal up to a per-pixel phase (the ambiguity of ESPIRiT maps). ``(B, C, H, W)``, ``(B, H, W)``."""
    est, true = np.asarray(est), np.asarray(true)
    num = np.abs(np.sum(est * true.conj(), axis=1))
    den = np.linalg.norm(est, axis=1) * np.linalg.norm(true, axis=1)
    c = num / np.maximum(den, 1e-12)
    return float(c[inside].mean())


@pytest.fixture(scope="module")
def problem():
    """64 x 64, 8 birdcage coils (sum_c |S_c|^2 = 1), 2-D Poisson R = 8 with an 8 x 8 calibration block,
    complex noise std 0.005 (image peak 1), 2 slices."""
    return phantom_problem((N, N), coils=COILS, accel=R, mask_kind="poisson", noise=NOISE, slices=2, seed=0)


def estimated(y, mask, method):
    """Maps as prep estimates them: calibration-block methods see the block only, espirit-sake every
    measured sample."""
    if method == "espirit-sake":
        return estimate_maps(y, CALIB, method, mask=np.asarray(mask)[:, None])
    return estimate_maps(acs_kspace(y, (CALIB, CALIB)), CALIB, method)


@pytest.fixture(scope="module")
def est_maps(problem):
    y, m = problem["y"].numpy(), problem["mask"].numpy()
    return {meth: estimated(y, m, meth) for meth in ("espirit", "espirit-torch", "espirit-sake")}


def test_espirit_defaults_small_blocks_changed_large_blocks_kept():
    """Kernel 3 / thresh 0.05 for an 8 x 8 block (docs/espirit.md); 24 x 24 keeps kernel 6 / thresh 0.02."""
    from ambient_mri.espirit import completion_size, default_kernel_width, default_thresh

    assert (default_kernel_width((8, 8)), default_thresh(3)) == (3, 0.05)
    assert (default_kernel_width((24, 24)), default_thresh(6)) == (6, 0.02)
    assert default_kernel_width((16, 16)) == 5 and default_kernel_width((4, 4)) == 2
    assert completion_size(8, (64, 64)) == 24 and completion_size(8, (12, 12)) == 12


def test_poisson_mask_has_the_8x8_calibration_block(problem):
    m = problem["mask"].numpy()
    assert abs(m[0].size / m[0].sum() - R) < 0.1
    assert m[:, N // 2 - 4 : N // 2 + 4, N // 2 - 4 : N // 2 + 4].all()


@pytest.mark.parametrize("method", ["espirit", "espirit-torch", "espirit-sake"])
def test_estimated_maps_correlate_with_the_truth_inside_the_object(problem, est_maps, method):
    inside = problem["x"].abs().numpy() > 0.1
    assert map_correlation(est_maps[method], problem["maps"], inside) > 0.98


@pytest.mark.parametrize("method,tol", [("espirit-torch", 1.0), (DEFAULT_MAPS, 0.5)])  # default: 0.0-0.25 dB measured
def test_l1_wavelet_with_estimated_maps_is_within_1db_of_true_maps(problem, est_maps, method, tol):
    x, y, m = problem["x"], problem["y"], problem["mask"]
    lam = 1e-3  # A-DPS's order for data of peak ~1 (baselines module doc)
    true = M.psnr_adps_batch(x, B.l1_wavelet(y, problem["maps"], m, lam, iters=60))
    est = M.psnr_adps_batch(x, B.l1_wavelet(y, est_maps[method], m, lam, iters=60))
    assert np.all(true > 25), true  # the problem itself is solvable
    assert np.all(est > true - tol), (est, true)


@pytest.mark.parametrize("which", ["true", "estimated"])
def test_cg_sense_is_never_below_zero_filled_at_r8(problem, est_maps, which):
    x, y, m = problem["x"], problem["y"], problem["mask"]
    maps = problem["maps"] if which == "true" else torch.from_numpy(est_maps[DEFAULT_MAPS])
    zf = M.psnr_adps_batch(x, B.zero_filled(y, maps, m))
    for iters in (10, 30, 100):  # the default regularisation keeps it there however long CG runs
        cg = M.psnr_adps_batch(x, B.cg_sense(y, maps, m, iters=iters))
        assert np.all(cg > zf + 2), (iters, cg, zf)


# ----------------------------------------------------------------------------------------------
# prep: true maps, noise_std, the forward-model residual


def write_simulated(path, problem, *, maps=True, sigma=True, oversample=False):
    """A fully sampled simulated fastMRI file as the converters write it: k-space ``F(S x + n)``,
    ``sim_coil_maps`` (the true maps) and the attribute ``noise_sigma`` (per slice)."""
    from data_prep.common import complex_noise, rng_for, write_fastmri

    x, S = problem["x"].numpy(), problem["maps"].numpy()[0]
    H = 2 * N if oversample else N
    Sf = np.pad(S, ((0, 0), (N // 2, N // 2), (0, 0)), mode="edge") if oversample else S
    xf = np.pad(x, ((0, 0), (N // 2, N // 2), (0, 0))) if oversample else x
    coil = xf[:, None] * Sf[None]
    sig = np.array([0.01, 0.02], dtype=np.float32)
    for s in range(len(coil)):
        coil[s] += complex_noise(rng_for(5, s), coil.shape[1:], sig[s])
    datasets = {"sim_coil_maps": Sf.astype(np.complex64)} if maps else None
    extra = {"noise_sigma": sig} if sigma else {}
    write_fastmri(path, fft2c(coil).astype(np.complex64), datasets=datasets, recon_size=(N, N),
                  extra_attrs=extra)
    return sig, H


def _read(p):
    import h5py

    with h5py.File(p) as f:
        return {k: f[k][()] for k in f}, dict(f.attrs)


def test_prep_true_maps_explain_the_data_down_to_the_noise(problem, tmp_path):
    sig, _ = write_simulated(tmp_path / "raw" / "sim.h5", problem)
    msgs = []
    opts = PrepOptions(split="val", accel=(R,), mask_type="poisson", maps="true", coils=6)
    run_prep(tmp_path / "raw", tmp_path / "out", opts, progress=False, echo=msgs.append)
    d, a = _read(tmp_path / "out" / "sim.h5")
    # noise_std in prepared units: the known sigma over the norm (compression keeps white noise white)
    np.testing.assert_allclose(d["noise_std"], sig / d["norm"], rtol=1e-5)
    assert d["noise_std"].dtype == np.float32 and d["noise_std"].shape == (2,)
    # the true maps, compressed like the k-space (U^H S), fit the data: residual ~ the noise share
    fr, nr = np.asarray(a["forward_residual"]), np.asarray(a["noise_residual"])
    assert np.all(fr < 1.1 * nr) and np.all(fr > 0.8 * nr), (fr, nr)
    assert a["maps_kind"] == "true" and json.loads(a["noise_std_source"]) == ["simulated"] * 2
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    entry = man["files"][0]
    assert man["options"]["maps"] == "true" and entry["maps"] == "true"
    assert entry["forward_residual"] == pytest.approx(fr.tolist()) and len(entry["noise_std"]) == 2
    assert not [m for m in msgs if "worse than the noise" in m]


def test_prep_estimated_maps_residual_and_one_line_warning(problem, tmp_path):
    write_simulated(tmp_path / "raw" / "sim.h5", problem)
    msgs = []
    opts = PrepOptions(split="val", accel=(R,), mask_type="poisson", maps="lowres", calib=4, center_lines=8)
    run_prep(tmp_path / "raw", tmp_path / "out", opts, progress=False, echo=msgs.append)
    _, a = _read(tmp_path / "out" / "sim.h5")
    fr, nr = np.asarray(a["forward_residual"]), np.asarray(a["noise_residual"])
    assert np.all(fr > 1.5 * nr)  # 4 x 4 low-resolution maps cannot explain this data
    warn = [m for m in msgs if "worse than the noise" in m]
    assert len(warn) == 1 and "sim.h5" in warn[0] and "\n" not in warn[0]


def test_prep_true_maps_follow_whitening_and_crop(problem, tmp_path):
    """Oversampled readout (whitened, cropped 128 -> 64 in image space): the maps go through the same
    coil transform and crop, so the fit stays at the noise level; whitened noise has std 1 / norm."""
    write_simulated(tmp_path / "raw" / "sim.h5", problem, oversample=True)
    opts = PrepOptions(split="val", accel=(R,), mask_type="poisson", maps="true", crop=(N, N), whiten=True)
    run_prep(tmp_path / "raw", tmp_path / "out", opts, progress=False, echo=lambda m: None)
    d, a = _read(tmp_path / "out" / "sim.h5")
    assert a["whitened"].all()
    np.testing.assert_allclose(d["noise_std"], 1 / d["norm"], rtol=1e-5)
    fr, nr = np.asarray(a["forward_residual"]), np.asarray(a["noise_residual"])
    assert np.all(fr < 1.2 * nr), (fr, nr)


def test_prep_true_maps_missing_is_one_line_naming_the_file(problem, tmp_path):
    write_simulated(tmp_path / "raw" / "plain.h5", problem, maps=False)
    opts = PrepOptions(split="val", accel=(R,), mask_type="poisson", maps="true")
    with pytest.raises(ConfigError) as e:
        run_prep(tmp_path / "raw", tmp_path / "out", opts, progress=False, echo=lambda m: None)
    assert "plain.h5" in str(e.value) and "sim_coil_maps" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out" / "plain.h5").exists()


def test_noise_std_from_the_image_corner_without_whitening_or_known_sigma(problem, tmp_path):
    """Oversampled readout, --no-whiten, no noise_sigma: the image corner's coil covariance gives it."""
    write_simulated(tmp_path / "raw" / "sim.h5", problem, sigma=False, oversample=True)
    opts = PrepOptions(split="train", accel=(R,), mask_type="poisson", maps="espirit-torch", crop=(N, N),
                       whiten=False, coils=6)
    run_prep(tmp_path / "raw", tmp_path / "out", opts, progress=False, echo=lambda m: None)
    d, a = _read(tmp_path / "out" / "sim.h5")
    assert json.loads(a["noise_std_source"]) == ["image corner"] * 2
    np.testing.assert_allclose(d["noise_std"], np.array([0.01, 0.02]) / d["norm"], rtol=0.15)


def test_noise_std_is_nan_when_unknown(problem, tmp_path):
    write_simulated(tmp_path / "raw" / "sim.h5", problem, sigma=False)
    opts = PrepOptions(split="train", accel=(R,), mask_type="poisson", maps="espirit-torch")
    run_prep(tmp_path / "raw", tmp_path / "out", opts, progress=False, echo=lambda m: None)
    d, a = _read(tmp_path / "out" / "sim.h5")
    assert np.isnan(d["noise_std"]).all() and json.loads(a["noise_std_source"]) == ["unknown"] * 2


def test_prepared_noise_std_rules():
    assert prepared_noise_std(2.0, True, 7.0) == (0.5, "whitened")
    assert prepared_noise_std(2.0, False, 7.0) == (3.5, "simulated")
    assert prepared_noise_std(2.0, False, None, np.diag([4.0, 16.0])) == (pytest.approx(math.sqrt(10) / 2),
                                                                          "image corner")
    est, src = prepared_noise_std(2.0, False, None, None)
    assert math.isnan(est) and src == "unknown"


def test_forward_residual_of_exact_data_is_zero_and_of_noise_is_the_noise_share():
    rng = np.random.default_rng(1)
    S = rng.standard_normal((3, 16, 16)) + 1j * rng.standard_normal((3, 16, 16))
    x = rng.standard_normal((16, 16)) + 0j
    mask = rng.random((16, 16)) < 0.5
    y = mask * fft2c(S * x)
    assert forward_residual(y, S, mask, x, 0.0) == pytest.approx((0.0, 0.0), abs=1e-6)
    sigma = 0.2
    n = mask * (rng.standard_normal(y.shape) + 1j * rng.standard_normal(y.shape)) * sigma / math.sqrt(2)
    res, share = forward_residual(y + n, S, mask, x, sigma)
    assert res == pytest.approx(share, rel=0.1)


def test_crop_maps_matches_the_kspace_crop_of_the_coil_images():
    """Fully sampled: image-space crop, exact. Line mask: the phase encode is cropped in k-space, so the
    cropped maps times the cropped image reproduce the cropped k-space for band-limited maps and image."""

    rng = np.random.default_rng(2)
    H, W, h, w = 32, 32, 16, 24
    yy, xx = np.mgrid[:H, :W] / H
    S = np.stack([np.exp(2j * np.pi * (c * xx + yy) / 3) * (1 + 0.3 * c * yy) for c in range(3)]).astype(np.complex64)
    x = ifft2c(np.pad(rng.standard_normal((8, 8)) + 0j, 12)).astype(np.complex64)  # band-limited image
    k = fft2c(S * x).astype(np.complex64)
    kc, _ = crop_kspace(k, (h, w))
    np.testing.assert_allclose(crop_maps(S, (h, w)), center_crop(S, (h, w)))
    xc = center_crop(x, (h, w))
    np.testing.assert_allclose(fft2c(crop_maps(S, (h, w)) * xc), kc, atol=1e-5)
    line = np.ones((1, W), bool)
    kl, _ = crop_kspace(k, (h, w), line)
    Sl = crop_maps(S, (h, w), line)
    assert Sl.shape == (3, h, w)
    # the cropped k-space of x alone gives the coarse image; S_l x_l reproduces the cropped coil data
    xl = ifft2c(crop_kspace(fft2c(x[None]), (h, w), line)[0])[0]
    err = np.linalg.norm(fft2c(Sl * xl) - kl) / np.linalg.norm(kl)
    assert err < 0.15, err


# ----------------------------------------------------------------------------------------------
# Real anatomy with real head-coil maps (../shared/data)

@pytest.mark.shared_data
@pytest.mark.slow
def test_siat_head_maps_known_answer(shared_data):
    SHARED = shared_data
    from ambient_mri.masks import kspace_mask
    from data_prep.common import resample
    from data_prep.siat import head_coil_maps, load_siat, simulate_multicoil

    idx = [25, 335]  # validation series of `python -m data_prep siat` (all 500 slices, seed 0), not test
    x = resample(load_siat(SHARED, idx), (N, N), "fourier")
    S = head_coil_maps(SHARED, N)
    coil, _ = simulate_multicoil(x, S, NOISE, 0, idx)
    mask = np.stack([kspace_mask("poisson", (N, N), R, center=CALIB, seed=i).mask for i in range(2)])
    y = (fft2c(coil) * mask[:, None]).astype(np.complex64)
    est = estimated(y, mask, DEFAULT_MAPS)
    true = np.broadcast_to(S[None], est.shape)
    inside = np.abs(x) > 0.1 * np.abs(x).reshape(2, -1).max(1)[:, None, None]
    assert map_correlation(est, true, inside) > 0.98
    lam = 1e-3 * float(np.abs(x).max())
    p_true = M.psnr_adps_batch(x, B.l1_wavelet(y, true, mask, lam, iters=60))
    p_est = M.psnr_adps_batch(x, B.l1_wavelet(y, est, mask, lam, iters=60))
    assert np.all(p_true > 28), p_true  # the problem itself is solvable
    assert np.all(p_est > p_true - 1.0), (p_est, p_true)  # the target (0.6-0.8 dB measured)


def test_sake_completion_predicts_unmeasured_samples_and_reads_only_measured_ones(problem):
    """The completed 20 x 20 block is closer to the noiseless truth than zero filling, and changing the
    unmeasured samples changes nothing."""
    from ambient_mri.espirit import complete_block
    from ambient_mri.masks import center_slice

    y, m = problem["y"], problem["mask"]
    truth = fft2c(problem["maps"] * problem["x"][:, None])
    sl = (Ellipsis, center_slice(N, 20), center_slice(N, 20))
    blk = complete_block(y, m, 20, calib=CALIB)
    rel = lambda a: float((a - truth[sl]).norm() / truth[sl].norm())  # noqa: E731
    assert rel(blk) < 0.5 * rel(y[sl]), (rel(blk), rel(y[sl]))
    other = y + (~m[:, None]) * torch.randn_like(y)  # garbage where nothing was measured
    torch.testing.assert_close(complete_block(other, m, 20, calib=CALIB), blk)


@pytest.mark.slow
def test_sake_rank_by_hold_out_is_as_good_as_the_best_candidate_rank(problem):
    """The phantom needs a low rank (30 of C k^2 = 200; 50-55 suits brain data): the staged hold-out must
    find it, i.e. complete the 24 x 24 block as well as the best fixed candidate (measured 1.02-1.03x)."""
    from ambient_mri.espirit import RANK_FRACTIONS, complete_block
    from ambient_mri.masks import center_slice

    y, m = problem["y"], problem["mask"]
    truth = fft2c(problem["maps"] * problem["x"][:, None])[..., center_slice(N, 24), center_slice(N, 24)]
    err = lambda blk: (blk - truth).flatten(1).norm(dim=1) / truth.flatten(1).norm(dim=1)  # noqa: E731
    chosen = err(complete_block(y, m, 24, calib=CALIB))
    fixed = torch.stack([err(complete_block(y, m, 24, calib=CALIB, rank=round(f * COILS * 25)))
                         for f in RANK_FRACTIONS])
    assert torch.all(chosen < 1.1 * fixed.min(0).values), (chosen, fixed)
    assert torch.all(chosen < 0.5 * fixed.max(0).values), (chosen, fixed)
