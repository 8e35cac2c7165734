import numpy as np
import pytest
import sigpy.mri
import torch

from ambient_mri import masks
from ambient_mri.fft import fft2c, ifft2c
from ambient_mri.operators import InpaintOp, SenseOp, SingleCoilOp, conjugate_gradient

from .conftest import crandn

B, C, H, W = 3, 4, 12, 10


def mask_variants():
    g = np.random.default_rng(0)
    line = g.uniform(size=W) > 0.5
    return {
        "1d (W,)": torch.from_numpy(line),
        "1d (1,W)": torch.from_numpy(line[None]),
        "1d batched (B,1,W)": torch.from_numpy(g.uniform(size=(B, 1, W)) > 0.5),
        "2d (H,W)": torch.from_numpy(g.uniform(size=(H, W)) > 0.5),
        "2d batched (B,H,W)": torch.from_numpy(g.uniform(size=(B, H, W)) > 0.5).float(),
    }


def inner(a, b):
    return torch.sum(a * b.conj())


@pytest.mark.parametrize("name", list(mask_variants()))
def test_adjoint_all_operators(name):
    mask = mask_variants()[name]
    g = torch.Generator().manual_seed(1)
    maps = crandn(B, C, H, W, generator=g)
    x = crandn(B, H, W, generator=g)
    ops = [(SenseOp(maps, mask), crandn(B, C, H, W, generator=g)),
           (SingleCoilOp(mask, like=x), crandn(B, H, W, generator=g)),
           (InpaintOp(mask, like=x), crandn(B, H, W, generator=g))]
    for op, y in ops:
        lhs, rhs = inner(op.forward(x), y), inner(x, op.adjoint(y))
        assert abs(lhs - rhs) / abs(lhs) < 1e-10, (type(op).__name__, lhs, rhs)
        assert torch.allclose(op.normal(x), op.adjoint(op.forward(x)), atol=1e-10)


def test_sense_zero_outside_mask_and_grad_flows():
    m = masks.adps_lines(W, 2, center_lines=2, seed=0).mask
    maps = crandn(1, C, H, W).to(torch.complex64)
    x = crandn(1, H, W).to(torch.complex64).requires_grad_(True)
    y = SenseOp(maps, torch.from_numpy(m)).forward(x)
    assert torch.all(y[..., ~torch.from_numpy(m[0])] == 0)
    y.abs().pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_sense_agrees_with_sigpy():
    g = np.random.default_rng(3)
    maps = (g.standard_normal((C, H, W)) + 1j * g.standard_normal((C, H, W))).astype(np.complex64)
    mask2d = (g.uniform(size=(H, W)) > 0.4).astype(np.float32)
    x = (g.standard_normal((H, W)) + 1j * g.standard_normal((H, W))).astype(np.complex64)
    y = (g.standard_normal((C, H, W)) + 1j * g.standard_normal((C, H, W))).astype(np.complex64)
    S = sigpy.mri.linop.Sense(maps, weights=mask2d)
    op = SenseOp(torch.from_numpy(maps)[None], torch.from_numpy(mask2d))
    np.testing.assert_allclose(op.forward(torch.from_numpy(x)[None])[0].numpy(), S * x, atol=1e-4)
    np.testing.assert_allclose(op.adjoint(torch.from_numpy(y * mask2d)[None])[0].numpy(), S.H * (y * mask2d), atol=1e-4)


def test_singlecoil_is_sense_with_unit_maps():
    mask = torch.from_numpy(np.random.default_rng(0).uniform(size=(1, W)) > 0.5)
    x = crandn(2, H, W)
    k1 = SingleCoilOp(mask, like=x).forward(x)
    k2 = SenseOp(torch.ones(2, 1, H, W, dtype=x.dtype), mask).forward(x)[:, 0]
    assert torch.allclose(k1, k2)


def test_cg_sense_recovers_image_fully_sampled_and_reduces_residual():
    g = torch.Generator().manual_seed(0)
    maps = crandn(2, C, H, W, generator=g)
    maps = maps / torch.sqrt((maps.abs() ** 2).sum(1, keepdim=True))
    x = crandn(2, H, W, generator=g)
    op = SenseOp(maps, torch.ones(H, W))
    xr = conjugate_gradient(op.normal, op.adjoint(op.forward(x)), iters=20)
    assert torch.allclose(xr, x, atol=1e-6)
    mask = torch.from_numpy(np.random.default_rng(1).uniform(size=(2, 1, W)) > 0.5)
    op = SenseOp(maps, mask)
    y = op.forward(x)
    r0 = torch.linalg.vector_norm(op.forward(op.adjoint(y)) - y)
    xr = conjugate_gradient(op.normal, op.adjoint(y), iters=30)
    assert torch.linalg.vector_norm(op.forward(xr) - y) < 1e-3 * r0


def test_fft_helpers_on_batched_complex64():
    x = crandn(2, 3, 8, 8).to(torch.complex64)
    assert fft2c(x).dtype == torch.complex64 and torch.allclose(ifft2c(fft2c(x)), x, atol=1e-5)


def test_cg_stays_put_once_converged_on_a_singular_system():
    # single coil: A^H A = F^H M F is a projection; CG converges in one step and must not then blow up
    g = torch.Generator().manual_seed(2)
    x = crandn(2, 64, 64, generator=g).to(torch.complex64)
    mask = torch.from_numpy(np.random.default_rng(0).uniform(size=(2, 1, 64)) > 0.6)
    op = SenseOp(torch.ones(2, 1, 64, 64, dtype=torch.complex64), mask)
    y = op.forward(x)
    xs = conjugate_gradient(op.normal, op.adjoint(y), iters=50)
    assert torch.isfinite(xs).all() and xs.abs().max() < 10 * x.abs().max()
    assert torch.linalg.vector_norm(op.forward(xs) - y) < 1e-4 * torch.linalg.vector_norm(y)
