"""The prepared format (``docs/data_format.md``): its one owner.

``ambient-mri prep`` writes it; ``info``, ``recon``, ``eval`` and the training datasets read it, all
through this module:

* :data:`FORMAT`, the version string in every prepared file's ``format`` attribute and ``manifest.json``;
* :data:`ARRAYS`, the arrays a prepared file may hold with their dtypes, and :func:`file_keys`, which of
  them a file of a given split and domain holds (:func:`stored` casts a value to its stored dtype);
* :func:`read_manifest` / :func:`manifest_json` (the folder's ``manifest.json``), :func:`describe_prepared`
  (a file's summary, also the manifest's file entry); :func:`build_manifest` / :func:`write_manifest`, its
  writer; :func:`create_datasets`, a new file's arrays with their stored dtypes;
* :func:`is_prepared`, the one "is this file prepared?" check;
* :class:`Scan` and :func:`load_prepared`, the validated reader of a prepared val/test file;
* the units contract: ``recon`` writes ``units`` = :data:`UNITS_PREPARED` (input read with
  :func:`load_prepared`) or :data:`UNITS_RAW` (a raw fastMRI input); :func:`reference_units` says which
  units a reference file is in (``eval`` refuses a mismatch).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from . import __version__
from .errors import AmbientMRIError, DataError
from .fastmri_io import list_volumes
from .fsutil import claim, write_json

if TYPE_CHECKING:
    from .prep import PrepOptions

FORMAT = "ambient_mri.prepared/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
DOMAINS = ("kspace", "image")


# ----------------------------------------------------------------------------------------------
# Keys and dtypes


@dataclass(frozen=True)
class ArrayKey:
    """One array of a prepared file: ``name``, stored ``dtype``, ``shape`` (``S`` slices) and meaning."""

    name: str
    dtype: np.dtype
    shape: str
    meaning: str


ARRAYS: dict[str, ArrayKey] = {a.name: a for a in (
    ArrayKey("kspace", np.dtype(np.complex64), "(S, C, H, W)", "measured k-space / norm, exactly 0 where mask is 0"),
    ArrayKey("image", np.dtype(np.complex64), "(S, H, W)", "--domain image: mask * x"),
    ArrayKey("mask", np.dtype(bool), "(S, 1, W) | (S, H, W)", "sampling mask M"),
    ArrayKey("maps", np.dtype(np.complex64), "(S, C, H, W)", "coil sensitivities from measured samples only"),
    ArrayKey("reference", np.dtype(np.complex64), "(S, H, W)", "reference image (val/test, fully sampled input)"),
    ArrayKey("norm", np.dtype(np.float32), "(S,)", "99th percentile of the calibration block's RSS image"),
    ArrayKey("mask_seed", np.dtype(np.int64), "(S,)", "seed of each slice's mask (-1: the input's own)"),
    ArrayKey("noise_std", np.dtype(np.float32), "(S,)", "complex noise std of one stored sample of one coil"),
    ArrayKey("slice_index", np.dtype(np.int64), "(S,)", "slice index in the input volume"),
)}

# the per-slice arrays in the order prep creates them (``slice_index`` follows them)
PER_SLICE_KEYS = ("kspace", "image", "mask", "maps", "reference", "norm", "mask_seed", "noise_std")


def file_keys(split: str, domain: str = "kspace", *, reference: bool = True) -> tuple[str, ...]:
    """The arrays of a prepared file, in the order prep writes them.

    k-space domain: ``kspace, mask, maps, norm, mask_seed, noise_std``; image domain: ``image, mask, norm,
    mask_seed`` (no maps, no k-space noise); val/test add ``reference`` (k-space inputs that carry their own
    mask have none: ``reference=False``); every file ends with ``slice_index``."""
    if split not in SPLITS or domain not in DOMAINS:
        raise ValueError(f"unknown split {split!r} or domain {domain!r}")
    have = {"mask", "norm", "mask_seed"}
    have |= {"kspace", "maps", "noise_std"} if domain == "kspace" else {"image"}
    if split != "train" and (reference or domain == "image"):
        have.add("reference")
    return tuple(k for k in PER_SLICE_KEYS if k in have) + ("slice_index",)


def array_keys(d: dict) -> list[str]:
    """The per-slice array keys present in a slice dict, in writing order."""
    return [k for k in PER_SLICE_KEYS if k in d]


def stored(key: str, value):
    """``value`` cast to the stored dtype of ``key`` (a numpy scalar for a scalar)."""
    a = np.asarray(value, dtype=ARRAYS[key].dtype)
    return a[()] if a.ndim == 0 else a


def create_datasets(f: h5py.File, d: dict, n: int) -> None:
    """Create the arrays of a new prepared file ``f`` for ``n`` slices, shaped and typed like the slice dict
    ``d`` (:func:`array_keys`, stored dtypes, one chunk per slice), then ``slice_index``."""
    for key in array_keys(d):
        v = stored(key, d[key])
        shape = (n,) + np.shape(v)
        chunks = (1,) + np.shape(v) if np.ndim(v) else None
        f.create_dataset(key, shape=shape, dtype=v.dtype, chunks=chunks)
    f.create_dataset("slice_index", shape=(n,), dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# Recognising a prepared file


def is_prepared(path) -> bool:
    """Whether ``path`` is a prepared file: HDF5 with the attribute ``format`` = :data:`FORMAT`; a file
    without ``format`` (another tool's file in this layout) counts when it has a ``split`` attribute and a
    ``mask`` with ``maps`` or ``image``. A file that is not readable HDF5 is not prepared (``False``)."""
    try:
        with h5py.File(path, "r") as f:
            fmt = f.attrs.get("format")
            fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
            if fmt is not None:
                return fmt == FORMAT
            return "split" in f.attrs and "mask" in f and ("maps" in f or "image" in f)
    except (OSError, RuntimeError, KeyError, ValueError, TypeError):  # not HDF5, truncated, damaged
        return False


# ----------------------------------------------------------------------------------------------
# manifest.json and file summaries


def _parse_manifest(raw: bytes, path) -> dict:
    try:
        return json.loads(raw)
    except ValueError as e:
        raise DataError(f"manifest is not valid JSON ({e})", path) from None


def manifest_json(path) -> dict:
    """The parsed ``manifest.json`` at ``path`` as it is (no checks beyond JSON); one-line DataError."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"unreadable manifest ({' '.join(str(e).split())[:120]})", path) from None
    return _parse_manifest(raw, path)


def read_manifest(root: str | os.PathLike) -> tuple[dict, str]:
    """``(manifest dict, sha256 of manifest.json)`` of a prepared folder, checked: format :data:`FORMAT`,
    a non-empty ``files`` list of ``{"file": plain name, "slices": int}``; one-line :class:`DataError`."""
    path = Path(root) / MANIFEST
    if not Path(root).is_dir():
        raise DataError("no such prepared folder", root)
    try:
        raw = path.read_bytes()
    except OSError:
        hint = ""
        subsets = sorted(p.parent.name for p in Path(root).glob(f"R*/{MANIFEST}"))
        if subsets:
            hint = f" (it holds per-acceleration folders: use one of {', '.join(subsets)})"
        raise DataError(f"no {MANIFEST}: not a prepared dataset (run ambient-mri prep){hint}", root) from None
    m = _parse_manifest(raw, path)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DataError(f"manifest format is {m.get('format') if isinstance(m, dict) else None!r}, expected {FORMAT!r}", path)
    files = m.get("files")
    if not isinstance(files, list) or not files:
        raise DataError("manifest lists no files", path)
    for e in files:
        if not isinstance(e, dict) or not isinstance(e.get("file"), str) or not isinstance(e.get("slices"), int):
            raise DataError(f"manifest file entry {e!r} lacks 'file' or 'slices'", path)
        if "/" in e["file"] or "\\" in e["file"] or e["file"].startswith("."):
            raise DataError(f"manifest file entry {e['file']!r} is not a plain file name", path)
    return m, hashlib.sha256(raw).hexdigest()


def attr_value(v):
    """An HDF5 attribute as a plain Python value (bytes -> str, arrays -> lists, numpy scalars -> numbers)."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def describe_prepared(path) -> dict:
    """Summary of a finished prepared file: the manifest entry fields (:func:`manifest_entry`) plus
    ``attrs`` (every file attribute) and ``shapes`` (of the image-sized arrays)."""
    with h5py.File(path, "r") as f:
        a = {k: attr_value(v) for k, v in f.attrs.items()}
        mask = f["mask"][()]
        d = {
            "file": Path(path).name, "source": a.get("source"), "source_sha256": a.get("source_sha256"),
            "slices": int(f["slice_index"].shape[0]), "slice_index": f["slice_index"][()].tolist(),
            "mask_seed": f["mask_seed"][()].tolist(), "norm": [float(x) for x in f["norm"][()]],
            "accel_actual": float(mask[0].size / max(mask.reshape(len(mask), -1).sum(1).mean(), 1e-12)),
            "reference": a.get("reference_kind") if "reference" in f else None,
            "warnings": json.loads(a.get("warnings", "[]")),
            "shapes": {k: list(f[k].shape) for k in ("kspace", "image", "mask", "maps", "reference") if k in f},
            "maps": a.get("maps_kind"),
            "noise_std": [float(x) for x in f["noise_std"][()]] if "noise_std" in f else None,
            "noise_std_source": json.loads(a["noise_std_source"]) if "noise_std_source" in a else None,
        }
        if "forward_residual" in a:
            d["forward_residual"] = [float(x) for x in np.atleast_1d(a["forward_residual"])]
            d["noise_residual"] = [float(x) for x in np.atleast_1d(a["noise_residual"])]
    d["attrs"] = a
    return d


def manifest_entry(path) -> dict:
    """A prepared file's entry in ``manifest.json``: :func:`describe_prepared` without ``attrs`` and ``shapes``."""
    d = describe_prepared(path)
    d.pop("attrs")
    d.pop("shapes")
    return d


def build_manifest(folder: Path, options: "PrepOptions", failed: list[dict]) -> dict:
    """``manifest.json`` content, built from the finished files in ``folder`` (so it is right after a resume):
    :data:`FORMAT`, split, domain, version, the prep ``options``, the reference kind, one
    :func:`manifest_entry` per file and the ``failed`` inputs."""
    files = [manifest_entry(p) for p in (list_volumes(folder) if Path(folder).is_dir() else [])]
    with_ref = any(f["reference"] for f in files)
    return {"format": FORMAT, "split": options.split, "domain": options.domain, "ambient_mri_version": __version__,
            "options": options.to_json(), "reference_kind": options.reference if with_ref else None,
            "files": files, "failed": failed}


def write_manifest(folder: Path, options: "PrepOptions", failed: list[dict], wait_s: float = 600.0) -> Path:
    """Build and write ``folder/manifest.json`` atomically, under a claim, so that concurrent prep runs on
    the same output never interleave (the last one to finish lists every finished file)."""
    path = Path(folder) / MANIFEST
    t0 = time.monotonic()
    while True:
        with claim(path) as held:
            if held:
                write_json(path, build_manifest(folder, options, failed))
                return path
        if time.monotonic() - t0 > wait_s:
            raise AmbientMRIError("another process holds the manifest claim for too long", path)
        time.sleep(0.2)


# ----------------------------------------------------------------------------------------------
# The units contract between recon and eval

UNITS_ATTR = "units"  # attribute of a reconstruction file written by recon
UNITS_PREPARED = "prepared"
UNITS_RAW = "raw"
UNITS = {UNITS_PREPARED: "the prepared data's normalised units (a prepared file's 'reference')",
         UNITS_RAW: "the raw scanner units of a fastMRI file"}
RAW_REFERENCE_KEYS = ("reconstruction_rss", "reconstruction_esc")  # fastMRI's own reference images


def reference_units(f) -> tuple[str, str] | None:
    """``(key, units)`` of the reference image an open HDF5 file ``f`` holds: a prepared file's
    ``reference`` (:data:`UNITS_PREPARED`, already divided by each slice's norm) or fastMRI's
    ``reconstruction_rss`` / ``_esc`` (:data:`UNITS_RAW`); ``None`` when it holds neither."""
    if "reference" in f:
        return "reference", UNITS_PREPARED
    key = next((k for k in RAW_REFERENCE_KEYS if k in f), None)
    return None if key is None else (key, UNITS_RAW)


# ----------------------------------------------------------------------------------------------
# Reading a prepared val/test file for reconstruction


@dataclass
class Scan:
    """One input volume, normalised: ``y`` ``(S, C, H, W)`` (or ``(S, H, W)`` image domain), ``maps`` or None,
    ``mask`` ``(S, 1|H, W)``, ``norm`` ``(S,)``, ``slice_index``, ``units``, ``attrs``, ``noise_std`` ``(S,)`` or None
    (complex noise std of one k-space sample of one coil in these units, ``E|n|^2 = noise_std^2``; NaN = unknown),
    ``reference`` ``(S, H, W)`` only when asked for (:func:`load_prepared`, ``reference=True``)."""

    path: Path
    y: np.ndarray
    maps: np.ndarray | None
    mask: np.ndarray
    norm: np.ndarray
    slice_index: np.ndarray
    units: str
    attrs: dict = field(default_factory=dict)
    noise_std: np.ndarray | None = None
    reference: np.ndarray | None = None

    @property
    def shape(self):
        return tuple(self.y.shape[-2:])


def load_prepared(path: Path, *, slices: int | None = None, reference: bool = False) -> Scan:
    """A prepared val/test file (``docs/data_format.md``) as a :class:`Scan` in :data:`UNITS_PREPARED`: its
    first ``slices`` slices (default all), with the ``reference`` when asked (``None`` if the file has
    none). A missing key, a damaged file, shapes that do not fit together or NaN/Inf raise a one-line
    :class:`DataError`."""
    take = slice(None) if slices is None else slice(0, int(slices))
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: (v.item() if hasattr(v, "item") and np.ndim(v) == 0 else v) for k, v in f.attrs.items()}
            image = "image" in f
            key = "image" if image else "kspace"
            for k in (key, "mask") + (() if image else ("maps",)):
                if k not in f:
                    raise DataError(f"prepared file has no {k!r}", path)
            y = f[key][take]
            maps = None if image else f["maps"][take]
            mask = f["mask"][take]
            norm = f["norm"][take] if "norm" in f else np.ones(y.shape[0], np.float32)
            idx = f["slice_index"][take] if "slice_index" in f else np.arange(y.shape[0])
            noise = f["noise_std"][take] if "noise_std" in f else None
            ref = f["reference"][take] if reference and "reference" in f else None
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
        raise DataError(f"cannot read the prepared file ({' '.join(str(e).split())[:120]})", path) from None
    rank = 3 if image else 4
    if y.ndim != rank or y.dtype.kind != "c" or 0 in y.shape:
        raise DataError(f"{key!r} must be complex with shape {'(S, H, W)' if image else '(S, C, H, W)'}, got "
                        f"{y.dtype} {y.shape}", path)
    S, (H, W) = y.shape[0], y.shape[-2:]
    if maps is not None and maps.shape != y.shape:
        raise DataError(f"'maps' shape {maps.shape} differs from 'kspace' shape {y.shape}", path)
    if mask.ndim != 3 or mask.shape[0] != S or mask.shape[1:] not in ((1, W), (H, W)):
        raise DataError(f"'mask' shape {mask.shape} does not fit {key!r} {y.shape} (expected (S, 1, W) or (S, H, W))",
                        path)
    if not np.asarray(mask, dtype=bool).reshape(S, -1).any(axis=1).all():
        raise DataError("a slice's sampling mask is empty", path)
    if np.shape(norm) != (S,) or np.shape(idx) != (S,):
        raise DataError(f"'norm' / 'slice_index' must have one value per slice ({S})", path)
    if ref is not None and ref.shape != (S, H, W):
        raise DataError(f"'reference' shape {ref.shape} does not fit {key!r} {y.shape} (expected (S, H, W))", path)
    for name, a in ((key, y), ("maps", maps), ("norm", norm), ("reference", ref)):
        if a is not None and not np.isfinite(a).all():
            raise DataError(f"{name!r} holds NaN or Inf", path)
    return Scan(path, y, maps, mask, norm, idx, UNITS_PREPARED, attrs, check_noise_std(noise, S, path), ref)


def check_noise_std(noise, S: int, path) -> np.ndarray | None:
    """``noise_std`` of a prepared file as float64 ``(S,)`` (NaN = unknown), or a one-line DataError."""
    if noise is None:
        return None
    a = np.asarray(noise)
    if a.shape != (S,) or a.dtype.kind not in "fiu":
        raise DataError(f"'noise_std' must be real with one value per slice ({S}), got {a.dtype} {a.shape}", path)
    a = a.astype(np.float64)
    if np.isinf(a).any() or (a < 0).any():
        raise DataError("'noise_std' holds a negative or infinite value (NaN marks an unknown level)", path)
    return a
