"""Batched torch ESPIRiT (ambient_mri.espirit) against sigpy's EspiritCalib (via coils.espirit_maps),
the true maps of simulated data, and a real 8-coil slice."""

import numpy as np
import pytest
import sigpy
import sigpy.mri
import torch

from ambient_mri import coils
from ambient_mri.errors import ConfigError, DataError
from ambient_mri.espirit import (_power, espirit_maps_torch, kernel_autocorrelation, kernel_projector)
from ambient_mri.fft import fft2c, ifft2c, rss
from ambient_mri.masks import acs_region, equispaced_lines
from ambient_mri.operators import SenseOp, conjugate_gradient


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch and one BLAS thread: on the shared 2-core machine, two threads that wait for each other
    under other users' load made these small problems up to 50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: only limits numpy's BLAS (sigpy)
        yield
    else:
        with threadpool_limits(1):
            yield
    torch.set_num_threads(n)


def simulated(n=64, C=8, seed=0, shift=0.0):
    """Phantom with smooth phase times birdcage maps (sum |S|^2 = 1); (kspace, maps, image, support)."""
    maps = sigpy.mri.birdcage_maps((C, n, n), r=1.2).astype(np.complex64)
    maps /= np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True))
    img = np.abs(sigpy.shepp_logan((n, n))).astype(np.complex64)
    yy, xx = np.mgrid[:n, :n] / n
    img = img * np.exp(1j * (2.0 * (xx - 0.3) * (yy + 0.2) + shift)).astype(np.complex64)
    ksp = fft2c(maps * img)
    rng = np.random.default_rng(seed)
    ksp = ksp + 1e-3 * (rng.standard_normal(ksp.shape) + 1j * rng.standard_normal(ksp.shape))
    return ksp.astype(np.complex64), maps, img, np.abs(img) > 0.05


def coherence(a, b):
    """Per pixel ``|<a, b>| / (|a| |b|)`` over the coil axis 0 (1 = the same maps up to a phase)."""
    num = np.abs((a.conj() * b).sum(0))
    return num / (np.sqrt((np.abs(a) ** 2).sum(0) * (np.abs(b) ** 2).sum(0)) + 1e-12)


def sense_error(maps, ksp, img, support, mask):
    op = SenseOp(torch.from_numpy(maps)[None], torch.from_numpy(mask))
    x = conjugate_gradient(op.normal, op.adjoint(torch.from_numpy(ksp)[None] * op.mask), iters=30)[0].numpy()
    return float(np.linalg.norm((np.abs(x) - np.abs(img))[support]) / np.linalg.norm(np.abs(img)[support]))


def ours(ksp, calib, **kw):
    return espirit_maps_torch(torch.from_numpy(ksp)[None], calib, **kw)[0].numpy()


@pytest.mark.parametrize("n,calib", [(64, 8), (128, 24)])
def test_matches_sigpy_and_true_maps(n, calib):
    ksp, maps, img, support = simulated(n)
    ref = coils.espirit_maps(ksp, calib)
    est = ours(ksp, calib)
    assert est.shape == ref.shape and est.dtype == np.complex64
    # same subspace at every object pixel, same magnitudes, and (same phase convention) the same maps
    assert coherence(est, ref)[support].min() > 0.9999
    np.testing.assert_allclose(np.abs(est)[:, support], np.abs(ref)[:, support], atol=1e-3)
    assert np.abs(est - ref)[:, support].max() < 1e-3
    assert np.abs(np.angle(est[0][support])).max() < 1e-3  # first coil real non-negative
    for m in (est, ref):
        assert coherence(m, maps)[support].mean() > 0.99
    # SENSE with an R = 2 line mask is as good with our maps as with sigpy's
    mask = equispaced_lines(n, 2, center_lines=calib, seed=0).full(n)
    e_ours, e_ref = sense_error(est, ksp, img, support, mask), sense_error(ref, ksp, img, support, mask)
    assert e_ours < 0.1 and abs(e_ours - e_ref) < 2e-3


def test_eigh_solver_agrees_inside_the_object():
    ksp, _, _, support = simulated(64)
    a, b = ours(ksp, 8), ours(ksp, 8, method="eigh")
    assert np.abs(a - b)[:, support].max() < 1e-3


def test_power_by_squaring_is_plain_power_iteration():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 6, 9, dtype=torch.complex64, generator=g)
    A = X @ X.mH
    A[:10] = A[:10] + 5 * torch.eye(6)  # nearly degenerate top eigenvalues: power iteration not converged
    for n in (1, 2, 7, 100):
        x = torch.ones(50, 6, 1, dtype=torch.complex64)
        for _ in range(n):  # sigpy's PowerMethod
            y = A @ x
            lam = torch.linalg.vector_norm(y, dim=1)[:, 0]
            x = y / lam[:, None, None]
        v, e = _power(A, n)
        torch.testing.assert_close(v, x[..., 0], atol=2e-5, rtol=0)
        torch.testing.assert_close(e, lam, rtol=2e-5, atol=0)


def test_kernel_autocorrelation_sums_the_projector_along_offsets():
    g = torch.Generator().manual_seed(1)
    C, kw = 2, 3
    P = torch.randn(1, C * kw * kw, C * kw * kw, dtype=torch.complex64, generator=g)
    G = kernel_autocorrelation(P, C, kw)[0]
    Pr = P[0].reshape(C, kw, kw, C, kw, kw)
    direct = torch.zeros(C, C, 2 * kw - 1, 2 * kw - 1, dtype=P.dtype)
    for ry, rx, sy, sx in np.ndindex(kw, kw, kw, kw):
        direct[:, :, ry - sy + kw - 1, rx - sx + kw - 1] += Pr[:, ry, rx, :, sy, sx]
    torch.testing.assert_close(G, direct)


def test_projector_keeps_sigpys_singular_vectors():
    ksp, *_ = simulated(64)
    block = torch.from_numpy(ksp[None, :, 28:36, 28:36])
    P = kernel_projector(block, 4, 0.02)[0].numpy()
    mat = sigpy.array_to_blocks(ksp[:, 28:36, 28:36], [4, 4], [1, 1]).reshape(8, -1, 16)
    mat = mat.transpose(1, 0, 2).reshape(-1, 8 * 16)
    _, s, vh = np.linalg.svd(mat, full_matrices=False)
    vh = vh[s > 0.02 * s.max()]
    np.testing.assert_allclose(P, vh.T @ vh.conj(), atol=1e-4)


def test_batched_equals_one_by_one_and_only_reads_the_calibration_block():
    slices = [simulated(64, seed=s, shift=s)[0] for s in range(3)]
    k = torch.from_numpy(np.stack(slices))
    batched = espirit_maps_torch(k, 8)
    for i, s in enumerate(slices):
        torch.testing.assert_close(batched[i], espirit_maps_torch(torch.from_numpy(s), 8), atol=1e-5, rtol=0)
    outside = torch.from_numpy(~acs_region((64, 64), (8, 8)))
    other = torch.where(outside, torch.randn_like(k), k)
    assert torch.equal(espirit_maps_torch(other, 8), batched)


def test_chunking_over_rows_gives_the_same_maps():
    from ambient_mri.espirit import image_space_maps

    ksp, *_ = simulated(32)
    block = torch.from_numpy(ksp[None, :, 12:20, 12:20])
    G = kernel_autocorrelation(kernel_projector(block, 4, 0.02), 8, 4)
    whole = image_space_maps(G, (32, 32), 4, chunk_bytes=1 << 30)
    rows = image_space_maps(G, (32, 32), 4, chunk_bytes=3 * 32 * 64 * 8)
    torch.testing.assert_close(rows, whole, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape,calib", [((64, 64), (64, 12)), ((65, 63), (65, 11))])
def test_rectangular_block_of_a_line_mask(shape, calib):
    """1-D line masks sample every row of ``calib[1]`` central columns: use the whole rectangle."""
    H, W = shape
    n = max(H, W)
    ksp, maps, img, support = simulated(n)
    ksp = fft2c(ifft2c(ksp)[:, :H, :W]).astype(np.complex64)
    maps, support = maps[:, :H, :W], support[:H, :W]
    est = ours(ksp, calib)
    assert coherence(est, maps)[support].mean() > 0.99
    square = ours(ksp, min(calib))
    assert coherence(est, square)[support].mean() > 0.999
    other = np.where(acs_region(shape, calib), ksp, 0)
    np.testing.assert_array_equal(ours(other, calib), est)


def test_odd_square_block_matches_sigpy():
    """sigpy centres an odd block like fastMRI (they differ only for an odd matrix with an even block)."""
    ksp, _, _, support = simulated(64)
    ksp = fft2c(ifft2c(ksp)[:, :63, :63]).astype(np.complex64)
    support = support[:63, :63]
    est, ref = ours(ksp, 9), coils.espirit_maps(ksp, 9)
    assert np.abs(est - ref)[:, support].max() < 1e-3


def test_crop_zeroes_the_maps_like_sigpy():
    ksp, *_ = simulated(64)
    est = ours(ksp, 8, crop=0.95)
    ref = coils.espirit_maps(ksp, 8, crop=0.95)
    zero_ours, zero_ref = np.all(est == 0, axis=0), np.all(ref == 0, axis=0)
    assert 0.05 < zero_ref.mean() < 0.95
    assert np.mean(zero_ours != zero_ref) < 0.005
    np.testing.assert_allclose(est[:, ~zero_ours & ~zero_ref], ref[:, ~zero_ours & ~zero_ref], atol=1e-3)


def test_dtype_device_and_errors():
    ksp, *_ = simulated(32)
    k = torch.from_numpy(ksp).to(torch.complex128)[None]
    assert espirit_maps_torch(k, 8, max_iter=5).dtype == torch.complex64
    with pytest.raises(ConfigError):
        espirit_maps_torch(k, 40)
    with pytest.raises(ConfigError, match="kernel width"):
        espirit_maps_torch(k, (1, 20))
    with pytest.raises(ConfigError):
        espirit_maps_torch(k, 8, method="lanczos")
    with pytest.raises(ConfigError):
        espirit_maps_torch(k, 8, max_iter=0)
    bad = k.clone()
    bad[0, 0, 16, 16] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        espirit_maps_torch(bad, 8)
    with pytest.raises(DataError, match="slice 1"):
        espirit_maps_torch(torch.cat([k, torch.zeros_like(k)]), 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    ksp, _, _, support = simulated(64)
    k = torch.from_numpy(np.stack([ksp, ksp[::-1].copy()]))
    cpu = espirit_maps_torch(k, 8)
    gpu = espirit_maps_torch(k.cuda(), 8)
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() - cpu).abs()[..., torch.from_numpy(support)].max() < 1e-3


@pytest.mark.shared_data
def test_real_head_slice_matches_sigpy(shared_data):
    import scipy.io

    coil_images = np.moveaxis(scipy.io.loadmat(shared_data / "head8ch" / "head.mat")["data"], -1, 0)
    # the central 128 x 128 of k-space (a real, lower-resolution slice) keeps the test fast
    ksp = fft2c(coil_images)[:, 64:192, 64:192].astype(np.complex64)
    image = rss(ifft2c(ksp), dim=0)
    support = image > 0.1 * image.max()
    est, ref = ours(ksp, 24), coils.espirit_maps(ksp, 24)
    assert coherence(est, ref)[support].min() > 0.999
    np.testing.assert_allclose(np.abs(est)[:, support], np.abs(ref)[:, support], atol=1e-3)
    # SENSE at R = 3 against the fully sampled SENSE image with sigpy's maps
    full = np.ones((128, 128), dtype=bool)
    op = SenseOp(torch.from_numpy(ref)[None], torch.from_numpy(full))
    truth = conjugate_gradient(op.normal, op.adjoint(torch.from_numpy(ksp)[None]), iters=30)[0].numpy()
    mask = equispaced_lines(128, 3, center_lines=24, seed=0).full(128)
    e_ours = sense_error(est, ksp, truth, support, mask)
    e_ref = sense_error(ref, ksp, truth, support, mask)
    assert e_ours < 0.2 and abs(e_ours - e_ref) < 5e-3
