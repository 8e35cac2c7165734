"""Torch datasets over a prepared folder (``docs/data_format.md``): every ``.h5`` listed in its
``manifest.json``, indexed by ``(file, slice)``, files opened lazily once per worker process.

Each class reads a fixed whitelist of keys (``KEYS``) and nothing else:

* :class:`AmbientKspaceDataset` (ambient training): ``kspace``, ``mask``, ``maps``, ``norm``; refuses
  k-space that is non-zero where its mask is 0, so unmasked k-space can never enter training.
  Items ``{"kspace" (C, H, W) complex64, "mask" (1, W) | (H, W) float32, "maps" (C, H, W) complex64,
  "norm" float, "index" int}``.
* :class:`ImageCorruptionDataset` (``domain: image``, pixel/box corruption): ``image``, ``mask``.
  Items ``{"image" (H, W) complex64, "mask" (H, W) float32, "index"}``.
* :class:`ReferenceDataset` (the ORACLE, FS-EDM): ``reference`` of a val-style split. Items ``{"image", "index"}``.
* :class:`NaiveDataset` (ZF-EDM / L1-EDM): ``A^H y`` or an L1-wavelet reconstruction of every training
  slice, computed once (and cached to a file), then plain images. Items ``{"image", "index"}``.
* :class:`PosteriorSamplesDataset` (EM M-step): the posterior samples an EM round's E-step drew from the
  training slices' own measurements. Items ``{"image", "index"}``.

Small datasets (arrays under ``cache_mb`` MiB) are read into memory once; larger ones slice by slice.
:func:`collate` stacks items into a batch and keeps complex tensors complex.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from .baselines import l1_wavelet, zero_filled
from .corruption import from_dict
from .errors import DataError
from .fsutil import atomic_path
from .prepared import ARRAYS, FORMAT, read_manifest  # noqa: F401  (FORMAT, read_manifest: kept importable from here)
from .prepared import attr_value as _attr

SAMPLES_FILE = "samples.h5"  # an EM round's E-step output, in the round's run folder


class PreparedDataset(Dataset):
    """Base class: the manifest's files, indexed by ``(file, slice)``; reads only ``KEYS``.

    ``info``: shared file attributes (``split``, ``domain``, ``mask_kind``, ``accel``, ``acs``, ...) plus
    ``shape`` ``(H, W)``, ``coils`` and ``mask_shape`` (per slice); ``manifest_sha256``.
    """

    KEYS: tuple[str, ...] = ()
    REQUIRED: tuple[str, ...] = ()
    DOMAIN: str | None = None

    def __init__(self, root: str | os.PathLike, *, cache_mb: float = 512.0):
        self.root = Path(root)
        self.manifest, self.manifest_sha256 = read_manifest(self.root)
        self.files = [self.root / e["file"] for e in self.manifest["files"]]
        self.index: list[tuple[int, int]] = []
        self.shapes: dict[str, tuple] = {}
        attrs0 = None
        for fi, (path, entry) in enumerate(zip(self.files, self.manifest["files"])):
            if not path.is_file():
                raise DataError("listed in manifest.json but missing", path)
            try:
                with h5py.File(path, "r") as f:
                    attrs = {k: _attr(v) for k, v in f.attrs.items()}
                    shapes = {k: tuple(f[k].shape) for k in self.KEYS if k in f}
            except OSError as e:
                raise DataError(f"cannot read as HDF5 ({' '.join(str(e).split())[:160]})", path) from None
            if self.DOMAIN is not None and attrs.get("domain", "kspace") != self.DOMAIN:
                use = {"image": "loss.kind=ambient_image", "kspace": "loss.kind=ambient"}.get(attrs.get("domain"), "")
                raise DataError(f"prepared with --domain {attrs.get('domain')}; this dataset needs {self.DOMAIN} "
                                f"data{f' (for this data use {use})' if use else ''}", path)
            missing = [k for k in self.REQUIRED if k not in shapes]
            if missing:
                raise DataError(self._missing_message(missing, attrs), path)
            n = entry["slices"]
            for k, shp in shapes.items():
                if shp[0] != n:
                    raise DataError(f"{k} has {shp[0]} slices but the manifest says {n}", path)
            self._check_shapes(shapes, path)
            per_slice = {k: shp[1:] for k, shp in shapes.items()}
            if not self.shapes:
                self.shapes, attrs0 = per_slice, attrs
            elif per_slice != self.shapes:
                raise DataError(f"array shapes {per_slice} differ from the first file's {self.shapes} "
                                f"(all files of one dataset must share them)", path)
            self.index += [(fi, s) for s in range(n)]
        self.info = self._info(attrs0)
        self._handles: dict[int, object] = {}
        self._pid = None
        self._cache = None
        nbytes = sum(int(np.prod(self.shapes[k])) * self._itemsize(k) for k in self.shapes) * len(self.index)
        if nbytes <= cache_mb * 2**20:
            self._cache = [self._read_file(fi) for fi in range(len(self.files))]
        else:  # check the first slice of every file now, the rest as they are read
            for fi in range(len(self.files)):
                self._validate(self._read(fi, 0), fi, 0)

    # -- subclass hooks
    def _check_shapes(self, shapes: dict, path):
        pass

    def _validate(self, arrays: dict, fi: int, s) -> None:
        """Check one slice (``s`` an int) or a whole file (``s = None``); raise DataError."""

    def _item(self, arrays: dict, index: int) -> dict:
        raise NotImplementedError

    def _missing_message(self, missing, attrs):
        return f"has no {', '.join(missing)}"

    def _info(self, attrs: dict) -> dict:
        return dict(attrs)

    @staticmethod
    def _itemsize(key):
        return ARRAYS[key].dtype.itemsize if key in ARRAYS else 4

    # -- reading
    def _file(self, fi: int):
        if self._pid != os.getpid():  # a new worker process: never share HDF5 handles across fork
            self._handles, self._pid = {}, os.getpid()
        if fi not in self._handles:
            self._handles[fi] = h5py.File(self.files[fi], "r")
        return self._handles[fi]

    def _read(self, fi: int, s: int) -> dict:
        f = self._file(fi)
        return {k: f[k][s] for k in self.shapes}

    def _read_file(self, fi: int) -> dict:
        f = self._file(fi)
        arrays = {k: f[k][()] for k in self.shapes}
        self._validate(arrays, fi, None)
        return arrays

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        fi, s = self.index[i]
        if self._cache is not None:
            arrays = {k: v[s] for k, v in self._cache[fi].items()}
        else:
            arrays = self._read(fi, s)
            self._validate(arrays, fi, s)
        return self._item(arrays, i)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_handles"], d["_pid"] = {}, None
        return d

    def close(self):
        for f in self._handles.values():
            try:
                f.close()
            except Exception:
                pass
        self._handles = {}

    def masks(self):
        """The sampling masks ``M`` of every slice, one ``(S, h, W)`` bool array per file (what
        ``corruption.MaskBank`` keeps for data with their own masks)."""
        for fi in range(len(self.files)):
            m = self._cache[fi]["mask"] if self._cache is not None else self._file(fi)["mask"][()]
            yield np.asarray(m, dtype=bool)

    def where(self, fi: int, s) -> str:
        return f"{self.files[fi]}" + ("" if s is None else f" (slice {s})")


def _complex(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.complex64))


def _finite(a, what, where):
    if not np.isfinite(a).all():
        raise DataError(f"{what} holds NaN or Inf", where)


def _mask_nonempty(m, where):
    flat = np.asarray(m).reshape(-1, m.shape[-2] * m.shape[-1]) if m.ndim >= 2 else m[None]
    if not flat.any(axis=1).all():
        raise DataError("the sampling mask is empty", where)


class AmbientKspaceDataset(PreparedDataset):
    """The ambient training set: measured k-space ``y = M F S x0``, its mask ``M`` and maps ``S`` only.

    Reads exactly the keys ``kspace``, ``mask``, ``maps`` and ``norm`` of each file (never any other
    array) and refuses a file whose k-space is non-zero where its mask is 0.
    """

    KEYS = ("kspace", "mask", "maps", "norm")
    REQUIRED = ("kspace", "mask", "maps")
    DOMAIN = "kspace"

    def _missing_message(self, missing, attrs):
        return f"has no {', '.join(missing)} (prepared k-space files hold kspace, mask, maps)"

    def _check_shapes(self, shapes, path):
        k, m, s = shapes["kspace"], shapes["mask"], shapes["maps"]
        if len(k) != 4:
            raise DataError(f"kspace must be (slices, coils, H, W), got {k}", path)
        if s != k:
            raise DataError(f"maps shape {s} differs from kspace shape {k}", path)
        if len(m) != 3 or m[-1] != k[-1] or m[-2] not in (1, k[-2]):
            raise DataError(f"mask shape {m} does not broadcast against kspace {k} (expected (S, 1, W) or (S, H, W))", path)

    def _validate(self, a, fi, s):
        where = self.where(fi, s)
        k, m = a["kspace"], np.asarray(a["mask"]).astype(bool)
        _finite(k, "kspace", where)
        _finite(a["maps"], "maps", where)
        _mask_nonempty(m, where)
        outside = np.where(m[..., None, :, :] if s is None else m[None], 0, k)
        if np.any(outside != 0):
            raise DataError("k-space is non-zero where the mask is 0: unmasked k-space is refused for ambient "
                            "training (prepare the data with ambient-mri prep)", where)

    def _info(self, attrs):
        d = dict(attrs)
        C, H, W = self.shapes["kspace"]
        d.update(shape=(H, W), coils=C, mask_shape=tuple(self.shapes["mask"]))
        acs = d.get("acs")
        if acs is None or len(acs) != 2:
            raise DataError("has no 'acs' attribute (the calibration block (h, w))", self.files[0])
        return d

    def _item(self, a, index):
        return {"kspace": _complex(a["kspace"]), "mask": torch.from_numpy(np.asarray(a["mask"], dtype=np.float32)),
                "maps": _complex(a["maps"]), "norm": float(a["norm"]) if "norm" in a else 1.0, "index": index}


class ImageCorruptionDataset(PreparedDataset):
    """Image-domain ambient set (``prep --domain image``): the corrupted image ``y = M x`` and ``M`` only."""

    KEYS = ("image", "mask")
    REQUIRED = ("image", "mask")
    DOMAIN = "image"

    def _check_shapes(self, shapes, path):
        x, m = shapes["image"], shapes["mask"]
        if len(x) != 3 or m != x:
            raise DataError(f"image {x} and mask {m} must both be (slices, H, W)", path)

    def _validate(self, a, fi, s):
        where = self.where(fi, s)
        m = np.asarray(a["mask"]).astype(bool)
        _finite(a["image"], "image", where)
        _mask_nonempty(m, where)
        if np.any(np.where(m, 0, a["image"]) != 0):
            raise DataError("image is non-zero where the mask is 0: uncorrupted pixels are refused", where)

    def _info(self, attrs):
        d = dict(attrs)
        d.update(shape=tuple(self.shapes["image"]), coils=0, mask_shape=tuple(self.shapes["mask"]))
        return d

    def _item(self, a, index):
        return {"image": _complex(a["image"]), "mask": torch.from_numpy(np.asarray(a["mask"], dtype=np.float32)),
                "index": index}


class ReferenceDataset(PreparedDataset):
    """ORACLE (FS-EDM) training set: the fully sampled ``reference`` images of a val-style split.

    Not an ambient dataset: it reads ground truth. Everything trained on it is labelled oracle."""

    KEYS = ("reference",)
    REQUIRED = ("reference",)
    oracle = True

    def _missing_message(self, missing, attrs):
        return (f"has no reference (split {attrs.get('split')!r}): the oracle needs a val-style split "
                "(ambient-mri prep --split val)")

    def _check_shapes(self, shapes, path):
        if len(shapes["reference"]) != 3:
            raise DataError(f"reference must be (slices, H, W), got {shapes['reference']}", path)

    def _validate(self, a, fi, s):
        _finite(a["reference"], "reference", self.where(fi, s))

    def _info(self, attrs):
        d = dict(attrs)
        d.update(shape=tuple(self.shapes["reference"]), coils=0, mask_shape=None)
        return d

    def _item(self, a, index):
        return {"image": _complex(a["reference"]), "index": index}


class NaiveDataset(Dataset):
    """ZF-EDM / L1-EDM training set: each training slice reconstructed once from its undersampled k-space,
    ``recon="zf"``: ``A^H y``; ``recon="l1"``: L1-wavelet CS (``baselines.l1_wavelet``, ``lam``, ``iters``).
    Image-domain (box/pixel-corrupted) data with ``recon="zf"``: the corrupted images ``M x`` as they are.

    Reads k-space through :class:`AmbientKspaceDataset` (never a reference). The reconstructions are
    cached in ``cache_path`` (an ``.h5``; reused when data, method and settings match). Items ``{"image", "index"}``.
    """

    def __init__(self, root: str | os.PathLike, recon: str = "zf", lam: float = 1e-3, *, iters: int = 100,
                 cache_path: str | os.PathLike | None = None, cache_mb: float = 512.0, progress: bool = True):
        if recon not in ("zf", "l1"):
            raise DataError(f"naive reconstruction must be 'zf' or 'l1' (got {recon!r})", root)
        self.image_domain = read_manifest(root)[0].get("domain") == "image"
        if self.image_domain and recon != "zf":
            raise DataError("naive L1 needs k-space data; for image-domain (box/pixel) data use naive_zf, which "
                            "trains on the corrupted images as they are", root)
        self.source = (ImageCorruptionDataset if self.image_domain else AmbientKspaceDataset)(root, cache_mb=cache_mb)
        self.root, self.recon, self.lam, self.iters = Path(root), recon, float(lam), int(iters)
        self.manifest_sha256 = self.source.manifest_sha256
        self.info = dict(self.source.info)
        self.key = json.dumps({"manifest_sha256": self.manifest_sha256, "recon": recon,
                               **({"lam": self.lam, "iters": self.iters} if recon == "l1" else {})}, sort_keys=True)
        self.images = self._load(cache_path) if cache_path is not None else None
        if self.images is None:
            self.images = self.compute(progress)
            if cache_path is not None:
                self._save(cache_path)

    @staticmethod
    def cache_name(recon: str) -> str:
        return f"naive_{recon}_cache.h5"

    def compute(self, progress: bool = True) -> torch.Tensor:
        """Reconstruct every slice: ``(N, H, W)`` complex64."""
        n = len(self.source)
        H, W = self.info["shape"]
        out = torch.empty(n, H, W, dtype=torch.complex64)
        chunk = 16 if self.recon == "zf" else 1
        bar = tqdm(total=n, desc=f"{'zero-filled' if self.recon == 'zf' else 'L1-wavelet'} recon of the training slices",
                   unit="slice", disable=not progress, leave=False)
        with torch.no_grad():
            for start in range(0, n, chunk):
                items = collate([self.source[i] for i in range(start, min(n, start + chunk))])
                if self.image_domain:
                    x = items["image"]
                elif self.recon == "zf":
                    x = zero_filled(items["kspace"], items["maps"], items["mask"])
                else:
                    x = l1_wavelet(items["kspace"], items["maps"], items["mask"], self.lam, iters=self.iters)
                out[start : start + len(x)] = x.to(torch.complex64)
                bar.update(len(x))
        bar.close()
        return out

    def _load(self, path):
        path = Path(path)
        if not path.is_file():
            return None
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("key") != self.key:
                    return None
                return torch.from_numpy(f["images"][()])
        except OSError:
            return None

    def _save(self, path):
        with atomic_path(path, ".h5.tmp") as tmp:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("images", data=self.images.numpy())
                f.attrs["key"] = self.key

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return {"image": self.images[i], "index": i}


class PosteriorSamplesDataset(Dataset):
    """EM M-step training set (``loss.kind: em``): posterior samples of the training slices, drawn by the
    E-step (``ambient_mri.em``) from each slice's own measurements and written to ``samples_path``
    (``images (N K, H, W)`` complex64, attribute ``lineage``: JSON, the priors and samplers that drew them).

    Reads the prepared folder only for its description (the k-space dataset's ``info``, manifest hash;
    never a reference); refuses samples drawn from another dataset. Items ``{"image", "index"}``."""

    def __init__(self, root: str | os.PathLike, samples_path: str | os.PathLike):
        source = AmbientKspaceDataset(root, cache_mb=0)
        self.root, self.info, self.manifest_sha256 = Path(root), dict(source.info), source.manifest_sha256
        source.close()
        path = Path(samples_path)
        if not path.is_file():
            raise DataError("no E-step samples here: an EM round trains on the samples its E-step writes first "
                            "(ambient-mri train --em-from AMBIENT_CHECKPOINT)", path)
        try:
            with h5py.File(path, "r") as f:
                self.images = torch.from_numpy(f["images"][()])
                self.lineage = json.loads(f.attrs["lineage"])
        except (OSError, KeyError, ValueError) as e:
            raise DataError(f"cannot read the E-step samples ({' '.join(str(e).split())[:120]})", path) from None
        if self.lineage.get("manifest_sha256") != self.manifest_sha256:
            raise DataError("these E-step samples were drawn from another prepared dataset (manifest sha256 differs)",
                            path)
        H, W = self.info["shape"]
        if self.images.ndim != 3 or tuple(self.images.shape[1:]) != (H, W) or not torch.isfinite(
                torch.view_as_real(self.images)).all():
            raise DataError(f"images must be finite (N, {H}, {W}), got {tuple(self.images.shape)}", path)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "index": i}


def collate(items: list[dict]) -> dict:
    """Stack a list of items into a batch (complex tensors stay complex; ``index`` -> int64 ``(B,)``)."""
    out = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        if isinstance(vals[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in vals}
            if len(shapes) > 1:
                raise DataError(f"items of one batch have different {k} shapes {sorted(shapes)}")
            out[k] = torch.stack(vals)
        else:
            out[k] = torch.as_tensor(vals, dtype=torch.int64 if k == "index" else torch.float32)
    return out


def build_dataset(kind: str, root, *, lam: float = 1e-3, l1_iters: int = 100, cache_dir=None,
                  cache_mb: float = 512.0, progress: bool = True):
    """The dataset a loss kind trains on (see :data:`ambient_mri.config.LOSS_KINDS`)."""
    if kind == "ambient":
        return AmbientKspaceDataset(root, cache_mb=cache_mb)
    if kind == "ambient_image":
        return ImageCorruptionDataset(root, cache_mb=cache_mb)
    if kind == "oracle":
        return ReferenceDataset(root, cache_mb=cache_mb)
    if kind in ("naive_zf", "naive_l1"):
        recon = kind.split("_")[1]
        cache = None if cache_dir is None else Path(cache_dir) / NaiveDataset.cache_name(recon)
        return NaiveDataset(root, recon, lam, iters=l1_iters, cache_path=cache, cache_mb=cache_mb, progress=progress)
    if kind == "em":
        if cache_dir is None:
            raise DataError("loss.kind=em reads the E-step samples of its run folder (give cache_dir)", root)
        return PosteriorSamplesDataset(root, Path(cache_dir) / SAMPLES_FILE)
    raise DataError(f"no dataset for loss kind {kind!r}")


def one_line(e: BaseException) -> str:
    """The last line of a DataError re-raised by a DataLoader worker (which wraps it in a traceback)."""
    text = " ".join(str(e).split())
    if "Traceback" in text and "DataError: " in text:
        return text.rsplit("DataError: ", 1)[-1].strip()
    return text


def estimate_sigma_view(dataset, corruption, *, max_slices: int = 512, seed: int = 0) -> float:
    """Estimate, from the MEASURED data only, the RMS of what an ambient model's view misses:
    ``sigma_view^2 ~ E_s sum_{k not in M~_s} P(k) / (H W)``.

    ``P(k)``: the mean coil-summed energy ``sum_c |y_c(k)|^2`` at k-space location ``k`` over the slices
    whose mask samples it (masks are drawn independently of the images, so this estimates the
    image's spectrum without any unmeasured data), averaged in 32 radial bins; ``M~_s``: a further mask
    drawn as in training (``corruption.further``; ``corruption``: a :class:`corruption.Corruption` or its
    recorded dict). Image-domain data: the same with pixels instead of k-space locations.
    Used for ``model.sigma_view: null`` (see ``networks.EDMDenoiser``); a dataset without a further mask
    (oracle, naive) gives 0.
    """
    corruption = from_dict(corruption)
    domain = corruption.domain
    if domain not in ("kspace", "image"):
        return 0.0
    n = min(len(dataset), max_slices)
    idx = np.random.default_rng(seed).choice(len(dataset), n, replace=False)
    items = [dataset[int(i)] for i in idx]
    key = "kspace" if domain == "kspace" else "image"
    y = torch.stack([it[key] for it in items])
    m = torch.stack([it["mask"] for it in items]) > 0
    energy = y.abs().pow(2).sum(1) if domain == "kspace" else y.abs().pow(2)  # (n, H, W)
    H, W = energy.shape[-2:]
    full = m.expand(n, H, W)
    total, count = (energy * full).sum(0), full.sum(0).double()
    yy, xx = torch.meshgrid(torch.arange(H) - H // 2, torch.arange(W) - W // 2, indexing="ij")
    r = torch.sqrt((yy / (H / 2)) ** 2 + (xx / (W / 2)) ** 2)
    b = torch.clamp((r / (r.max() + 1e-9) * 32).long(), max=31)
    P = torch.zeros(32, dtype=torch.float64)
    for k in range(32):  # 32 radial bins, not a loop over pixels
        sel = b == k
        P[k] = total[sel].sum().double() / count[sel].sum().clamp_min(1)
    P = P[b]
    mt = corruption.further(m, torch.Generator().manual_seed(seed))
    missing = ~mt.expand(n, H, W)
    return float(torch.sqrt((P * missing).sum((1, 2)).mean() / (H * W)))
