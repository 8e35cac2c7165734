"""ambient-mri recon with model methods, on a tiny model trained here on undersampled data only."""

import json
import os

import h5py
import numpy as np
import pytest
import torch

from ambient_mri.errors import ConfigError, DataError
from ambient_mri.prep import PrepOptions, run_prep
from ambient_mri.recon import run_recon
from ambient_mri.train import train
from tests.test_recon import N, raw_volume


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("recon_models")
    for i in range(3):
        raw_volume(root / "raw_train" / f"t{i}.h5", slices=4, seed=10 + i)
    raw_volume(root / "raw_test" / "vol0.h5", slices=2, seed=0)
    quiet = dict(progress=False, echo=lambda m: None)
    common = dict(mask_type="poisson", maps="lowres", calib=8)
    run_prep(root / "raw_train", root / "train", PrepOptions(split="train", accel=(4.0,), **common), **quiet)
    run_prep(root / "raw_train", root / "train_ref", PrepOptions(split="val", accel=(4.0,), **common), **quiet)
    run_prep(root / "raw_test", root / "test", PrepOptions(split="test", accel=(4.0,), seed=5, **common), **quiet)
    train("tiny", root / "train", root / "amb", overrides=["train.steps=30"], **quiet)
    train("tiny", root / "train_ref", root / "oracle", overrides=["train.steps=30", "loss.kind=oracle"], **quiet)
    return root


def read(p):
    with h5py.File(p) as f:
        return {k: f[k][()] for k in f}, dict(f.attrs)


def test_model_methods_shapes_seed_and_data_consistency(setup, tmp_path):
    root = setup
    run_recon(root / "test", tmp_path / "zf", "zf", quiet=True)
    zf, _ = read(tmp_path / "zf" / "vol0.h5")
    out = {}
    for method, kw in [("dc", dict(steps=4)), ("adps", dict(steps=8, step_size=0.2)), ("aos", {})]:
        run_recon(root / "test", tmp_path / method, method, checkpoint=root / "amb" / "checkpoint.pt", samples=2,
                  quiet=True, **kw)
        arrays, attrs = read(tmp_path / method / "vol0.h5")
        assert arrays["reconstruction"].shape == (2, N, N) and np.isfinite(arrays["reconstruction"]).all()
        assert arrays["std"].shape == (2, N, N)
        assert attrs["checkpoint_kind"] == "ambient" and attrs["nfe"] == {"dc": 7, "adps": 8, "aos": 1}[method]
        if method == "dc":  # the defaults are written into the outputs
            assert json.loads(attrs["options"])["sampler"] == {"cg_iters": 20, "error_var": "local"}
        out[method] = arrays
    # CG data consistency: with the data declared exact (noise 0) far closer to the measurements than the
    # zero-filled image; with the (conservative) estimated noise level closer, but it no longer fits the noise
    run_recon(root / "test", tmp_path / "dc0", "dc", checkpoint=root / "amb", samples=2, steps=4, noise_std=0.0,
              quiet=True)
    exact, _ = read(tmp_path / "dc0" / "vol0.h5")
    assert np.all(exact["data_consistency"] < 0.5 * zf["data_consistency"])
    assert np.all(out["dc"]["data_consistency"] < zf["data_consistency"])
    assert out["dc"]["std"].mean() > 0
    # the same seed gives the same samples
    run_recon(root / "test", tmp_path / "dc_again", "dc", checkpoint=root / "amb", samples=2, steps=4, quiet=True)
    again, _ = read(tmp_path / "dc_again" / "vol0.h5")
    np.testing.assert_array_equal(again["reconstruction"], out["dc"]["reconstruction"])
    run_recon(root / "test", tmp_path / "dc_seed", "dc", checkpoint=root / "amb", samples=2, steps=4, seed=3,
              quiet=True)
    other, _ = read(tmp_path / "dc_seed" / "vol0.h5")
    assert not np.array_equal(other["reconstruction"], out["dc"]["reconstruction"])


def test_oracle_runs_as_fsdps_only(setup, tmp_path):
    root = setup
    with pytest.raises(ConfigError, match="fsdps"):
        run_recon(root / "test", tmp_path / "x", "adps", checkpoint=root / "oracle" / "checkpoint.pt", quiet=True)
    with pytest.raises(ConfigError, match="oracle"):
        run_recon(root / "test", tmp_path / "y", "fsdps", checkpoint=root / "amb" / "checkpoint.pt", quiet=True)
    run_recon(root / "test", tmp_path / "fs", "fsdps", checkpoint=root / "oracle" / "checkpoint.pt", steps=6,
              step_size=0.2, quiet=True)
    arrays, attrs = read(tmp_path / "fs" / "vol0.h5")
    assert attrs["checkpoint_kind"] == "oracle" and arrays["reconstruction"].shape == (2, N, N)


def test_mmps_through_recon_with_a_clean_prior(setup, tmp_path):
    root = setup
    run_recon(root / "test", tmp_path / "mm", "mmps", checkpoint=root / "oracle", steps=4, cg_iters=3, quiet=True)
    arrays, attrs = read(tmp_path / "mm" / "vol0.h5")
    assert arrays["reconstruction"].shape == (2, N, N) and np.isfinite(arrays["reconstruction"]).all()
    assert attrs["method"] == "mmps" and attrs["nfe"] == (2 * 4 - 1) * (3 + 2)
    # wiring only: MMPS's accuracy is checked with exact denoisers (tests/test_mmps.py); a 30-step network's
    # Jacobian is no covariance, and its data consistency here is worse than zero-filled's (measured 3-78 x)
    assert np.isfinite(arrays["data_consistency"]).all()
    with pytest.raises(ConfigError, match="churn"):
        run_recon(root / "test", tmp_path / "mm2", "mmps", checkpoint=root / "oracle", churn=0.1, quiet=True)


def test_matrix_mismatch_refused_or_cropped(setup, tmp_path):
    root = setup
    raw_volume(root / "big" / "big.h5", slices=1, seed=3)
    # a 48 x 48 scan of the same object (zero-padded image)

    from ambient_mri.fastmri_io import write_volume
    from ambient_mri.fft import fft2c, ifft2c

    with h5py.File(root / "big" / "big.h5") as f:
        k = f["kspace"][()]
    img = np.pad(ifft2c(k), ((0, 0), (0, 0), (8, 8), (8, 8)))
    write_volume(root / "big48" / "big.h5", fft2c(img))
    with pytest.raises(ConfigError, match="differs from the model"):
        run_recon(root / "big48", tmp_path / "a", "dc", checkpoint=root / "amb", accel=4, mask_type="poisson",
                  maps_method="lowres", steps=3, quiet=True)
    run_recon(root / "big48", tmp_path / "b", "dc", checkpoint=root / "amb", accel=4, mask_type="poisson",
              maps_method="lowres", steps=3, matrix="crop", quiet=True)
    arrays, attrs = read(tmp_path / "b" / "big.h5")
    assert arrays["reconstruction"].shape == (1, N, N)
    run_recon(root / "big48", tmp_path / "c", "dc", checkpoint=root / "amb", accel=4, mask_type="poisson",
              maps_method="lowres", steps=3, matrix="native", quiet=True)
    arrays, _ = read(tmp_path / "c" / "big.h5")
    assert arrays["reconstruction"].shape == (1, 48, 48)


def test_exported_release_checkpoint_is_smaller_and_equivalent(setup, tmp_path):
    from ambient_mri.checkpoint import export_weights, load_denoiser, without_machine_paths

    root = setup
    dst = export_weights(root / "amb", tmp_path / "release.pt")
    assert dst.stat().st_size < (root / "amb" / "checkpoint.pt").stat().st_size
    a, meta_a = load_denoiser(root / "amb" / "checkpoint.pt")
    b, meta_b = load_denoiser(dst)
    # the same metadata, except that the release names no folder of this machine (data.root: its last part)
    assert without_machine_paths(meta_a["training"]) == meta_b["training"] and meta_a["step"] == meta_b["step"]
    assert meta_b["training"]["data"]["root"] == os.path.basename(meta_a["training"]["data"]["root"])
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    run_recon(root / "test", tmp_path / "r", "aos", checkpoint=dst, quiet=True)
    assert (tmp_path / "r" / "vol0.h5").exists()


def test_noise_level_plumbing_and_further_mask_recorded(setup, tmp_path):
    """``recon`` takes the noise level from the prepared file (per slice; NaN = unknown -> estimated),
    from ``--noise-std``, or estimates it, and records the level used, its source and how M~ was drawn."""
    import shutil

    root = setup
    ck = root / "amb" / "checkpoint.pt"
    run_recon(root / "test", tmp_path / "est", "dc", checkpoint=ck, steps=2, quiet=True)
    arrays, attrs = read(tmp_path / "est" / "vol0.h5")
    assert attrs["noise_std_source"] == "estimated" and attrs["further_mask"] == "within"  # dc's default
    est = arrays["noise_std"]
    assert est.shape == (2,) and np.all(est > 0)
    # a prepared file that knows its noise (second slice unknown)
    (tmp_path / "known").mkdir()
    shutil.copy(root / "test" / "vol0.h5", tmp_path / "known" / "vol0.h5")
    with h5py.File(tmp_path / "known" / "vol0.h5", "a") as f:
        if "noise_std" in f:  # prep stores NaN (unknown) for this synthetic input
            del f["noise_std"]
        f["noise_std"] = np.array([0.0123, np.nan], np.float32)
    run_recon(tmp_path / "known", tmp_path / "file", "dc", checkpoint=ck, steps=2, quiet=True, further="independent")
    arrays, attrs = read(tmp_path / "file" / "vol0.h5")
    assert attrs["noise_std_source"] == "estimated + file" and attrs["further_mask"] == "independent"
    np.testing.assert_allclose(arrays["noise_std"], [0.0123, est[1]], rtol=1e-6)
    run_recon(root / "test", tmp_path / "flag", "adps-noise", checkpoint=ck, steps=3, noise_std=0.02, quiet=True)
    arrays, attrs = read(tmp_path / "flag" / "vol0.h5")
    assert attrs["noise_std_source"] == "flag" and np.allclose(arrays["noise_std"], 0.02)
    assert attrs["nfe"] == 3 and np.isfinite(arrays["reconstruction"]).all()
    # the published samplers ignore the noise and say so; the flag is refused where it is not used
    run_recon(root / "test", tmp_path / "pub", "adps", checkpoint=ck, steps=2, step_size=0.2, quiet=True)
    arrays, attrs = read(tmp_path / "pub" / "vol0.h5")
    assert "noise_std" not in arrays and attrs["noise_std_source"].startswith("not used")
    assert attrs["further_mask"] == "independent"  # the published A-DPS rule
    with pytest.raises(ConfigError, match="--noise-std is not used"):
        run_recon(root / "test", tmp_path / "x", "adps", checkpoint=ck, noise_std=0.01, quiet=True)
    with pytest.raises(ConfigError, match="--further-mask is not used"):
        run_recon(root / "test", tmp_path / "x", "aos", checkpoint=ck, further="within", quiet=True)
    with pytest.raises(ConfigError, match="noise-std"):
        run_recon(root / "test", tmp_path / "x", "dc", checkpoint=ck, noise_std=-1.0, quiet=True)
    with pytest.raises(ConfigError, match="fsdps-noise"):
        run_recon(root / "test", tmp_path / "x", "adps-noise", checkpoint=root / "oracle", quiet=True)
    # a bad noise_std key is a one-line DataError naming the file
    with h5py.File(tmp_path / "known" / "vol0.h5", "a") as f:
        del f["noise_std"]
        f["noise_std"] = np.array([-1.0, 0.1], np.float32)
    with pytest.raises(DataError, match="noise_std"):
        run_recon(tmp_path / "known", tmp_path / "bad", "dc", checkpoint=ck, steps=2, quiet=True)
