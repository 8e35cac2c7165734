"""Helpers shared by the converters: input reading (BART ``.cfl``, MATLAB ``.mat``), seeded random
streams, Fourier resampling, coil-map normalisation, complex noise, whole-group split assignment and
fastMRI-layout output with extra datasets.

Conventions: images ``(..., H, W)`` complex, k-space by :func:`ambient_mri.fft.fft2c` (centred,
orthonormal), coil axis ``-3``. Noise level ``noise`` is relative: ``sigma = noise * max|x|`` of the
coil-combined slice, complex white Gaussian ``n`` with ``E|n|^2 = sigma^2`` in every coil (identical in
image and k-space because the FFT is orthonormal).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ambient_mri.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
NOISE_DEFINITION = ("complex white Gaussian per coil and pixel, E|n|^2 = sigma^2 (image and k-space alike),"
                    " sigma = noise_level * max|x| of the coil-combined slice x (sum_c |S_c|^2 = 1)")


# -- inputs -----------------------------------------------------------------------------------------

def resolve_input(path: str | os.PathLike, default_name: str) -> Path:
    """``path`` itself if it is a file, else ``path / default_name`` (a data folder was given)."""
    p = Path(path)
    if p.is_dir():
        p = p / default_name
    if not p.is_file():
        raise DataError("no such file" if not p.exists() else "not a regular file", p)
    return p


def read_cfl(base: str | os.PathLike) -> np.ndarray:
    """A BART ``base.cfl``/``base.hdr`` pair as a complex64 array with BART's dims (column-major data).

    ``base`` may end in ``.cfl`` or ``.hdr``. The ``.hdr`` line after ``# Dimensions`` holds the dims.
    """
    base = Path(base)
    if base.suffix in (".cfl", ".hdr"):
        base = base.with_suffix("")
    hdr, cfl = base.with_suffix(".hdr"), base.with_suffix(".cfl")
    for p in (hdr, cfl):
        if not p.is_file():
            raise DataError("no such file", p)
    lines = hdr.read_text(errors="replace").splitlines()
    try:
        i = next(i for i, line in enumerate(lines) if line.strip().lower().startswith("# dim"))
        dims = [int(d) for d in lines[i + 1].split()]
    except (StopIteration, IndexError, ValueError):
        raise DataError("no '# Dimensions' line followed by integers", hdr) from None
    if not dims or min(dims) < 1:
        raise DataError(f"bad dimensions {dims}", hdr)
    n = math.prod(dims)
    size = cfl.stat().st_size
    if size != 8 * n:
        raise DataError(f"holds {size} bytes, but the header dims {dims} need {8 * n}", cfl)
    data = np.fromfile(cfl, dtype=np.complex64).reshape(dims, order="F")
    check_finite(data, "data", cfl)
    return data


def load_mat(path: str | os.PathLike, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Arrays ``keys`` of a MATLAB file (v5 via scipy; v7.3/HDF5 via h5py, transposed to MATLAB order)."""
    import scipy.io

    path = Path(path)
    try:
        mat = scipy.io.loadmat(path, variable_names=list(keys))
    except NotImplementedError:  # v7.3 = HDF5
        mat = _load_mat73(path, keys)
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"cannot read as a MATLAB file ({' '.join(str(e).split())[:200]})", path) from None
    missing = [k for k in keys if k not in mat]
    if missing:
        have = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"missing key(s) {', '.join(missing)} (has: {', '.join(have) or 'none'})", path)
    return {k: np.asarray(mat[k]) for k in keys}


def _load_mat73(path: Path, keys) -> dict:
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        for k in keys:
            if k in f:
                a = f[k][()]
                if a.dtype.names and {"real", "imag"} <= set(a.dtype.names):
                    a = a["real"] + 1j * a["imag"]
                out[k] = np.asarray(a).T
    return out


def check_finite(a: np.ndarray, name: str, path) -> None:
    """:class:`DataError` if ``a`` holds NaN or Inf."""
    if not np.isfinite(a).all():
        raise DataError(f"'{name}' holds NaN or Inf", path)


# -- randomness -------------------------------------------------------------------------------------

def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """An independent, reproducible stream for ``(seed, *keys)`` (numpy ``SeedSequence`` spawn key), so
    that e.g. slice ``i``'s noise does not depend on which other slices are generated."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in keys)))


# -- resampling, maps, noise ------------------------------------------------------------------------

def fourier_resample(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resample images ``(..., H, W)`` to ``shape`` with the same field of view by cropping (or zero-padding)
    centred k-space: ``x' = sqrt(h w / (H W)) ifft2c(crop(fft2c(x)))``; the factor keeps intensities
    (a constant image stays the same constant). This is what a ``shape`` acquisition of the same FOV sees
    (band-limited, Gibbs ringing at sharp edges); smooth phase stays smooth."""
    from ambient_mri.fft import center_crop, center_pad, fft2c, ifft2c

    h, w = shape
    H, W = x.shape[-2:]
    k = fft2c(np.asarray(x))
    k = center_crop(k, (min(h, H), min(w, W)))
    k = center_pad(k, (h, w)) if (h > H or w > W) else k
    return (ifft2c(k) * math.sqrt(h * w / (H * W))).astype(np.complex64)


def interp_resample(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resample images ``(..., H, W)`` to ``shape`` by ``skimage.transform.resize`` (linear, anti-aliased)
    of the real and imaginary parts."""
    from skimage.transform import resize

    out_shape = x.shape[:-2] + tuple(shape)
    re = resize(x.real.astype(np.float64), out_shape, order=1, anti_aliasing=True, preserve_range=True)
    im = resize(x.imag.astype(np.float64), out_shape, order=1, anti_aliasing=True, preserve_range=True)
    return (re + 1j * im).astype(np.complex64)


RESAMPLERS = {"fourier": fourier_resample, "interp": interp_resample}


def resample(x: np.ndarray, shape: tuple[int, int], method: str = "fourier") -> np.ndarray:
    """:func:`fourier_resample` (``"fourier"``) or :func:`interp_resample` (``"interp"``)."""
    if method not in RESAMPLERS:
        raise ConfigError(f"unknown resampling method {method!r} (choose {', '.join(RESAMPLERS)})")
    if tuple(x.shape[-2:]) == tuple(shape):
        return np.asarray(x, dtype=np.complex64)
    return RESAMPLERS[method](x, shape)


def normalize_maps(maps: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """``S_c / sqrt(sum_c |S_c|^2)`` over the coil axis ``-3`` (pixels with ``sum < eps^2`` become 0)."""
    norm = np.sqrt(np.sum(np.abs(maps) ** 2, axis=-3, keepdims=True))
    return np.where(norm > eps, maps / np.maximum(norm, eps), 0).astype(np.complex64)


def complex_noise(rng: np.random.Generator, shape, sigma) -> np.ndarray:
    """Complex white Gaussian ``n`` of ``shape`` with ``E|n|^2 = sigma^2`` (``sigma`` broadcasts)."""
    n = rng.standard_normal((2, *shape), dtype=np.float32)
    return ((n[0] + 1j * n[1]) * (np.asarray(sigma, dtype=np.float32) / np.float32(math.sqrt(2)))).astype(np.complex64)


def relative_sigma(images: np.ndarray, noise: float) -> np.ndarray:
    """Per-slice noise std ``noise * max|x_s|`` for images ``(S, H, W)`` -> ``(S,)`` float32."""
    if not noise >= 0:
        raise ConfigError(f"noise level must be >= 0 (got {noise})")
    return (noise * np.abs(images).reshape(len(images), -1).max(axis=1)).astype(np.float32)


# -- masks ------------------------------------------------------------------------------------------

def center_run(mask_1d: np.ndarray) -> int:
    """Length of the contiguous run of sampled lines that contains the centre line ``W // 2``."""
    m = np.asarray(mask_1d, dtype=bool).ravel()
    c = m.size // 2
    if not m[c]:
        return 0
    gaps = np.flatnonzero(~m)
    left = gaps[gaps < c].max(initial=-1)
    right = gaps[gaps > c].min(initial=m.size)
    return int(right - left - 1)


def center_block(mask_2d: np.ndarray) -> tuple[int, int]:
    """The largest fully sampled centred block ``(h, w)`` (centring as :func:`ambient_mri.masks.acs_region`):
    the largest square first, then each side grown while the block stays fully sampled."""
    from ambient_mri.masks import acs_region

    m = np.asarray(mask_2d, dtype=bool)
    H, W = m.shape

    def full(h, w):
        return bool(m[acs_region((H, W), (h, w))].all())

    n = 0
    while n < min(H, W) and full(n + 1, n + 1):
        n += 1
    h, w = n, n
    while h < H and full(h + 1, w):
        h += 1
    while w < W and full(h, w + 1):
        w += 1
    return h, w


# -- splits -----------------------------------------------------------------------------------------

def split_counts(n: int, fractions=None, counts=None) -> dict[str, int]:
    """How many of ``n`` groups go to train/val/test.

    ``counts`` (three ints summing to ``n``) is taken as is. ``fractions`` (three non-negative numbers,
    normalised) are rounded by largest remainder (ties to test, then val, then train); a split with a
    positive fraction that would get none takes one group from the largest split.
    """
    if counts is not None:
        counts = [int(c) for c in counts]
        if len(counts) != 3 or min(counts) < 0 or sum(counts) != n:
            raise ConfigError(f"split counts {counts} must be three non-negative numbers summing to {n} groups")
        return dict(zip(SPLITS, counts))
    fr = np.asarray(fractions if fractions is not None else (0.8, 0.1, 0.1), dtype=float)
    if fr.shape != (3,) or not np.isfinite(fr).all() or (fr < 0).any() or fr.sum() <= 0:
        raise ConfigError(f"split fractions {fr.tolist()} must be three non-negative numbers, not all zero")
    want = fr / fr.sum() * n
    c = np.floor(want).astype(int)
    order = sorted(range(3), key=lambda i: (-(want[i] - c[i]), -i))  # largest remainder, ties: test first
    for i in order[: n - c.sum()]:
        c[i] += 1
    for i in np.flatnonzero((fr > 0) & (c == 0)):
        j = int(np.argmax(c))
        if c[j] > 1:
            c[j] -= 1
            c[i] += 1
    if ((fr > 0) & (c == 0)).any():
        raise ConfigError(f"{n} group(s) cannot fill every split with a positive fraction {fr.tolist()}")
    return dict(zip(SPLITS, c.tolist()))


def assign_splits(groups, *, fractions=None, counts=None, seed: int = 0) -> list[str]:
    """Split name for each item of ``groups`` (e.g. one group id per volume): whole groups go to one split.

    The distinct groups are shuffled with ``seed`` and dealt out by :func:`split_counts`, so the result is a
    pure function of ``(groups, fractions/counts, seed)`` and no group ever lands in two splits.
    """
    groups = list(groups)
    uniq = list(dict.fromkeys(groups))
    c = split_counts(len(uniq), fractions, counts)
    order = rng_for(seed, 0x5917).permutation(len(uniq))
    names = np.repeat(SPLITS, [c[s] for s in SPLITS])
    where = {uniq[g]: str(names[k]) for k, g in enumerate(order)}
    return [where[g] for g in groups]


# -- outputs ----------------------------------------------------------------------------------------

def prepare_split_dirs(out_dir: str | os.PathLike, planned: dict[str, list[str]], *, overwrite: bool = False) -> None:
    """Make ``out_dir/<split>/`` and make sure no ``.h5`` file from another run would sit beside the
    planned ones (a stale file could put a slice into two splits): without ``overwrite`` such files are
    an error, with it they are deleted. ``planned``: split -> file names this run writes."""
    out_dir = Path(out_dir)
    stale = []
    for split in SPLITS:
        d = out_dir / split
        if d.is_dir():
            keep = set(planned.get(split, ()))
            stale += [p for p in d.glob("*.h5") if p.name not in keep and not p.name.startswith(".")]
    if stale and not overwrite:
        raise ConfigError(f"{len(stale)} .h5 file(s) from another run are in the output folder (e.g. "
                          f"{stale[0]}); use an empty folder or --overwrite", out_dir)
    for p in stale:
        p.unlink()
    for split in SPLITS:
        if planned.get(split):
            (out_dir / split).mkdir(parents=True, exist_ok=True)


def write_fastmri(path: str | os.PathLike, kspace: np.ndarray, *, datasets: dict | None = None,
                  patient_id: str | None = None, **kwargs) -> Path:
    """:func:`ambient_mri.fastmri_io.write_volume`, plus extra named ``datasets`` (``name -> array`` or
    ``name -> (array, attrs)``) in the same file; the whole file appears atomically."""
    import h5py

    from ambient_mri.fastmri_io import write_volume
    from ambient_mri.fsutil import atomic_path

    path = Path(path)
    if not datasets:
        return write_volume(path, kspace, patient_id=patient_id or path.stem, **kwargs)
    with atomic_path(path, ".h5.tmp") as tmp:
        write_volume(tmp, kspace, patient_id=patient_id or path.stem, **kwargs)
        with h5py.File(tmp, "a") as f:
            for name, value in datasets.items():
                arr, attrs = value if isinstance(value, tuple) else (value, {})
                ds = f.create_dataset(name, data=np.asarray(arr))
                for k, v in attrs.items():
                    ds.attrs[k] = v
    return path


def parse_range(text: str | None, n: int) -> range:
    """``"a:b"`` (Python slice, either end optional) or ``"a"`` -> a ``range`` within ``[0, n)``."""
    if text is None or str(text).strip() in ("", ":"):
        return range(n)
    parts = str(text).split(":")
    try:
        if len(parts) == 1:
            i = int(parts[0])
            r = range(i, i + 1)
        elif len(parts) == 2:
            r = range(*slice(int(parts[0]) if parts[0] else None, int(parts[1]) if parts[1] else None).indices(n))
        else:
            raise ValueError
    except ValueError:
        raise ConfigError(f"slice range {text!r} is not 'start:stop'") from None
    if len(r) == 0 or r.start < 0 or r.stop > n:
        raise ConfigError(f"slice range {text!r} selects nothing within 0..{n - 1}")
    return r
