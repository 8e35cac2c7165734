"""ambient-mri recon with the classical methods (model methods are tested in test_recon_models.py)."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import sigpy
import sigpy.mri
from click.testing import CliRunner

from ambient_mri.errors import ConfigError, DataError
from ambient_mri.fastmri_io import write_volume
from ambient_mri.fft import fft2c
from ambient_mri.prep import PrepOptions, run_prep
from ambient_mri.commands.recon import command
from ambient_mri.recon import parse_shard, run_recon

N, C = 32, 4


def raw_volume(path, slices=3, seed=0):
    rng = np.random.default_rng(seed)
    maps = sigpy.mri.birdcage_maps((C, N, N), r=1.2).astype(np.complex64)
    maps /= np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True))
    base = np.abs(sigpy.shepp_logan((N, N))).astype(np.float32)
    imgs = [base * (0.6 + 0.4 * rng.uniform()) * np.exp(1j * rng.uniform(0, 1)) for _ in range(slices)]
    k = np.stack([fft2c(maps * im) for im in imgs])
    k = k + 1e-3 * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))
    write_volume(path, k.astype(np.complex64))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("recon")
    for i in range(2):
        raw_volume(root / "raw" / f"vol{i}.h5", seed=i)
    raw_volume(root / "rawval" / "val0.h5", seed=7)
    opts = PrepOptions(split="test", accel=(4.0,), mask_type="poisson", maps="lowres", calib=8)
    run_prep(root / "raw", root / "test", opts, progress=False, echo=lambda m: None)
    run_prep(root / "rawval", root / "val", PrepOptions(split="val", accel=(4.0,), mask_type="poisson",
                                                        maps="lowres", calib=8), progress=False, echo=lambda m: None)
    return root


def read(p):
    with h5py.File(p) as f:
        return {k: f[k][()] for k in f}, dict(f.attrs)


def test_classical_methods_write_fastmri_layout_and_improve_dc(data, tmp_path):
    outs = {}
    for m in ("zf", "sense"):
        run_recon(data / "test", tmp_path / m, m, quiet=True)
        arrays, attrs = read(tmp_path / m / "vol0.h5")
        assert arrays["reconstruction"].shape == (3, N, N) and arrays["reconstruction"].dtype == np.float32
        assert arrays["reconstruction_complex"].dtype == np.complex64 and "std" not in arrays
        assert attrs["method"] == m and attrs["units"] == "prepared" and attrs["accel"] == "4"
        assert (tmp_path / m / "vol0.nii.gz").exists() and (tmp_path / m / "vol0.png").exists()
        outs[m] = arrays["data_consistency"]
    assert np.all(outs["sense"] < 0.5 * outs["zf"])


def test_l1_needs_lambda_and_tunes_on_validation(data, tmp_path):
    with pytest.raises(ConfigError, match="--lam or --tune-on"):
        run_recon(data / "test", tmp_path / "l1", "l1", quiet=True)
    run_recon(data / "test" / "vol0.h5", tmp_path / "l1", "l1", tune_on=data / "val", tune_slices=2, l1_iters=20,
              quiet=True)
    choice = json.loads((tmp_path / "l1" / "lambda_choice.json").read_text())
    assert choice["chosen_on"] == "validation" and choice["val_slices"] == 2
    _, attrs = read(tmp_path / "l1" / "vol0.h5")
    assert attrs["lam"] == choice["lam"] and json.loads(attrs["options"])["lam_choice"]["lam"] == choice["lam"]


def test_raw_inputs_undersampled_here_and_units(data, tmp_path):
    with pytest.raises(ConfigError, match="fully sampled"):
        run_recon(data / "raw" / "vol0.h5", tmp_path / "x", "zf", quiet=True)
    run_recon(data / "raw" / "vol0.h5", tmp_path / "x", "sense", accel=4, mask_type="poisson", quiet=True)
    arrays, attrs = read(tmp_path / "x" / "vol0.h5")
    assert attrs["units"] == "raw"
    with h5py.File(data / "raw" / "vol0.h5") as f:
        rss = f["reconstruction_rss"][()]
    # raw units: comparable to the input's own RSS image
    ratio = arrays["reconstruction"].max() / rss.max()
    assert 0.7 < ratio < 1.3


def test_resume_reuses_finished_slices_and_matches_a_clean_run(data, tmp_path):
    run_recon(data / "test" / "vol1.h5", tmp_path / "clean", "sense", batch=1, quiet=True)
    out = tmp_path / "resumed"
    # a run interrupted after slice 0: only its partial result exists, no final file
    run_recon(data / "test" / "vol1.h5", out, "sense", batch=1, quiet=True)
    (out / "vol1.h5").unlink()
    part = out / ".partial" / "vol1"
    part.mkdir(parents=True)
    np.savez(part / "s00000.npz", mean=np.full((N, N), 7 + 0j, np.complex64), std=np.zeros(0), dc=0.5, seconds=1.0)
    run_recon(data / "test" / "vol1.h5", out, "sense", batch=1, quiet=True)
    a, _ = read(out / "vol1.h5")
    b, _ = read(tmp_path / "clean" / "vol1.h5")
    assert np.all(a["reconstruction"][0] == 7)  # the finished slice was kept, not recomputed
    np.testing.assert_array_equal(a["reconstruction"][1:], b["reconstruction"][1:])
    assert not part.exists()
    # a finished output is never recomputed
    mtime = (out / "vol1.h5").stat().st_mtime_ns
    assert run_recon(data / "test" / "vol1.h5", out, "sense", quiet=True) == []
    assert (out / "vol1.h5").stat().st_mtime_ns == mtime


def test_shards_split_the_folder(data, tmp_path):
    assert parse_shard("1/2") == (1, 2)
    for bad in ("2/2", "x", "1/0"):
        with pytest.raises(ConfigError):
            parse_shard(bad)
    a = run_recon(data / "test", tmp_path / "s", "zf", shard="0/2", quiet=True)
    b = run_recon(data / "test", tmp_path / "s", "zf", shard="1/2", quiet=True)
    assert sorted(p.name for p in a + b) == ["vol0.h5", "vol1.h5"] and len(a) == len(b) == 1


def test_cli_errors_are_one_line(data, tmp_path):
    r = CliRunner().invoke(command, ["--input", str(data / "test"), "--out", str(tmp_path / "o"), "--method", "adps"])
    assert r.exit_code != 0 and "needs --checkpoint" in str(r.exception)
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="bad.h5"):
        run_recon(bad, tmp_path / "o2", "zf", quiet=True)
    with pytest.raises(ConfigError, match="not used"):
        run_recon(data / "test", tmp_path / "o3", "zf", step_size=0.5, quiet=True)


def test_noise_estimate_from_the_kspace_edge():
    """The fallback noise level: pure complex noise of known std is recovered (median of |n|^2 = s^2 ln 2);
    signal at the k-space edge only raises it (conservative)."""
    from ambient_mri.recon import estimate_noise_std

    rng = np.random.default_rng(0)
    s = 0.03
    n = (rng.standard_normal((8, 64, 64)) + 1j * rng.standard_normal((8, 64, 64))) * s / np.sqrt(2)
    for mask in (np.ones((64, 64), bool), (rng.uniform(size=(1, 64)) < 0.4)):
        assert abs(estimate_noise_std(n, mask) / s - 1) < 0.1
    edge = n.copy()
    edge[:, :4] += 0.5
    assert estimate_noise_std(edge, np.ones((64, 64), bool)) > s
