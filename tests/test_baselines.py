import numpy as np
import pytest
import torch

from ambient_mri import baselines as B
from tests.phantom import phantom_problem
from ambient_mri import metrics as M
from ambient_mri.errors import ConfigError, DataError
from ambient_mri.operators import SenseOp


@pytest.fixture(scope="module")
def poisson4():
    """64 x 64, 8 birdcage coils, Poisson-disc R = 4, noise std 0.01 (image peak 1), 2 slices."""
    return phantom_problem((64, 64), coils=8, accel=4, mask_kind="poisson", noise=0.01, slices=2, seed=0)


@pytest.fixture(scope="module")
def recons(poisson4):
    p = poisson4
    return {
        "zf": B.zero_filled(p["y"], p["maps"], p["mask"]),
        "cg": B.cg_sense(p["y"], p["maps"], p["mask"], iters=30),
        "l1": B.l1_wavelet(p["y"], p["maps"], p["mask"], lam=1e-3, iters=100),
    }


def test_phantom_problem_contract(poisson4):
    p = poisson4
    assert p["x"].shape == (2, 64, 64) and p["y"].shape == p["maps"].shape == (2, 8, 64, 64)
    assert p["y"].dtype == torch.complex64 and p["mask"].dtype == torch.bool
    torch.testing.assert_close(p["maps"].abs().pow(2).sum(1), torch.ones(2, 64, 64), atol=1e-5, rtol=0)
    assert torch.all(p["y"][~p["mask"][:, None].expand_as(p["y"])] == 0)  # zero where not sampled
    assert 3.5 < 64 * 64 / p["mask"][0].sum().item() < 4.5
    assert not torch.equal(p["mask"][0], p["mask"][1])  # one seed per slice


def test_zero_filled_is_the_adjoint(poisson4):
    p = poisson4
    torch.testing.assert_close(B.zero_filled(p["y"], p["maps"], p["mask"]),
                               SenseOp(p["maps"], p["mask"]).adjoint(p["y"]))
    # numpy inputs give the same
    np_zf = B.zero_filled(p["y"].numpy(), p["maps"].numpy(), p["mask"].numpy())
    torch.testing.assert_close(np_zf, B.zero_filled(p["y"], p["maps"], p["mask"]))


def test_fully_sampled_recovers_image():
    p = phantom_problem((32, 32), coils=8, accel=1, mask_kind="poisson", noise=0.0, seed=3)
    assert bool(p["mask"].all())
    x = p["x"]
    err = lambda r: (torch.linalg.vector_norm(r - x) / torch.linalg.vector_norm(x)).item()  # noqa: E731
    assert err(B.cg_sense(p["y"], p["maps"], p["mask"], iters=10, lam=0.0)) < 1e-5  # unregularised: exact
    assert err(B.zero_filled(p["y"], p["maps"], p["mask"])) < 1e-5  # sum_c |S_c|^2 = 1
    torch.testing.assert_close(B.rss_zero_filled(p["y"], p["mask"]), x.abs(), atol=1e-5, rtol=0)


def test_ordering_zf_cg_l1(poisson4, recons):
    x = poisson4["x"]
    psnr = {k: M.psnr_adps_batch(x, r) for k, r in recons.items()}
    assert np.all(psnr["cg"] > psnr["zf"] + 3), psnr
    assert np.all(psnr["l1"] > psnr["zf"] + 3), psnr
    assert np.all(psnr["l1"] > psnr["cg"]), psnr  # noise at R = 4: the wavelet prior helps
    assert recons["l1"].shape == (2, 64, 64) and recons["l1"].dtype == torch.complex64


def test_data_consistency(poisson4, recons):
    p = poisson4
    dc = {k: B.data_consistency(r, p["y"], p["maps"], p["mask"]) for k, r in recons.items()}
    assert dc["zf"].shape == (2,)
    assert torch.all(dc["cg"] < 0.5 * dc["zf"]), dc
    # the true image is consistent up to the noise only; noiseless data: exactly
    clean = phantom_problem((32, 32), accel=4, noise=0.0, seed=1)
    dc0 = B.data_consistency(clean["x"], clean["y"], clean["maps"], clean["mask"])
    assert dc0.item() < 1e-5


def test_cg_sense_matches_sigpy_sense_recon():
    mr = pytest.importorskip("sigpy.mri")
    p = phantom_problem((48, 48), coils=8, accel=4, mask_kind="adps", noise=0.01, seed=2)
    y, maps, m = p["y"].to(torch.complex128), p["maps"].to(torch.complex128), p["mask"]
    w = np.broadcast_to(m[0].numpy(), (48, 48)).astype(np.float64)
    for lam in (0.0, 0.05):
        ours = B.cg_sense(y, maps, m, iters=20, lam=lam)[0].numpy()
        ref = mr.app.SenseRecon(y[0].numpy(), maps[0].numpy(), lamda=lam, weights=w, max_iter=20,
                                show_pbar=False).run()
        assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-8


def test_cg_sense_slices_are_independent(poisson4):
    p = poisson4
    both = B.cg_sense(p["y"], p["maps"], p["mask"], iters=15)
    one = B.cg_sense(p["y"][1:], p["maps"][1:], p["mask"][1:], iters=15)
    torch.testing.assert_close(both[1:], one, atol=1e-5, rtol=1e-4)


def test_l1_wavelet_is_deterministic_and_lam_matters():
    p = phantom_problem((32, 32), accel=3, noise=0.02, seed=4)
    a = B.l1_wavelet(p["y"], p["maps"], p["mask"], lam=1e-2, iters=20)
    b = B.l1_wavelet(p["y"], p["maps"], p["mask"], lam=1e-2, iters=20)
    assert torch.equal(a, b)
    c = B.l1_wavelet(p["y"], p["maps"], p["mask"], lam=1.0, iters=20)  # huge weight: shrinks the image
    assert torch.linalg.vector_norm(c) < 0.5 * torch.linalg.vector_norm(a)


def test_max_eig_of_normalised_sense_is_about_one(poisson4):
    p = poisson4
    ev = B.max_eig(p["y"], p["maps"], p["mask"])
    assert ev.shape == (2,) and torch.all((ev > 0.9) & (ev <= 1.0 + 1e-4)), ev


def test_choose_lambda_interior_and_deterministic():
    val = phantom_problem((64, 64), accel=4, noise=0.02, slices=1, seed=5)  # "validation" slice
    cands = (1e-5, 1e-3, 1e-2, 1e-1)
    kw = dict(val_y=val["y"], val_maps=val["maps"], val_mask=val["mask"], val_reference=val["x"],
              candidates=cands, iters=50)
    c1 = B.choose_lambda(**kw)
    assert c1.lam not in (cands[0], cands[-1]), c1
    best = max(c1.scores)
    assert c1.scores[0] < best - 2 and c1.scores[-1] < best - 2, c1.scores  # both extremes clearly worse
    assert c1.per_slice.shape == (4, 1) and c1.candidates == cands
    rec = c1.as_dict()
    assert rec["lam"] == c1.lam and rec["chosen_on"] == "validation" and rec["val_slices"] == 1
    c2 = B.choose_lambda(**kw)
    assert c2.lam == c1.lam and c2.scores == c1.scores
    # nrmse: lower is better, so the same candidate wins on this problem
    c3 = B.choose_lambda(**kw, metric="nrmse")
    assert c3.scores[cands.index(c3.lam)] == min(c3.scores)


def test_errors():
    p = phantom_problem((16, 16), accel=2, noise=0.0, seed=0)
    with pytest.raises(DataError, match="empty"):
        B.zero_filled(p["y"], p["maps"], torch.zeros(16, dtype=torch.bool))
    with pytest.raises(DataError, match="maps"):
        B.cg_sense(p["y"], p["maps"][:, :4], p["mask"])
    with pytest.raises(DataError, match="image shape"):
        B.data_consistency(p["x"][..., :8], p["y"], p["maps"], p["mask"])
    with pytest.raises(ConfigError, match="metric"):
        B.choose_lambda(p["y"], p["maps"], p["mask"], p["x"], candidates=(1e-3,), metric="lpips")
