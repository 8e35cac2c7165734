"""Datasets over prepared folders: shapes, the no-ground-truth guarantee (an access spy and unreadable
"trap" arrays), refusals.

``write_prepared`` writes small prepared datasets exactly as ``docs/data_format.md`` specifies (the other
training tests import it); one test also reads the output of the real ``ambient-mri prep``.
"""

import json

import h5py
import numpy as np
import pytest
import torch

from ambient_mri import masks
from ambient_mri.datasets import (AmbientKspaceDataset, ImageCorruptionDataset, NaiveDataset, ReferenceDataset,
                                  collate, read_manifest)
from ambient_mri.errors import DataError
from ambient_mri.fft import fft2c, ifft2c


def phantom_images(n, H, W, seed):
    """Random smooth blobs with a smooth phase: ``(n, H, W)`` complex64, magnitudes O(1)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W] / np.array([H, W])[:, None, None]
    out = []
    for _ in range(n):
        img = np.zeros((H, W))
        for _ in range(4):
            cy, cx = rng.uniform(0.25, 0.75, 2)
            ry, rx = rng.uniform(0.08, 0.25, 2)
            img += rng.uniform(0.3, 1.0) * np.exp(-(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2))
        phase = np.exp(1j * rng.uniform(-0.5, 0.5) * (xx - 0.5 + yy - 0.5))
        out.append(img * phase)
    return np.stack(out).astype(np.complex64)


def coil_maps(C, H, W):
    """Smooth Gaussian sensitivities around the border, normalised so that ``sum_c |S_c|^2 = 1``."""
    yy, xx = np.mgrid[:H, :W] / np.array([H, W])[:, None, None]
    maps = []
    for c in range(C):
        a = 2 * np.pi * c / C
        cy, cx = 0.5 + 0.6 * np.sin(a), 0.5 + 0.6 * np.cos(a)
        maps.append(np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.3) * np.exp(1j * a))
    maps = np.stack(maps)
    return (maps / np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True))).astype(np.complex64)


def write_prepared(root, *, files=2, slices=3, coils=2, H=32, W=32, accel=4.0, center=4, split="train",
                   domain="kspace", mask_kind="adps", level=0.25, corruption="box", seed=0, leak=False):
    """A prepared dataset following docs/data_format.md: ``root/manifest.json`` + ``vol_{i}.h5``.

    ``leak=True`` writes k-space that is NOT zero where the mask is 0 (what the ambient set must refuse)."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    maps1 = coil_maps(coils, H, W)
    for i in range(files):
        x = phantom_images(slices, H, W, seed * 100 + i)
        norm = np.float32(np.percentile(np.abs(x), 99, axis=(1, 2)) / 0.5)
        x = x / norm[:, None, None]
        name = f"vol_{i}.h5"
        seeds = np.array([seed * 1000 + i * slices + s for s in range(slices)], dtype=np.int64)
        with h5py.File(root / name, "w") as f:
            if domain == "kspace" and mask_kind == "random2d":  # cheap 2-D masks: random points + a centred block
                ms = [masks.SamplingMask((np.random.default_rng(int(s)).uniform(size=(H, W)) < 1 / accel)
                                         | masks.acs_region((H, W), (center, center)), (center, center), int(s),
                                         "random2d") for s in seeds]
            elif domain == "kspace":
                ms = [masks.kspace_mask(mask_kind, (H, W), accel, center=center, seed=int(s)) for s in seeds]
            if domain == "kspace":
                m = np.stack([sm.mask for sm in ms])                               # (S, 1, W) or (S, H, W)
                full = fft2c(maps1[None] * x[:, None])                              # (S, C, H, W)
                k = full if leak else full * m[:, None]
                f["kspace"] = k.astype(np.complex64)
                f["mask"] = m.astype(bool)
                f["maps"] = np.broadcast_to(maps1, (slices, coils, H, W)).astype(np.complex64)
                acs = ms[0].acs
                f.attrs["acs"] = np.asarray((H, acs[1]) if acs[0] == 1 else acs, dtype=np.int64)
                f.attrs["mask_kind"] = mask_kind
                f.attrs["accel"] = float(accel)
                accel_actual = float(m[0].size / m.reshape(slices, -1).sum(1).mean())
            else:
                m = np.stack([masks.image_mask(corruption, (H, W), level, seed=int(s)) for s in seeds])
                f["image"] = (m * x).astype(np.complex64)
                f["mask"] = m
                f.attrs["acs"] = np.asarray((0, 0), dtype=np.int64)
                f.attrs["mask_kind"] = corruption
                f.attrs["corruption"] = corruption
                f.attrs["level"] = float(level)
                f.attrs["accel"] = 1.0 / (1.0 - level)
                accel_actual = float(m[0].size / m.reshape(slices, -1).sum(1).mean())
            f["norm"] = norm
            f["mask_seed"] = seeds
            f["slice_index"] = np.arange(slices, dtype=np.int64)
            if split != "train":
                f["reference"] = x.astype(np.complex64)
                f.attrs["reference_kind"] = "cg-sense"
            f.attrs.update({"format": "ambient_mri.prepared/1", "split": split, "domain": domain, "calib": center,
                            "source": f"/synthetic/{name}", "source_sha256": "0" * 64,
                            "ambient_mri_version": "test", "options": json.dumps({"seed": seed})})
        entries.append({"file": name, "source": f"/synthetic/{name}", "source_sha256": "0" * 64, "slices": slices,
                        "slice_index": list(range(slices)), "mask_seed": seeds.tolist(), "norm": norm.tolist(),
                        "accel_actual": accel_actual})
    manifest = {"format": "ambient_mri.prepared/1", "split": split, "domain": domain, "ambient_mri_version": "test",
                "options": {"seed": seed}, "reference_kind": None if split == "train" else "cg-sense",
                "files": entries, "failed": []}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


@pytest.fixture
def spy(monkeypatch):
    """Record the name of every HDF5 dataset opened through any group/file (``f[key]``, ``f.get(key)``)."""
    seen = []
    orig = h5py.Group.__getitem__

    def getitem(self, name):
        obj = orig(self, name)
        if isinstance(obj, h5py.Dataset):
            seen.append(obj.name.lstrip("/"))
        return obj

    monkeypatch.setattr(h5py.Group, "__getitem__", getitem)
    return seen


# ----------------------------------------------------------------------------------------------


def test_ambient_items_shapes_and_values(tmp_path):
    root = write_prepared(tmp_path / "train", files=2, slices=3, coils=2)
    ds = AmbientKspaceDataset(root)
    assert len(ds) == 6
    it = ds[4]
    assert it["kspace"].shape == (2, 32, 32) and it["kspace"].dtype == torch.complex64
    assert it["maps"].shape == (2, 32, 32) and it["maps"].dtype == torch.complex64
    assert it["mask"].shape == (1, 32) and it["mask"].dtype == torch.float32 and it["index"] == 4
    with h5py.File(root / "vol_1.h5") as f:
        assert np.array_equal(it["kspace"].numpy(), f["kspace"][1])
        assert it["norm"] == pytest.approx(float(f["norm"][1]))
    assert ds.info["shape"] == (32, 32) and ds.info["coils"] == 2 and ds.info["acs"] == [32, 4]
    b = collate([ds[i] for i in range(4)])
    assert b["kspace"].shape == (4, 2, 32, 32) and b["kspace"].dtype == torch.complex64
    assert b["mask"].shape == (4, 1, 32) and b["index"].tolist() == [0, 1, 2, 3]
    assert ds.manifest_sha256 == read_manifest(root)[1]


def test_lazy_reading_matches_the_cached_dataset_and_survives_pickling(tmp_path):
    import pickle

    root = write_prepared(tmp_path / "train", files=2, slices=2, mask_kind="random2d", center=6, accel=3)
    cached, lazy = AmbientKspaceDataset(root), AmbientKspaceDataset(root, cache_mb=0)
    assert cached._cache is not None and lazy._cache is None
    for i in range(len(cached)):
        a, b = cached[i], lazy[i]
        assert torch.equal(a["kspace"], b["kspace"]) and torch.equal(a["mask"], b["mask"])
    assert cached[0]["mask"].shape == (32, 32)
    clone = pickle.loads(pickle.dumps(lazy))  # what a DataLoader worker gets: no open handles
    assert clone._handles == {} and torch.equal(clone[3]["kspace"], lazy[3]["kspace"])


# What each dataset may read: its arrays, by the data format (docs/data_format.md) -- written out here, not
# taken from the classes, so that a class that widens its whitelist fails the tests below.
ALLOWED = {AmbientKspaceDataset: {"kspace", "mask", "maps", "norm"}, ImageCorruptionDataset: {"image", "mask"},
           ReferenceDataset: {"reference"}}
GROUND_TRUTH = ("reference", "image", "kspace_full")


def plant_traps(path, keep):
    """Make every array of the prepared file ``path`` except ``keep`` a trap, and add trapped ground-truth
    arrays (``reference``, ``image``, ``kspace_full``) where absent.

    A trap is an HDF5 dataset whose values live in an external file that does not exist: its name, shape
    and dtype can be listed, but reading any of its values (h5py's high- or low-level API, a slice or all
    of it) raises ``OSError``. A dataset that reads a key it must not read therefore fails, whatever route
    it takes to the file."""
    absent = path.parent / f".absent-{path.stem}"
    assert not absent.exists()
    with h5py.File(path, "r+") as f:
        S = f[next(k for k in ("kspace", "image", "reference") if k in f)].shape[0]
        H, W = f["mask"].shape[-2:] if f["mask"].shape[-2] > 1 else (f["maps"].shape[-2], f["mask"].shape[-1])
        specs = {k: (f[k].shape, f[k].dtype) for k in f if k not in keep}
        specs.update({k: ((S, H, W), np.complex64) for k in GROUND_TRUTH if k not in f and k not in keep})
        for k, (shape, dtype) in specs.items():
            if k in f:
                del f[k]
            f.create_dataset(k, shape=shape, dtype=dtype, external=[(f"{absent}-{k}.bin", 0, h5py.h5f.UNLIMITED)])


def items_of(ds):
    return [ds[i] for i in range(len(ds))]


def assert_same_items(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.keys() == v.keys() and all(torch.equal(torch.as_tensor(u[k]), torch.as_tensor(v[k])) for k in u)


@pytest.mark.parametrize("cls, layout", [(AmbientKspaceDataset, {}), (ImageCorruptionDataset, {"domain": "image"}),
                                         (ReferenceDataset, {})], ids=["ambient", "image", "reference"])
@pytest.mark.parametrize("cache_mb", [512, 0], ids=["in-memory", "lazy"])
def test_each_dataset_reads_only_its_own_arrays(tmp_path, spy, cls, layout, cache_mb):
    """The no-ground-truth guarantee as behaviour: in a val-style folder (it holds references) where every
    array except the class's own is a trap and ground truth is planted as traps too, the dataset opens,
    serves every item, serves exactly what it serves from the intact folder, and touches only its arrays."""
    intact = write_prepared(tmp_path / "intact", split="val", files=2, slices=2, **layout)
    trapped = write_prepared(tmp_path / "trapped", split="val", files=2, slices=2, **layout)
    for p in sorted(trapped.glob("*.h5")):
        plant_traps(p, ALLOWED[cls])
    expected = items_of(cls(intact, cache_mb=cache_mb))
    spy.clear()
    got = items_of(cls(trapped, cache_mb=cache_mb))
    assert spy and set(spy) <= ALLOWED[cls], spy
    assert_same_items(got, expected)


def test_the_traps_catch_a_dataset_that_reads_ground_truth(tmp_path, spy):
    """The test above can fail: a trapped reference cannot be read by any route, the oracle set (which
    needs it) fails on it, and so does an ambient set whose whitelist were widened to the reference."""
    root = write_prepared(tmp_path / "val", split="val", files=1, slices=2)
    plant_traps(root / "vol_0.h5", ALLOWED[AmbientKspaceDataset])
    with h5py.File(root / "vol_0.h5") as f:
        assert f["reference"].shape == (2, 32, 32)  # visible...
        with pytest.raises(OSError):
            f["reference"][0]  # ...but unreadable
        with pytest.raises(OSError):
            h5py.h5d.open(f.id, b"reference").read(h5py.h5s.ALL, h5py.h5s.ALL, np.empty((2, 32, 32), np.complex64))

    class Leaky(AmbientKspaceDataset):
        KEYS = AmbientKspaceDataset.KEYS + ("reference",)

    for cache_mb in (512, 0):
        for cls in (ReferenceDataset, Leaky):
            with pytest.raises(OSError):
                items_of(cls(root, cache_mb=cache_mb))
    spy.clear()
    ReferenceDataset(write_prepared(tmp_path / "val2", split="val", files=1, slices=2))[0]
    assert "reference" in spy  # and the spy sees a reference read


@pytest.mark.parametrize("kind", ["ambient", "naive_zf"])
def test_training_runs_on_data_whose_ground_truth_is_trapped(tmp_path, kind, one_thread):
    """End to end: ``ambient-mri train`` (ambient and naive runs) on a val-style folder whose references and
    every array the ambient set must not read are traps completes its steps: no training path reads them."""
    from ambient_mri.train import train

    root = write_prepared(tmp_path / "val", split="val", files=1, slices=4, coils=2)
    plant_traps(root / "vol_0.h5", ALLOWED[AmbientKspaceDataset])
    res = train("tiny", root, tmp_path / "run", overrides=[f"loss.kind={kind}", "train.steps=2", "train.log_every=1",
                                                           "train.ckpt_every=2"], progress=False, echo=lambda m: None)
    assert res["step"] == 2 and res["interrupted"] is None


def test_the_train_split_holds_no_ground_truth(tmp_path):
    root = write_prepared(tmp_path / "train")
    for p in sorted(root.glob("*.h5")):
        with h5py.File(p) as f:
            assert "reference" not in f and "image" not in f
            m = f["mask"][()]
            assert np.all(f["kspace"][()] * ~m[:, None] == 0)
    with pytest.raises(DataError, match="has no reference.*val-style"):
        ReferenceDataset(root)


def test_unmasked_kspace_is_refused_in_one_line(tmp_path):
    root = write_prepared(tmp_path / "leak", leak=True)
    with pytest.raises(DataError) as e:
        AmbientKspaceDataset(root)
    msg = str(e.value)
    assert "non-zero where the mask is 0" in msg and "vol_0.h5" in msg and "\n" not in msg
    # lazily read: the first slice of each file is checked up front, the others when read
    root2 = write_prepared(tmp_path / "ok", files=1, slices=3)
    with h5py.File(root2 / "vol_0.h5", "r+") as f:
        k = f["kspace"][()]
        k[2] += 1e-3  # slice 2 leaks everywhere
        f["kspace"][...] = k
    with pytest.raises(DataError, match="non-zero"):
        AmbientKspaceDataset(root2)
    ds = AmbientKspaceDataset(root2, cache_mb=0)
    ds[0], ds[1]
    with pytest.raises(DataError, match=r"slice 2.*non-zero|non-zero"):
        ds[2]


@pytest.mark.parametrize("damage, words", [
    ("no_manifest", "no manifest.json"),
    ("missing_file", "missing"),
    ("nan", "NaN or Inf"),
    ("empty_mask", "mask is empty"),
    ("bad_mask_shape", "does not broadcast"),
    ("image_domain", "domain"),
])
def test_bad_prepared_data_is_refused_in_one_line(tmp_path, damage, words):
    root = write_prepared(tmp_path / "d", files=1, slices=2, domain="image" if damage == "image_domain" else "kspace")
    f5 = root / "vol_0.h5"
    if damage == "no_manifest":
        (root / "manifest.json").unlink()
    elif damage == "missing_file":
        f5.unlink()
    else:
        with h5py.File(f5, "r+") as f:
            if damage == "nan":
                f["maps"][0, 0, 0, 0] = np.nan
            elif damage == "empty_mask":
                f["kspace"][1] = 0
                f["mask"][1] = False
            elif damage == "bad_mask_shape":
                del f["mask"]
                f["mask"] = np.ones((2, 1, 16), bool)
    with pytest.raises(DataError) as e:
        AmbientKspaceDataset(root)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_image_corruption_and_reference_datasets(tmp_path, spy):
    root = write_prepared(tmp_path / "img", domain="image", files=1, slices=3, level=0.25)
    spy.clear()
    ds = ImageCorruptionDataset(root)
    it = ds[1]
    assert set(spy) <= {"image", "mask"}
    assert it["image"].shape == (32, 32) and it["mask"].shape == (32, 32)
    assert torch.all(it["image"][it["mask"] == 0] == 0)
    assert 0.2 < 1 - it["mask"].mean() < 0.3  # a box of a quarter of the area
    with pytest.raises(DataError, match="domain"):
        ImageCorruptionDataset(write_prepared(tmp_path / "k", files=1))
    val = write_prepared(tmp_path / "val", split="val", files=1, slices=2)
    ref = ReferenceDataset(val)
    assert ref.oracle and ref[1]["image"].shape == (32, 32)
    with h5py.File(val / "vol_0.h5") as f:
        assert np.array_equal(ref[1]["image"].numpy(), f["reference"][1])


def test_naive_datasets_zero_filled_and_l1_cached(tmp_path):
    root = write_prepared(tmp_path / "train", files=1, slices=1)
    zf = NaiveDataset(root, "zf", progress=False)
    src = AmbientKspaceDataset(root)
    it = src[0]
    expect = (it["maps"].conj() * ifft2c(it["kspace"] * it["mask"])).sum(0)
    assert torch.allclose(zf[0]["image"], expect, atol=1e-6)
    cache = tmp_path / "run" / "naive_l1_cache.h5"
    l1 = NaiveDataset(root, "l1", lam=1e-3, iters=5, cache_path=cache, progress=False)
    assert cache.is_file() and l1[0]["image"].shape == (32, 32)
    assert not torch.allclose(l1[0]["image"], zf[0]["image"])  # L1 differs from A^H y
    # reused (no recomputation) when the settings match; recomputed when they do not
    called = []
    orig = NaiveDataset.compute
    NaiveDataset.compute = lambda self, progress=True: called.append(1) or orig(self, progress)
    try:
        again = NaiveDataset(root, "l1", lam=1e-3, iters=5, cache_path=cache, progress=False)
        assert not called and torch.equal(again.images, l1.images)
        NaiveDataset(root, "l1", lam=1e-2, iters=5, cache_path=cache, progress=False)
        assert called
    finally:
        NaiveDataset.compute = orig


def test_collate_refuses_mixed_shapes():
    with pytest.raises(DataError, match="different mask shapes"):
        collate([{"mask": torch.zeros(1, 8)}, {"mask": torch.zeros(8, 8)}])


def test_real_prep_output_is_read(tmp_path):
    """The train split written by the real ``ambient-mri prep`` (lowres maps, small phantom) loads, holds no
    reference and only masked k-space, and the dataset touches only whitelisted keys."""
    prep = pytest.importorskip("ambient_mri.prep")
    from ambient_mri.fastmri_io import write_volume

    x = phantom_images(2, 64, 64, 3)
    maps = coil_maps(4, 64, 64)
    raw = tmp_path / "raw"
    write_volume(raw / "vol.h5", fft2c(maps[None] * x[:, None]).astype(np.complex64), recon_size=(64, 64))
    out = tmp_path / "prep"
    opts = prep.PrepOptions(split="train", accel=(4.0,), maps="lowres", center_lines=8, seed=1)
    res = prep.run_prep(raw, out, opts, progress=False, echo=lambda m: None)
    assert not res.failed
    with h5py.File(out / "vol.h5") as f:
        assert "reference" not in f
        assert np.all(f["kspace"][()] * ~f["mask"][()][:, None] == 0)
    ds = AmbientKspaceDataset(out)
    assert len(ds) == 2 and ds[0]["kspace"].shape == (4, 64, 64) and ds.info["split"] == "train"
    assert ds.info["acs"][1] == 8 and ds.info["mask_kind"] == "adps"


def test_estimate_sigma_view_from_measured_data_matches_the_true_view_error(tmp_path):
    """The estimate uses only the measured k-space; compare with the view error computed from the images."""
    from ambient_mri.datasets import AmbientKspaceDataset, estimate_sigma_view
    from ambient_mri.masks import further_kspace_mask
    from ambient_mri.operators import SenseOp

    root = write_prepared(tmp_path / "d", files=4, slices=8, coils=2, H=32, W=32, accel=3.0, center=4,
                          mask_kind="poisson", seed=3)
    ds = AmbientKspaceDataset(root)
    acs = [int(v) for v in ds.info["acs"]]
    corr = {"domain": "kspace", "mask_kind": "poisson", "accel": 3.0, "center": acs[0], "acs": acs, "shape": [32, 32],
            "further_accel": 4.0}
    est = estimate_sigma_view(ds, corr)
    # oracle check (test only): the images behind the data, from the same files written fully sampled
    g = torch.Generator().manual_seed(0)
    items = [ds[i] for i in range(len(ds))]
    maps = torch.stack([it["maps"] for it in items])
    m = torch.stack([it["mask"] for it in items])
    mt = further_kspace_mask(m > 0, tuple(acs), further_accel=4.0, generator=g)
    full = write_prepared(tmp_path / "full", files=4, slices=8, coils=2, H=32, W=32, accel=3.0, center=4,
                          mask_kind="poisson", seed=3, leak=True)
    leak = [torch.from_numpy(h5py.File(full / f"vol_{i}.h5")["kspace"][()]) for i in range(4)]
    k_full = torch.cat(leak)
    x = SenseOp(maps, torch.ones(32, 32)).adjoint(k_full) / maps.abs().pow(2).sum(1).clamp_min(1e-6)
    view = SenseOp(maps, mt.float()).normal(x)
    true = (view - x).abs().pow(2).mean().sqrt().item()
    assert 0.6 * true < est < 1.6 * true, (est, true)
    assert estimate_sigma_view(ds, {"domain": "clean"}) == 0.0
    assert estimate_sigma_view(ds, dict(corr, further_accel=8.0)) > est  # a sparser view misses more


def test_naive_on_image_domain_data_uses_the_corrupted_images(tmp_path):
    from ambient_mri.datasets import ImageCorruptionDataset, NaiveDataset

    root = write_prepared(tmp_path / "img", files=1, slices=3, domain="image", level=0.25, seed=4)
    ds = NaiveDataset(root, "zf", progress=False)
    src = ImageCorruptionDataset(root)
    assert len(ds) == 3 and torch.equal(ds[1]["image"], src[1]["image"])
    with pytest.raises(DataError, match="naive_zf"):
        NaiveDataset(root, "l1", progress=False)
