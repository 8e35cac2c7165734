"""SIAT multi-coil benchmark data: the 500 complex SIAT T2 slices made 8-coil with real sensitivities.

For each slice ``x`` (original scale, resampled to ``size x size``) and the coil maps ``S`` estimated by
ESPIRiT from ``head8ch/head.mat`` (``sum_c |S_c|^2 = 1``):

    kspace_c = fft2c(S_c * x + n_c),   n_c complex white Gaussian, E|n_c|^2 = sigma^2, sigma = noise * max|x|

Slices are grouped into volumes of ``volume_size`` consecutive slices that never cross a *series*
boundary (``series = slice_index // series_length``; the SIAT file holds 25 series of 20 consecutive
slices, see ``docs/data_prep.md``), and whole series are dealt to ``train/``, ``val/``, ``test/``.
``split.json`` lists which original slice indices went where.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import numpy as np

from ambient_mri.errors import ConfigError, DataError

from .common import (NOISE_DEFINITION, SPLITS, assign_splits, check_finite, complex_noise, load_mat,
                     normalize_maps, parse_range, prepare_split_dirs, relative_sigma, resample, resolve_input,
                     rng_for, write_fastmri)

SIAT_FILE = "siat500_brain_t2_256_f16ri.npy"
SCALE_FILE = "siat500_brain_t2_256_scale.npy"
HEAD_FILE = "head8ch/head.mat"
SERIES_LENGTH = 20  # consecutive-slice correlation drops at every multiple of 20 (docs/data_prep.md)
FORMAT = "ambient_mri.data_prep.siat/1"


def load_siat(data_dir: str | os.PathLike, indices=None) -> np.ndarray:
    """SIAT slices ``indices`` (default all) at original scale: ``(S, 256, 256)`` complex64 =
    ``(real + 1j imag) * scale``. Only the requested slices are read (memory-mapped)."""
    data_dir = Path(data_dir)
    f_ri, f_scale = resolve_input(data_dir, SIAT_FILE), resolve_input(data_dir, SCALE_FILE)
    try:
        ri = np.load(f_ri, mmap_mode="r")
        scale = np.load(f_scale)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read as .npy ({' '.join(str(e).split())[:200]})", data_dir) from None
    if ri.ndim != 4 or ri.shape[-1] != 2:
        raise DataError(f"expected (slices, H, W, 2) [real, imag], got shape {ri.shape}", f_ri)
    if scale.shape != (ri.shape[0],):
        raise DataError(f"expected ({ri.shape[0]},) scales to match {f_ri.name}, got shape {scale.shape}", f_scale)
    idx = np.arange(ri.shape[0]) if indices is None else np.asarray(list(indices), dtype=int)
    if idx.size and (idx.min() < 0 or idx.max() >= ri.shape[0]):
        raise ConfigError(f"slice indices must lie in 0..{ri.shape[0] - 1}")
    block = np.asarray(ri[idx], dtype=np.float32)
    x = (block[..., 0] + 1j * block[..., 1]) * scale[idx, None, None].astype(np.float32)
    check_finite(x, "slices", f_ri)
    return x.astype(np.complex64)


def consecutive_correlation(data_dir: str | os.PathLike, step: int = 4) -> np.ndarray:
    """Normalised correlation of the magnitudes of slices ``i`` and ``i + 1`` (every ``step``-th pixel),
    ``(N - 1,)``: it drops (below about 0.45) where a new series starts, which is how ``SERIES_LENGTH``
    was found (every multiple of 20)."""
    f_ri = resolve_input(data_dir, SIAT_FILE)
    ri = np.load(f_ri, mmap_mode="r")
    m = np.abs(ri[:, ::step, ::step, 0].astype(np.float32) + 1j * ri[:, ::step, ::step, 1].astype(np.float32))
    m = m.reshape(len(m), -1)
    m -= m.mean(axis=1, keepdims=True)
    m /= np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
    return np.sum(m[1:] * m[:-1], axis=1)


def head_coil_maps(head_path: str | os.PathLike, size: int, *, coils: int = 8, calib: int = 24,
                   device=None) -> np.ndarray:
    """Coil sensitivities ``(coils, size, size)`` complex64 with ``sum_c |S_c|^2 = 1`` at every pixel.

    The fully sampled 8-coil k-space of ``head.mat`` (``fft2c`` of its coil images, coil axis first) is
    centre-cropped (or zero-padded) to ``size x size`` -- the same field of view at the target resolution
    -- optionally SVD-compressed to ``coils`` virtual coils (:func:`ambient_mri.coils.coil_compress`), and
    ESPIRiT (:func:`ambient_mri.coils.espirit_maps`, one map set, no eigenvalue crop) estimates smooth maps
    over the whole field of view from its central ``calib x calib`` block.
    """
    from ambient_mri.coils import coil_compress, espirit_maps
    from ambient_mri.fft import center_crop, center_pad, fft2c

    head_path = resolve_input(head_path, HEAD_FILE)
    data = load_mat(head_path, ("data",))["data"]
    if data.ndim != 3 or not np.iscomplexobj(data):
        raise DataError(f"'data' must be complex (H, W, coils), got {data.dtype} {data.shape}", head_path)
    check_finite(data, "data", head_path)
    k = fft2c(np.moveaxis(data, -1, 0).astype(np.complex64))
    C, H, W = k.shape
    if not 1 <= coils <= C:
        raise ConfigError(f"coils must be 1..{C} (head.mat has {C}), got {coils}")
    k = center_crop(k, (min(size, H), min(size, W)))
    if size > min(H, W):
        k = center_pad(k, (size, size))
    if coils < C:
        k, _ = coil_compress(k, coils)
    with _one_blas_thread():  # a small SVD: extra BLAS threads only contend on a busy CPU (1-14 s vs 0.5 s)
        c = min(calib, size // 2)  # kernel and threshold fixed (not the estimator defaults): same maps across versions
        maps = espirit_maps(k, c, kernel_width=max(2, min(6, c // 2)), thresh=0.02, device=device)
    maps = normalize_maps(maps)
    holes = int((np.sum(np.abs(maps) ** 2, axis=0) < 0.5).sum())
    if holes:
        raise DataError(f"ESPIRiT maps vanish at {holes} pixels at {size}x{size}", head_path)
    return maps


def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional (comes with nilearn's scikit-learn)
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def simulate_multicoil(images: np.ndarray, maps: np.ndarray, noise: float, seed: int, slice_ids) -> tuple:
    """Coil images ``S_c x_s + n_{s,c}`` ``(S, C, H, W)`` and the per-slice ``sigma`` ``(S,)``.

    Slice ``s``'s noise comes from the stream ``rng_for(seed, 1, slice_ids[s])``, so it is the same
    whatever else is converted alongside it.
    """
    sigma = relative_sigma(images, noise)
    coil = images[:, None] * maps[None]
    if noise > 0:
        for s, i in enumerate(slice_ids):
            coil[s] += complex_noise(rng_for(seed, 1, i), coil.shape[1:], sigma[s])
    return coil.astype(np.complex64), sigma


def plan_volumes(indices, volume_size: int = 10, series_length: int = SERIES_LENGTH) -> list[np.ndarray]:
    """Group slice ``indices`` into volumes of up to ``volume_size`` consecutive indices that never cross
    a series boundary (``index // series_length`` changes) or a gap in ``indices``."""
    if volume_size < 1 or series_length < 1:
        raise ConfigError("volume size and series length must be >= 1")
    idx = np.asarray(sorted(set(int(i) for i in indices)), dtype=int)
    if idx.size == 0:
        raise ConfigError("no slices selected")
    cut = np.flatnonzero((np.diff(idx) != 1) | (np.diff(idx // series_length) != 0)) + 1
    vols = []
    for run in np.split(idx, cut):
        vols += [run[i : i + volume_size] for i in range(0, len(run), volume_size)]
    return vols


def convert_siat(data_dir: str | os.PathLike, out_dir: str | os.PathLike, *, size: int = 64, coils: int = 8,
                 noise: float = 0.005, seed: int = 0, slices=None, volume_size: int = 10,
                 series_length: int = SERIES_LENGTH, fractions=(0.8, 0.1, 0.1), counts=None,
                 resample_method: str = "fourier", calib: int = 24, head: str | os.PathLike | None = None,
                 overwrite: bool = False, progress: bool = False) -> dict[str, list[Path]]:
    """Write the SIAT slices as multi-coil fastMRI volumes in ``out_dir/{train,val,test}/`` plus
    ``out_dir/split.json``; returns ``{split: [paths]}``.

    ``slices``: original indices to use (default all 500). Whole series (``index // series_length``) go
    to one split: ``counts`` (numbers of series) or ``fractions``, dealt by a ``seed``-ed shuffle
    (:func:`data_prep.common.assign_splits`). ``head``: the ``head.mat`` for the maps (default
    ``data_dir/head8ch/head.mat``). Everything is a pure function of the arguments.
    """
    from tqdm import tqdm

    from ambient_mri import __version__
    from ambient_mri.fft import fft2c
    from ambient_mri.fsutil import write_json

    if size < 8:
        raise ConfigError(f"size must be >= 8 (got {size})")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    n_total = np.load(resolve_input(data_dir, SIAT_FILE), mmap_mode="r").shape[0]
    indices = range(n_total) if slices is None else slices
    vols = plan_volumes(indices, volume_size, series_length)
    series = [int(v[0] // series_length) for v in vols]
    split_of = assign_splits(series, fractions=fractions, counts=counts, seed=seed)
    names = [f"siat_{v[0]:03d}-{v[-1]:03d}.h5" for v in vols]
    planned = {s: [n for n, sp in zip(names, split_of) if sp == s] for s in SPLITS}
    prepare_split_dirs(out_dir, planned, overwrite=overwrite)

    maps = head_coil_maps(head or data_dir, size, coils=coils, calib=calib)
    options = {"size": size, "coils": coils, "noise_level": noise, "seed": seed, "volume_size": volume_size,
               "series_length": series_length, "fractions": None if counts is not None else list(fractions),
               "counts": None if counts is None else list(counts), "resample": resample_method, "calib": calib}
    common_attrs = {
        "source": SIAT_FILE, "noise_level": float(noise), "noise_definition": NOISE_DEFINITION,
        "coil_maps": (f"ESPIRiT (sigpy, 1 set, calib {min(calib, size // 2)}) of {HEAD_FILE} k-space centre-cropped"
                      f" to {size}x{size}{'' if coils == 8 else f', compressed to {coils} virtual coils'},"
                      " normalised sum_c |S_c|^2 = 1; stored as sim_coil_maps"),
        "resample": resample_method, "seed": int(seed), "data_prep": FORMAT, "ambient_mri_version": __version__,
    }
    out = {s: [] for s in SPLITS}
    records = []
    for v, name, split, ser in tqdm(list(zip(vols, names, split_of, series)), desc="siat", disable=not progress):
        x = resample(load_siat(data_dir, v), (size, size), resample_method)
        coil, sigma = simulate_multicoil(x, maps, noise, seed, v)
        path = write_fastmri(
            out_dir / split / name, fft2c(coil), acquisition="AXT2", patient_id=f"siat_series{ser:02d}",
            datasets={"sim_coil_maps": (maps, {"description": "true coil maps used to simulate this volume"})},
            extra_attrs={**common_attrs, "split": split, "series": ser, "source_slices": np.asarray(v, np.int64),
                         "noise_sigma": sigma})
        out[split].append(path)
        records.append({"file": f"{split}/{name}", "split": split, "series": ser, "slices": v.tolist(),
                        "noise_sigma": sigma.tolist()})
    summary = {s: {"files": [r["file"] for r in records if r["split"] == s],
                   "series": sorted({r["series"] for r in records if r["split"] == s}),
                   "slices": sorted(i for r in records if r["split"] == s for i in r["slices"])} for s in SPLITS}
    write_json(out_dir / "split.json", {
        "format": FORMAT, "source": str(data_dir / SIAT_FILE), "ambient_mri_version": __version__,
        "options": options, "rule": (f"volumes of <= {volume_size} consecutive slices within a series "
                                     f"(index // {series_length}); whole series dealt to splits by a seeded shuffle"),
        "splits": summary, "volumes": records})
    return out


def _split_option(text: str | None, kind: type):
    if text is None:
        return None
    try:
        vals = [kind(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"expected three comma-separated numbers, got {text!r}") from None
    if len(vals) != 3:
        raise ConfigError(f"expected three comma-separated numbers (train,val,test), got {text!r}")
    return vals


@click.command(name="siat")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--size", default=64, show_default=True, help="Output matrix size N (N x N); 64, 128 and 256 all work.")
@click.option("--coils", default=8, show_default=True,
              help="Number of coils (fewer than 8: SVD coil compression of head.mat before ESPIRiT).")
@click.option("--noise", default=0.005, show_default=True,
              help="Added noise level: per-coil complex noise std sigma = NOISE x max|x| of each slice.")
@click.option("--seed", default=0, show_default=True, help="Seed for the noise and the split shuffle.")
@click.option("--slices", default=None, help="Original slice range 'start:stop' to use (default all 500).")
@click.option("--volume-size", default=10, show_default=True,
              help="Slices per output volume (volumes never cross a series).")
@click.option("--series-length", default=SERIES_LENGTH, show_default=True,
              help="Consecutive slices per series; whole series go to one split.")
@click.option("--fractions", default="0.8,0.1,0.1", show_default=True,
              help="train,val,test fractions of the series.")
@click.option("--counts", default=None, help="train,val,test numbers of series (overrides --fractions).")
@click.option("--resample", "resample_method", type=click.Choice(["fourier", "interp"]), default="fourier",
              show_default=True, help="Resizing: k-space centre crop (fourier) or skimage resize of real/imag (interp).")
@click.option("--calib", default=24, show_default=True, help="ESPIRiT calibration width (capped at N/2).")
@click.option("--head", type=click.Path(exists=True, dir_okay=False), default=None,
              help="head.mat for the coil maps (default DATA_DIR/head8ch/head.mat).")
@click.option("--overwrite", is_flag=True, help="Delete .h5 files of another run found in OUT_DIR/{train,val,test}.")
def command(data_dir, out_dir, size, coils, noise, seed, slices, volume_size, series_length, fractions, counts,
            resample_method, calib, head, overwrite):
    """Make the SIAT slices in DATA_DIR (../shared/data) multi-coil and write train/val/test fastMRI
    volumes plus split.json into OUT_DIR."""
    n_total = np.load(resolve_input(data_dir, SIAT_FILE), mmap_mode="r").shape[0]
    out = convert_siat(data_dir, out_dir, size=size, coils=coils, noise=noise, seed=seed,
                       slices=parse_range(slices, n_total), volume_size=volume_size, series_length=series_length,
                       fractions=_split_option(fractions, float), counts=_split_option(counts, int),
                       resample_method=resample_method, calib=calib, head=head, overwrite=overwrite, progress=True)
    summary = json.loads((Path(out_dir) / "split.json").read_text())["splits"]
    for s in SPLITS:
        click.echo(f"{s}: {len(out[s])} volumes, {len(summary[s]['slices'])} slices")
    click.echo(f"wrote {Path(out_dir) / 'split.json'}")
