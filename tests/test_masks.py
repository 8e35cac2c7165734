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


@pytest.mark.parametrize("W,cf,R,seed", [(320, 0.08, 4, 0), (368, 0.04, 8, 7), (64, 0.125, 4, 3), (33, 0.1, 3, 11)])
def test_random_matches_fastmri(W, cf, R, seed):
    np.testing.assert_array_equal(M.random_lines(W, R, center_fraction=cf, seed=seed).mask[0],
                                  fastmri_random_mask_ported(W, cf, R, seed))


# --------------------------------------------------------------------------------------------
# Equispaced lines: fastMRI 0.3.0 EquispacedMaskFractionFunc, re-derived from its documentation:
# N_low = round(N cf) centred columns (start (N - N_low + 1) // 2), plus columns at equal spacing
# "at a proportion that reaches the desired acceleration taking into consideration the number of low
# frequencies", so that the expected total is N / R: with spacing a, the outer columns add (N - N_low) / a
# lines, hence a = R (N - N_low) / (N - N_low R). The outer columns are offset + k a rounded (half to even)
# for offset + k a < N - 1, and a missing offset is drawn uniformly from {0, ..., round(a) - 1}.


def expected_equispaced(W, cf, R, offset):
    """The mask from the definition above, by plain Python floats (not the code under test)."""
    n_low = round(W * cf)
    a = R * (W - n_low) / (W - n_low * R)
    cols = set(range((W - n_low + 1) // 2, (W - n_low + 1) // 2 + n_low))
    k = 0
    while offset + k * a < W - 1:
        cols.add(round(offset + k * a))
        k += 1
    m = np.zeros(W, dtype=bool)
    m[sorted(cols)] = True
    return m, n_low, a


COMBOS = [(320, 0.08, 4), (368, 0.04, 8), (640, 0.04, 8), (64, 0.125, 4), (33, 0.1, 3), (100, 0.2, 2), (372, 0.08, 4)]


@pytest.mark.parametrize("W,cf,R", COMBOS)
def test_equispaced_structure_for_every_offset(W, cf, R):
    for offset in range(round(R * (W - round(W * cf)) / (W - round(W * cf) * R))):
        m = M.equispaced_lines(W, R, center_fraction=cf, offset=offset)
        got = m.mask[0]
        want, n_low, a = expected_equispaced(W, cf, R, offset)
        np.testing.assert_array_equal(got, want, err_msg=f"W={W} cf={cf} R={R} offset={offset}")
        start = (W - n_low + 1) // 2
        assert m.acs == (1, n_low) and got[start : start + n_low].all()
        # before the ACS block the lines are equispaced: first at `offset`, gaps of floor(a) or ceil(a)
        before = np.flatnonzero(got[:start])
        assert before[0] == offset and set(np.diff(before)) <= {math.floor(a), math.ceil(a)}
        # the total: N_low + (N - 1 - offset) / a outer lines, less those inside the ACS block: about N / R
        assert abs(got.sum() - W / R) <= 1 + n_low / a


@pytest.mark.parametrize("W,cf,R", COMBOS)
def test_equispaced_offset_is_drawn_from_round_of_the_adjusted_acceleration(W, cf, R):
    _, _, a = expected_equispaced(W, cf, R, 0)
    firsts = {int(np.flatnonzero(M.equispaced_lines(W, R, center_fraction=cf, seed=s).mask[0])[0]) for s in range(300)}
    assert firsts == set(range(round(a)))  # every offset in [0, round(a)), none beyond
    if round(a) > round(R):  # (where round(R) would differ: the bug this test was written for)
        assert max(firsts) >= round(R)


def test_equispaced_hand_derived():
    # W = 16, cf = 1/8, R = 4: N_low = 2 (columns 7, 8), a = 4 * 14 / (16 - 8) = 7, offsets 0..6
    for offset, cols in [(0, [0, 7, 8, 14]), (3, [3, 7, 8, 10]), (6, [6, 7, 8, 13])]:
        assert np.flatnonzero(M.equispaced_lines(16, 4, center_fraction=0.125, offset=offset).mask[0]).tolist() == cols
    # W = 20, cf = 0.2, R = 2: N_low = 4 (columns 8..11), a = 2 * 16 / 12 = 8/3; offset 1:
    # 1, 3.67, 6.33, 9, 11.67, 14.33, 17 (19.67 >= 19 stops) -> 1, 4, 6, 9, 12, 14, 17
    assert np.flatnonzero(M.equispaced_lines(20, 2, center_fraction=0.2, offset=1).mask[0]).tolist() == \
        [1, 4, 6, 8, 9, 10, 11, 12, 14, 17]
    # W = 10, cf = 0.1, R = 2: N_low = 1 (column 5), a = 18 / 8 = 2.25, offsets 0, 1; offset 1:
    # 1, 3.25, 5.5 (half to even: 6), 7.75 -> 1, 3, 6, 8
    assert np.flatnonzero(M.equispaced_lines(10, 2, center_fraction=0.1, offset=1).mask[0]).tolist() == [1, 3, 5, 6, 8]
    # the ACS block alone reaches R when N_low R >= N: no outer lines (fastMRI's formula would divide by <= 0)
    assert np.flatnonzero(M.equispaced_lines(16, 4, center_lines=4).mask[0]).tolist() == [6, 7, 8, 9]
    # a seeded draw is fastMRI's: MaskFunc.__call__ seeds its RandomState, choose_acceleration spends one
    # randint(len(center_fractions)) draw, then the offset is randint(0, round(a)); W = 16 above: round(a) = 7
    for seed in (0, 1, 5, 123):
        rng = np.random.RandomState(seed)
        rng.randint(1)
        offset = rng.randint(0, 7)
        np.testing.assert_array_equal(M.equispaced_lines(16, 4, center_fraction=0.125, seed=seed).mask,
                                      M.equispaced_lines(16, 4, center_fraction=0.125, offset=offset).mask)
    with pytest.raises(ConfigError, match="offset"):
        M.equispaced_lines(16, 4, center_fraction=0.125, offset=-1)


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
    assert torch.all(f3 <= ms) and torch.all(f3.sum((1, 2)) == 12)  # unseeded: may coincide with f1, must be valid


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


@pytest.mark.parametrize("kind", ["adps", "gaussian", "random", "equispaced", "poisson", "random-2d"])
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


def test_random_2d_exact_count_density_law_and_independence():
    ms = np.stack([M.random_points((64, 64), 4, calib=(8, 8), seed=s).mask for s in range(200)])
    assert np.all(ms.sum((1, 2)) == 1024) and ms[:, 28:36, 28:36].all()
    # the density law p ~ (1 + 2 r)^-2 outside the calibration block, r as in poisson_disc
    yy, xx = np.mgrid[:64, :64] - 32
    r = np.hypot(yy / 32, xx / 32) / math.sqrt(2)
    freq, outer = ms.mean(0), ~M.acs_region((64, 64), (8, 8))
    law = (1 + 2 * r) ** -2.0
    ratio = freq[outer] / law[outer]
    assert ratio.std() / ratio.mean() < 0.15
    # independence: a point's neighbour being sampled does not change its own chance (a Poisson disc's does)
    same = (ms[:, :, 1:] & ms[:, :, :-1])[:, outer[:, 1:] & outer[:, :-1]].mean()
    alone = (freq[:, 1:] * freq[:, :-1])[outer[:, 1:] & outer[:, :-1]].mean()
    assert same == pytest.approx(alone, rel=0.05)


def removed_vs_never_auc(draw, R, R_further, n=30):
    """AUC (midranks) with which the distance to the nearest point of ``M~`` tells the points that the further
    mask removed from points never acquired; 0.5 is chance. ``draw(R, seed)`` gives a uniform-density mask, so
    that where a point lies says nothing (with variable density, location alone would shift the AUC)."""
    from scipy.ndimage import distance_transform_edt
    from scipy.stats import rankdata

    removed, never = [], []
    for seed in range(n):
        sm = draw(R, seed)
        g = torch.Generator().manual_seed(seed)
        f = M.further_kspace_mask(torch.from_numpy(sm.mask[None]), sm.acs, further_accel=R_further,
                                  generator=g)[0].numpy()
        d = distance_transform_edt(~f)
        removed.append(d[sm.mask & ~f])
        never.append(d[~sm.mask])
    a, b = np.concatenate(removed), np.concatenate(never)
    ranks = rankdata(np.concatenate([a, b]))
    return (ranks[: a.size].sum() - a.size * (a.size + 1) / 2) / (a.size * b.size)


def test_identifiability_poisson_disc_holes_are_visible_random_2d_are_not():
    """Issue 10's measurement as a test: removing points from a Poisson disc leaves holes that tell removed
    points from never-acquired ones; a mask of independent points gives them away at chance only."""
    def disc(R, seed):
        return M.poisson_disc((64, 64), R, calib=(8, 8), seed=seed, density_slope=0.0)

    def points(R, seed):
        return M.random_points((64, 64), R, calib=(8, 8), seed=seed, density_slope=0.0)

    assert removed_vs_never_auc(disc, 4, 5) > 0.7 and removed_vs_never_auc(disc, 8, 9) > 0.85
    assert abs(removed_vs_never_auc(points, 4, 5) - 0.5) < 0.02
    assert abs(removed_vs_never_auc(points, 8, 9) - 0.5) < 0.02


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
