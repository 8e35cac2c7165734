"""Samplers on a Gaussian prior whose exact denoiser is known (stationary: diagonal in k-space)."""

import numpy as np
import pytest
import torch
from torch import nn

from ambient_mri import masks
from ambient_mri.corruption import from_dict
from ambient_mri.error_variance import (local_error_variance, measured_counts, normal_diagonal,
                                        residual_error_variance)
from ambient_mri.fft import fft2c, ifft2c
from ambient_mri.operators import SenseOp
from ambient_mri.sampling import View, adps, aos, dc_sampler, edm_sigmas, model_view, nfe, posterior, prior_sample

N = 16


def spectrum(n=N):
    k = torch.fft.fftshift(torch.fft.fftfreq(n)) * n
    r2 = k[:, None] ** 2 + k[None] ** 2
    return (0.5 / (1 + r2 / 4.0)).float()  # E|X_k|^2, decaying: a smooth random image


class GaussianDenoiser(nn.Module):
    """Exact E[x0 | x0 + sigma eta] (noise E|eta_k|^2 = 2) for x0 with k-space variance P: P / (P + 2 sigma^2)."""

    sigma_data = 0.5

    def __init__(self):
        super().__init__()
        self.P = spectrum()
        self.calls = 0

    def forward(self, x_in, sigma, mask):
        self.calls += 1
        s2 = sigma.reshape(-1, 1, 1).float() ** 2
        return ifft2c(self.P / (self.P + 2 * s2) * fft2c(x_in))


def draw_prior(b, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.complex(torch.randn(b, N, N, generator=g), torch.randn(b, N, N, generator=g)) / np.sqrt(2)
    return ifft2c(spectrum().sqrt() * w)


def problem(b=4, seed=0):
    x0 = draw_prior(b, seed)
    maps = torch.ones(b, 1, N, N, dtype=torch.complex64)
    m = torch.from_numpy(masks.poisson_disc((N, N), 3, calib=(4, 4), seed=seed).mask)
    A = SenseOp(maps, m)
    return x0, A.forward(x0), maps, m, A


def test_edm_sigmas():
    t = edm_sigmas(18, 0.002, 80)
    assert t.shape == (19,) and abs(t[0] - 80) < 1e-3 and abs(t[17] - 0.002) < 1e-6 and t[18] == 0
    assert torch.all(t[1:] < t[:-1])


def test_prior_sampler_reproduces_the_prior_spectrum():
    D = GaussianDenoiser()
    view = View("clean")
    g = torch.Generator().manual_seed(0)
    # Heun's discretisation error on this linear ODE is +11 to +20 % variance at 18 steps and +1 to +2 % at
    # 50 (computed by integrating dx/dsigma = 2 sigma x / (P + 2 sigma^2) with the same schedule)
    x = prior_sample(D, view, (2000, N, N), steps=50, generator=g)
    emp = fft2c(x).abs().pow(2).mean(0)
    ratio = (emp / spectrum()).flatten()
    assert D.calls == 99  # Heun: 2 N - 1
    assert abs(ratio.mean().item() - 1) < 0.05 and ratio.std().item() < 0.1


def test_fixed_mask_prior_sampler_keeps_the_mask_and_is_seeded():
    meta = {"corruption": {"domain": "kspace", "mask_kind": "adps", "accel": 2, "center": 4, "acs": [N, 4],
                           "shape": [N, N], "further_accel": 3}}
    D = GaussianDenoiser()
    v1 = model_view(meta, 3, shape=(N, N), seed=5)
    v2 = model_view(meta, 3, shape=(N, N), seed=5)
    assert torch.equal(v1.mask, v2.mask) and v1.mask.shape == (3, 1, N)
    a = prior_sample(D, v1, (N, N), steps=6, generator=torch.Generator().manual_seed(1))
    b = prior_sample(D, v2, (N, N), steps=6, generator=torch.Generator().manual_seed(1))
    c = prior_sample(D, v2, (N, N), steps=6, generator=torch.Generator().manual_seed(2))
    assert a.shape == (3, N, N) and torch.equal(a, b) and not torch.equal(a, c)


def rel(a, b):
    return (torch.linalg.vector_norm((a - b).flatten(1), dim=1) / torch.linalg.vector_norm(b.flatten(1), dim=1))


def test_dc_sampler_consistent_with_data_and_posterior_spread():
    x0, y, maps, m, A = problem(b=1)
    D = GaussianDenoiser()
    K = 64
    post = posterior("dc", D, {"corruption": {"domain": "clean"}}, y, maps, m, samples=K, steps=12, seed=0, churn=10)
    assert post.samples.shape == (K, 1, N, N) and post.nfe == 23
    Ak = SenseOp(maps.repeat(K, 1, 1, 1), m)
    dc = rel(Ak.forward(post.samples[:, 0]), y.repeat(K, 1, 1, 1))
    assert dc.max() < 0.02
    # unmeasured frequencies are a priori independent of the measured ones: the posterior there is the prior
    spec = fft2c(post.samples[:, 0]).abs().pow(2).mean(0) / spectrum()
    unmeasured = ~m.bool()
    assert 0.6 < spec[unmeasured].mean() < 1.4
    assert post.std.shape == (1, N, N) and post.std.mean() > 0
    # deterministic by seed
    again = posterior("dc", D, {"corruption": {"domain": "clean"}}, y, maps, m, samples=K, steps=12, seed=0, churn=10)
    assert torch.equal(again.samples, post.samples)


def test_local_error_variance_matches_the_residual_moment_and_follows_the_signal():
    """``sum_p v_p (A^H A)_pp = ||r||^2 - m s^2`` (the moment match), uniform ``|D|`` gives the scalar
    :func:`residual_error_variance`, and an empty background gets the small variance of the floor."""
    x0, y, maps, m, A = problem(b=2, seed=1)
    maps = maps * torch.linspace(0.5, 1.0, N)[None, None, :, None]  # non-uniform |S|^2: the diagonal matters
    A = SenseOp(maps, m)
    noise = 0.01 * torch.complex(torch.randn(y.shape, generator=torch.Generator().manual_seed(0)),
                                 torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
    D = 0.8 * x0
    D[:, :, : N // 2] = 0  # the left half "background"
    r = A.forward(x0) + noise * m - A.forward(D)
    s2 = torch.full((2, 1, 1), 2e-4)
    v = local_error_variance(D, r, A, s2, floor=1e-9, window=3, spread=0.01)
    mc, _ = measured_counts(A)
    excess = r.abs().pow(2).flatten(1).sum(1) - mc.flatten() * 2e-4
    assert torch.allclose((v * normal_diagonal(A)).flatten(1).sum(1), excess, rtol=1e-4)
    assert (v[:, :, : N // 2 - 2].mean() < 0.05 * v[:, :, N // 2 + 2 :].mean())
    flat = torch.exp(1j * torch.rand(2, N, N, generator=torch.Generator().manual_seed(2)))
    scalar = residual_error_variance(r, A, s2, 1e-9)
    assert torch.allclose(local_error_variance(flat, r, A, s2, 1e-9), scalar.expand(2, N, N), rtol=1e-4)


def test_dc_local_gives_the_scalar_iterates_when_the_weight_is_uniform():
    """The whitened solve ``D + h u``, ``(h A^H A h + s^2) u = h A^H r``, spans the same Krylov space as the
    ``mu`` form: with ``spread`` huge (uniform weight) ``error_var="local"`` reproduces ``"residual"``; with
    the default spread it differs (and still fits the data)."""
    x0, y, maps, m, A = problem(b=2, seed=2)
    D = GaussianDenoiser()

    def run(**kw):
        return dc_sampler(D, View("clean"), y, A, steps=6, noise_std=0.01,
                          generator=torch.Generator().manual_seed(0), **kw)

    scalar, uniform, local = run(error_var="residual"), run(error_var="local", spread=1e9), run()
    assert rel(uniform, scalar).max() < 1e-3
    assert rel(local, scalar).max() > 1e-2
    assert rel(A.forward(local), y).max() < 0.1
    with pytest.raises(ValueError, match="error_var"):
        run(error_var="pixel")


def test_adps_fits_data_and_errs_like_an_independent_posterior_sample():
    x0, y, maps, m, A = problem(b=4, seed=3)
    D = GaussianDenoiser()
    # the normalised DPS step moves x by about 2 l per step whatever the image size, so l = 1 (tuned by A-DPS
    # at 384 x 320) is far too large for a 16 x 16 image; l = 0.1 here
    x = adps(D, View("clean"), y, A, steps=100, step_size=0.1, generator=torch.Generator().manual_seed(0))
    zf = A.adjoint(y)
    assert x.shape == x0.shape
    assert rel(A.forward(x), y).mean() < 0.1
    # this prior makes unmeasured frequencies independent of measured ones: the posterior mean is the
    # zero-filled image and a posterior sample errs by sqrt(2) times as much (an independent draw)
    ratio = (rel(x, x0).mean() / rel(zf, x0).mean()).item()
    assert abs(ratio - np.sqrt(2)) < 0.2, ratio


def test_aos_one_evaluation_conditioned_on_test_mask():
    x0, y, maps, m, A = problem(b=2)
    seen = {}

    class Spy(GaussianDenoiser):
        def forward(self, x_in, sigma, mask):
            seen["mask"], seen["sigma"] = mask, sigma
            return super().forward(x_in, sigma, mask)

    D = Spy()
    out = aos(D, y, A)
    assert out.shape == (2, N, N) and D.calls == 1
    assert torch.allclose(seen["sigma"], torch.full((2,), 0.003))
    assert torch.equal(seen["mask"][0].bool(), m.bool())
    assert nfe("aos", 1) == 1 and nfe("adps", 500) == 500 and nfe("dc", 25) == 49


def test_posterior_inpainting_and_bad_method():
    x0 = draw_prior(2, 1)
    box = torch.from_numpy(masks.random_box((N, N), 0.25, seed=0))
    y = box * x0
    meta = {"corruption": {"domain": "image", "kind": "box", "level": 0.25, "further_level": 0.1, "shape": [N, N]}}
    post = posterior("dc", GaussianDenoiser(), meta, y, None, box, samples=2, steps=5, seed=1)
    assert post.samples.shape == (2, 2, N, N)
    assert torch.allclose(post.samples[:, :, box] , y[:, box].expand(2, -1, -1), atol=0.05)
    with pytest.raises(ValueError):
        posterior("nonsense", GaussianDenoiser(), meta, y, None, box)


def test_prior_sampler_of_a_kspace_model_sees_the_training_coil_maps(tmp_path, monkeypatch):
    """``sample`` for a multi-coil k-space model: the view is ``S^H F^-1 M~ F S x`` with the maps of training
    slices (never identity maps); checked against the view computed here with numpy's FFT."""
    import h5py

    from ambient_mri import sampling
    from ambient_mri.errors import AmbientMRIError

    rng = np.random.default_rng(0)
    C = 3
    for i in range(2):
        m = rng.standard_normal((2, C, N, N)) + 1j * rng.standard_normal((2, C, N, N))
        m /= np.sqrt((np.abs(m) ** 2).sum(1, keepdims=True))
        with h5py.File(tmp_path / f"t{i}.h5", "w") as f:
            f["maps"] = m.astype(np.complex64)
    maps, names = sampling.training_maps(tmp_path, 4, shape=(N, N), seed=1)
    assert maps.shape == (4, C, N, N) and len(names) == 4
    again, names2 = sampling.training_maps(tmp_path, 4, shape=(N, N), seed=1)
    assert names == names2 and torch.equal(maps, again)
    for (name, s), mp in zip(names, maps):
        with h5py.File(tmp_path / name) as f:
            assert np.array_equal(f["maps"][s], mp.numpy())
    with pytest.raises(AmbientMRIError, match="--maps-from"):
        sampling.training_maps(tmp_path / "nowhere", 1)
    with pytest.raises(AmbientMRIError, match="matrix"):
        sampling.training_maps(tmp_path, 1, shape=(N + 2, N))

    seen = []
    real = sampling.prior_sample
    monkeypatch.setattr(sampling, "prior_sample", lambda den, view, shape, **kw: (seen.append(view),
                                                                                  real(den, view, shape, **kw))[1])
    corruption = {"domain": "kspace", "mask_kind": "adps", "accel": 2, "center": 4, "acs": [N, 4], "shape": [N, N],
                  "further_accel": 3}
    x, fm = sampling.draw_prior_samples(GaussianDenoiser(), corruption, 4, steps=3, batch=2, maps=maps)
    assert x.shape == (4, N, N) and len(seen) == 2
    z = draw_prior(2, 7)
    for b, view in enumerate(seen):
        S = maps[2 * b : 2 * b + 2].numpy()
        M = fm[2 * b : 2 * b + 2].numpy()[:, None].astype(float)  # (2, 1, 1, N)
        k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(S * z.numpy()[:, None], axes=(-2, -1)), norm="ortho"),
                            axes=(-2, -1))
        img = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(M * k, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
        expect = (S.conj() * img).sum(1)
        np.testing.assert_allclose(view(z).numpy(), expect, atol=1e-5)


def test_further_masks_within_the_test_mask():
    """``M~`` drawn inside the test mask by the training rule: a subset of it, the ACS block kept, the same
    fraction of samples as training keeps (R / R~), seeded."""
    corruption = {"domain": "kspace", "mask_kind": "poisson", "accel": 4.0, "center": 4, "acs": [4, 4],
                  "shape": [N, N], "further_accel": 5.0}
    test = torch.from_numpy(masks.poisson_disc((N, N), 3, calib=(4, 4), seed=2).mask)
    fm = from_dict(corruption).within(test, 6, seed=0)
    assert fm.shape == (6, N, N) and fm.dtype == torch.bool
    assert not (fm & ~test).any()  # inside the test mask
    acs = torch.from_numpy(masks.acs_region((N, N), (4, 4)))
    assert fm[:, acs].all()
    assert (fm.flatten(1).sum(1) == int(np.floor(int(test.sum()) * 4 / 5))).all()
    assert not torch.equal(fm[0], fm[1]) and torch.equal(fm, from_dict(corruption).within(test, 6, seed=0))
    # and through posterior(): the view's mask is inside the test mask
    x0, y, maps, m, A = problem(b=1)
    meta = {"corruption": dict(corruption)}
    seen = {}

    class Spy(GaussianDenoiser):
        def forward(self, x_in, sigma, mask):
            seen["mask"] = mask
            return super().forward(x_in, sigma, mask)

    posterior("dc", Spy(), meta, y, maps, m, samples=3, steps=2, noise_std=0.01, further="within")
    assert seen["mask"].shape == (3, N, N) and not (seen["mask"].bool() & ~m.bool()).any()
    posterior("dc", Spy(), meta, y, maps, m, samples=3, steps=2, noise_std=0.01)
    assert (seen["mask"].bool() & ~m.bool()).any()  # the published draw ignores the test mask
