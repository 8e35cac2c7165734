"""A complex Gaussian image prior with closed-form denoisers and posterior (the known answers of
tests/test_gaussian_posterior.py; nothing here comes from the sampler code under test).

Conventions (as the samplers): ``x0 ~ CN(0, Sigma)`` on ``n = N^2`` pixels, diffusion noise
``x_t = x0 + sigma eta`` with ``E[eta eta^H] = 2 I`` (real and imaginary parts standard normal),
measurements ``y = A x0 + n``, ``A = M F S`` (centred orthonormal FFT, maps ``S (C, N, N)``), noise
``E[n n^H] = s^2 I`` on the measured entries. Closed forms (linear-Gaussian conditioning, ``X^+`` the
pseudo-inverse on the range):

* oracle denoiser ``E[x0 | x_t] = Sigma (Sigma + 2 sigma^2 I)^-1 x_t``;
* ambient denoiser, given the view ``u = A~^H A~ x_t = Nm x0 + sigma Nm eta`` (``Nm = A~^H A~``,
  ``A~ = M~ F S``): ``Cov(x0, u) = Sigma Nm``, ``Cov(u) = Nm (Sigma + 2 sigma^2 I) Nm`` (the noise in
  ``A~ x_t`` has covariance ``2 sigma^2 A~ A~^H``), so ``E[x0 | u] = Sigma Nm (Nm (Sigma + 2 sigma^2) Nm)^+ u``;
  ``u`` determines ``A~ x_t`` (``A~^H`` is injective on the range of ``A~``), so this is ``E[x0 | A~ x_t, A~]``;
* posterior ``x0 | y``: mean ``Sigma A^H (A Sigma A^H + s^2 I)^-1 y``, covariance
  ``Sigma - Sigma A^H (A Sigma A^H + s^2 I)^-1 A Sigma``; the Bayes MMSE is its trace.
"""

from __future__ import annotations

import numpy as np
import torch

from ambient_mri import masks
from ambient_mri.fft import fft2c


def psd_root(S: np.ndarray) -> np.ndarray:
    """``R`` with ``R R^H = S`` for a Hermitian positive semi-definite ``S`` (eigenvalues clipped at 0)."""
    w, V = np.linalg.eigh(S)
    return V * np.sqrt(np.clip(w, 0, None))[None, :]


def fft_matrix(N: int) -> np.ndarray:
    """The centred orthonormal 2-D FFT as an ``(n, n)`` matrix on row-major flattened images."""
    eye = torch.eye(N * N, dtype=torch.complex128).reshape(N * N, N, N)
    return fft2c(eye).reshape(N * N, N * N).T.numpy()


def prior_covariance(N: int, *, corr: float = 2.0, background: float = 0.05, radius: float = 0.38) -> np.ndarray:
    """Correlated, non-stationary ``Sigma = E B E``: ``B`` stationary with k-space variance
    ``1 / (1 + |k|^2 / corr^2)`` (smooth images), ``E`` a diagonal envelope, 1 inside a disc of ``radius``
    (in units of the field of view) and ``background`` outside (a dark background, as in MR images).
    Scaled to ``tr(Sigma) / n = 2 sd^2`` with ``sd = 0.5`` (EDM's sigma_data)."""
    F = fft_matrix(N)
    k = np.fft.fftshift(np.fft.fftfreq(N)) * N
    P = 1.0 / (1.0 + (k[:, None] ** 2 + k[None] ** 2) / corr**2)
    B = F.conj().T @ np.diag(P.ravel()) @ F
    r = np.hypot(*np.meshgrid((np.arange(N) - N / 2 + 0.5) / N, (np.arange(N) - N / 2 + 0.5) / N, indexing="ij"))
    e = np.where(r < radius, 1.0, background).ravel()
    S = e[:, None] * B * e[None, :]
    S = (S + S.conj().T) / 2
    return S * (2 * 0.25 * N * N / np.trace(S).real)


def smooth_maps(N: int, C: int = 4, *, shift: float = 0.0) -> np.ndarray:
    """``C`` smooth coil maps ``(C, N, N)`` (Gaussian sensitivities at the sides with a linear phase),
    normalised to ``sum_c |S_c|^2 = 1``; ``shift`` moves every coil centre (a model mismatch)."""
    yy, xx = np.meshgrid(np.arange(N) / N - 0.5, np.arange(N) / N - 0.5, indexing="ij")
    maps = []
    for c in range(C):
        a = 2 * np.pi * c / C
        cy, cx = 0.6 * np.sin(a) + shift, 0.6 * np.cos(a) + shift
        mag = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.5)
        maps.append(mag * np.exp(1j * (np.pi * (yy * np.sin(a) + xx * np.cos(a)) + c)))
    m = np.stack(maps)
    return m / np.sqrt((np.abs(m) ** 2).sum(0, keepdims=True))


def sense_matrix(maps: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Dense ``A = M F S`` restricted to the measured rows: ``(C * count(M), n)``; ``mask (N, N)`` or ``(1, N)``."""
    C, N, _ = maps.shape
    F = fft_matrix(N)
    m = np.broadcast_to(np.asarray(mask, bool), (N, N)).ravel()
    return np.concatenate([F[m] * maps[c].ravel()[None, :] for c in range(C)])


def normal_matrix(maps: np.ndarray, mask: np.ndarray) -> np.ndarray:
    A = sense_matrix(maps, mask)
    return A.conj().T @ A


class GaussianModel:
    """Prior ``Sigma`` on ``N x N`` images, maps, and the closed-form quantities above."""

    def __init__(self, N: int = 12, C: int = 4, seed: int = 0, **prior_kw):
        self.N, self.n = N, N * N
        self.Sigma = prior_covariance(N, **prior_kw)
        self.maps = smooth_maps(N, C)
        self.root = psd_root(self.Sigma)  # Sigma = root root^H
        self.rng = np.random.default_rng(seed)

    def draw(self, b: int) -> np.ndarray:
        w = (self.rng.standard_normal((self.n, b)) + 1j * self.rng.standard_normal((self.n, b))) / np.sqrt(2)
        return (self.root @ w).T.reshape(b, self.N, self.N)

    def measure(self, x0: np.ndarray, mask: np.ndarray, s: float, maps: np.ndarray | None = None) -> np.ndarray:
        """``y = M F S x0 + M n``, ``(b, C, N, N)`` complex (zeros off the mask)."""
        maps = self.maps if maps is None else maps
        m = np.broadcast_to(np.asarray(mask, bool), (self.N, self.N))
        k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(maps[None] * x0[:, None], axes=(-2, -1)), norm="ortho"),
                            axes=(-2, -1))
        n = (self.rng.standard_normal(k.shape) + 1j * self.rng.standard_normal(k.shape)) * s / np.sqrt(2)
        return (k + n) * m

    def posterior(self, y: np.ndarray, mask: np.ndarray, s: float) -> tuple[np.ndarray, np.ndarray]:
        """Exact posterior mean ``(b, N, N)`` and covariance ``(n, n)`` of ``x0`` given ``y``."""
        A = sense_matrix(self.maps, mask)
        m = np.broadcast_to(np.asarray(mask, bool), (self.N, self.N)).ravel()
        yv = np.stack([yb.reshape(yb.shape[0], -1)[:, m].ravel() for yb in y], 1)  # (rows, b)
        G = self.Sigma @ A.conj().T
        K = np.linalg.solve(A @ G + s**2 * np.eye(A.shape[0]), np.eye(A.shape[0]))
        mean = (G @ K @ yv).T.reshape(-1, self.N, self.N)
        cov = self.Sigma - G @ K @ G.conj().T
        return mean, (cov + cov.conj().T) / 2


class _LinearDenoiser(torch.nn.Module):
    """``D(x_in; sigma, mask) = W(sigma, mask) x_in`` (differentiable, as ``networks.EDMDenoiser``)."""

    sigma_data = 0.5

    def __init__(self, model: GaussianModel):
        super().__init__()
        self.model, self.cache, self.calls = model, {}, 0

    def matrix(self, sigma: float, mask) -> np.ndarray:
        raise NotImplementedError

    def forward(self, x_in, sigma, mask=None):
        self.calls += 1
        sig = torch.as_tensor(sigma).reshape(-1).expand(x_in.shape[0])
        out = []
        for b in range(x_in.shape[0]):
            mb = None if mask is None else np.asarray(torch.as_tensor(mask)[b if mask.shape[0] > 1 else 0].cpu()) > 0
            W = torch.from_numpy(self.matrix(float(sig[b]), mb))
            out.append((W @ x_in[b].reshape(-1).to(torch.complex128)).reshape(x_in.shape[1:]))
        return torch.stack(out).to(x_in.dtype)


class OracleDenoiser(_LinearDenoiser):
    """Exact ``E[x0 | x_t] = Sigma (Sigma + 2 sigma^2 I)^-1 x_t`` (the mask is ignored)."""

    def matrix(self, sigma, mask):
        key = round(sigma, 12)
        if key not in self.cache:
            S = self.model.Sigma
            self.cache[key] = np.linalg.solve((S + 2 * sigma**2 * np.eye(len(S))).T, S.T).T
        return self.cache[key]


class AmbientDenoiser(_LinearDenoiser):
    """Exact ``E[x0 | A~^H A~ x_t, A~]`` for ``A~ = M~ F S`` (the model's maps), given ``M~`` as ``mask``."""

    def __init__(self, model: GaussianModel):
        super().__init__(model)
        self.basis = {}

    def matrix(self, sigma, mask):
        key = (mask.tobytes(), mask.shape, round(sigma, 12))
        if key not in self.cache:
            mk = key[:2]
            if mk not in self.basis:
                Nm = normal_matrix(self.model.maps, mask)
                w, V = np.linalg.eigh(Nm)
                Q = V[:, w > 1e-4 * w.max()]  # the view arrives in complex64: drop directions it cannot resolve
                self.basis[mk] = (Nm, Q)
            Nm, Q = self.basis[mk]
            S = self.model.Sigma
            Cu = Q.conj().T @ Nm @ (S + 2 * sigma**2 * np.eye(len(S))) @ Nm @ Q
            self.cache[key] = S @ Nm @ Q @ np.linalg.solve(Cu, Q.conj().T)
        return self.cache[key]


class PosteriorDenoiser(_LinearDenoiser):
    """Exact ``E[x0 | x_t, y]`` for one fixed ``y``: the denoiser of the posterior, whose probability-flow
    ODE samples ``p(x0 | y)`` (checks the harness: the ODE integrator itself reaches the posterior)."""

    def __init__(self, model: GaussianModel, y: np.ndarray, mask, s: float):
        super().__init__(model)
        self.A = sense_matrix(model.maps, mask)
        m = np.broadcast_to(np.asarray(mask, bool), (model.N, model.N)).ravel()
        self.yv = y.reshape(y.shape[0], -1)[:, m].ravel()
        self.s = s

    def matrix(self, sigma, mask):
        raise NotImplementedError

    def forward(self, x_in, sigma, mask=None):
        self.calls += 1
        sigma = float(torch.as_tensor(sigma).reshape(-1)[0])
        key = round(sigma, 12)
        if key not in self.cache:  # precision J = Sigma^-1 + A^H A / s^2 + I / (2 sigma^2), via Sigma's eigenbasis
            S, A, n = self.model.Sigma, self.A, self.model.n
            Ct = S - S @ np.linalg.solve(S + 2 * sigma**2 * np.eye(n), S)  # Cov(x0 | x_t)
            G = Ct @ A.conj().T
            K = np.linalg.inv(A @ G + self.s**2 * np.eye(A.shape[0]))
            Wt = np.linalg.solve((S + 2 * sigma**2 * np.eye(n)).T, S.T).T  # E[x0 | x_t] = Wt x_t
            self.cache[key] = (Wt - G @ K @ A @ Wt, G @ K @ self.yv)
        W, c = self.cache[key]
        xt = x_in.reshape(x_in.shape[0], -1).to(torch.complex128)
        out = xt @ torch.from_numpy(W).T + torch.from_numpy(c)[None]
        return out.reshape(x_in.shape).to(x_in.dtype)


def joint_posterior_mean(model: GaussianModel, x_t: np.ndarray, y: np.ndarray, mask, s: float,
                         sigma: float) -> np.ndarray:
    """Exact ``E[x0 | x_t, y]`` ``(b, N, N)`` for ``x_t (b, N, N)`` and ``y (b, C, N, N)``, from the joint
    Gaussian of ``(x0, x_t, y)`` in one step (not the two-stage ``PosteriorDenoiser`` form): with
    ``v = (x_t, y)``, ``Cov(x0, v) = [Sigma, Sigma A^H]``, ``Cov(v) = [[Sigma + 2 sigma^2 I, Sigma A^H],
    [A Sigma, A Sigma A^H + s^2 I]]`` and ``E[x0 | v] = Cov(x0, v) Cov(v)^-1 v``."""
    A = sense_matrix(model.maps, mask)
    S, n, r = model.Sigma, model.n, A.shape[0]
    m = np.broadcast_to(np.asarray(mask, bool), (model.N, model.N)).ravel()
    v = np.concatenate([x_t.reshape(x_t.shape[0], -1).T,
                        np.stack([yb.reshape(yb.shape[0], -1)[:, m].ravel() for yb in y], 1)])  # (n + r, b)
    SA = S @ A.conj().T
    cov_v = np.block([[S + 2 * sigma**2 * np.eye(n), SA], [SA.conj().T, A @ SA + s**2 * np.eye(r)]])
    return (np.concatenate([S, SA], 1) @ np.linalg.solve(cov_v, v)).T.reshape(-1, model.N, model.N)


class BatchedOracleDenoiser(OracleDenoiser):
    """:class:`OracleDenoiser` as one matrix product over the batch when every item has the same ``sigma``
    (as in the samplers): the same values, and a VJP (``W^H w``) fast enough for samplers that take many."""

    def forward(self, x_in, sigma, mask=None):
        sig = torch.as_tensor(sigma).reshape(-1)
        if not bool((sig == sig[0]).all()):
            return super().forward(x_in, sigma, mask)
        self.calls += 1
        W = torch.from_numpy(self.matrix(float(sig[0]), None))
        out = x_in.reshape(x_in.shape[0], -1).to(torch.complex128) @ W.T
        return out.reshape(x_in.shape).to(x_in.dtype)


def with_prior(model: GaussianModel, Sigma: np.ndarray) -> GaussianModel:
    """A copy of ``model`` (same maps) whose prior covariance is ``Sigma``."""
    m = GaussianModel.__new__(GaussianModel)
    m.N, m.n, m.maps, m.rng = model.N, model.n, model.maps, model.rng
    m.Sigma, m.root = Sigma, psd_root(Sigma)
    return m


class GaussianEM:
    """Expectation-maximisation of a zero-mean Gaussian prior from undersampled scans (the known answer for
    ``ambient_mri/em.py``'s loop). Scans: ``groups`` Poisson-disc masks (R = ``accel``; different masks make
    every frequency observed by some scan), ``per`` scans each, noise ``s``. Round ``r``: the E-step draws one
    posterior sample per scan under ``Sigma_r`` (``exact``: from the closed-form posterior; or a package
    sampler ``(method, kwargs)`` driven by the exact oracle denoiser of ``Sigma_r``), and the M-step is the
    maximum-likelihood fit to the samples, ``Sigma_{r+1} = (1/S) sum x x^H``. Scored each round by the
    posterior-mean MSE on held-out scans under ``Sigma_r`` over the Bayes MSE (under the true prior)."""

    def __init__(self, N: int = 8, C: int = 4, s: float = 0.05, groups: int = 8, per: int = 128, accel: float = 2.5,
                 seed: int = 0):
        self.truth = GaussianModel(N, C=C, seed=seed)
        self.s, self.per = s, per
        self.masks = [masks.poisson_disc((N, N), accel, calib=(2, 2), seed=j).mask for j in range(groups)]
        self.y = [self.truth.measure(self.truth.draw(per), m, s) for m in self.masks]
        self.x_test = self.truth.draw(128)
        self.y_test = [self.truth.measure(self.x_test, m, s) for m in self.masks[:2]]
        self.bayes = self.recon_mse(self.truth.Sigma)

    def recon_mse(self, Sigma) -> float:
        m = with_prior(self.truth, Sigma)
        return float(np.mean([np.mean(np.abs(m.posterior(y, mk, self.s)[0] - self.x_test) ** 2)
                              for y, mk in zip(self.y_test, self.masks)]))

    def e_step(self, Sigma, sampler, rng, seed: int) -> np.ndarray:
        """One posterior sample per scan under ``Sigma``: ``(scans, n)``."""
        from ambient_mri.sampling import posterior

        m, out = with_prior(self.truth, Sigma), []
        for j, (y, mk) in enumerate(zip(self.y, self.masks)):
            if sampler == "exact":
                mu, cov = m.posterior(y, mk, self.s)
                z = (rng.standard_normal((m.n, self.per)) + 1j * rng.standard_normal((m.n, self.per))) / np.sqrt(2)
                out.append(mu.reshape(self.per, -1) + (psd_root(cov) @ z).T)
            else:
                method, kw = sampler
                maps = torch.from_numpy(np.repeat(m.maps[None], self.per, 0).astype(np.complex64))
                x = posterior(method, BatchedOracleDenoiser(m), {"corruption": {"domain": "clean"}},
                              torch.from_numpy(y.astype(np.complex64)), maps, torch.from_numpy(mk.astype(np.float32)),
                              seed=seed + j, noise_std=self.s, **kw).samples[0]
                out.append(x.numpy().reshape(self.per, -1).astype(np.complex128))
        return np.concatenate(out)

    def run(self, Sigma0, sampler, rounds: int) -> list[dict]:
        """``rounds`` EM rounds from ``Sigma0``; per round (0 = the start): ``mse`` (over Bayes), ``cov_err``
        (``||Sigma_r - Sigma|| / ||Sigma||``, Frobenius) and ``trace`` (``tr Sigma_r / tr Sigma``)."""
        rng, S, out = np.random.default_rng(0), Sigma0, []
        T = self.truth.Sigma
        for r in range(rounds + 1):
            if r:
                X = self.e_step(S, sampler, rng, 100 * r)
                S = X.T @ X.conj() / len(X)
                S = (S + S.conj().T) / 2
            out.append({"mse": self.recon_mse(S) / self.bayes,
                        "cov_err": float(np.linalg.norm(S - T) / np.linalg.norm(T)),
                        "trace": float(np.trace(S).real / np.trace(T).real)})
        return out

