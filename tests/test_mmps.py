"""MMPS (ambient_mri/mmps.py) against closed-form Gaussian answers (tests/gaussian_model.py).

* one step: with the exact denoiser of a Gaussian prior, the MMPS posterior denoiser IS ``E[x0 | x_t, y]``,
  computed here from the joint Gaussian of ``(x0, x_t, y)`` (:func:`gaussian_model.joint_posterior_mean`);
* the VJP convention on complex data, against explicit real Jacobians, and the whole one-step formula for a
  non-circular prior (a denoiser that is not complex-linear), against the real joint Gaussian;
* the sampler on the harness problem of tests/test_gaussian_posterior.py (bias ~ 1/K, spread ~ 1).
"""

import numpy as np
import pytest
import torch

from ambient_mri import masks
from ambient_mri.errors import AmbientMRIError
from ambient_mri.mmps import NOISE_FLOOR, mmps, mmps_mean, nfe, tweedie_vjp
from ambient_mri.networks import build_denoiser
from ambient_mri.operators import InpaintOp, SenseOp
from ambient_mri.sampling import View, model_view
from tests.gaussian_model import (AmbientDenoiser, BatchedOracleDenoiser, GaussianModel, OracleDenoiser,
                                  joint_posterior_mean, normal_matrix, sense_matrix)
from tests.test_gaussian_posterior import AMBIENT, Problem

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

N = 10


@pytest.fixture(scope="module")
def gauss():
    """The harness prior (10 x 10, 4 coils, Poisson-disc R = 3), two scans, complex128 operator."""
    model = GaussianModel(N, C=4, seed=1)
    mask = masks.poisson_disc((N, N), 3, calib=(4, 4), seed=0).mask
    x0 = model.draw(2)
    A = SenseOp(torch.from_numpy(np.repeat(model.maps[None], 2, 0)), torch.from_numpy(mask.astype(np.float64)))
    return model, mask, x0, A


def noisy(x0, sigma, seed=0):
    rng = np.random.default_rng(seed)
    return x0 + sigma * (rng.standard_normal(x0.shape) + 1j * rng.standard_normal(x0.shape))


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# -- one step --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.0625, 0.25, 2.0, 8.0])
def test_one_step_is_the_exact_posterior_denoiser_of_a_gaussian_prior(gauss, sigma):
    """``D + 2 sigma^2 J^T A^H (s^2 + 2 sigma^2 A J^T A^H)^-1 (y - A D)`` with the exact oracle ``D`` equals
    ``E[x0 | x_t, y]`` of the joint Gaussian, per scan with its own ``s`` (0.05, 0.02). Measured (float64,
    200 CG steps): relative error 2e-9 at every sigma (float32 rounding of ``s^2``; 150 steps leave 3e-7 at
    sigma = 8, an ill-conditioned system); 5 CG steps are far off at high ``sigma`` (0.3 at sigma = 8),
    which the last assertion checks."""
    model, mask, x0, A = gauss
    s = np.array([0.05, 0.02])
    y = np.concatenate([model.measure(x0[i : i + 1], mask, s[i]) for i in range(2)])
    xt = noisy(x0, sigma)
    ref = np.concatenate([joint_posterior_mean(model, xt[i : i + 1], y[i : i + 1], mask, s[i], sigma)
                          for i in range(2)])
    D = OracleDenoiser(model)

    def run(iters):
        return mmps_mean(D, View("clean"), torch.from_numpy(xt), sigma, torch.from_numpy(y), A,
                         noise_std=torch.from_numpy(s), cg_iters=iters).numpy()

    err = rel_err(run(200), ref)
    print(sigma, err)
    assert err < 1e-6
    prior_only = rel_err(OracleDenoiser(model)(torch.from_numpy(xt), torch.tensor(sigma)).numpy(), ref)
    assert rel_err(run(0), ref) == pytest.approx(prior_only)  # no CG: the prior's D
    if sigma >= 2:
        assert rel_err(run(5), ref) > 1e-2


def test_zero_noise_uses_the_floor(gauss):
    """``noise_std = 0``: the system keeps ``s^2 = NOISE_FLOOR^2`` (positive definite), so the result is the
    exact posterior denoiser for ``s = NOISE_FLOOR`` (measured: 2e-12 relative, 400 CG steps at sigma =
    0.0625; near-noiseless systems are ill-conditioned and need many CG steps)."""
    model, mask, x0, A = gauss
    sigma = 0.0625
    y = model.measure(x0, mask, 0.0)
    xt = noisy(x0, sigma, seed=1)
    out = mmps_mean(OracleDenoiser(model), View("clean"), torch.from_numpy(xt), sigma, torch.from_numpy(y), A,
                    noise_std=0.0, cg_iters=400).numpy()
    assert np.isfinite(out).all()
    assert rel_err(out, joint_posterior_mean(model, xt, y, mask, NOISE_FLOOR, sigma)) < 1e-6
    with pytest.raises(ValueError, match="needs noise_std"):
        mmps_mean(OracleDenoiser(model), View("clean"), torch.from_numpy(xt), sigma, torch.from_numpy(y), A,
                  noise_std=None)


# -- complex data: the VJP convention -------------------------------------------------------------


def realify(z):
    """``C^n -> R^2n``: ``[Re z; Im z]`` of a flattened array."""
    z = np.asarray(z).ravel()
    return np.concatenate([z.real, z.imag])


def real_matrix(M, Nc=None):
    """The real ``2m x 2n`` matrix of ``z -> M z + Nc conj(z)`` on ``[Re z; Im z]`` (written out by hand)."""
    Nc = np.zeros_like(M) if Nc is None else Nc
    return np.block([[M.real + Nc.real, -M.imag + Nc.imag], [M.imag + Nc.imag, M.real - Nc.real]])


class WidelyLinear(torch.nn.Module):
    """``D(x) = M x + Nc conj(x)`` on flattened images: real-linear but not complex-linear when ``Nc != 0``,
    as a network on two real channels is."""

    def __init__(self, M, Nc):
        super().__init__()
        self.M, self.Nc = (torch.from_numpy(np.asarray(a, np.complex128)) for a in (M, Nc))

    def forward(self, x_in, sigma, mask=None):
        v = x_in.reshape(x_in.shape[0], -1)
        return (v @ self.M.T + v.conj() @ self.Nc.T).reshape(x_in.shape)


def tiny_operator(H=2, W=3, C=2, seed=0):
    rng = np.random.default_rng(seed)
    maps = rng.standard_normal((1, C, H, W)) + 1j * rng.standard_normal((1, C, H, W))
    mask = np.array([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    A = SenseOp(torch.from_numpy(maps), torch.from_numpy(mask))
    eye = torch.eye(H * W, dtype=torch.complex128).reshape(H * W, H, W)
    Amat = A.forward(eye).reshape(H * W, -1).T.numpy()  # (C H W, H W), zero rows off the mask
    return A, Amat, mask


def test_vjp_is_the_transpose_of_the_real_jacobian():
    """``J^T A^H w`` from :func:`tweedie_vjp` equals ``J_R^T A_R^T [Re w; Im w]`` with ``J_R`` written out
    by hand, for a widely-linear denoiser; for a complex-linear one (``Nc = 0``) that is ``M^H A^H w``."""
    rng = np.random.default_rng(3)
    n = 6
    A, Amat, _ = tiny_operator()
    x = torch.from_numpy(rng.standard_normal((1, 2, 3)) + 1j * rng.standard_normal((1, 2, 3)))
    w = rng.standard_normal((1, 2, 2, 3)) + 1j * rng.standard_normal((1, 2, 2, 3))
    M = rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))
    for Nc in (np.zeros((n, n)), rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))):
        D, AD, JtAh = tweedie_vjp(WidelyLinear(M, Nc), View("clean"), x, 0.5, A)
        got = realify(JtAh(torch.from_numpy(w), last=True).numpy())
        want = real_matrix(M, Nc).T @ real_matrix(Amat).T @ realify(w)
        assert np.abs(got - want).max() < 1e-12 * np.abs(want).max()
        assert np.allclose(D.numpy().ravel(), M @ x.numpy().ravel() + Nc @ x.numpy().ravel().conj())
        if not Nc.any():
            np.testing.assert_allclose(got, realify(M.conj().T @ Amat.conj().T @ w.ravel()), atol=1e-12)
        else:  # a widely-linear D: neither M^H nor (M + Nc)^H
            assert np.abs(got - realify(M.conj().T @ Amat.conj().T @ w.ravel())).max() > 0.1


def test_one_step_is_exact_for_a_non_circular_prior():
    """A real Gaussian prior on ``[Re x; Im x]`` with covariance ``P`` (not circular: its exact denoiser
    ``P (P + sigma^2 I)^-1`` is widely linear), real noise variance ``sigma^2`` per channel and ``s^2 / 2``
    per measured channel: MMPS equals the real joint-Gaussian ``E[x0 | x_t, y]`` (checks the factor 2
    between ``Cov = 2 sigma^2 J`` and the per-channel ``sigma^2``, and CG on the real representation)."""
    rng = np.random.default_rng(4)
    n, sigma, s = 6, 0.4, 0.1
    A, Amat, mask = tiny_operator()
    rows = np.tile(mask.ravel() > 0, 2)  # measured entries of (C, H, W), C = 2
    Ar = real_matrix(Amat[rows])
    L = rng.standard_normal((2 * n, 2 * n))
    P = L @ L.T / (2 * n) + 0.05 * np.eye(2 * n)
    G = P @ np.linalg.inv(P + sigma**2 * np.eye(2 * n))  # exact real denoiser, symmetric
    h = n
    M = (G[:h, :h] + G[h:, h:]) / 2 + 1j * (G[h:, :h] - G[:h, h:]) / 2
    Nc = (G[:h, :h] - G[h:, h:]) / 2 + 1j * (G[h:, :h] + G[:h, h:]) / 2
    assert np.allclose(real_matrix(M, Nc), G)
    x0r = np.linalg.cholesky(P) @ rng.standard_normal(2 * n)
    xtr = x0r + sigma * rng.standard_normal(2 * n)
    yr = Ar @ x0r + s / np.sqrt(2) * rng.standard_normal(Ar.shape[0])
    # the joint Gaussian of (x0, x_t, y) in the real representation
    PA = P @ Ar.T
    cov_v = np.block([[P + sigma**2 * np.eye(2 * n), PA], [PA.T, Ar @ PA + s**2 / 2 * np.eye(len(yr))]])
    want = np.concatenate([P, PA], 1) @ np.linalg.solve(cov_v, np.concatenate([xtr, yr]))

    def cplx(v):
        return v[: len(v) // 2] + 1j * v[len(v) // 2 :]

    y = np.zeros(2 * 2 * 3, complex)
    y[rows] = cplx(yr)
    got = mmps_mean(WidelyLinear(M, Nc), View("clean"), torch.from_numpy(cplx(xtr).reshape(1, 2, 3)), sigma,
                    torch.from_numpy(y.reshape(1, 2, 2, 3)), A, noise_std=s, cg_iters=100).numpy()
    # measured 5e-9: s^2 is rounded to float32 (error_variance.noise_variance)
    assert np.abs(realify(got) - want).max() < 1e-7 * np.abs(want).max()


# -- the sampler -----------------------------------------------------------------------------------


def run_mmps(p: Problem, K: int, **kw) -> np.ndarray:
    """``K`` MMPS chains for scan 0 of the harness problem (oracle denoiser), ``(K, 1, N, N)``."""
    y, maps = p.yt.repeat(K, 1, 1, 1), p.st.repeat(K, 1, 1, 1)
    x = mmps(BatchedOracleDenoiser(p.model), View("clean"), y, SenseOp(maps, p.mt), noise_std=p.s,
             generator=torch.Generator().manual_seed(0), **kw)
    return x.numpy()[:, None]


def test_nfe_counts_vjps():
    assert nfe(25, 5) == 49 * 6


def test_mmps_runs_a_network_batched_under_no_grad():
    """A tiny EDM network with a k-space view (SENSE) and with an image-domain operator (inpainting): two
    scans with their own ``s`` (one of them 0), called under ``torch.no_grad`` as recon does; the result has
    the image shape, is finite, carries no graph, and no gradient reaches the network's parameters."""
    torch.manual_seed(0)
    net = build_denoiser({"channels": [8, 8], "groups": 4}).eval()
    B, C, H, W = 2, 3, 8, 8
    maps = torch.randn(B, C, H, W, dtype=torch.complex64)
    mask = torch.from_numpy(masks.poisson_disc((H, W), 2, calib=(4, 4), seed=0).mask.astype(np.float32))
    further = mask[None].repeat(B, 1, 1)
    x0 = torch.randn(B, H, W, dtype=torch.complex64)
    for A, view in ((SenseOp(maps, mask), View("kspace", further, maps)),
                    (InpaintOp(mask, like=x0), View("clean"))):
        y = A.forward(x0)
        with torch.no_grad():
            x = mmps(net, view, y, A, noise_std=torch.tensor([0.05, 0.0]), steps=3, cg_iters=2,
                     generator=torch.Generator().manual_seed(0))
        assert x.shape == (B, H, W) and x.dtype == torch.complex64 and not x.requires_grad
        assert torch.isfinite(torch.view_as_real(x)).all()
        assert all(p.grad is None for p in net.parameters())


@pytest.mark.slow
def test_mmps_with_the_exact_denoiser_samples_the_exact_posterior():
    """The harness problem (s = 0.05, K = 64, 25 Heun steps; 2.5-6 s) and the harness's own bounds (bias < 3/K,
    spread 0.85-1.15, what the posterior ODE with the exact posterior denoiser reaches). Measured: 30 CG
    steps bias 0.95/K, spread 1.06 (as exact as the harness, unlike DPS's 4.8 and DC's 0.70 bias); one CG
    step bias 65/K, spread 3.1 (the truncated solve under-uses the data), which must miss."""
    p = Problem()
    K = 64
    bias, spread, _ = p.stats(run_mmps(p, K, steps=25, cg_iters=30))
    rough = p.stats(run_mmps(p, K, steps=25, cg_iters=1))
    print((bias * K, spread), (rough[0] * K, rough[1]))
    assert bias < 3 / K and 0.85 < spread < 1.15, (bias, spread)
    assert rough[0] > 10 / K


def test_an_ambient_denoiser_gives_an_indefinite_system_and_mmps_says_so():
    """The exact ambient denoiser ``E[x0 | A~ x_t, A~]`` has ``J = W Nm``, not a covariance: the MMPS system
    ``s^2 I + 2 sigma^2 A J^T A^H`` has a Hermitian part with negative eigenvalues at mid noise (measured at
    sigma = 0.5: -0.023 for the first chain's M~, against s^2 = 0.0025; the oracle's is >= s^2), so CG is
    not valid; the chains diverge (measured: all 4 with 5 CG steps; with 1 CG step they stay finite but
    are useless, bias 10, spread 50) and :func:`mmps` raises a one-line error instead of returning NaN."""
    p, K, sigma = Problem(), 4, 0.5
    maps = p.st.repeat(K, 1, 1, 1)
    view = model_view(AMBIENT, K, shape=(N, N), maps=maps, seed=0)
    A = sense_matrix(p.model.maps, p.mask)
    fm = view.mask[0].numpy() > 0
    J = AmbientDenoiser(p.model).matrix(sigma, fm) @ normal_matrix(p.model.maps, fm)
    Jo = OracleDenoiser(p.model).matrix(sigma, None)
    for Jac, sign in ((J, -1), (Jo, 1)):
        op = p.s**2 * np.eye(len(A)) + 2 * sigma**2 * A @ Jac.conj().T @ A.conj().T
        low = np.linalg.eigvalsh((op + op.conj().T) / 2).min()
        assert (low < -p.s**2) if sign < 0 else (low > 0.99 * p.s**2), low
    with pytest.raises(AmbientMRIError, match="mmps diverged"):
        mmps(AmbientDenoiser(p.model), view, p.yt.repeat(K, 1, 1, 1), SenseOp(maps, p.mt), noise_std=p.s, steps=25,
             cg_iters=5, generator=torch.Generator().manual_seed(0))
