"""Loss values on hand-computed cases, and the known-answer test of the ambient theory."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from ambient_mri import masks
from ambient_mri.config import load_config
from ambient_mri.corruption import from_data
from ambient_mri.fft import fft2c, ifft2c
from ambient_mri.losses import (ambient_image_loss, ambient_input, ambient_kspace_loss, build_loss, edm_loss,
                                edm_weight, sample_sigma)
from ambient_mri.operators import SenseOp


class Fixed(nn.Module):
    """A denoiser that returns a fixed image (or its input when ``out`` is None)."""

    sigma_data = 0.5

    @staticmethod
    def sigma_eff(sigma):  # plain EDM preconditioning (sigma_view = 0)
        return sigma

    def __init__(self, out=None):
        super().__init__()
        self.out = out
        self.seen = None

    def forward(self, x_in, sigma, mask):
        self.seen = (x_in, mask)
        return x_in if self.out is None else self.out


def test_edm_weight_and_sigma_distribution():
    s = torch.tensor([0.5, 1.0])
    assert torch.allclose(edm_weight(s, 0.5), torch.tensor([8.0, 5.0]))
    sig = sample_sigma(20000, generator=torch.Generator().manual_seed(0))
    assert abs(sig.log().mean() + 1.2) < 0.03 and abs(sig.log().std() - 1.2) < 0.03


def test_kspace_loss_hand_computed():
    # single coil, 1 x 4 image, mask keeps lines 1 and 2; denoiser returns zeros -> loss = w ||y||^2 / (H W)
    y = torch.zeros(1, 1, 1, 4, dtype=torch.complex64)
    y[0, 0, 0, 1], y[0, 0, 0, 2] = 3 + 4j, 1.0
    mask = torch.tensor([[[0.0, 1.0, 1.0, 0.0]]])
    maps = torch.ones(1, 1, 1, 4, dtype=torch.complex64)
    sigma = torch.tensor([0.5])
    zero = Fixed(torch.zeros(1, 1, 4, dtype=torch.complex64))
    loss = ambient_kspace_loss(zero, y, mask, maps, mask, sigma, eta=torch.zeros(1, 1, 4, dtype=torch.complex64))
    assert torch.allclose(loss, torch.tensor([8.0 * (25 + 1) / 4]))
    # the denoiser sees A~^H (M~ y) when eta = 0; with M~ dropping line 2 it sees only line 1
    fm = torch.tensor([[[0.0, 1.0, 0.0, 0.0]]])
    ambient_kspace_loss(zero, y, mask, maps, fm, sigma, eta=torch.zeros(1, 1, 4, dtype=torch.complex64))
    expect = ifft2c(y[0, 0] * fm[0])
    assert torch.allclose(zero.seen[0][0], expect) and torch.equal(zero.seen[1], fm)
    # a perfect denoiser (returns x0) has zero loss even though it never saw x0
    x0 = torch.randn(1, 1, 4, dtype=torch.complex64)
    y0 = mask[:, None] * fft2c(x0[:, None])
    assert ambient_kspace_loss(Fixed(x0), y0, mask, maps, fm, sigma).item() < 1e-10


def test_kspace_loss_only_uses_measured_lines_and_noise_is_masked():
    g = torch.Generator().manual_seed(0)
    B, C, H, W = 2, 3, 8, 8
    maps = torch.randn(B, C, H, W, dtype=torch.complex64, generator=g)
    m = torch.from_numpy(np.stack([masks.adps_lines(W, 2, center_lines=2, seed=s).mask for s in range(B)]))
    fm = masks.further_kspace_mask(m, (1, 2), further_accel=4, generator=g)
    y = SenseOp(maps, m).forward(torch.randn(B, H, W, dtype=torch.complex64, generator=g))
    eta = torch.randn(B, H, W, dtype=torch.complex64, generator=g)
    x_in = ambient_input(y, maps, fm, torch.tensor([1.0, 2.0]), eta)
    # the view is in the range of A~^H: unchanged by the projection-like normal op's masked k-space
    k = fft2c(maps * x_in[:, None])
    assert torch.allclose(SenseOp(maps, fm).adjoint(k * 0 + y + torch.tensor([1.0, 2.0])[:, None, None, None] *
                                                    fft2c(maps * eta[:, None])), x_in, atol=1e-4)
    # changing y outside M~ does not change the view; changing it outside M does not change the loss
    y2 = y + (1 - fm.float())[:, None] * m[:, None] * 5.0
    assert torch.allclose(ambient_input(y2, maps, fm, torch.tensor([1.0, 2.0]), eta), x_in, atol=1e-5)


def test_kspace_and_image_forms_agree_single_coil():
    g = torch.Generator().manual_seed(1)
    B, H, W = 3, 8, 8
    maps = torch.ones(B, 1, H, W, dtype=torch.complex64)
    m = torch.from_numpy(np.stack([masks.adps_lines(W, 2, center_lines=2, seed=s).mask for s in range(B)]))
    fm = masks.further_kspace_mask(m, (1, 2), further_accel=4, generator=g)
    y = SenseOp(maps, m).forward(torch.randn(B, H, W, dtype=torch.complex64, generator=g))
    D = Fixed(torch.randn(B, H, W, dtype=torch.complex64, generator=g))
    sig = torch.tensor([0.1, 1.0, 3.0])
    eta = torch.randn(B, H, W, dtype=torch.complex64, generator=g)
    a = ambient_kspace_loss(D, y, m, maps, fm, sig, eta=eta, domain="kspace")
    b = ambient_kspace_loss(D, y, m, maps, fm, sig, eta=eta, domain="image")
    assert torch.allclose(a, b, rtol=1e-5)
    # multi-coil, fully sampled, sum_c |S_c|^2 = 1: A^H A = I, so the two forms agree as well
    maps = torch.randn(B, 4, H, W, dtype=torch.complex64, generator=g)
    maps = maps / maps.abs().pow(2).sum(1, keepdim=True).sqrt()
    full = torch.ones(B, 1, W)
    y = SenseOp(maps, full).forward(torch.randn(B, H, W, dtype=torch.complex64, generator=g))
    a = ambient_kspace_loss(D, y, full, maps, fm, sig, eta=eta, domain="kspace")
    b = ambient_kspace_loss(D, y, full, maps, fm, sig, eta=eta, domain="image")
    assert torch.allclose(a, b, rtol=1e-4)


def test_image_and_edm_losses_hand_computed():
    y = torch.zeros(1, 2, 2, dtype=torch.complex64)
    y[0, 0, 0] = 2.0
    mask = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    D = Fixed(torch.full((1, 2, 2), 1.0, dtype=torch.complex64))
    sig = torch.tensor([1.0])
    # masked residual: (1-2)^2 + 0 (masked) + 1 + 1 = 3, over H W = 4, weight (1 + .25) / .25 = 5
    loss = ambient_image_loss(D, y, mask, mask, sig, eta=torch.zeros_like(y))
    assert torch.allclose(loss, torch.tensor([5.0 * 3 / 4]))
    assert torch.allclose(edm_loss(D, y, sig, eta=torch.zeros_like(y)), torch.tensor([5.0 * 4 / 4]))
    assert D.seen[1] is None


# --------------------------------------------------------------------------------------------
# Known answer: Gaussian images, random line masks. The minimiser of the ambient loss must be the
# posterior mean of the CLEAN image given the further-corrupted view, E[x0 | A~ x_t, A~]; the naive
# loss that regresses onto zero-filled measurements A^H y instead converges to E[A^H A x0 | ...].

N_PIX, ACS, SIGMA = 8, (1, 2), 0.3


class PatternLinear(nn.Module):
    """One complex linear map per further-mask pattern: ``D(z, M~) = W_{M~} z`` (a linear 'network')."""

    sigma_data = 0.5

    @staticmethod
    def sigma_eff(sigma):
        return sigma

    def __init__(self, patterns):
        super().__init__()
        self.index = {p: i for i, p in enumerate(patterns)}
        self.w_re = nn.Parameter(torch.zeros(len(patterns), N_PIX, N_PIX, dtype=torch.float64))
        self.w_im = nn.Parameter(torch.zeros(len(patterns), N_PIX, N_PIX, dtype=torch.float64))

    def bind(self, mask):
        """Remember which samples have which pattern (the batch is fixed during the fit)."""
        keys = [self.index[tuple(int(v) for v in m.reshape(-1))] for m in mask]
        keys = torch.tensor(keys)
        self.groups = [torch.nonzero(keys == i).flatten() for i in range(len(self.index))]
        return self

    def matrix(self, p):
        i = self.index[p]
        return torch.complex(self.w_re[i], self.w_im[i])

    def forward(self, x_in, sigma, mask):
        x = x_in[:, 0]
        out = torch.zeros_like(x)
        Wc = torch.complex(self.w_re, self.w_im)
        for i, rows in enumerate(self.groups):
            out = out.index_put((rows,), x[rows] @ Wc[i].T)
        return out[:, None]


def gaussian_problem(n_samples, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(N_PIX, dtype=torch.float64)
    cov_re = torch.exp(-((t[:, None] - t[None]) ** 2) / 6.0) + 0.05 * torch.eye(N_PIX, dtype=torch.float64)
    phase = torch.exp(1j * 0.4 * t.to(torch.complex128))
    Sigma = phase[:, None] * cov_re.to(torch.complex128) * phase.conj()[None]
    L = torch.linalg.cholesky(Sigma)
    w = torch.complex(torch.randn(n_samples, N_PIX, generator=g, dtype=torch.float64),
                      torch.randn(n_samples, N_PIX, generator=g, dtype=torch.float64)) / math.sqrt(2)
    x0 = (w @ L.T)[:, None]  # (B, 1, N): one row, N phase-encode columns
    outer = np.array([0, 1, 2, 5, 6, 7])
    rng = np.random.default_rng(seed)
    M = np.zeros((n_samples, 1, N_PIX), bool)
    M[:, 0, 3:5] = True
    picks = outer[np.argsort(rng.uniform(size=(n_samples, outer.size)), axis=1)[:, :3]]
    M[np.arange(n_samples)[:, None], 0, picks] = True
    M = torch.from_numpy(M)
    Mt = masks.further_kspace_mask(M, ACS, further_accel=2, generator=g)  # keep floor(8 / 2) = 4 lines
    eta = torch.complex(torch.randn(n_samples, 1, N_PIX, generator=g, dtype=torch.float64),
                        torch.randn(n_samples, 1, N_PIX, generator=g, dtype=torch.float64))
    return Sigma, x0, M, Mt, eta


def posterior_mean_matrix(Sigma, mt):
    """E[x0 | z] = Sigma P (P (Sigma + 2 sigma^2 I) P)^+ z, P = F^H M~ F (noise is 2 sigma^2 I: unit Re and Im)."""
    Fm = fft2c(torch.eye(N_PIX, dtype=torch.complex128)[:, None])[:, 0].T  # columns: F e_j
    P = Fm.conj().T @ torch.diag(torch.as_tensor(mt, dtype=torch.complex128)) @ Fm
    K = P @ (Sigma + 2 * SIGMA**2 * torch.eye(N_PIX, dtype=torch.complex128)) @ P
    return Sigma @ P @ torch.linalg.pinv(K, hermitian=True, rtol=1e-10)


def least_squares(z, target_k, M, groups):
    """argmin_W sum_b ||M_b F W z_b - t_b||^2 per pattern. Setting the Wirtinger gradient to zero:
    sum_b P_b W z_b z_b^H = sum_b F^H M_b t_b z_b^H with P_b = F^H M_b F; solved as an n^2 linear system."""
    n = N_PIX
    Fm = fft2c(torch.eye(n, dtype=torch.complex128)[:, None])[:, 0].T  # Fm[m, j] = (F e_j)_m
    out = []
    for rows in groups:
        zi, Mi, ti = z[rows], M[rows, 0].to(torch.complex128), target_k[rows]
        P = torch.einsum("mi,bm,mj->bij", Fm.conj(), Mi, Fm)
        T = torch.einsum("bij,bl,bk->ikjl", P, zi, zi.conj()).reshape(n * n, n * n)
        R = torch.einsum("mi,bm,bk->ik", Fm.conj(), Mi * ti, zi.conj()).reshape(n * n)
        out.append(torch.linalg.solve(T, R).reshape(n, n))
    return torch.stack(out)


@pytest.mark.slow
def test_ambient_minimiser_is_clean_posterior_mean_and_naive_is_not():
    Sigma, x0, M, Mt, eta = gaussian_problem(200000, seed=0)
    B = x0.shape[0]
    maps = torch.ones(B, 1, 1, N_PIX, dtype=torch.complex128)
    y = M[:, None].to(torch.float64) * fft2c(x0[:, None])
    sigma = torch.full((B,), SIGMA, dtype=torch.float64)
    patterns = sorted({tuple(int(v) for v in m.reshape(-1)) for m in Mt})
    assert len(patterns) == 15
    model = PatternLinear(patterns).bind(Mt)
    z = ambient_input(y, maps, Mt, sigma, eta)[:, 0]

    # ambient: fit onto the measured lines of y; naive: onto the zero-filled image A^H y (in k-space: F A^H y)
    W_amb = least_squares(z, y[:, 0, 0], M, model.groups)
    zero_filled = SenseOp(maps, M).adjoint(y)[:, 0]
    W_naive = least_squares(z, fft2c(zero_filled[:, None])[:, 0], torch.ones_like(M), model.groups)

    # W_amb is the minimiser of OUR loss function: its gradient there vanishes (the loss is convex)
    def grad_at(W):
        with torch.no_grad():
            model.w_re.copy_(W.real)
            model.w_im.copy_(W.imag)
        model.zero_grad()
        ambient_kspace_loss(model, y, M, maps, Mt, sigma, eta=eta).sum().backward()
        return torch.cat([model.w_re.grad.flatten(), model.w_im.grad.flatten()]).norm()

    g0 = grad_at(torch.zeros_like(W_amb))
    assert grad_at(W_amb) < 1e-6 * g0
    assert grad_at(W_naive) > 1e-2 * g0

    # held-out: the fitted ambient denoiser reproduces the clean posterior mean E[x0 | A~ x_t, A~]
    Sigma, x0h, Mh, Mth, etah = gaussian_problem(20000, seed=1)
    yh = Mh[:, None].to(torch.float64) * fft2c(x0h[:, None])
    sig_h = torch.full((x0h.shape[0],), SIGMA, dtype=torch.float64)
    zh = ambient_input(yh, torch.ones_like(yh), Mth, sig_h, etah)[:, 0]
    keys = [tuple(int(v) for v in m.reshape(-1)) for m in Mth]
    err_amb, err_naive = [], []
    for i, p in enumerate(patterns):
        rows = torch.tensor([k == p for k in keys])
        truth = zh[rows] @ posterior_mean_matrix(Sigma, p).T
        nrm = truth.abs().pow(2).sum()
        err_amb.append(((zh[rows] @ W_amb[i].T - truth).abs().pow(2).sum() / nrm).sqrt().item())
        err_naive.append(((zh[rows] @ W_naive[i].T - truth).abs().pow(2).sum() / nrm).sqrt().item())
    # the ambient error is statistical (it shrinks as 1/sqrt(N): max 0.026 at 800k samples, checked once)
    assert max(err_amb) < 0.06 and np.mean(err_amb) < 0.035, err_amb
    assert min(err_naive) > 0.1 and np.mean(err_naive) > 4 * np.mean(err_amb), (err_naive, err_amb)


# --------------------------------------------------------------------------------------------
# The loss objects the trainer calls, ``loss(denoiser, batch, generator) -> (B,)``: one per loss.kind, each
# the documented function with sigma, then M~, then eta drawn from the step's generator in that order.


def _loss_config(*overrides):
    return load_config("tiny", list(overrides)).loss


def _build(loss, info, seed):
    """The loss object of ``loss`` for data ``info``, as the trainer builds it."""
    return build_loss(loss, from_data(loss, info), seed)


def _kspace_batch(B=3, C=2, H=16, W=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.complex(torch.randn(B, H, W, generator=g), torch.randn(B, H, W, generator=g))
    maps = torch.complex(torch.randn(B, C, H, W, generator=g), torch.randn(B, C, H, W, generator=g))
    mask = torch.from_numpy(np.stack([masks.kspace_mask("adps", (H, W), 2.0, center=4, seed=s).mask
                                      for s in range(B)])).float()  # (B, 1, W)
    y = mask[:, None] * fft2c(maps * x[:, None])
    return {"kspace": y, "mask": mask, "maps": maps, "index": torch.arange(10, 10 + B)}


def test_build_loss_gives_one_object_per_kind():
    from ambient_mri.losses import AmbientImageLoss, AmbientKspaceLoss, EDMLoss
    from ambient_mri.errors import ConfigError

    info = {"acs": [16, 4], "mask_shape": [1, 16], "corruption": "pixels", "shape": [16, 16]}
    expect = {"ambient": AmbientKspaceLoss, "ambient_image": AmbientImageLoss, "oracle": EDMLoss,
              "naive_zf": EDMLoss, "naive_l1": EDMLoss}
    for kind, cls in expect.items():
        cfg = _loss_config(f"loss.kind={kind}")
        assert type(_build(cfg, info, seed=0)) is cls, kind
    bad = _loss_config()
    bad.kind = "nonsense"
    with pytest.raises(ConfigError, match="loss.kind"):
        build_loss(bad, from_data(_loss_config(), info), seed=0)


@pytest.mark.parametrize("domain", ["kspace", "image"])
def test_kspace_loss_object_is_the_function_with_sigma_then_further_mask_then_noise(domain):
    cfg = _loss_config(f"loss.domain={domain}", "loss.P_mean=-0.5")
    loss = _build(cfg, {"acs": [16, 4], "mask_shape": [1, 16], "shape": [16, 16]}, seed=0)
    batch, D = _kspace_batch(), Fixed()
    got = loss(D, batch, torch.Generator().manual_seed(5))
    seen_mask = D.seen[1]
    g = torch.Generator().manual_seed(5)
    sigma = sample_sigma(3, P_mean=-0.5, P_std=cfg.P_std, generator=g)
    mt = masks.further_kspace_mask(batch["mask"], (1, 4), delta=cfg.delta, generator=g)  # line masks: ACS width 4
    want = ambient_kspace_loss(D, batch["kspace"], batch["mask"], batch["maps"], mt, sigma, domain=domain, generator=g)
    assert got.shape == (3,) and torch.equal(got, want)
    assert torch.equal(seen_mask, mt) and torch.all(mt <= batch["mask"]) and not torch.equal(mt, batch["mask"])


def test_image_and_edm_loss_objects_are_the_functions():
    g = torch.Generator().manual_seed(1)
    x = torch.complex(torch.randn(2, 8, 8, generator=g), torch.randn(2, 8, 8, generator=g))
    mask = (torch.rand(2, 8, 8, generator=g) > 0.3).float()
    batch = {"image": mask * x, "mask": mask, "index": torch.tensor([0, 1])}
    cfg = _loss_config("loss.kind=ambient_image", "loss.delta=0.2")
    got = _build(cfg, {"corruption": "pixels", "shape": [8, 8]}, seed=0)(Fixed(), batch, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    sigma = sample_sigma(2, P_mean=cfg.P_mean, P_std=cfg.P_std, generator=g)
    mt = masks.further_image_mask(mask, "pixels", 0.2, generator=g)
    assert torch.equal(got, ambient_image_loss(Fixed(), batch["image"], mask, mt, sigma, generator=g))

    cfg = _loss_config("loss.kind=oracle")
    got = _build(cfg, {"shape": [8, 8]}, seed=0)(Fixed(), {"image": x}, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    sigma = sample_sigma(2, P_mean=cfg.P_mean, P_std=cfg.P_std, generator=g)
    assert torch.equal(got, edm_loss(Fixed(), x, sigma, generator=g))


def test_fixed_further_masks_depend_on_the_slice_only():
    """``loss.redraw=false``: the M~ of a slice is the same at every step (any generator, any batch position),
    differs between slices and between run seeds, and the step's generator is not consumed."""
    info = {"acs": [16, 4], "mask_shape": [1, 16], "shape": [16, 16]}
    batch = _kspace_batch(B=4)
    batch["mask"] = batch["mask"][:1].expand(4, -1, -1).clone()  # one training mask M for all four slices
    further = _build(_loss_config("loss.redraw=false"), info, seed=0).further
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    a = further(batch["mask"], batch["index"], g)
    assert torch.equal(g.get_state(), state)
    b = further(batch["mask"].flip(0), batch["index"].flip(0), torch.Generator().manual_seed(8))
    assert torch.equal(a, b.flip(0))
    assert len({m.numpy().tobytes() for m in a}) > 1  # different slices, different M~
    other = _build(_loss_config("loss.redraw=false"), info, seed=1).further
    assert not torch.equal(other(batch["mask"], batch["index"], g), a)
    redraw = _build(_loss_config(), info, seed=0).further
    assert not torch.equal(redraw(batch["mask"], batch["index"], torch.Generator().manual_seed(1)),
                           redraw(batch["mask"], batch["index"], torch.Generator().manual_seed(2)))
