"""data_prep: shared helpers, the demo-data generator, and the converters of ../shared/data."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from ambient_mri.errors import ConfigError, DataError
from ambient_mri.fastmri_io import FastMRIVolume
from ambient_mri.fft import center_crop, fft2c, ifft2c, rss
from data_prep import common, demo_data

DEMO = dict(n_train_volumes=3, n_val_volumes=1, n_test_volumes=1, slices_per_volume=4, size=32, coils=4, seed=3)


# -- common -------------------------------------------------------------------------------------------

def test_fourier_resample_keeps_constants_and_round_trips(rng):
    const = np.full((2, 16, 16), 0.7 - 0.2j, np.complex64)
    assert np.allclose(common.fourier_resample(const, (8, 8)), 0.7 - 0.2j, atol=1e-6)
    assert np.allclose(common.fourier_resample(const, (32, 24)), 0.7 - 0.2j, atol=1e-6)
    x = (rng.standard_normal((3, 16, 16)) + 1j * rng.standard_normal((3, 16, 16))).astype(np.complex64)
    up = common.resample(x, (32, 32), "fourier")
    assert np.allclose(common.resample(up, (16, 16), "fourier"), x, atol=1e-5)  # zero-pad then crop = identity
    assert common.resample(x, (8, 8), "interp").shape == (3, 8, 8)
    with pytest.raises(ConfigError):
        common.resample(x, (8, 8), "cubic")


def test_noise_has_the_stated_level():
    n = common.complex_noise(common.rng_for(0, 1), (200, 200), 0.3)
    assert n.dtype == np.complex64 and abs(np.sqrt(np.mean(np.abs(n) ** 2)) - 0.3) < 0.01
    assert abs(n.real.std() - n.imag.std()) < 0.01
    assert np.array_equal(n, common.complex_noise(common.rng_for(0, 1), (200, 200), 0.3))
    assert not np.array_equal(n, common.complex_noise(common.rng_for(0, 2), (200, 200), 0.3))


def test_normalize_maps(rng):
    m = common.normalize_maps(rng.standard_normal((4, 8, 8)) + 1j * rng.standard_normal((4, 8, 8)))
    assert np.allclose(np.sum(np.abs(m) ** 2, axis=0), 1, atol=1e-5)


def test_split_counts_and_assign_splits():
    assert common.split_counts(25, (0.8, 0.1, 0.1)) == {"train": 20, "val": 2, "test": 3}
    assert common.split_counts(4, (0.8, 0.1, 0.1)) == {"train": 2, "val": 1, "test": 1}  # every split filled
    assert common.split_counts(5, counts=(3, 0, 2)) == {"train": 3, "val": 0, "test": 2}
    with pytest.raises(ConfigError):
        common.split_counts(5, counts=(3, 1, 2))
    with pytest.raises(ConfigError):
        common.split_counts(2, (0.5, 0.25, 0.25))
    groups = [0, 0, 1, 1, 1, 2, 3, 3, 4, 5]
    a = common.assign_splits(groups, fractions=(0.5, 0.25, 0.25), seed=7)
    assert a == common.assign_splits(groups, fractions=(0.5, 0.25, 0.25), seed=7)
    for g in set(groups):  # whole groups
        assert len({s for s, gg in zip(a, groups) if gg == g}) == 1
    per_split = {s: {g for s2, g in zip(a, groups) if s2 == s} for s in common.SPLITS}
    assert [len(per_split[s]) for s in common.SPLITS] == [3, 1, 2]
    assert any(common.assign_splits(groups, fractions=(0.5, 0.25, 0.25), seed=s) != a for s in range(8, 14))


def test_center_run_and_block():
    m = np.zeros(32, bool)
    m[12:21] = True
    m[[2, 25]] = True
    assert common.center_run(m) == 9
    m[16] = False
    assert common.center_run(m) == 0
    m2 = np.zeros((20, 30), bool)
    m2[6:14, 11:19] = True  # an 8 x 8 block centred as ambient_mri.masks.acs_region centres it
    m2[8:12, 5:25] = True
    assert common.center_block(m2) == (8, 8)
    m2[6:14, 9:21] = True
    assert common.center_block(m2) == (8, 12)


def test_read_cfl_column_major(tmp_path, rng):
    a = (rng.standard_normal((1, 3, 5, 2)) + 1j * rng.standard_normal((1, 3, 5, 2))).astype(np.complex64)
    (tmp_path / "x.hdr").write_text("# Dimensions\n1 3 5 2 1 1 1 1 1 1 1 1 1 1 1 1\n")
    a.flatten(order="F").tofile(tmp_path / "x.cfl")
    b = common.read_cfl(tmp_path / "x")
    assert b.shape == (1, 3, 5, 2, *[1] * 12) and np.array_equal(b.reshape(a.shape), a)
    (tmp_path / "x.hdr").write_text("# Dimensions\n1 3 5 3\n")
    with pytest.raises(DataError, match="bytes"):
        common.read_cfl(tmp_path / "x.cfl")


def test_parse_range():
    assert common.parse_range("0:20", 500) == range(0, 20)
    assert common.parse_range(None, 5) == range(5)
    assert common.parse_range("490:", 500) == range(490, 500)
    with pytest.raises(ConfigError):
        common.parse_range("600:700", 500)


def test_plan_volumes_never_cross_a_series():
    from data_prep.siat import plan_volumes

    vols = plan_volumes(range(15, 47), volume_size=10, series_length=20)
    assert [v.tolist()[0] for v in vols] == [15, 20, 30, 40]
    assert all(len({i // 20 for i in v}) == 1 for v in vols)
    assert np.array_equal(np.concatenate(vols), np.arange(15, 47))


# -- demo data ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    paths = demo_data.generate_demo(out, **DEMO)
    return out, paths


def _kspaces(paths):
    out = {}
    for split, ps in paths.items():
        for p in ps:
            with h5py.File(p, "r") as f:
                out[f"{split}/{p.name}"] = f["kspace"][()]
    return out


def test_demo_is_deterministic(demo_dir, tmp_path):
    out, paths = demo_dir
    again = demo_data.generate_demo(tmp_path / "again", **DEMO)
    a, b = _kspaces(paths), _kspaces(again)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # volume i of a split does not depend on how many other volumes there are
    opts = {k: DEMO[k] for k in ("slices_per_volume", "size", "coils")}
    v = demo_data.demo_volume("train", 2, **opts, seed=DEMO["seed"])
    assert np.array_equal(v.kspace, a["train/demo_train_002.h5"])
    other = demo_data.demo_volume("train", 2, **opts, seed=DEMO["seed"] + 1)
    assert not np.allclose(other.kspace, v.kspace)


def test_existing_demo_recognises_a_finished_run(demo_dir):
    out, paths = demo_dir
    assert demo_data.existing_demo(out, **DEMO) == paths
    assert demo_data.existing_demo(out, **dict(DEMO, seed=4)) is None
    assert demo_data.existing_demo(out / "nowhere", **DEMO) is None


def test_demo_files_follow_the_fastmri_layout(demo_dir):
    out, paths = demo_dir
    assert [len(paths[s]) for s in common.SPLITS] == [3, 1, 1]
    for split, ps in paths.items():
        for p in ps:
            assert p.parent.name == split
            with FastMRIVolume(p) as v:
                assert v.shape == (4, 4, 32, 32) and not v.is_undersampled and not v.warnings
                assert v.header["encoding_size"][:2] == (32, 32) and v.header["recon_size"][:2] == (32, 32)
                assert v.attrs["split"] == split and v.attrs["acquisition"][-2:] in ("T1", "T2", "PD", "IR")
            with h5py.File(p, "r") as f:
                k = f["kspace"][()]
                assert k.dtype == np.complex64
                ref = center_crop(rss(ifft2c(k), dim=1), (32, 32))
                assert np.allclose(f["reconstruction_rss"][()], ref, rtol=1e-4, atol=1e-6)
                maps = f["sim_coil_maps"][()]
                assert maps.shape == (4, 32, 32) and np.allclose(np.sum(np.abs(maps) ** 2, 0), 1, atol=1e-4)
    manifest = json.loads((out / "demo_manifest.json").read_text())
    assert manifest["options"]["seed"] == 3 and len(manifest["volumes"]) == 5


def test_demo_coil_images_are_maps_times_image_plus_stated_noise():
    v = demo_data.demo_volume("val", 0, slices_per_volume=3, size=32, coils=4, noise=0.02, seed=1)
    resid = ifft2c(v.kspace) - v.maps[None] * v.image[:, None]
    assert np.allclose(v.sigma, 0.02 * np.abs(v.image).reshape(3, -1).max(1))
    measured = np.sqrt(np.mean(np.abs(resid) ** 2, axis=(1, 2, 3)))
    assert np.allclose(measured, v.sigma, rtol=0.1)
    clean = demo_data.demo_volume("val", 0, slices_per_volume=3, size=32, coils=4, noise=0.0, seed=1)
    assert np.allclose(ifft2c(clean.kspace), clean.maps[None] * clean.image[:, None], atol=1e-5)
    assert np.allclose(rss(ifft2c(clean.kspace), dim=1), np.abs(clean.image), atol=1e-5)


def test_demo_images_look_like_anatomy(demo_dir):
    from scipy import ndimage

    out, paths = demo_dir
    fractions, contrasts = [], set()
    for p in sum(paths.values(), []):
        with h5py.File(p, "r") as f:
            img = f["reconstruction_rss"][()]
            contrasts.add(f.attrs["contrast"])
        for x in img:
            fg = x > 0.15 * x.max()
            fractions.append(fg.mean())
            assert ndimage.label(ndimage.binary_opening(fg))[1] <= 3  # one head, not scattered noise
            assert x[fg].std() / x[fg].mean() > 0.2  # tissue contrast, not a flat disc
            gy, gx = np.gradient(x)
            assert np.hypot(gx, gy)[fg].mean() / x[fg].mean() > 0.1  # edges inside the head
            edge = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
            assert edge.max() < 0.12 * x.max()  # the head fits the field of view (Gibbs ringing aside)
    assert 0.1 < min(fractions) and max(fractions) < 0.7
    assert len(contrasts) >= 2


def test_demo_splits_use_disjoint_anatomy(demo_dir):
    out, paths = demo_dir
    T = demo_data.load_template()
    for ori, lv in T.levels.items():
        s = demo_data.split_levels(lv)
        assert all(len(s[k]) >= 8 for k in common.SPLITS), ori
        for held in ("val", "test"):
            assert np.abs(s["train"][:, None] - s[held][None]).min() >= demo_data.GUARD_MM
    manifest = json.loads((out / "demo_manifest.json").read_text())
    for vol in manifest["volumes"]:
        allowed = manifest["levels_mm"][vol["orientation"]][vol["split"]]
        levels = np.abs(vol["levels_mm"]) if vol["orientation"] == "sagittal" else np.asarray(vol["levels_mm"])
        assert set(levels.tolist()) <= set(allowed)

    def stack(split):
        xs = []
        for p in paths[split]:
            with h5py.File(p, "r") as f:
                xs.append(f["reconstruction_rss"][()].reshape(-1, 32 * 32))
        x = np.concatenate(xs)
        x = x - x.mean(1, keepdims=True)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    train = stack("train")
    for held in ("val", "test"):
        assert (stack(held) @ train.T).max() < 0.97  # no near-copy of a training slice


def test_demo_refuses_stale_files(demo_dir, tmp_path):
    small = dict(DEMO, n_train_volumes=2, slices_per_volume=1, size=16)
    demo_data.generate_demo(tmp_path, **small)
    with pytest.raises(ConfigError, match="another run"):
        demo_data.generate_demo(tmp_path, **dict(small, n_train_volumes=1))
    paths = demo_data.generate_demo(tmp_path, **dict(small, n_train_volumes=1), overwrite=True)
    assert sorted(p.name for p in (tmp_path / "train").glob("*.h5")) == [p.name for p in paths["train"]]
    with pytest.raises(ConfigError):
        demo_data.generate_demo(tmp_path / "x", **dict(small, size=4))


def test_cli_help_and_one_line_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "data_prep", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and all(c in r.stdout for c in ("siat", "head8ch", "bart", "brain512", "demo"))
    r = subprocess.run([sys.executable, "-m", "data_prep", "demo", str(tmp_path), "--size", "4"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "size must be" in r.stderr


# -- converters of ../shared/data -------------------------------------------------------------------

@pytest.fixture(scope="module")
def siat_small(tmp_path_factory):
    from tests.conftest import SHARED_DATA

    if not (SHARED_DATA / "README.md").exists():
        pytest.skip(f"real MRI data folder {SHARED_DATA} is absent")
    from data_prep.siat import convert_siat

    out = tmp_path_factory.mktemp("siat")
    paths = convert_siat(SHARED_DATA, out, slices=range(20), size=64, noise=0.01, seed=5, volume_size=5,
                         series_length=5, fractions=(0.5, 0.25, 0.25))
    return out, paths


@pytest.mark.shared_data
def test_siat_splits_are_disjoint_and_complete(shared_data, siat_small):
    out, paths = siat_small
    split = json.loads((out / "split.json").read_text())
    slices = {s: set(split["splits"][s]["slices"]) for s in common.SPLITS}
    assert set().union(*slices.values()) == set(range(20))
    assert sum(len(v) for v in slices.values()) == 20
    assert [len(paths[s]) for s in common.SPLITS] == [2, 1, 1]
    for s in common.SPLITS:
        on_disk = sorted(p.name for p in (out / s).glob("*.h5"))
        assert on_disk == sorted(p.name for p in paths[s])
        got = set()
        for p in paths[s]:
            with h5py.File(p, "r") as f:
                got |= set(f.attrs["source_slices"].tolist())
                assert f.attrs["split"] == s
        assert got == slices[s]
    series = {s: {i // 5 for i in slices[s]} for s in common.SPLITS}  # whole series per split
    assert not (series["train"] & series["val"]) and not (series["train"] & series["test"])


@pytest.mark.shared_data
def test_siat_coil_images_are_maps_times_image_plus_noise(shared_data, siat_small):
    from ambient_mri.fastmri_io import parse_header
    from data_prep.siat import load_siat

    out, paths = siat_small
    p = paths["val"][0]
    with h5py.File(p, "r") as f:
        k, maps, idx = f["kspace"][()], f["sim_coil_maps"][()], f.attrs["source_slices"]
        sigma, level = f.attrs["noise_sigma"], f.attrs["noise_level"]
        hdr = parse_header(f["ismrmrd_header"][()])
    assert k.shape == (5, 8, 64, 64) and hdr["encoding_size"][:2] == (64, 64) and hdr["recon_size"][:2] == (64, 64)
    assert np.allclose(np.sum(np.abs(maps) ** 2, 0), 1, atol=1e-4)
    x = common.fourier_resample(load_siat(shared_data, idx), (64, 64))
    assert np.allclose(sigma, level * np.abs(x).reshape(5, -1).max(1), rtol=1e-5)
    resid = ifft2c(k) - maps[None] * x[:, None]
    measured = np.sqrt(np.mean(np.abs(resid) ** 2, axis=(1, 2, 3)))
    assert np.allclose(measured, sigma, rtol=0.05)
    # the image really is the SIAT slice: the maps-combined coil images match it up to the noise
    combined = np.sum(np.conj(maps)[None] * ifft2c(k), axis=1)
    assert np.linalg.norm(combined - x) / np.linalg.norm(x) < 0.05


@pytest.mark.shared_data
def test_siat_series_length_matches_the_data(shared_data):
    from data_prep.siat import SERIES_LENGTH, consecutive_correlation

    c = consecutive_correlation(shared_data)
    starts = np.arange(SERIES_LENGTH, len(c) + 1, SERIES_LENGTH)
    assert c[starts - 1].max() < 0.45  # a new series starts at every multiple of SERIES_LENGTH ...
    assert np.median(np.delete(c, starts - 1)) > 0.55  # ... while neighbours within a series correlate


@pytest.mark.shared_data
def test_head8ch_round_trip(shared_data, tmp_path):
    from data_prep.head8ch import convert_head8ch

    p = convert_head8ch(shared_data, tmp_path)
    data = common.load_mat(shared_data / "head8ch" / "head.mat", ("data",))["data"]
    with FastMRIVolume(p) as v:
        assert v.shape == (1, 8, 256, 256) and not v.is_undersampled
        k = v.slice(0)
    img = ifft2c(k)
    assert np.allclose(img, np.moveaxis(data, -1, 0), atol=1e-5 * np.abs(data).max())


@pytest.mark.shared_data
def test_bart_mask_acceleration_and_zeros(shared_data, tmp_path):
    from data_prep.bart import convert_bart

    p = convert_bart(shared_data, tmp_path)
    raw = common.read_cfl(shared_data / "bart_brain8ch_poisson" / "ksp").reshape(180, 230, 8, order="F")  # (Y, Z, C)
    with h5py.File(p, "r") as f:
        k, mask, attrs = f["kspace"][()], f["mask"][()], dict(f.attrs)
        pics = f["bart_pics_reconstruction"]
        assert pics.shape == (1, 2, 230, 180) and "NOT ground truth" in pics.attrs["description"]
        assert "reconstruction_rss" not in f
    assert k.shape == (1, 8, 230, 180) and mask.shape == (230, 180) and mask.dtype == bool
    assert np.array_equal(k[0], np.transpose(raw, (2, 1, 0)))  # transposed plane, coils first
    assert not np.any(k[0][:, ~mask]) and np.all(np.abs(k[0][:, mask]).max(axis=0) > 0)
    assert 7 < attrs["acceleration"] < 9 and np.isclose(attrs["acceleration"], mask.size / mask.sum())
    h, w = attrs["calibration_block"]
    assert attrs["num_low_frequency"] == min(h, w) >= 16
    from ambient_mri.masks import acs_region

    assert mask[acs_region(mask.shape, (h, w))].all()
    with FastMRIVolume(p) as v:
        assert v.is_undersampled and v.mask.shape == (230, 180)
    assert_honest_header(p, (230, 180))  # both in-plane axes are phase encodes: nothing is oversampled


@pytest.mark.shared_data
def test_brain512_mask_and_kspace_match_the_mat(shared_data, tmp_path):
    from data_prep.brain512 import convert_brain512

    p = convert_brain512(shared_data, tmp_path)
    mat = common.load_mat(shared_data / "brain512_singlecoil" / "brain512.mat", ("data", "mask"))
    with h5py.File(p, "r") as f:
        k, mask, attrs = f["kspace"][()], f["mask"][()], dict(f.attrs)
        assert "reconstruction_esc" not in f
    assert k.shape == (1, 512, 512) and mask.shape == (512,)
    assert np.array_equal(np.broadcast_to(mask, (512, 512)), mat["mask"] != 0)  # lines are columns
    assert np.allclose(k[0], mat["data"].astype(np.complex64)) and not np.any(k[0][:, ~mask])
    assert np.isclose(attrs["acceleration"], 512 / mask.sum())
    c = np.flatnonzero(~mask)
    run = c[c > 256].min() - c[c < 256].max() - 1
    assert attrs["num_low_frequency"] == run > 0
    img = ifft2c(k[0])
    ref = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(mat["data"]))) * 512  # README's image, orthonormal scale
    assert np.allclose(img, ref, atol=1e-4 * np.abs(ref).max())
    assert_honest_header(p, (512, 512))  # the head fills the 512-sample readout: not oversampled


def assert_honest_header(path, shape):
    """The ``ismrmrd_header`` XML itself (not the reader's interpretation): encoded = recon matrix = the
    k-space plane, so nothing claims an oversampled readout; the reader then leaves whitening off."""
    import xml.etree.ElementTree as ET

    from ambient_mri.fastmri_io import ISMRMRD_NS

    with h5py.File(path, "r") as f:
        root = ET.fromstring(f["ismrmrd_header"][()])
    ns = {"m": ISMRMRD_NS}
    for space in ("encodedSpace", "reconSpace"):
        size = tuple(int(root.find(f"m:encoding/m:{space}/m:matrixSize/m:{a}", ns).text) for a in "xy")
        assert size == shape, space
    with FastMRIVolume(path) as v:
        assert not v.readout_oversampled and v.header["source"] == "header"
