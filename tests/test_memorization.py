import numpy as np
import torch

from ambient_mri.memorization import nearest_ncc, summary


def test_nearest_ncc_finds_copies_and_ignores_scale():
    rng = np.random.default_rng(0)
    train = rng.standard_normal((50, 8, 8)) + 1j * rng.standard_normal((50, 8, 8))
    samples = np.stack([3.0 * np.abs(train[7]) + 0.5, rng.standard_normal((8, 8))])
    ncc, idx = nearest_ncc(samples, train, chunk=16)
    assert idx[0] == 7 and abs(ncc[0] - 1) < 1e-12
    assert ncc[1] < 0.9
    t_ncc, t_idx = nearest_ncc(torch.from_numpy(samples), torch.from_numpy(train))
    np.testing.assert_allclose(t_ncc, ncc)
    s = summary(ncc)
    assert s["n"] == 2 and s["max"] == ncc.max() and s["frac_above_0.95"] == 0.5
