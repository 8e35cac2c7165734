import numpy as np
import pytest
import sigpy
import sigpy.mri
import torch

from ambient_mri import coils
from ambient_mri.errors import ConfigError
from ambient_mri.fft import fft2c
from ambient_mri.operators import SenseOp, conjugate_gradient


def simulated(n=64, C=8, seed=0):
    """Phantom with smooth phase times normalised birdcage maps; returns (kspace, maps, image, support)."""
    maps = sigpy.mri.birdcage_maps((C, n, n), r=1.2).astype(np.complex64)
    maps /= np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True))
    img = np.abs(sigpy.shepp_logan((n, n))).astype(np.complex64)
    yy, xx = np.mgrid[:n, :n] / n
    img = img * np.exp(1j * 2.0 * (xx - 0.3) * (yy + 0.2)).astype(np.complex64)
    ksp = fft2c(maps * img)
    rng = np.random.default_rng(seed)
    ksp = ksp + 1e-3 * (rng.standard_normal(ksp.shape) + 1j * rng.standard_normal(ksp.shape))
    return ksp.astype(np.complex64), maps, img, np.abs(img) > 0.05


def alignment(est, true, support):
    """Mean over the support of |<S_est, S_true>| / (|S_est| |S_true|): 1 = same maps up to a phase."""
    num = np.abs((est.conj() * true).sum(0))
    den = np.sqrt((np.abs(est) ** 2).sum(0) * (np.abs(true) ** 2).sum(0)) + 1e-12
    return float((num / den)[support].mean())


def sense_error(maps, ksp, img, support):
    op = SenseOp(torch.from_numpy(maps)[None], torch.ones(ksp.shape[-2:]))
    y = torch.from_numpy(ksp)[None]
    x = conjugate_gradient(op.normal, op.adjoint(y), iters=30)[0].numpy()
    return float(np.linalg.norm((np.abs(x) - np.abs(img))[support]) / np.linalg.norm(np.abs(img)[support]))


@pytest.mark.parametrize("n,calib", [(64, 8), (128, 24)])
def test_lowres_and_espirit_recover_true_maps(n, calib):
    ksp, maps, img, support = simulated(n)
    acs_only = coils.acs_kspace(ksp, (calib, calib))
    low = coils.lowres_maps(acs_only, (calib, calib))
    esp = coils.espirit_maps(acs_only, calib)
    for est in (low, esp):
        assert est.shape == maps.shape
        assert alignment(est, maps, support) > 0.97
        assert sense_error(est, ksp, img, support) < 0.1
    # torch input gives the same low-resolution maps
    low_t = coils.lowres_maps(torch.from_numpy(acs_only), (calib, calib)).numpy()
    np.testing.assert_allclose(low_t, low, atol=1e-5)


def test_maps_only_read_the_acs_block():
    ksp, *_ = simulated(64)
    other = ksp.copy()
    region = coils.acs_kspace(np.ones_like(ksp), (8, 8)) == 0
    other[region] = 0
    np.testing.assert_allclose(coils.lowres_maps(ksp, (8, 8)), coils.lowres_maps(other, (8, 8)), atol=1e-6)
    np.testing.assert_allclose(coils.espirit_maps(ksp, 8), coils.espirit_maps(other, 8), atol=1e-4)


def test_coil_compression_keeps_energy_and_rejects_bad_counts():
    ksp, *_ = simulated(64)
    cc, U = coils.coil_compress(ksp, 4)
    assert cc.shape == (4, 64, 64) and U.shape == (8, 4)
    np.testing.assert_allclose(U.conj().T @ U, np.eye(4), atol=1e-5)
    kept = np.linalg.norm(cc) ** 2 / np.linalg.norm(ksp) ** 2
    assert kept > 0.9
    full, _ = coils.coil_compress(ksp, 8)
    np.testing.assert_allclose(np.linalg.norm(full), np.linalg.norm(ksp), rtol=1e-5)
    with pytest.raises(ConfigError):
        coils.coil_compress(ksp, 9)
