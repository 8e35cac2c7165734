"""``ambient-mri prep``: the prepared-data contract (docs/data_format.md) on small generated volumes."""

import hashlib
import json
import os
import subprocess
import sys
import threading

import h5py
import numpy as np
import pytest
import sigpy
import sigpy.mri
from click.testing import CliRunner

from ambient_mri import coils, masks, whitening
from ambient_mri.coils import acs_norm, calibration_block, estimate_maps
from ambient_mri.commands.prep import command
from ambient_mri.crop import crop_kspace
from ambient_mri.errors import ConfigError, DataError
from ambient_mri.fastmri_io import FastMRIVolume, write_volume
from ambient_mri.fft import center_crop, fft2c, ifft2c, rss
from ambient_mri.prep import PrepOptions, prepare_volume, run_prep
from ambient_mri.prep_options import MASK_TYPES, parse_slices, slice_seed
from ambient_mri.prep_slice import prepare_slice
from ambient_mri.whitening import prewhiten_slice

S, C, H, W = 2, 4, 128, 64  # 2x oversampled readout; recon (and crop) 64 x 64
CROP = (64, 64)
FAST = dict(crop=CROP, maps="lowres", center_lines=8)  # small, fast defaults for most runs


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def phantom_kspace(seed, S=S, C=C, H=H, W=W, noise=0.01):
    """Birdcage maps x Shepp-Logan (smooth phase, per-slice scale) in the central H/2 rows, plus
    coil-correlated complex noise: ``(S, C, H, W)`` complex64."""
    rng = np.random.default_rng(seed)
    maps = sigpy.mri.birdcage_maps((C, H // 2, W), r=1.2).astype(np.complex64)
    yy, xx = np.mgrid[: H // 2, :W] / W
    mix = np.eye(C) + 0.3 * rng.standard_normal((C, C))
    out = []
    for s in range(S):
        img = sigpy.shepp_logan((H // 2, W)).real * (1 + 0.2 * s) * np.exp(1j * (xx - 0.5 + 0.3 * s * yy))
        coil = np.zeros((C, H, W), np.complex64)
        coil[:, H // 4 : H // 4 + H // 2] = maps * img
        n = noise * (rng.standard_normal((C, H * W)) + 1j * rng.standard_normal((C, H * W)))
        out.append(fft2c(coil) + (mix @ n).reshape(C, H, W))
    return np.stack(out).astype(np.complex64)


def sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """Two fully sampled volumes (train/val style) and two test-style ones (own line / 2-D mask)."""
    root = tmp_path_factory.mktemp("raw")
    full = root / "full"
    for i, name in enumerate(("vol_a.h5", "vol_b.h5")):
        write_volume(full / name, phantom_kspace(i), recon_size=CROP)
    test = root / "test"
    k = phantom_kspace(7)
    line = masks.kspace_mask("random", (H, W), 4, center=10, seed=3).mask[0]
    write_volume(test / "lines.h5", k, recon_size=CROP, mask=line, acceleration=4.0, num_low_frequency=10)
    m2 = masks.kspace_mask("poisson", CROP, 3, center=12, seed=4).mask
    m2 = np.pad(m2, ((H // 4, H // 4), (0, 0)))  # 2-D mask over the uncropped 128 x 64 matrix
    m2[H // 2 - 6 : H // 2 + 6, W // 2 - 6 : W // 2 + 6] = True
    write_volume(test / "poisson.h5", phantom_kspace(8), recon_size=CROP, mask=m2)
    return root


def checksums(folder):
    return {p.name: sha(p) for p in sorted(folder.glob("*.h5"))}


def prep(raw_dir, out, **kw):
    opts = PrepOptions(**{**FAST, **kw})
    return run_prep(raw_dir, out, opts, progress=False, echo=lambda m: None)


@pytest.fixture(scope="module")
def train_run(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    before = checksums(raw / "full")
    runner = CliRunner()
    res = runner.invoke(command, [str(raw / "full"), str(out), "--split", "train", "--accel", "4", "--crop", "64", "64",
                                  "--maps", "lowres", "--center-lines", "8", "--seed", "5", "-q"])
    assert res.exit_code == 0, res.output
    assert checksums(raw / "full") == before  # inputs never modified
    return out


@pytest.fixture(scope="module")
def val_run(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("val")
    res = prep(raw / "full", out, split="val", accel=(4.0, 8.0), whiten=False)
    assert not res.failed
    return out


def read(p):
    with h5py.File(p, "r") as f:
        return {k: f[k][()] for k in f}, dict(f.attrs)


def acs_rss_p99(k, calib):
    return float(np.percentile(rss(ifft2c(coils.acs_kspace(k, (calib, calib))), dim=0), 99))


# ----------------------------------------------------------------------------------------------
# train split


def test_train_files_follow_the_contract_and_hold_only_masked_data(train_run, raw):
    assert sorted(p.name for p in train_run.iterdir()) == ["manifest.json", "vol_a.h5", "vol_b.h5"]
    for name in ("vol_a.h5", "vol_b.h5"):
        d, a = read(train_run / name)
        assert set(d) == {"kspace", "mask", "maps", "norm", "mask_seed", "slice_index", "noise_std"}  # no reference
        assert d["kspace"].shape == (S, C, 64, 64) and d["kspace"].dtype == np.complex64
        assert d["mask"].shape == (S, 1, 64) and d["mask"].dtype == bool
        assert d["maps"].shape == (S, C, 64, 64) and d["maps"].dtype == np.complex64
        assert d["norm"].dtype == np.float32 and d["mask_seed"].dtype == np.int64
        np.testing.assert_array_equal(d["slice_index"], np.arange(S))
        # exactly zero where the mask is 0, and every sampled line non-zero
        full_mask = np.broadcast_to(d["mask"][:, None], d["kspace"].shape)
        assert (d["kspace"][~full_mask] == 0).all() and (np.abs(d["kspace"][full_mask]) > 0).all()
        assert a["split"] == "train" and a["domain"] == "kspace" and a["mask_kind"] == "adps"
        assert a["accel"] == 4.0 and tuple(a["acs"]) == (64, 8) and a["calib"] == 8
        assert "reference_kind" not in a
        assert a["source_sha256"] == sha(raw / "full" / name) and a["format"] == "ambient_mri.prepared/1"
        assert json.loads(a["options"])["seed"] == 5
        assert a["whitened"].all()  # header encoded 128 > recon 64: whitening on by default
        for s in range(S):
            # norm: ACS-block RSS 99th percentile is 1 after normalisation
            assert acs_rss_p99(d["kspace"][s], 8) == pytest.approx(1.0, rel=1e-4)
            # the mask is the documented one for the recorded seed
            seed = slice_seed(5, name, s)
            assert d["mask_seed"][s] == seed
            np.testing.assert_array_equal(d["mask"][s], masks.kspace_mask("adps", (64, 64), 4, center=8, seed=seed).mask)
            # maps are a function of the calibration block alone
            np.testing.assert_allclose(d["maps"][s], coils.lowres_maps(coils.acs_kspace(d["kspace"][s], (8, 8)), (8, 8)),
                                       atol=1e-4)
        assert len(set(d["mask_seed"].tolist())) == S
        # what is stored cannot give the fully sampled image: a 4x undersampled zero-filled recon is far from it
        with FastMRIVolume(raw / "full" / name) as v:
            truth = center_crop(rss(ifft2c(v.slice(0)), dim=0), CROP)
        zf = rss(ifft2c(d["kspace"][0]), dim=0) * d["norm"][0]
        assert np.linalg.norm(zf - truth) / np.linalg.norm(truth) > 0.1


def test_train_manifest_matches_the_files(train_run, raw):
    m = json.loads((train_run / "manifest.json").read_text())
    assert m["format"] == "ambient_mri.prepared/1" and m["split"] == "train" and m["domain"] == "kspace"
    assert m["failed"] == [] and m["reference_kind"] is None and m["options"]["accel"] == [4.0]
    assert m["ambient_mri_version"] and m["options"]["maps"] == "lowres"
    assert [f["file"] for f in m["files"]] == ["vol_a.h5", "vol_b.h5"]
    for f in m["files"]:
        d, a = read(train_run / f["file"])
        assert f["source_sha256"] == sha(raw / "full" / f["file"]) and f["source"].endswith(f["file"])
        assert f["slices"] == S and f["slice_index"] == [0, 1] and f["mask_seed"] == d["mask_seed"].tolist()
        np.testing.assert_allclose(f["norm"], d["norm"], rtol=1e-6)
        assert f["accel_actual"] == pytest.approx(4.0) and f["reference"] is None


def test_resume_skips_finished_files_and_completes_missing_ones_identically(train_run, raw, tmp_path):
    out = tmp_path / "resume"
    args = dict(split="train", accel=(4.0,), seed=5)
    prep(raw / "full", out, **args)
    first = {p.name: read(p) for p in out.glob("*.h5")}
    manifest = json.loads((out / "manifest.json").read_text())
    mtime_a = os.stat(out / "vol_a.h5").st_mtime_ns
    (out / "vol_b.h5").unlink()
    res = prep(raw / "full", out, **args)
    assert [os.path.basename(p) for p in res.skipped] == ["vol_a.h5"]
    assert [os.path.basename(p) for p in res.written] == ["vol_b.h5"]
    assert os.stat(out / "vol_a.h5").st_mtime_ns == mtime_a
    again = read(out / "vol_b.h5")
    for key in first["vol_b.h5"][0]:
        np.testing.assert_array_equal(again[0][key], first["vol_b.h5"][0][key])
    assert json.loads((out / "manifest.json").read_text()) == manifest
    # same data as the CLI run with the same options
    np.testing.assert_array_equal(again[0]["kspace"], read(train_run / "vol_b.h5")[0]["kspace"])
    res = prep(raw / "full", out, **args)
    assert len(res.skipped) == 2 and res.written == []
    # different options into the same folder are refused before any work
    with pytest.raises(ConfigError, match="different options"):
        prep(raw / "full", out, split="train", accel=(4.0,), seed=6)
    assert not list(out.glob(".*"))  # no temporary or lock files left


def test_resume_refuses_maps_of_another_estimator_revision(raw, tmp_path, monkeypatch):
    """A folder half-prepared by code whose map estimator had other settings is never completed with new maps."""
    import h5py

    from ambient_mri import coils

    out = tmp_path / "rev"
    args = dict(split="train", accel=(4.0,), seed=5)
    prep(raw / "full", out, **args)
    (out / "vol_b.h5").unlink()
    with h5py.File(out / "vol_a.h5", "r+") as f:  # as written before maps_revision was recorded
        opts = json.loads(f.attrs["options"])
        opts.pop("maps_revision")
        f.attrs["options"] = json.dumps(opts, sort_keys=True)
    assert prep(raw / "full", out, **args).written  # revision 1 (no key) of this estimator: the same maps
    monkeypatch.setitem(coils.MAPS_REVISION, FAST.get("maps", coils.DEFAULT_MAPS), 99)
    (out / "vol_b.h5").unlink()
    with pytest.raises(ConfigError, match="maps_revision"):
        prep(raw / "full", out, **args)


# ----------------------------------------------------------------------------------------------
# val / test splits


def test_val_split_writes_one_folder_per_acceleration_with_references(val_run, raw):
    assert sorted(p.name for p in val_run.iterdir()) == ["R4", "R8"]
    refs = {}
    for R in (4, 8):
        folder = val_run / f"R{R}"
        m = json.loads((folder / "manifest.json").read_text())
        assert m["split"] == "val" and m["reference_kind"] == "cg-sense" and len(m["files"]) == 2
        assert all(f["reference"] == "cg-sense" and f["accel_actual"] == pytest.approx(R) for f in m["files"])
        d, a = read(folder / "vol_a.h5")
        assert set(d) == {"kspace", "mask", "maps", "norm", "mask_seed", "slice_index", "reference", "noise_std"}
        assert d["reference"].shape == (S, 64, 64) and d["reference"].dtype == np.complex64
        assert a["reference_kind"] == "cg-sense" and a["accel"] == R and not a["whitened"].any()
        assert (d["kspace"][~np.broadcast_to(d["mask"][:, None], d["kspace"].shape)] == 0).all()
        refs[R] = (d["reference"], d["norm"], d["maps"])
        # the reference is the image of the fully sampled (cropped, normalised) k-space: it explains that
        # k-space up to noise and the error of 8 x 8-block maps, and its magnitude is the RSS image's
        with FastMRIVolume(raw / "full" / "vol_a.h5") as v:
            for s in range(S):
                full = crop_kspace(v.slice(s), CROP)[0] / d["norm"][s]
                pred = fft2c(d["maps"][s] * d["reference"][s])
                assert np.linalg.norm(pred - full) / np.linalg.norm(full) < 0.3
                truth = center_crop(rss(ifft2c(v.slice(s)), dim=0), CROP) / d["norm"][s]
                corr = np.corrcoef(np.abs(d["reference"][s]).ravel(), truth.ravel())[0, 1]
                assert corr > 0.995
    for i in range(3):  # maps, norm and reference do not depend on R
        np.testing.assert_array_equal(refs[4][i], refs[8][i])


def test_test_split_uses_the_inputs_own_masks_and_has_no_reference(raw, tmp_path):
    before = checksums(raw / "test")
    res = prep(raw / "test", tmp_path / "t", split="test", accel=(4.0,), center_lines=None)
    assert not res.failed and checksums(raw / "test") == before
    m = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert m["reference_kind"] is None
    by = {f["file"]: f for f in m["files"]}
    assert set(by) == {"lines.h5", "poisson.h5"} and all(f["reference"] is None for f in by.values())
    assert all(f["mask_seed"] == [-1] * S for f in by.values())
    for name in by:
        d, a = read(tmp_path / "t" / name)
        assert "reference" not in d and a["reference_kind"] == "none" and a["mask_kind"] == "input"
        with FastMRIVolume(raw / "test" / name) as v:
            mask = v.mask
        if name == "lines.h5":
            assert d["mask"].shape == (S, 1, 64) and a["accel"] == 4.0
            np.testing.assert_array_equal(d["mask"][0, 0], mask)  # W is not cropped: same mask
            assert tuple(a["acs"]) == (64, 10) and a["calib"] == 10
        else:
            assert d["mask"].shape == (S, 64, 64)
            np.testing.assert_array_equal(d["mask"][0], mask[32:96])  # k-space crop of the readout
            assert a["calib"] == calibration_block(mask[32:96])[0] >= 12
        full = np.broadcast_to(d["mask"][:, None], d["kspace"].shape)
        assert (d["kspace"][~full] == 0).all()
        assert acs_rss_p99(d["kspace"][1], int(a["calib"])) == pytest.approx(1.0, rel=1e-4)


def test_undersampled_input_crop_keeps_unsampled_lines_zero(rng):
    k = (rng.standard_normal((3, 40, 24)) + 1j * rng.standard_normal((3, 40, 24))).astype(np.complex64)
    m = (rng.uniform(size=24) < 0.4)[None]
    m[0, 10:14] = True
    kc, mc = crop_kspace(k * m, (20, 16), m)
    assert kc.shape == (3, 20, 16) and mc.shape == (1, 16)
    np.testing.assert_array_equal(mc[0], m[0, 4:20])  # the 16 lines around DC (index 12 -> 8)
    assert (kc[..., ~mc[0]] == 0).all()
    # readout crop in image space: same as fastMRI's image crop of the columns that are kept
    expect = fft2c(center_crop(ifft2c((k * m)[..., 4:20]), (20, 16)))
    np.testing.assert_allclose(kc, expect, atol=1e-5)
    # fully sampled: fastMRI's centre crop after the inverse FFT
    kf, _ = crop_kspace(k, (20, 16))
    np.testing.assert_allclose(ifft2c(kf), center_crop(ifft2c(k), (20, 16)), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# failures and options


def test_bad_file_among_good_ones_fails_alone_with_nonzero_exit(raw, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for p in (raw / "full").glob("*.h5"):
        (src / p.name).write_bytes(p.read_bytes())
    (src / "broken.h5").write_text("not hdf5")
    k = phantom_kspace(3)
    k[1, 0, 5, 5] = np.nan  # passes the open-time check (central row), fails while slice 1 is prepared
    write_volume(src / "late_nan.h5", k, recon_size=CROP)
    before = checksums(src)
    out = tmp_path / "out"
    res = CliRunner().invoke(command, [str(src), str(out), "--split", "train", "--crop", "64", "64", "--maps", "lowres",
                                       "--center-lines", "8", "-q"])
    assert res.exit_code == 1
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "vol_a.h5", "vol_b.h5"]  # no partial files
    m = json.loads((out / "manifest.json").read_text())
    assert [os.path.basename(f["source"]) for f in m["failed"]] == ["broken.h5", "late_nan.h5"]
    assert "broken.h5: not an HDF5 file" in m["failed"][0]["error"]
    assert "late_nan.h5" in m["failed"][1]["error"] and "slice 1" in m["failed"][1]["error"]
    assert all("\n" not in f["error"] for f in m["failed"])
    assert "2 input file(s) failed" in res.output and [f["file"] for f in m["files"]] == ["vol_a.h5", "vol_b.h5"]
    assert checksums(src) == before


@pytest.mark.parametrize("args,words", [
    (["--accel", "0.5"], "--accel must be >= 1"),
    (["--accel", "x"], "is not a number"),
    (["--crop", "200", "64"], "larger than the 128x64 matrix"),
    (["--coils", "16"], "more than the 4 coils"),
    (["--mask-type", "spiral"], "unknown mask type 'spiral'"),
    (["--calib", "20"], "--calib 20 exceeds"),
    (["--domain", "image"], "--corruption"),
    (["--level", "0.2"], "need --domain image"),
    (["--slices", "a:b"], "--slices"),
])
def test_bad_options_are_rejected_before_any_work(raw, tmp_path, args, words):
    out = tmp_path / "out"
    base = [str(raw / "full"), str(out), "--split", "train", "--maps", "lowres", "--center-lines", "8", "-q"]
    res = CliRunner().invoke(command, base + args)
    assert res.exit_code != 0 and isinstance(res.exception, ConfigError), res.output
    assert words in str(res.exception) and "\n" not in str(res.exception)
    assert not out.exists()


def test_cli_main_prints_one_line_for_a_bad_option(raw, tmp_path, capsys):
    from ambient_mri.cli import main

    with pytest.raises(SystemExit) as ex:
        main(["prep", str(raw / "full"), str(tmp_path / "o"), "--split", "val", "--accel", "0"])
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--accel must be >= 1" in err


def test_output_inside_input_folder_is_refused(raw):
    with pytest.raises(ConfigError, match="input folder"):
        prep(raw / "full", raw / "full", split="train")


def test_help_explains_every_option():
    res = CliRunner().invoke(command, ["--help"])
    assert res.exit_code == 0
    for opt in ("--split", "--accel", "--mask-type", "--center-lines", "--crop", "--coils", "--seed", "--workers",
                "--maps", "--calib", "--whiten / --no-whiten", "--reference", "--nifti", "--domain", "--corruption",
                "--level", "--slices"):
        assert opt in res.output
    text = "".join(res.output.split())  # click wraps lines at hyphens
    assert set(MASK_TYPES) == set(masks.KSPACE_KINDS) and all(k in text for k in MASK_TYPES)


# ----------------------------------------------------------------------------------------------
# image domain, NIfTI, concurrency


def test_image_domain_box_corruption(raw, tmp_path):
    for split in ("train", "val"):
        out = tmp_path / split
        res = prep(raw / "full", out, split=split, domain="image", accel=(), corruption="box", level=0.25)
        assert not res.failed
        d, a = read(out / "vol_a.h5")
        expect = {"image", "mask", "norm", "mask_seed", "slice_index"} | ({"reference"} if split == "val" else set())
        assert set(d) == expect
        assert d["image"].shape == (S, 64, 64) and d["image"].dtype == np.complex64
        assert d["mask"].shape == (S, 64, 64) and d["mask"].dtype == bool
        assert (d["image"][~d["mask"]] == 0).all()
        assert (~d["mask"]).mean(axis=(1, 2)) == pytest.approx([0.25, 0.25], abs=0.01)
        assert a["domain"] == "image" and a["mask_kind"] == "box" and a["level"] == 0.25
        np.testing.assert_array_equal(d["mask"][1], masks.image_mask("box", (64, 64), 0.25,
                                                                     seed=slice_seed(0, "vol_a.h5", 1)))
        if split == "val":
            np.testing.assert_array_equal(d["image"], d["mask"] * d["reference"])
            assert json.loads((out / "manifest.json").read_text())["reference_kind"] == "cg-sense"


def test_nifti_export(raw, tmp_path):
    import nibabel as nib

    out = tmp_path / "n"
    run_prep(raw / "full", out, PrepOptions(**FAST, split="val", reference="rss", slices="1"), nifti=True,
             progress=False, echo=lambda m: None)
    d, a = read(out / "vol_a.h5")
    assert d["slice_index"].tolist() == [1]
    ref = nib.load(out / "nifti" / "vol_a_reference.nii.gz")
    zf = nib.load(out / "nifti" / "vol_a_zerofilled.nii.gz")
    assert ref.shape == zf.shape == (64, 64, 1)
    np.testing.assert_allclose(np.asarray(ref.dataobj)[..., 0].T, np.abs(d["reference"][0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(zf.dataobj)[..., 0].T, rss(ifft2c(d["kspace"][0]), dim=0), rtol=1e-4,
                               atol=1e-6)
    assert np.allclose(ref.header.get_zooms()[2], a["voxel_size_mm"][2])


def test_output_claimed_by_another_live_process_is_waited_for_then_taken_over(raw, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    reaper = threading.Thread(target=other.wait)  # reap it when it ends (a zombie would look alive)
    reaper.start()
    try:
        (out / ".vol_b.h5.lock").write_text(f"{other.pid}\n")
        res = prep(raw / "full", out, split="train")
    finally:
        reaper.join()
    assert sorted(os.path.basename(p) for p in res.written) == ["vol_a.h5", "vol_b.h5"]
    assert [f["file"] for f in json.loads((out / "manifest.json").read_text())["files"]] == ["vol_a.h5", "vol_b.h5"]
    assert not list(out.glob(".*"))


def test_two_concurrent_runs_one_with_worker_processes_give_the_same_dataset(raw, train_run, tmp_path):
    out = tmp_path / "both"
    args = [sys.executable, "-m", "ambient_mri.cli", "prep", str(raw / "full"), str(out), "--split", "train",
            "--crop", "64", "64", "--maps", "lowres", "--center-lines", "8", "--seed", "5", "-q"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(args + extra, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for extra in (["--workers", "2"], [])]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "vol_a.h5", "vol_b.h5"]  # no locks, no tmp
    for name in ("vol_a.h5", "vol_b.h5"):
        got, want = read(out / name)[0], read(train_run / name)[0]
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    assert [f["file"] for f in json.loads((out / "manifest.json").read_text())["files"]] == ["vol_a.h5", "vol_b.h5"]


# ----------------------------------------------------------------------------------------------
# per-slice pieces


def test_prepare_volume_in_memory_matches_the_written_file(train_run, raw):
    mem = prepare_volume(raw / "full" / "vol_a.h5", PrepOptions(**FAST, split="train", seed=5))
    d, a = read(train_run / "vol_a.h5")
    for key in d:
        np.testing.assert_array_equal(mem[key], d[key])
    assert mem["attrs"]["options"] == a["options"] and mem["attrs"]["mask_kind"] == "adps"


def test_espirit_maps_see_only_the_calibration_block():
    k = phantom_kspace(11, S=1, H=64)[0]
    opts = PrepOptions(split="train", maps="espirit", center_lines=8, accel=(4.0,))
    a = prepare_slice(k, None, opts, seed=1)
    other = k.copy()
    outside = coils.acs_kspace(np.ones_like(k), (8, 8)) == 0
    other[outside] *= 0.3  # change everything outside the 8 x 8 block
    b = prepare_slice(other, None, opts, seed=1)
    np.testing.assert_allclose(a["maps"], b["maps"], atol=1e-5)
    assert a["norm"] == pytest.approx(b["norm"], rel=1e-6)
    assert a["maps"].shape == (C, 64, 64) and a["calib"] == 8
    # one set of maps, unit norm over coils where there is signal
    assert np.median(rss(a["maps"], dim=0)) == pytest.approx(1.0, abs=0.05)


def test_coil_compression_and_single_coil(rng):
    k = phantom_kspace(12, S=1, H=64)[0]
    out = prepare_slice(k, None, PrepOptions(split="val", maps="lowres", coils=2, center_lines=8), seed=0)
    assert out["kspace"].shape == out["maps"].shape == (2, 64, 64) and out["reference"].shape == (64, 64)
    single = prepare_slice(k[0], None, PrepOptions(split="val", maps="espirit", center_lines=8), seed=0)
    assert single["kspace"].shape == (1, 64, 64)
    np.testing.assert_array_equal(single["maps"], np.ones((1, 64, 64), np.complex64))  # S = 1
    np.testing.assert_allclose(single["reference"], ifft2c(k[0]) / single["norm"], atol=1e-4)


def test_prewhitening_gives_white_corner_noise():
    rng = np.random.default_rng(0)
    mix = np.eye(4) + 0.8 * rng.standard_normal((4, 4))
    noise = (rng.standard_normal((4, 64 * 64)) + 1j * rng.standard_normal((4, 64 * 64)))
    k = fft2c((mix @ noise).reshape(4, 64, 64)).astype(np.complex64)
    kw, reason = prewhiten_slice(k)
    assert reason is None
    cov = whitening.noise_covariance(whitening.noise_from_corner(kw, 30))
    np.testing.assert_allclose(cov, np.eye(4), atol=0.1)
    assert prewhiten_slice(np.zeros((4, 64, 64), np.complex64))[1] is not None
    with pytest.raises(DataError, match="cannot prewhiten"):
        prepare_slice(np.ones((4, 64, 64), np.complex64), None, PrepOptions(maps="lowres", center_lines=8),
                      whiten=True)


def test_calibration_block_and_norm_helpers():
    m = np.zeros((1, 20), bool)
    m[0, 8:13] = True  # DC at 10; fastMRI centring of 4 lines: 8..11, of 5: 8..12
    assert calibration_block(m) == (1, 5)
    m[0, 12] = False
    assert calibration_block(m) == (1, 4)
    m2 = np.zeros((16, 16), bool)
    m2[5:11, 4:12] = True
    assert calibration_block(m2) == (6, 6)
    k = fft2c(np.ones((2, 16, 16), np.complex64))
    assert acs_norm(k, 4) == pytest.approx(acs_rss_p99(k, 4))


def test_slice_selection_and_seeds():
    assert parse_slices(None, 4) == [0, 1, 2, 3] and parse_slices("0:2", 4) == [0, 1]
    assert parse_slices("-1", 4) == [3] and parse_slices("1,9", 4) == [1] and parse_slices("::2", 5) == [0, 2, 4]
    with pytest.raises(ConfigError):
        parse_slices("1:x", 4)
    s = {slice_seed(0, "a.h5", i) for i in range(50)} | {slice_seed(1, "a.h5", 0), slice_seed(0, "b.h5", 0)}
    assert len(s) == 52 and all(0 <= x < 2**31 - 2**20 for x in s)
    assert slice_seed(3, "x.h5", 2) == slice_seed(3, "x.h5", 2)


def test_maps_switch_espirit_torch_when_available():
    pytest.importorskip("ambient_mri.espirit")
    k = phantom_kspace(13, S=1, H=64)[0]
    opts = PrepOptions(split="train", maps="espirit-torch", center_lines=8)
    a = prepare_slice(k, None, opts, seed=1)
    other = k.copy()
    other[coils.acs_kspace(np.ones_like(k), (8, 8)) == 0] *= 0.3
    np.testing.assert_allclose(prepare_slice(other, None, opts, seed=1)["maps"], a["maps"], atol=1e-4)
    ref = estimate_maps(coils.acs_kspace(k, (8, 8))[None], 8, "espirit")[0]
    sup = rss(ifft2c(k), dim=0) > 0.2 * rss(ifft2c(k), dim=0).max()
    align = np.abs((a["maps"].conj() * ref).sum(0)) / (rss(a["maps"], dim=0) * rss(ref, dim=0) + 1e-12)
    assert align[sup].mean() > 0.98  # same maps as sigpy's up to a phase, on the object


def test_estimate_maps_switch_rejects_unknown_methods():
    with pytest.raises(ConfigError, match="unknown maps method"):
        estimate_maps(np.zeros((1, 2, 8, 8), np.complex64), 4, "magic")


def test_real_8coil_head_slice(shared_data, tmp_path):
    """Real coil sensitivities and phase (../shared/data/head8ch): the val reference is the RSS image."""
    import scipy.io

    coil_img = np.moveaxis(scipy.io.loadmat(shared_data / "head8ch" / "head.mat")["data"], -1, 0)
    write_volume(tmp_path / "raw" / "head.h5", fft2c(coil_img.astype(np.complex64))[None])
    res = prep(tmp_path / "raw", tmp_path / "out", split="val", crop=None, center_lines=None, accel=(4.0,))
    assert not res.failed
    d, a = read(tmp_path / "out" / "head.h5")
    assert a["calib"] == 16 and not a["whitened"].any()  # 256 / 16 ACS lines; header not oversampled
    truth = rss(coil_img, dim=0) / d["norm"][0]
    assert np.corrcoef(np.abs(d["reference"][0]).ravel(), truth.ravel())[0, 1] > 0.99
    assert acs_rss_p99(d["kspace"][0], 16) == pytest.approx(1.0, rel=1e-4)
