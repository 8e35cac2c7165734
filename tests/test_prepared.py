"""ambient_mri.prepared, the one owner of the prepared format: its key table against what prep actually
writes for every split and domain, is_prepared on prepared / raw fastMRI / other HDF5 / non-HDF5 files,
the Scan reader against the stored arrays, manifest reading, and the units of a reference file."""

import hashlib
import json

import h5py
import numpy as np
import pytest

from ambient_mri import prepared
from ambient_mri.errors import DataError
from ambient_mri.evaluate import read_reference
from ambient_mri.fastmri_io import write_volume
from ambient_mri.prep import PrepOptions, run_prep
from ambient_mri.prepared import (ARRAYS, FORMAT, UNITS_PREPARED, UNITS_RAW, file_keys, is_prepared, load_prepared,
                                  manifest_entry, read_manifest, reference_units)
from tests.test_recon import raw_volume

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

QUIET = dict(progress=False, echo=lambda m: None)
FAST = dict(maps="lowres")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny prep runs: ``{name: (folder, split, domain, has_reference)}`` plus the raw inputs."""
    root = tmp_path_factory.mktemp("prepared")
    full, under = root / "raw" / "full", root / "raw" / "under"
    raw_volume(full / "vol0.h5", slices=2, seed=0)
    with h5py.File(full / "vol0.h5") as f:
        k = f["kspace"][()]
    m = np.zeros(k.shape[-1], bool)
    m[::3] = True
    m[k.shape[-1] // 2 - 4 : k.shape[-1] // 2 + 4] = True
    write_volume(under / "u0.h5", (k * m).astype(np.complex64), mask=m)
    specs = {
        "train": (full, PrepOptions(split="train", accel=(4.0,), center_lines=8, **FAST), "train", "kspace", False),
        "val": (full, PrepOptions(split="val", accel=(4.0,), mask_type="poisson", calib=8, **FAST), "val", "kspace",
                True),
        "test_masked_input": (under, PrepOptions(split="test", accel=(4.0,), **FAST), "test", "kspace", False),
        "image_train": (full, PrepOptions(split="train", domain="image", accel=(), corruption="pixels", level=0.3,
                                          **FAST), "train", "image", False),
        "image_val": (full, PrepOptions(split="val", domain="image", accel=(), corruption="box", level=0.2, **FAST),
                      "val", "image", True),
    }
    out = {}
    for name, (src, opts, split, domain, ref) in specs.items():
        run_prep(src, root / name, opts, **QUIET)
        out[name] = (root / name, split, domain, ref)
    return out, full, under


@pytest.mark.parametrize("name", ["train", "val", "test_masked_input", "image_train", "image_val"])
def test_key_table_matches_what_prep_writes(runs, name):
    folder, split, domain, ref = runs[0][name]
    (path,) = sorted(folder.glob("*.h5"))
    with h5py.File(path) as f:
        assert f.attrs["format"] == FORMAT and f.attrs["split"] == split and f.attrs["domain"] == domain
        assert sorted(f.keys()) == sorted(file_keys(split, domain, reference=ref)), name
        for key in f:
            assert f[key].dtype == ARRAYS[key].dtype, (name, key)
        assert ("reference" in f) == ref  # a train split never holds a reference
    assert is_prepared(path)


def test_file_keys_train_holds_no_ground_truth_and_rejects_unknown_splits():
    for domain in ("kspace", "image"):
        assert "reference" not in file_keys("train", domain)
    assert file_keys("val", "image", reference=False) == file_keys("val", "image")  # image domain: always a reference
    with pytest.raises(ValueError):
        file_keys("training")


def test_is_prepared_tells_prepared_from_raw_and_other_files(runs, tmp_path):
    folders, full, under = runs
    assert is_prepared(folders["val"][0] / "vol0.h5") and is_prepared(folders["image_train"][0] / "vol0.h5")
    assert not is_prepared(full / "vol0.h5") and not is_prepared(under / "u0.h5")  # raw fastMRI layout
    with h5py.File(tmp_path / "random.h5", "w") as f:
        f["x"] = np.random.default_rng(0).standard_normal((3, 4))
        f.attrs["split"] = "val"
    assert not is_prepared(tmp_path / "random.h5")
    (tmp_path / "noise.h5").write_bytes(np.random.default_rng(1).bytes(4096))
    assert not is_prepared(tmp_path / "noise.h5")  # not HDF5: not prepared, no exception
    other = tmp_path / "other_version.h5"
    with h5py.File(folders["val"][0] / "vol0.h5") as src, h5py.File(other, "w") as f:
        for k in src:
            f[k] = src[k][()]
        f.attrs.update({k: v for k, v in src.attrs.items()})
        f.attrs["format"] = "ambient_mri.prepared/2"
    assert not is_prepared(other)
    with h5py.File(other, "a") as f:  # the same layout written by another tool, without a format attribute
        del f.attrs["format"]
    assert is_prepared(other)


def test_scan_reader_returns_the_stored_arrays(runs):
    path = runs[0]["val"][0] / "vol0.h5"
    scan = load_prepared(path)
    with h5py.File(path) as f:
        k, mask, maps, norm, ref = (f[key][()] for key in ("kspace", "mask", "maps", "norm", "reference"))
        noise, idx = f["noise_std"][()], f["slice_index"][()]
    assert scan.units == UNITS_PREPARED and scan.reference is None  # ground truth only on request
    assert np.array_equal(scan.y, k) and np.array_equal(scan.maps, maps) and np.array_equal(scan.mask, mask)
    assert np.array_equal(scan.norm, norm) and np.array_equal(scan.slice_index, idx)
    assert scan.noise_std.dtype == np.float64 and np.array_equal(scan.noise_std, noise.astype(np.float64), equal_nan=True)
    assert np.all(scan.y[np.broadcast_to(~mask[:, None], scan.y.shape)] == 0)  # measured samples only
    first = load_prepared(path, slices=1, reference=True)
    assert first.y.shape[0] == 1 and np.array_equal(first.reference, ref[:1]) and np.array_equal(first.y, k[:1])
    img = load_prepared(runs[0]["image_val"][0] / "vol0.h5")
    assert img.maps is None and img.y.ndim == 3
    with pytest.raises(DataError, match=r"vol0\.h5.*no 'mask'"):
        load_prepared(runs[1] / "vol0.h5")  # fastMRI layout: no mask, no maps


def test_manifest_reading_and_entries(runs):
    folder = runs[0]["val"][0]
    m, sha = read_manifest(folder)
    assert sha == hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()
    assert m["format"] == FORMAT and m == json.loads((folder / "manifest.json").read_text())
    entries = [manifest_entry(folder / e["file"]) for e in m["files"]]
    assert json.dumps(m["files"], sort_keys=True) == json.dumps(entries, sort_keys=True)  # NaN noise_std as JSON
    with pytest.raises(DataError, match="no manifest.json"):
        read_manifest(runs[1])


def test_units_of_a_prepared_reference_and_a_raw_fastmri_reference(runs):
    folders, full, _ = runs
    val = folders["val"][0] / "vol0.h5"
    with h5py.File(val) as f:
        assert reference_units(f) == ("reference", UNITS_PREPARED)
        ref = np.abs(f["reference"][()])
    with h5py.File(full / "vol0.h5") as f:  # write_volume gives fully sampled input fastMRI's RSS target
        assert reference_units(f) == ("reconstruction_rss", UNITS_RAW)
        rss = f["reconstruction_rss"][()]
    with h5py.File(folders["train"][0] / "vol0.h5") as f:
        assert reference_units(f) is None
    # eval reads through the same function
    got, units = read_reference(val, None)
    assert units == UNITS_PREPARED and np.array_equal(got, ref)
    got, units = read_reference(full / "vol0.h5", None)
    assert units == UNITS_RAW and np.array_equal(got, rss)
    assert set(prepared.UNITS) == {UNITS_PREPARED, UNITS_RAW}
