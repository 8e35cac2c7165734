import math
import time

import numpy as np
import pytest
import torch

from ambient_mri import masks as M
from ambient_mri.errors import ConfigError


def fastmri_random_mask_ported(W, cf, accel, seed):
    """fastMRI ``RandomMaskFunc([cf], [accel])(shape, seed=seed)`` formulas, ported (1-D result)."""
    rng = np.random.RandomState()
    rng.seed(seed)
    choice = rng.randint(0, 1)
    cf, accel = [cf][choice], [accel][choice]
    num_low = round(W * cf)
    center = np.zeros(W, dtype=np.float32)
    pad = (W - num_low + 1) // 2
    center[pad : pad + num_low] = 1
    prob = (W / accel - num_low) / (W - num_low)
    accel_mask = rng.uniform(size=W) < prob
    return np.maximum(center, accel_mask).astype(bool)


def fastmri_equispaced_fraction_ported(W, cf, accel, seed):
    rng = np.random.RandomState()
    rng.seed(seed)
    rng.randint(0, 1)
    num_low = round(W * cf)
    center = np.zeros(W, dtype=bool)
    pad = (W - num_low + 1) // 2
    center[pad : pad + num_low] = True
    offset = rng.randint(0, high=round(accel))
    adjusted = (accel * (num_low - W)) / (num_low * accel - W)
    m = np.zeros(W, dtype=bool)
    m[np.around(np.arange(offset, W - 1, adjusted)).astype(np.uint)] = True
    return m | center


@pytest.mark.parametrize("W,cf,R,seed", [(320, 0.08, 4, 0), (368, 0.04, 8, 7), (64, 0.125, 4, 3), (33, 0.1, 3, 11)])
def test_random_and_equispaced_match_fastmri(W, cf, R, seed):
    np.testing.assert_array_equal(M.random_lines(W, R, center_fraction=cf, seed=seed).mask[0],
                                  fastmri_random_mask_ported(W, cf, R, seed))
    np.testing.assert_array_equal(M.equispaced_lines(W, R, center_fraction=cf, seed=seed).mask[0],
                                  fastmri_equispaced_fraction_ported(W, cf, R, seed))


def test_random_lines_expected_acceleration():
    counts = [M.random_lines(320, 4, seed=s).mask.sum() for s in range(300)]
    assert abs(np.mean(counts) - 80) < 1.5


@pytest.mark.parametrize("R,lines", [(2, 160), (4, 80), (6, 53), (8, 40)])
def test_adps_rule_and_published_further_table(R, lines):
    sm = M.adps_lines(320, R, center_lines=20, seed=R)
    m = sm.mask[0]
    assert m.sum() == lines == math.floor(320 / R)
    assert m[150:170].all() and sm.acs == (1, 20)
    published = {2: (54, 3.02), 4: (16, 5.00), 6: (8, 7.11), 8: (5, 9.14)}
    f = M.further_kspace_mask(torch.from_numpy(sm.mask[None]), sm.acs, further_accel=R + 1)
    removed = int(m.sum() - f.sum())
    assert removed == published[R][0]
    assert round(320 / int(f.sum()), 2) == published[R][1]
    fm = f[0, 0].numpy().astype(bool)
    assert np.all(fm <= m) and fm[150:170].all()


def test_further_mask_batched_random_and_seeded():
    ms = torch.from_numpy(np.stack([M.adps_lines(64, 4, center_lines=8, seed=s).mask for s in range(16)]))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    f1 = M.further_kspace_mask(ms, (1, 8), further_accel=5, generator=g1)
    f2 = M.further_kspace_mask(ms, (1, 8), further_accel=5, generator=g2)
    assert torch.equal(f1, f2)
    assert torch.all(f1 <= ms) and torch.all(f1.sum((1, 2)) == 12)  # floor(64 / 5)
    assert len({tuple(f[0].tolist()) for f in f1}) > 8  # the draws differ across the batch
    f3 = M.further_kspace_mask(ms, (1, 8), further_accel=5)
    assert not torch.equal(f1, f3) or True  # unseeded: allowed to coincide, only must be valid
    assert torch.all(f3 <= ms)


def test_further_mask_delta_and_2d():
    pd = M.poisson_disc((32, 32), 4, calib=(6, 6), seed=0)
    m = torch.from_numpy(pd.mask[None].repeat(4, 0))
    f = M.further_kspace_mask(m, pd.acs, delta=0.1, generator=torch.Generator().manual_seed(0))
    outer = int(pd.mask.sum() - 36)
    assert torch.all(f <= m)
    assert torch.all(m.sum((1, 2)) - f.sum((1, 2)) == round(0.1 * outer))
    assert torch.all(f[:, 13:19, 13:19])  # the calibration block survives
    with pytest.raises(ConfigError):
        M.further_kspace_mask(m, pd.acs)


def test_further_removes_at_least_one_line():
    sm = M.adps_lines(64, 8, center_lines=4, seed=0)
    f = M.further_kspace_mask(torch.from_numpy(sm.mask[None]), sm.acs, further_accel=2)
    assert int(sm.mask.sum() - f.sum()) == 1


@pytest.mark.parametrize("kind", ["adps", "gaussian", "random", "equispaced", "poisson"])
def test_seed_reproducible_and_reports_acceleration(kind):
    a = M.kspace_mask(kind, (64, 64), 4, seed=3)
    b = M.kspace_mask(kind, (64, 64), 4, seed=3)
    np.testing.assert_array_equal(a.mask, b.mask)
    others = [M.kspace_mask(kind, (64, 64), 4, seed=s).mask for s in range(4, 10)]
    assert any(not np.array_equal(a.mask, c) for c in others)  # equispaced varies only by its offset
    assert a.acceleration == pytest.approx(a.mask.size / a.mask.sum())
    assert M.acs_region(a.mask.shape, a.acs)[a.mask.shape[0] // 2, 32]
    assert np.all(a.mask[M.acs_region(a.mask.shape, a.acs)])


def test_gaussian_lines_exact_count_and_centre_denser():
    ms = np.stack([M.gaussian_lines(128, 4, center_lines=8, seed=s).mask[0] for s in range(200)])
    assert np.all(ms.sum(1) == 32)
    freq = ms.mean(0)
    assert freq[40:60].mean() > freq[:20].mean()


@pytest.mark.parametrize("R", [4, 8, 12, 16])
def test_poisson_disc_exact_bounded_and_variable_density(R):
    for seed in range(6):
        t = time.perf_counter()
        pd = M.poisson_disc((64, 64), R, calib=(8, 8), seed=seed)
        assert time.perf_counter() - t < 10
        assert pd.mask.sum() == math.floor(64 * 64 / R)
        assert pd.mask[28:36, 28:36].all()
    yy, xx = np.mgrid[:64, :64] - 32
    r = np.hypot(yy, xx)
    assert pd.mask[(r > 6) & (r < 16)].mean() > pd.mask[r > 24].mean()


def test_sigpy_poisson_deterministic_fallback():
    a = M.sigpy_poisson((64, 64), 4, calib=(8, 8), seed=0)
    b = M.sigpy_poisson((64, 64), 4, calib=(8, 8), seed=0)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.seed == b.seed and 3 < a.acceleration < 5


def test_image_masks_and_further():
    px = M.random_pixels((64, 64), 0.4, seed=0)
    assert abs(px.mean() - 0.6) < 0.03
    box = M.random_box((64, 64), 0.25, seed=1)
    assert (~box).sum() == 32 * 32
    mb = torch.from_numpy(np.stack([box] * 3))
    g = torch.Generator().manual_seed(0)
    f = M.further_image_mask(mb, "box", 0.25, generator=g)
    assert torch.all(f <= mb) and torch.all(f.sum((1, 2)) < mb.sum((1, 2)))
    fp = M.further_image_mask(torch.from_numpy(px[None]), "pixels", 0.1, generator=g)
    assert torch.all(fp <= torch.from_numpy(px[None]))
    assert abs(fp.float().mean() - 0.54) < 0.03


@pytest.mark.parametrize("bad", [dict(accel=0.5), dict(accel=float("nan"))])
def test_bad_acceleration_rejected(bad):
    with pytest.raises(ConfigError):
        M.kspace_mask("adps", (64, 64), bad["accel"])
    with pytest.raises(ConfigError):
        M.kspace_mask("nonsense", (64, 64), 4)


def test_draw_training_further_masks_follows_the_recorded_distribution():
    lines = {"domain": "kspace", "mask_kind": "adps", "accel": 4, "center": 20, "acs": [384, 20],
             "shape": [384, 320], "further_accel": 5}
    m = M.draw_training_further_masks(lines, 3, seed=1)
    assert m.shape == (3, 1, 320) and torch.all(m.sum((1, 2)) == 64)
    assert torch.equal(m, M.draw_training_further_masks(lines, 3, seed=1))
    assert not torch.equal(m, M.draw_training_further_masks(lines, 3, seed=2))
    pd = dict(lines, mask_kind="poisson", accel=8, center=8, acs=[8, 8], shape=[64, 64], further_accel=9)
    m = M.draw_training_further_masks(pd, 2, seed=0)
    assert m.shape == (2, 64, 64) and torch.all(m.sum((1, 2)) == 455) and m[:, 28:36, 28:36].all()
    box = {"domain": "image", "kind": "box", "level": 0.25, "further_level": 0.1, "shape": [32, 32]}
    m = M.draw_training_further_masks(box, 2, seed=0)
    assert m.shape == (2, 32, 32) and torch.all((~m).sum((1, 2)) >= 256)
    assert M.draw_training_further_masks({"domain": "clean", "shape": [8, 8]}, 2).all()
