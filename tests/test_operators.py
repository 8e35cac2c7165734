import numpy as np
import pytest
import sigpy.mri
import torch

from ambient_mri import masks
from ambient_mri.fft import fft2c, ifft2c
from ambient_mri.operators import InpaintOp, SenseOp, ShapeError, SingleCoilOp, conjugate_gradient

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
    """``<a, b> = sum a conj(b)``."""
    return torch.sum(a * b.conj())


def concrete(shape):
    """A declared operator shape with its free (``None``) axes filled: batch ``B``, then ``H``, ``W``."""
    n = len(shape)
    return tuple(s if s is not None else B if i == 0 else H if i == n - 2 else W for i, s in enumerate(shape))


def missing_box():
    box = torch.ones(H, W, dtype=torch.float64)
    box[2:6, 3:7] = 0  # a missing box, the image-domain corruption
    return box


def build(name, mask, g):
    """The operator called ``name`` on ``mask``: the three classes, broadcast parameters, ``.H``, ``.H.H``,
    ``.N`` and compositions (``@`` and ``*``), all batched over ``B`` slices."""
    maps = crandn(B, C, H, W, generator=g)
    like = torch.zeros((), dtype=torch.complex128)
    S, F, P = SenseOp(maps, mask), SingleCoilOp(mask, like=like), InpaintOp(mask, like=like)
    P2 = InpaintOp(missing_box(), like=like)
    return {
        "SenseOp": lambda: S,
        "SenseOp maps batch 1": lambda: SenseOp(maps[:1], mask),
        "SenseOp unit maps (B,1,1,1)": lambda: SenseOp(torch.ones(B, 1, 1, 1, dtype=maps.dtype), mask),
        "SingleCoilOp": lambda: F,
        "InpaintOp": lambda: P,
        "SenseOp.H": lambda: S.H,
        "SenseOp.H.H": lambda: S.H.H,
        "SingleCoilOp.H": lambda: F.H,
        "SenseOp.N": lambda: S.N,
        "SenseOp @ InpaintOp": lambda: S @ P2,
        "(SenseOp @ InpaintOp).H": lambda: (S @ P2).H,
        "(SenseOp @ InpaintOp).H.H": lambda: (S @ P2).H.H,
        "InpaintOp @ SenseOp.H": lambda: P2 @ S.H,
        "SenseOp * SingleCoilOp.H * SingleCoilOp": lambda: S * F.H * F,
        "SenseOp.H @ SenseOp": lambda: S.H @ S,
    }[name]()


OPERATORS = ["SenseOp", "SenseOp maps batch 1", "SenseOp unit maps (B,1,1,1)", "SingleCoilOp", "InpaintOp",
             "SenseOp.H", "SenseOp.H.H", "SingleCoilOp.H", "SenseOp.N", "SenseOp @ InpaintOp",
             "(SenseOp @ InpaintOp).H", "(SenseOp @ InpaintOp).H.H", "InpaintOp @ SenseOp.H",
             "SenseOp * SingleCoilOp.H * SingleCoilOp", "SenseOp.H @ SenseOp"]


@pytest.mark.parametrize("mask_name", list(mask_variants()))
@pytest.mark.parametrize("op_name", OPERATORS)
def test_adjoint_identity_for_every_operator(op_name, mask_name):
    """``<A x, y> = <x, A^H y>`` on random complex128 ``x``, ``y`` (relative error ~1e-16 when right; a
    missing conjugate, a wrong FFT normalisation or a dropped mask gives O(1)); ``A^H A x = A^H (A x)``;
    ``A.H`` applies the adjoint; the output has the declared shape; ``A(x) = A @ x = A * x = A.forward(x)``."""
    g = torch.Generator().manual_seed(1)
    A = build(op_name, mask_variants()[mask_name], g)
    x, y = crandn(*concrete(A.ishape), generator=g), crandn(*concrete(A.oshape), generator=g)
    Ax, AHy = A.forward(x), A.adjoint(y)
    assert Ax.shape == concrete(A.oshape) and AHy.shape == concrete(A.ishape)
    lhs, rhs = inner(Ax, y), inner(x, AHy)
    assert abs(lhs - rhs) / abs(lhs) < 1e-12, (lhs, rhs)
    assert torch.allclose(A.normal(x), A.adjoint(Ax), atol=1e-12)
    assert torch.equal(A.H.forward(y), AHy) and torch.equal(A.H.adjoint(x), Ax)
    assert torch.equal(A(x), Ax) and torch.equal(A @ x, Ax) and torch.equal(A * x, Ax)


def test_adjoint_of_adjoint_is_the_operator_and_compositions_reverse():
    g = torch.Generator().manual_seed(0)
    mask = mask_variants()["1d batched (B,1,W)"]
    S, F, P = (build(n, mask, g) for n in ("SenseOp", "SingleCoilOp", "InpaintOp"))
    N = S.N
    assert S.H.H is S and F.H.H is F and P.H.H is P and N.H is N
    A = S @ F @ P
    assert [type(op).__name__ for op in A.ops] == ["SenseOp", "SingleCoilOp", "InpaintOp"]  # flattened
    assert [op.name for op in A.H.ops] == ["InpaintOp.H", "SingleCoilOp.H", "SenseOp.H"]
    x = crandn(B, H, W, generator=g)
    assert torch.equal(A.forward(x), S.forward(F.forward(P.forward(x))))


@pytest.mark.parametrize("mask_name", ["1d batched (B,1,W)", "2d (H,W)", "2d batched (B,H,W)"])
def test_operators_agree_with_sigpy(mask_name):
    """Known answer: sigpy's own operators on the same maps and mask, slice by slice: ``Sense(maps,
    weights=M)`` for SenseOp, ``Multiply(M) * FFT(center=True)`` for SingleCoilOp, ``Multiply(M)`` for
    InpaintOp, and sigpy's composition and adjoint for ``(SenseOp @ InpaintOp).H``; forward, adjoint, normal."""
    import sigpy as sp

    g = torch.Generator().manual_seed(3)
    mask = mask_variants()[mask_name]
    maps = crandn(B, C, H, W, generator=g)
    like = torch.zeros((), dtype=torch.complex128)
    S, F, P = SenseOp(maps, mask), SingleCoilOp(mask, like=like), InpaintOp(mask, like=like)
    SP = (S @ InpaintOp(missing_box(), like=like)).H
    m = np.broadcast_to(np.asarray(mask, dtype=np.float64), (B, H, W))
    for b in range(B):
        ref_S = sigpy.mri.linop.Sense(maps[b].numpy(), weights=m[b])
        refs = {"SenseOp": ref_S, "SingleCoilOp": sp.linop.Multiply((H, W), m[b]) * sp.linop.FFT((H, W), center=True),
                "InpaintOp": sp.linop.Multiply((H, W), m[b]),
                "SenseOp @ InpaintOp": (ref_S * sp.linop.Multiply((H, W), missing_box().numpy())).H}
        for op, ref in [(S, refs["SenseOp"]), (F, refs["SingleCoilOp"]), (P, refs["InpaintOp"]),
                        (SP, refs["SenseOp @ InpaintOp"])]:
            u, v = crandn(*concrete(op.ishape), generator=g), crandn(*concrete(op.oshape), generator=g)
            for got, want in [(op.forward(u), ref * u[b].numpy()), (op.adjoint(v), ref.H * v[b].numpy()),
                              (op.normal(u), ref.N * u[b].numpy())]:
                np.testing.assert_allclose(got[b].numpy(), want, atol=1e-12, err_msg=op.name)


def test_shape_errors_name_the_expected_and_the_received_shape():
    g = torch.Generator().manual_seed(0)
    maps = crandn(B, C, H, W, generator=g)
    S = SenseOp(maps, mask_variants()["2d (H,W)"])
    assert issubclass(ShapeError, ValueError)
    with pytest.raises(ShapeError, match=r"SenseOp\.forward: input shape \(3, 12, 9\) .*expected \(3, 12, 10\)"):
        S.forward(crandn(B, H, W - 1))
    with pytest.raises(ShapeError, match=r"SenseOp\.adjoint: input shape \(3, 3, 12, 10\) .*expected \(3, 4, 12, 10\)"):
        S.adjoint(crandn(B, C - 1, H, W))
    with pytest.raises(ShapeError, match=r"SenseOp\.normal: input shape \(3, 4, 12, 10\)"):
        S.normal(crandn(B, C, H, W))  # k-space where an image is expected
    with pytest.raises(ShapeError, match=r"expected \(3, 12, 10\)"):
        S.forward(crandn(2, H, W))  # a batch of 2 does not broadcast against 3 slices
    with pytest.raises(ShapeError, match=r"SenseOp\.H\.forward: input shape \(3, 12, 10\)"):
        S.H.forward(crandn(B, H, W))
    with pytest.raises(ShapeError, match=r"InpaintOp\.forward: input shape \(3, 12, 11\) .*expected \(\*, \*, 10\)"):
        InpaintOp(mask_variants()["1d (W,)"]).forward(crandn(B, H, W + 1))
    with pytest.raises(ShapeError, match=r"cannot compose SenseOp after InpaintOp: InpaintOp gives \(\*, 12, 9\)"):
        S @ InpaintOp(torch.ones(H, W - 1))
    with pytest.raises(ShapeError, match="maps and mask batch sizes 3 and 2"):
        SenseOp(maps, torch.ones(2, 1, W))
    with pytest.raises(ShapeError, match=r"maps shape \(4, 12, 10\) does not match the expected \(B, C, H, W\)"):
        SenseOp(maps[0], torch.ones(W))


def test_broadcasting_the_callers_rely_on_is_accepted():
    """A batch of 1 in the maps, the mask or the input broadcasts (as torch does); unit maps ``(B, 1, 1, 1)``
    with a 2-D mask (the single-coil view of sampling.View) give SingleCoilOp's normal operator."""
    g = torch.Generator().manual_seed(4)
    maps, x = crandn(B, C, H, W, generator=g), crandn(B, H, W, generator=g)
    line = mask_variants()["1d (1,W)"]
    S1, SB = SenseOp(maps[:1], line), SenseOp(maps[:1].expand(B, C, H, W), line)
    assert S1.ishape == (None, H, W) and torch.equal(S1.forward(x), SB.forward(x))
    assert SB.forward(x[:1]).shape == (B, C, H, W)
    m2 = mask_variants()["2d batched (B,H,W)"]
    U = SenseOp(torch.ones(B, 1, 1, 1, dtype=x.dtype), m2)
    assert U.ishape == (B, H, W) and torch.allclose(U.normal(x), SingleCoilOp(m2, like=x).normal(x))


def test_sense_zero_outside_mask_and_grad_flows():
    m = masks.adps_lines(W, 2, center_lines=2, seed=0).mask
    maps = crandn(1, C, H, W).to(torch.complex64)
    x = crandn(1, H, W).to(torch.complex64).requires_grad_(True)
    y = SenseOp(maps, torch.from_numpy(m)).forward(x)
    assert torch.all(y[..., ~torch.from_numpy(m[0])] == 0)
    y.abs().pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


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
    assert torch.equal(conjugate_gradient(op.N, op.adjoint(y), iters=30), xr)  # the normal operator as a Linop


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
