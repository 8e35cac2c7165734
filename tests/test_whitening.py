"""Prewhitening decision: whiten only from an image corner that holds noise (known answers on synthetic data).

Known answers used here (none from the code under test): white k-space noise through a centred block of
``L`` of ``N`` lines has neighbour correlation ``|sin(pi L / N) / (L sin(pi / N))|`` (Dirichlet kernel);
the corner of a fully sampled object that fills the field of view is the object itself (smooth: neighbour
correlation near 1); the corner outside the object of a 2x-oversampled readout is pure noise.
"""

import json

import numpy as np
import pytest
import sigpy
import sigpy.mri
from click.testing import CliRunner

from ambient_mri import masks
from ambient_mri.errors import DataError
from ambient_mri.fastmri_io import FastMRIVolume, write_volume
from ambient_mri.fft import fft2c
from ambient_mri.prep import PrepOptions, prepare_volume, run_prep
from ambient_mri.whitening import (CORNER_SMOOTH_MAX, corner_neighbour_correlation, corner_smooth_fraction,
                                   noise_covariance, noise_from_corner, noise_neighbour_correlation, prewhiten,
                                   prewhiten_slice, whitening_mode)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

C, H, W = 4, 64, 64


def cnoise(rng, *shape):
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / np.sqrt(2)


def noise_kspace(rng, C=C, H=H, W=W):
    """Coil-correlated white noise only: ``(C, H, W)`` k-space."""
    mix = np.eye(C) + 0.5 * rng.standard_normal((C, C))
    return fft2c((mix @ cnoise(rng, C, H * W)).reshape(C, H, W)).astype(np.complex64)


def object_images(H=H, W=W, C=C, fill=True):
    """Shepp-Logan x birdcage maps with a smooth phase. ``fill``: the phantom is twice the field of view
    and centre-cropped, so its top-left corner lies inside the head (a readout that is not oversampled, or
    an aliased object); otherwise it sits in the central half of the readout (2x oversampled: the corner
    holds nothing)."""
    if fill:
        img = sigpy.shepp_logan((2 * H, 2 * W)).real[H // 2 : H // 2 + H, W // 2 : W // 2 + W]
    else:
        img = np.zeros((H, W))
        img[H // 4 : H // 4 + H // 2] = sigpy.shepp_logan((H // 2, W)).real
    yy, xx = np.mgrid[:H, :W] / W
    maps = sigpy.mri.birdcage_maps((C, H, W), r=1.2)
    return (maps * img * np.exp(1j * (xx - 0.3 * yy))).astype(np.complex64)


def test_noise_neighbour_correlation_matches_the_dirichlet_kernel():
    assert np.allclose(noise_neighbour_correlation(np.ones((32, 48))), 0, atol=1e-12)  # fully sampled: white
    for L in (4, 11, 24):
        m = np.zeros((32, 48), bool)
        m[:, 24 - L // 2 : 24 - L // 2 + L] = True  # L contiguous lines around DC along W
        expected = abs(np.sin(np.pi * L / 48) / (L * np.sin(np.pi / 48)))
        rho = noise_neighbour_correlation(m)
        assert rho[0] == pytest.approx(0, abs=1e-12) and rho[1] == pytest.approx(expected, rel=1e-9)
    every_other = np.zeros((32, 48), bool)
    every_other[:, ::2] = True  # equispaced R = 2: noise aliases to distance W/2, neighbours stay uncorrelated
    assert noise_neighbour_correlation(every_other)[1] == pytest.approx(0, abs=1e-12)


def test_measured_neighbour_correlation_of_masked_noise_is_the_predicted_one():
    rng = np.random.default_rng(1)
    m = masks.kspace_mask("gaussian", (256, 256), 3, center=24, seed=2).mask  # (1, 256), a low-pass-heavy mask
    img = np.fft.ifft2(np.fft.ifftshift(cnoise(rng, 4, 256, 256) * m, axes=(-2, -1)))
    rho = noise_neighbour_correlation(np.broadcast_to(m, (256, 256)))
    assert rho[1] > 0.2  # the mask does correlate neighbours along W, and the prediction says how much
    np.testing.assert_allclose(corner_neighbour_correlation(img), rho, atol=0.02)
    assert corner_neighbour_correlation(object_images()[:, :30, :30]).min() > 0.9  # an image is smooth


@pytest.mark.parametrize("C", [1, 8])
def test_a_genuine_noise_corner_is_accepted_and_whitened(C):
    """Noise corners (fully sampled, line mask, 2-D Poisson) of an object in the centre half of a 2x
    oversampled readout: accepted for every seed, and the whitened corner noise has identity covariance."""

    kinds = {"full": None, "lines": masks.kspace_mask("random", (2 * H, W), 4, center=8, seed=0).mask,
             "poisson": masks.kspace_mask("poisson", (2 * H, W), 3, center=12, seed=0).mask}
    for seed in range(6):
        rng = np.random.default_rng(seed)
        k = fft2c(object_images(2 * H, W, C, fill=False)) + 0.02 * noise_kspace(rng, C, 2 * H, W)
        for name, m in kinds.items():
            km = k if m is None else k * m
            f = corner_smooth_fraction(np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(km, axes=(-2, -1)), norm="ortho"),
                                                       axes=(-2, -1))[:, :30, :30],
                                       np.ones((2 * H, W)) if m is None else np.broadcast_to(m, (2 * H, W)))
            assert f.max() < CORNER_SMOOTH_MAX, (name, seed, f)
            kw, reason = prewhiten_slice(km.astype(np.complex64), mask=m)
            assert reason is None, (name, seed)
            if m is None and C > 1:
                np.testing.assert_allclose(noise_covariance(noise_from_corner(kw, 30)), np.eye(C), atol=0.15)


def test_an_object_or_aliased_corner_is_refused():
    """The object fills the field of view (a readout that is not oversampled), fully sampled and through a
    2-D Poisson mask (zero-filled aliasing in the corner, as in the BART scan): refused, k-space untouched."""
    rng = np.random.default_rng(0)
    k = (fft2c(object_images()) + 0.02 * noise_kspace(rng)).astype(np.complex64)
    m = masks.kspace_mask("poisson", (H, W), 6, center=12, seed=1).mask
    for km, mask in ((k, None), (k * m, m)):
        out, reason = prewhiten_slice(km, mask=mask)
        assert reason is not None and "not noise" in reason
        assert out is km
    # the smooth share tracks the object's share of the corner power: equal power -> ~1/2 (refused), noise
    # ten times the object's power -> ~1/11 (accepted)
    from ambient_mri.fft import ifft2c

    obj, n = fft2c(object_images()), noise_kspace(rng)
    p_obj, p_noise = (np.mean(np.abs(ifft2c(a)[:, :30, :30]) ** 2) for a in (obj, n))
    for ratio, ok in ((1.0, False), (10.0, True)):
        k = (obj + np.sqrt(ratio * p_obj / p_noise) * n).astype(np.complex64)
        f = corner_smooth_fraction(ifft2c(k)[:, :30, :30], np.ones((H, W)))
        assert f.max() == pytest.approx(1 / (1 + ratio), abs=0.08)
        assert (prewhiten_slice(k)[1] is None) == ok


def vol_file(tmp_path, name, recon_h, *, fill, H=H):
    """A 2-slice volume with readout ``H`` and header recon readout ``recon_h``."""
    rng = np.random.default_rng(3)
    k = [fft2c(object_images(H, fill=fill)) + 0.02 * noise_kspace(rng, H=H) for _ in range(2)]
    return write_volume(tmp_path / name, np.stack(k).astype(np.complex64), recon_size=(recon_h, W))


def test_whitening_mode_follows_the_header_and_the_request(tmp_path):
    plain = vol_file(tmp_path, "plain.h5", H, fill=True)  # encoded 64 = recon 64
    partial = vol_file(tmp_path, "partial.h5", 48, fill=True)  # 64 < 2 x 48: not 2x oversampled
    over = vol_file(tmp_path, "over.h5", H // 2, fill=False)  # 64 = 2 x 32
    with FastMRIVolume(plain) as a, FastMRIVolume(partial) as b, FastMRIVolume(over) as c:
        assert not a.readout_oversampled and not b.readout_oversampled and c.readout_oversampled
        assert whitening_mode(None, a) == (False, None) and whitening_mode(None, b) == (False, None)
        assert whitening_mode(None, c) == ("try", None)
        assert all(whitening_mode(False, v) == (False, None) for v in (a, b, c))
        assert whitening_mode(True, c) == (True, None)
        mode, note = whitening_mode(True, a)
        assert mode is True and "not 2x oversampled" in note


def test_a_header_that_claims_oversampling_over_an_object_corner_is_not_whitened(tmp_path):
    """The old BART converter's mistake: recon readout half the encoded one, but the object fills the field
    of view. Default: not whitened, one note naming the file; --whiten: a one-line error naming the file."""
    liar = vol_file(tmp_path / "in", "liar.h5", H // 2, fill=True)
    lines = []
    res = run_prep(liar, tmp_path / "out", PrepOptions(split="test", maps="lowres", center_lines=8), progress=False,
                   echo=lines.append)
    assert not res.failed
    notes = [line for line in lines if line.startswith("note:")]
    assert len(notes) == 1 and str(liar) in notes[0] and "not prewhitened (2 of 2 slices)" in notes[0]
    import h5py

    with h5py.File(tmp_path / "out" / "liar.h5") as f:
        assert not f.attrs["whitened"].any() and "not noise" in json.loads(f.attrs["warnings"])[0]
    with pytest.raises(DataError, match="cannot prewhiten.*not noise") as e:
        prepare_volume(liar, PrepOptions(split="test", maps="lowres", center_lines=8, whiten=True))
    assert str(liar) in str(e.value) and "\n" not in str(e.value)
    # a genuine 2x-oversampled readout is whitened by default (128 rows: the 30-row corner lies outside the
    # central 64; with 64 rows it would reach into the object, and is refused)
    good = vol_file(tmp_path / "in2", "good.h5", H, fill=False, H=2 * H)
    arrays = prepare_volume(good, PrepOptions(split="test", maps="lowres", center_lines=8))
    assert arrays["attrs"]["whitened"].all()


def test_recon_whiten_option(tmp_path):
    from ambient_mri.commands.recon import command

    liar = vol_file(tmp_path / "in", "liar.h5", H // 2, fill=True)
    runner = CliRunner()
    base = ["--input", str(liar), "--method", "zf", "--accel", "4", "--mask-type", "poisson", "--center-lines", "12",
            "--no-nifti", "--no-png", "-q"]
    r = runner.invoke(command, base + ["--out", str(tmp_path / "off"), "--no-whiten"])
    assert r.exit_code == 0, r.output
    import h5py

    with h5py.File(tmp_path / "off" / "liar.h5") as f:
        assert not f.attrs["whitened"].any() and json.loads(f.attrs["options"])["whiten"] is False
    r = runner.invoke(command, base + ["--out", str(tmp_path / "on"), "--whiten"])
    assert r.exit_code != 0 and "cannot prewhiten" in r.output and str(liar) in r.output
    r = runner.invoke(command, [a for a in base if a != "-q"] + ["--out", str(tmp_path / "auto")])
    assert r.exit_code == 0 and f"note: {liar}: not prewhitened (2 of 2 slices)" in r.output


# ----------------------------------------------------------------------------------------------
# Noise covariance and whitening matrix (moved here from test_coils.py with the functions)


def test_prewhitening_gives_identity_noise_covariance():
    rng = np.random.default_rng(0)
    C = 6
    A = rng.standard_normal((C, C)) + 1j * rng.standard_normal((C, C))
    cov_true = A @ A.conj().T / C + np.eye(C)
    L = np.linalg.cholesky(cov_true)
    noise = L @ (rng.standard_normal((C, 40000)) + 1j * rng.standard_normal((C, 40000))) / np.sqrt(2)
    cov = noise_covariance(noise)
    np.testing.assert_allclose(cov, cov_true, atol=0.05 * np.abs(cov_true).max())
    white = prewhiten(noise.reshape(C, 200, 200), cov).reshape(C, -1)
    np.testing.assert_allclose(noise_covariance(white), np.eye(C), atol=0.03)


def test_noise_from_corner_reads_coil_image_corner():
    rng = np.random.default_rng(0)
    img = np.zeros((2, 64, 64), np.complex64)
    img[:, :30, :30] = rng.standard_normal((2, 30, 30))
    s = noise_from_corner(fft2c(img), 30)
    np.testing.assert_allclose(s, img[:, :30, :30].reshape(2, -1), atol=1e-5)
