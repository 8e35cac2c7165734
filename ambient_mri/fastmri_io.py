"""fastMRI ``.h5`` layout: writing volumes (for converters, the demo and tests) and parsing the header.

Layout (``facebookresearch/fastMRI``): ``kspace`` ``(slices, coils, H, W)`` complex64 (single-coil:
``(slices, H, W)``), ``reconstruction_rss`` ``(slices, h, w)`` float32 = centre crop of the RSS of
``|ifft2c(kspace)|`` (single-coil: ``reconstruction_esc``), ``ismrmrd_header`` (XML bytes with the
encoded and recon matrix sizes), attributes ``acquisition``, ``max``, ``norm``, ``patient_id``; test
and challenge files are already undersampled and carry ``mask`` ``(W,)`` plus the attributes
``acceleration`` and ``num_low_frequency``. As an extension, ``mask`` may be 2-D ``(H, W)`` (Poisson-disc
data). Phase-encode lines are the last axis.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import numpy as np

from .errors import DataError
from .fft import center_crop, ifft2c, rss
from .fsutil import atomic_h5

ISMRMRD_NS = "http://www.ismrm.org/ISMRMRD"


def make_header(encoded: tuple[int, int], recon: tuple[int, int], fov_mm: tuple[float, float] | None = None) -> bytes:
    """Minimal ``ismrmrd_header`` XML: encodedSpace/reconSpace matrix sizes (x = readout H, y = phase W),
    field of view, and the phase-encode limits (``kspace_encoding_step_1``) fastMRI reads."""
    fov = fov_mm or (float(encoded[0]), float(encoded[1]))

    def space(tag, size, f):
        return (f"<{tag}><matrixSize><x>{size[0]}</x><y>{size[1]}</y><z>1</z></matrixSize>"
                f"<fieldOfView_mm><x>{f[0]}</x><y>{f[1]}</y><z>5.0</z></fieldOfView_mm></{tag}>")

    W = encoded[1]
    xml = (f'<?xml version="1.0" encoding="utf-8"?>\n<ismrmrdHeader xmlns="{ISMRMRD_NS}"><encoding>'
           + space("encodedSpace", encoded, fov)
           + space("reconSpace", recon, (fov[0] * recon[0] / encoded[0], fov[1] * recon[1] / encoded[1]))
           + "<encodingLimits><kspace_encoding_step_1><minimum>0</minimum>"
           f"<maximum>{W - 1}</maximum><center>{W // 2}</center></kspace_encoding_step_1></encodingLimits>"
           "</encoding></ismrmrdHeader>")
    return xml.encode()


def parse_header(xml: bytes | str) -> dict:
    """Encoding and recon matrix sizes, FOV and phase-encode padding from an ``ismrmrd_header``.

    Returns ``{"encoding_size": (x, y, z), "recon_size": (x, y, z), "encoding_fov_mm": (x, y, z),
    "padding_left": int, "padding_right": int}`` (padding as fastMRI's ``SliceDataset`` computes it).
    Raises ``xml.etree.ElementTree.ParseError`` if the XML does not parse, ``LookupError`` if its declaration
    names an unknown encoding, ``ValueError`` if it lacks these fields or holds a non-finite number.
    """
    import math

    root = ET.fromstring(xml)
    ns = {"m": ISMRMRD_NS}

    def num(path, cast=int):
        el = root.find(path, ns)
        if el is None or el.text is None:
            raise ValueError(f"header has no {path.replace('m:', '')}")
        v = float(el.text)
        if not math.isfinite(v):
            raise ValueError(f"header {path.replace('m:', '')} is {el.text.strip()!r}")
        return int(v) if cast is int else cast(el.text)

    enc = "m:encoding/m:encodedSpace"
    rec = "m:encoding/m:reconSpace"
    out = {
        "encoding_size": tuple(num(f"{enc}/m:matrixSize/m:{a}") for a in "xyz"),
        "recon_size": tuple(num(f"{rec}/m:matrixSize/m:{a}") for a in "xyz"),
        "encoding_fov_mm": tuple(num(f"{enc}/m:fieldOfView_mm/m:{a}", float) for a in "xyz"),
    }
    lim = "m:encoding/m:encodingLimits/m:kspace_encoding_step_1"
    try:
        center, maximum = num(f"{lim}/m:center"), num(f"{lim}/m:maximum")
        left = out["encoding_size"][1] // 2 - center
        out["padding_left"], out["padding_right"] = left, left + maximum + 1
    except ValueError:
        out["padding_left"], out["padding_right"] = 0, out["encoding_size"][1]
    return out


def write_volume(path: str | os.PathLike, kspace: np.ndarray, *, recon_size: tuple[int, int] | None = None,
                 mask: np.ndarray | None = None, acceleration: float | None = None,
                 num_low_frequency: int | None = None, acquisition: str = "AXT2",
                 patient_id: str | None = None, extra_attrs: dict | None = None) -> Path:
    """Write one fastMRI-layout volume atomically.

    ``kspace``: ``(S, C, H, W)`` multi-coil or ``(S, H, W)`` single-coil (complex). Without ``mask`` the
    file is train/val style and gets a reference (``reconstruction_rss`` multi-coil, ``reconstruction_esc``
    and ``reconstruction_rss`` single-coil) cropped to ``recon_size`` (default ``min(H, W)`` square);
    with ``mask`` it is test style: ``kspace`` is zeroed outside the mask, which is stored with
    ``acceleration`` and ``num_low_frequency``, and no reference is written.
    """
    path = Path(path)
    kspace = np.asarray(kspace).astype(np.complex64)
    if kspace.ndim not in (3, 4):
        raise ValueError(f"kspace must be (S, C, H, W) or (S, H, W), got {kspace.shape}")
    H, W = kspace.shape[-2:]
    recon_size = tuple(recon_size or (min(H, W), min(H, W)))
    with atomic_h5(path) as f:
        if mask is not None:
            mask = np.asarray(mask).astype(bool)
            kspace = kspace * mask
            f.create_dataset("mask", data=mask)
            f.attrs["acceleration"] = float(acceleration if acceleration is not None else mask.size / mask.sum())
            f.attrs["num_low_frequency"] = int(num_low_frequency or 0)
        f.create_dataset("kspace", data=kspace)
        if mask is None:
            coil_img = ifft2c(kspace)
            target = rss(coil_img, dim=1) if kspace.ndim == 4 else np.abs(coil_img)
            target = np.ascontiguousarray(center_crop(target, recon_size)).astype(np.float32)
            key = "reconstruction_rss" if kspace.ndim == 4 else "reconstruction_esc"
            f.create_dataset(key, data=target)
            if kspace.ndim == 3:
                f.create_dataset("reconstruction_rss", data=target)
            f.attrs["max"] = float(target.max())
            f.attrs["norm"] = float(np.linalg.norm(target))
        f.create_dataset("ismrmrd_header", data=np.bytes_(make_header((H, W), recon_size)))
        f.attrs["acquisition"] = acquisition
        f.attrs["patient_id"] = patient_id or path.stem
        for k, v in (extra_attrs or {}).items():
            f.attrs[k] = v
    return path


# ----------------------------------------------------------------------------------------------
# Reading: one volume at a time, one slice at a time


MAX_DIM = 16384  # larger sizes (matrix side or header size) are taken as corrupt
MAX_COILS = 1024
# what h5py raises on a truncated or damaged file, depending on which structure is broken
_H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError, OverflowError)



class FastMRIVolume:
    """A lazily read fastMRI-layout volume; validated on open, read one slice at a time.

    ``FastMRIVolume(path)`` opens the file read-only and checks it (each problem is a one-line
    :class:`~ambient_mri.errors.DataError` naming the file): HDF5 readable, ``kspace`` present, rank 3
    (single-coil ``(S, H, W)``, read as ``C = 1``) or 4 (``(S, C, H, W)``), complex dtype, no empty axis,
    a finite central k-space row in every slice (cheap check; every slice is checked in full as it is
    read), and a ``mask`` of shape ``(W,)``, ``(1, W)`` or ``(H, W)`` that samples something.
    A header that is missing, does not parse or holds absurd sizes is not fatal: the sizes fall back to
    the array shape and the reason is kept in :attr:`warnings` (and issued as a ``UserWarning``).

    Attributes: ``path``, ``shape`` ``(S, C, H, W)``, ``num_slices``, ``num_coils``, ``single_coil``,
    ``mask`` (bool ``(W,)`` / ``(H, W)`` or ``None``), ``header`` (:func:`parse_header` dict plus
    ``"source"``: ``"header"`` or ``"array"``), ``attrs`` (the file's attributes as Python values),
    ``warnings``. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike):

        self.path = Path(path)
        self.warnings: list[str] = []
        self._file = None
        name = os.fspath(self.path)
        if not self.path.is_file():
            raise DataError("no such file" if not self.path.exists() else "not a regular file", name)
        try:
            if not h5py.is_hdf5(name):
                raise DataError("not an HDF5 file", name)
            self._file = h5py.File(name, "r")
        except DataError:
            raise
        except _H5_ERRORS as e:
            raise DataError(f"cannot open as HDF5 (truncated or unreadable: {_first_line(e)})", name) from None
        try:
            self._validate()
        except DataError:
            self.close()
            raise
        except _H5_ERRORS as e:  # h5py's own errors on a damaged structure (bad B-tree, heap, message...)
            self.close()
            raise DataError(f"damaged HDF5 file ({type(e).__name__}: {_first_line(e)})", name) from None
        except BaseException:
            self.close()
            raise

    # -- validation ---------------------------------------------------------------------------------

    def _fail(self, problem: str):

        raise DataError(problem, self.path)

    def _validate(self):
        f = self._file
        if "kspace" not in f:
            self._fail(f"no 'kspace' dataset (keys: {', '.join(sorted(f.keys())) or 'none'})")
        ks = f["kspace"]
        if not isinstance(ks, h5py.Dataset):
            self._fail("'kspace' is not a dataset")
        if ks.ndim not in (3, 4):
            self._fail(f"'kspace' must be (slices, coils, H, W) or (slices, H, W), got shape {ks.shape}")
        if ks.dtype.kind != "c":
            self._fail(f"'kspace' must be complex, got dtype {ks.dtype}")
        self.single_coil = ks.ndim == 3
        S, C, H, W = (ks.shape[0], 1, *ks.shape[1:]) if self.single_coil else ks.shape
        if min(S, C, H, W) == 0:
            self._fail(f"'kspace' has an empty axis: shape {ks.shape}")
        if max(H, W) > MAX_DIM or C > MAX_COILS:
            self._fail(f"'kspace' has an absurd shape {ks.shape}")
        self._ks = ks
        self.shape = (S, C, H, W)
        self.attrs = {k: _plain(v) for k, v in f.attrs.items()}
        self.mask = self._read_mask(H, W)
        self.header = self._read_header(H, W)
        try:  # cheap finiteness check: the central k-space row (where most energy is) of every slice
            row = ks[:, H // 2, :] if self.single_coil else ks[:, :, H // 2, :]
        except _H5_ERRORS as e:
            self._fail(f"cannot read 'kspace' (truncated file?: {_first_line(e)})")
        if not np.isfinite(row).all():
            bad = np.flatnonzero(~np.isfinite(row).reshape(S, -1).all(axis=1))
            self._fail(f"'kspace' holds NaN or Inf (slice {int(bad[0])})")

    def _read_mask(self, H, W):
        if "mask" not in self._file:
            return None
        try:
            m = np.asarray(self._file["mask"][()])
        except _H5_ERRORS as e:
            self._fail(f"cannot read 'mask' ({_first_line(e)})")
        if m.size == 0:
            self._fail("'mask' is empty")
        if m.dtype.kind not in "biuf":
            self._fail(f"'mask' must be boolean or numeric, got dtype {m.dtype}")
        if m.dtype.kind == "f" and not np.isfinite(m).all():
            self._fail("'mask' holds NaN or Inf")
        if m.ndim == 2 and m.shape[0] == 1:
            m = m[0]
        if not (m.shape == (W,) or m.shape == (H, W)):
            self._fail(f"'mask' has shape {m.shape}; expected ({W},) or ({H}, {W}) for k-space {self._ks.shape}")
        m = m != 0
        if not m.any():
            self._fail("'mask' is all zero (samples nothing)")
        return m

    def _read_header(self, H, W):
        fallback = {"encoding_size": (H, W, 1), "recon_size": (H, W, 1), "encoding_fov_mm": (float(H), float(W), 1.0),
                    "padding_left": 0, "padding_right": W, "source": "array"}
        if "ismrmrd_header" not in self._file:
            return self._header_fallback(fallback, "no 'ismrmrd_header'")
        try:
            raw = self._file["ismrmrd_header"][()]
            raw = raw.tobytes() if isinstance(raw, np.ndarray) else raw
            hdr = parse_header(raw)
        except (ET.ParseError, LookupError, *_H5_ERRORS) as e:  # LookupError: unknown XML encoding
            return self._header_fallback(fallback, f"'ismrmrd_header' does not parse ({_first_line(e)})")
        sizes = hdr["encoding_size"][:2] + hdr["recon_size"][:2]
        if any(not 1 <= s <= MAX_DIM for s in sizes):
            return self._header_fallback(fallback, f"'ismrmrd_header' has absurd sizes (encoded {hdr['encoding_size']},"
                                                   f" recon {hdr['recon_size']})")
        hdr["source"] = "header"
        return hdr

    def _header_fallback(self, fallback, reason):
        import warnings

        msg = f"{reason}; using the array shape {fallback['encoding_size'][:2]} instead"
        self.warnings.append(msg)
        warnings.warn(f"{self.path}: {msg}", UserWarning, stacklevel=3)
        return fallback

    # -- properties ---------------------------------------------------------------------------------

    @property
    def num_slices(self) -> int:
        return self.shape[0]

    @property
    def num_coils(self) -> int:
        return self.shape[1]

    @property
    def is_undersampled(self) -> bool:
        """True when the file carries its own sampling ``mask`` (test/challenge or real undersampled data)."""
        return self.mask is not None

    @property
    def acceleration(self) -> float | None:
        """The file's ``acceleration`` attribute (when a number >= 1), else ``mask`` size / samples; ``None`` without
        a mask."""
        if self.mask is None:
            return None
        try:  # a missing, non-numeric or impossible attribute (< 1, NaN) falls back to the mask's own
            a = float(self.attrs["acceleration"])
        except (KeyError, TypeError, ValueError):
            a = float("nan")
        return a if a >= 1 and a != float("inf") else float(self.mask.size / self.mask.sum())

    @property
    def readout_oversampled(self) -> bool:
        """The header's encoded readout is at least twice the recon readout (fastMRI: 640 = 2 x 320): the
        image corner then lies outside the reconstructed field of view (prewhitening's noise region)."""
        return self.header["encoding_size"][0] >= 2 * self.header["recon_size"][0]

    @property
    def reference_key(self) -> str | None:
        """``reconstruction_rss`` (multi-coil) or ``reconstruction_esc`` (single-coil) if present."""
        for key in (("reconstruction_esc", "reconstruction_rss") if self.single_coil else ("reconstruction_rss",)):
            if key in self._file:
                return key
        return None

    def keys(self) -> list[str]:
        return sorted(self._file.keys())

    # -- reading ------------------------------------------------------------------------------------

    def _index(self, i) -> int:
        i = int(i)
        if not -self.num_slices <= i < self.num_slices:

            raise DataError(f"slice {i} out of range (volume has {self.num_slices})", self.path)
        return i % self.num_slices

    def slice(self, i: int, *, apply_mask: bool = True) -> np.ndarray:
        """Slice ``i`` as complex64 ``(C, H, W)`` (single-coil: ``C = 1``); only this slice is read.

        With a ``mask`` in the file, k-space is multiplied by it (fastMRI test data is already zero there).
        """
        i = self._index(i)
        try:
            k = np.asarray(self._ks[i], dtype=np.complex64)
        except _H5_ERRORS as e:
            self._fail(f"cannot read slice {i} of 'kspace' ({_first_line(e)})")
        if not np.isfinite(k).all():
            self._fail(f"'kspace' holds NaN or Inf (slice {i})")
        if self.single_coil:
            k = k[None]
        if apply_mask and self.mask is not None:
            k = k * self.mask
        return k

    def slices(self, indices=None):
        """Iterate ``(i, slice(i))`` over ``indices`` (default all), reading one slice at a time."""
        for i in range(self.num_slices) if indices is None else indices:
            yield int(i), self.slice(i)

    def reference(self, i: int) -> np.ndarray | None:
        """Slice ``i`` of the file's own reconstruction (``reconstruction_rss``/``_esc``), or ``None``."""
        key = self.reference_key
        if key is None:
            return None
        i = self._index(i)
        try:
            return np.asarray(self._file[key][i], dtype=np.float32)
        except _H5_ERRORS as e:
            self._fail(f"cannot read slice {i} of {key!r} ({_first_line(e)})")

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        kind = "single-coil" if self.single_coil else f"{self.num_coils}-coil"
        us = f", undersampled R={self.acceleration:.3g}" if self.is_undersampled else ""
        return f"FastMRIVolume({str(self.path)!r}, {self.num_slices} slices, {kind}, {self.shape[2]}x{self.shape[3]}{us})"


def list_volumes(folder: str | os.PathLike) -> list[Path]:
    """The ``*.h5`` files of ``folder``, sorted by name (temporary and hidden files skipped); a file
    path gives itself."""
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    return sorted(p for p in folder.glob("*.h5") if not p.name.startswith(".") and p.is_file())


def iter_volumes(folder: str | os.PathLike, on_error=None):
    """Open the volumes of :func:`list_volumes` one at a time (each is closed before the next is opened).

    A file that fails validation raises its :class:`DataError`, or, with ``on_error``, is passed to
    ``on_error(path, error)`` and skipped.
    """

    for path in list_volumes(folder):
        try:
            vol = FastMRIVolume(path)
        except DataError as e:
            if on_error is None:
                raise
            on_error(path, e)
            continue
        with vol:
            yield vol


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200]


def _plain(v):
    """h5py attribute value -> plain Python (bytes decoded, numpy scalars unwrapped)."""
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v
