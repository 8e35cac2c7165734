"""Built-in demo data: multi-coil brain MR volumes simulated from the MNI152 2009a template that ships
inside nilearn's wheel (T1 image and grey/white-matter probability maps; nothing is downloaded and
nothing from ``../shared`` is read).

One volume = one simulated scan: an orientation (axial, or less often coronal/sagittal), a contrast
(T1 from the template's own intensities; T2, PD or FLAIR from tissue maps with random intensities), a
pose (in-plane rotation, scale, shift), skull and scalp shells of random thickness, a smooth bias field,
and ``slices_per_volume`` slices at template levels drawn from the volume's split. Each slice gets a
smooth random phase, is rendered at 2x (or more) the target matrix and Fourier-cropped to it (a
band-limited, same-FOV acquisition), multiplied by normalised birdcage coil maps (``sigpy.mri.birdcage_maps``,
random radius, rotation and offset per volume, ``sum_c |S_c|^2 = 1``) and gets complex white noise
``sigma = noise * max|x|``:

    kspace[s, c] = fft2c(S_c * x_s + n_{s,c})

Splits use disjoint anatomy: along each orientation's axis the template levels (1 mm) are cut into
blocks of ``BLOCK_MM`` dealt out by the pattern ``PATTERN`` (train, train, val, train, train, test, ...),
and training levels closer than ``GUARD_MM`` to a val/test level are dropped, so a val/test slice is
always at least ``GUARD_MM`` from every training slice (sagittal levels are ``|x|``: the template is
left-right symmetric). Everything is a pure function of ``seed`` and the options; volume ``i`` of a
split is the same whatever the number of other volumes.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from ambient_mri.errors import ConfigError, DataError

from .common import (NOISE_DEFINITION, SPLITS, complex_noise, normalize_maps, prepare_split_dirs,
                     relative_sigma, rng_for, write_fastmri)

TEMPLATE_FILES = {k: f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
ORIENTATION_WEIGHTS = {"axial": 4.0, "coronal": 1.0, "sagittal": 1.0}
ORIENTATION_CODE = {"axial": "AX", "coronal": "COR", "sagittal": "SAG"}
AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}  # template axis (x, y, z) normal to the slice
FOV_MM = 256.0
BLOCK_MM = 8
GUARD_MM = 4
PATTERN = ("train", "train", "val", "train", "train", "test")
MIN_AREA = 0.3  # levels whose brain cross-section is at least this fraction of the largest one
FAR_MM = 40.0
# nominal tissue intensities (before a random x0.85-1.15 per volume); T1 uses the template image itself
CONTRASTS = {
    "T1": {"brain": 1.0, "csf_outer": 0.12, "skull": 0.04, "scalp": 0.85},
    "T2": {"gm": 0.55, "wm": 0.38, "csf": 1.0, "csf_outer": 0.95, "skull": 0.04, "scalp": 0.55},
    "PD": {"gm": 0.85, "wm": 0.68, "csf": 0.95, "csf_outer": 0.9, "skull": 0.05, "scalp": 0.8},
    "FLAIR": {"gm": 0.65, "wm": 0.45, "csf": 0.06, "csf_outer": 0.08, "skull": 0.03, "scalp": 0.5},
}
FORMAT = "ambient_mri.data_prep.demo/1"


# -- template -----------------------------------------------------------------------------------------

def template_dir() -> Path:
    """nilearn's bundled data folder (``nilearn/datasets/data``), located through the installed package."""
    import importlib.resources

    try:
        d = importlib.resources.files("nilearn") / "datasets" / "data"
    except ModuleNotFoundError:
        raise DataError("nilearn is not installed (pip install nilearn): the demo needs its MNI template") from None
    d = Path(os.fspath(d))
    missing = [n for n in TEMPLATE_FILES.values() if not (d / n).is_file()]
    if missing:
        raise DataError(f"nilearn's package data lacks {', '.join(missing)}", d)
    return d


@dataclass
class Template:
    """The template prepared for rendering: ``vol`` ``(5, X, Y, Z)`` float32 channels [T1, GM, WM, CSF,
    brain mask] on the 1 mm grid cropped to the brain (voxel ``crop_lo`` of the file is ``vol[:, 0, 0, 0]``),
    ``far`` ``(X', Y', Z')`` = ``max(0, FAR_MM - d)`` with ``d`` the distance (mm) outside the brain on a
    3 mm grid of the whole file, ``affine`` (file voxel -> MNI mm), the head centre (mm) and the usable
    levels (mm) per orientation."""

    vol: np.ndarray
    far: np.ndarray
    crop_lo: np.ndarray
    affine: np.ndarray
    centre_mm: np.ndarray
    levels: dict = field(default_factory=dict)
    _stacks: dict = field(default_factory=dict, repr=False)

    def stack(self, normal: int):
        """Torch ``(N, 5, A1, A2)`` copy of ``vol`` with the ``normal`` axis first (contiguous planes), cached."""
        import torch

        if normal not in self._stacks:
            self._stacks[normal] = torch.from_numpy(np.ascontiguousarray(np.moveaxis(self.vol, normal + 1, 0)))
        return self._stacks[normal]


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """Read, derive and cache the template (about a second, once per process)."""
    import nibabel as nib
    from scipy import ndimage

    d = template_dir()
    imgs = {k: nib.load(str(d / n)) for k, n in TEMPLATE_FILES.items()}
    affine = imgs["t1"].affine
    if not np.allclose(np.abs(np.diag(affine)[:3]), 1) or not np.allclose(affine[:3, :3], np.diag(np.diag(affine)[:3])):
        raise DataError("expected a 1 mm axis-aligned template", d / TEMPLATE_FILES["t1"])
    t1, gm, wm = (np.asarray(imgs[k].dataobj, dtype=np.float32) / 255.0 for k in ("t1", "gm", "wm"))
    brain = (t1 > 8 / 255).astype(np.float32)
    csf = np.clip(brain - gm - wm, 0, 1)
    idx = np.argwhere(brain > 0)
    lo, hi = idx.min(0), idx.max(0)
    c0, c1 = np.maximum(lo - 2, 0), np.minimum(hi + 3, brain.shape)
    crop = tuple(slice(a, b) for a, b in zip(c0, c1))
    vol = np.stack([t1[crop], gm[crop], wm[crop], csf[crop], brain[crop]])
    # distance outside the brain on a 3 mm grid (block maximum of the mask)
    X, Y, Z = brain.shape
    pad = [(0, (-n) % 3) for n in brain.shape]
    b3 = np.pad(brain > 0, pad).reshape(-1, 3, (Y + pad[1][1]) // 3, 3, (Z + pad[2][1]) // 3, 3).any(axis=(1, 3, 5))
    dist = ndimage.distance_transform_edt(~b3) * 3.0
    far = np.maximum(0, FAR_MM - dist).astype(np.float32)
    centre_mm = (affine @ np.r_[(lo + hi) / 2.0, 1.0])[:3]
    centre_mm[0] = 0.0  # symmetric template: the midline
    levels = {}
    for name, ax in AXIS.items():
        area = brain.sum(axis=tuple(a for a in range(3) if a != ax))
        vox = np.flatnonzero(area >= MIN_AREA * area.max())
        mm = affine[ax, ax] * vox + affine[ax, 3]
        levels[name] = np.unique(np.abs(mm)) if name == "sagittal" else mm
    return Template(vol=vol, far=far, crop_lo=c0, affine=affine, centre_mm=centre_mm, levels=levels)


def split_levels(levels_mm, *, block_mm: int = BLOCK_MM, guard_mm: int = GUARD_MM, pattern=PATTERN) -> dict:
    """``{split: sorted levels}``: block ``floor((level - min) / block_mm)`` goes to ``pattern[block %
    len(pattern)]``; then levels closer than ``guard_mm`` to a level of another split are dropped from the
    split that comes first in ``pattern`` order of plenty (train), so that distinct splits are always at
    least ``guard_mm`` apart."""
    lv = np.unique(np.asarray(levels_mm, dtype=float))
    block = np.floor((lv - lv.min()) / block_mm).astype(int)
    names = np.asarray([pattern[b % len(pattern)] for b in block])
    out = {s: lv[names == s] for s in SPLITS}
    held = np.concatenate([out["val"], out["test"]])
    if held.size:
        near = np.abs(out["train"][:, None] - held[None, :]).min(axis=1) < guard_mm
        out["train"] = out["train"][~near]
    if out["val"].size and out["test"].size and np.abs(out["val"][:, None] - out["test"][None]).min() < guard_mm:
        raise ConfigError(f"val and test levels closer than {guard_mm} mm: use a larger block")
    return out


# -- rendering ----------------------------------------------------------------------------------------

def _poly2(u, v, coef):
    """``sum_k coef[k] * [u, v, u^2, u v, v^2]_k`` (normalised coordinates)."""
    return coef[0] * u + coef[1] * v + coef[2] * u * u + coef[3] * u * v + coef[4] * v * v


def _smooth(rng, u, v, amplitude):
    """A random quadratic field scaled to ``max |field| = amplitude`` over the grid."""
    f = _poly2(u, v, rng.standard_normal(5))
    return amplitude * f / max(float(np.abs(f).max()), 1e-6)


def _sig(t):
    return 1.0 / (1.0 + np.exp(-np.clip(t, -30, 30, dtype=np.float32)))


def coil_maps(rng: np.random.Generator, coils: int, size: int) -> tuple[np.ndarray, dict]:
    """Birdcage maps ``(coils, size, size)`` (``sigpy.mri.birdcage_maps``) with a random radius, rotation
    and offset, normalised to ``sum_c |S_c|^2 = 1``; also returns the parameters."""
    import sigpy.mri
    from scipy import ndimage

    pad = max(2, size // 4)
    P = size + 2 * pad
    # coil ring radius in half-FOVs; >= 1.55 keeps every coil outside the (offset) field of view
    radius = float(rng.uniform(1.55, 1.8))
    angle = float(rng.uniform(0, 360))
    off = rng.integers(-(size // 32), size // 32 + 1, size=2)
    big = sigpy.mri.birdcage_maps((coils, P, P), r=radius * size / P).astype(np.complex64)
    big = (ndimage.rotate(big.real, angle, axes=(1, 2), reshape=False, order=1, mode="nearest")
           + 1j * ndimage.rotate(big.imag, angle, axes=(1, 2), reshape=False, order=1, mode="nearest"))
    y0, x0 = pad + int(off[0]), pad + int(off[1])
    maps = normalize_maps(big[:, y0 : y0 + size, x0 : x0 + size])
    return maps, {"coil_radius": radius, "coil_rotation_deg": angle, "coil_offset_px": off.tolist()}


def _sample_planes(T: Template, normal: int, vox) -> np.ndarray:
    """Bilinear samples of the template channels and of the outside distance ``d`` (mm) at voxel
    coordinates ``vox`` (3 arrays ``(S, n, n)``; the normal coordinate is one integer level per slice):
    each slice's template plane is taken exactly and resampled in 2-D. Returns ``(6, S, n, n)``
    = [T1, GM, WM, CSF, brain, d]."""
    import torch
    import torch.nn.functional as F

    a1, a2 = (a for a in range(3) if a != normal)
    level = vox[normal][:, 0, 0]
    k = np.rint(level).astype(int)
    if not np.allclose(level, k, atol=1e-6):
        raise ValueError("template levels must fall on voxel centres")
    lo = T.crop_lo

    def grid(coords, shape):
        g = [2.0 * coords[i] / (shape[i] - 1) - 1.0 for i in range(2)]
        return torch.from_numpy(np.stack([g[1], g[0]], axis=-1).astype(np.float32))  # (x -> a2, y -> a1)

    stack = T.stack(normal)  # (N, 5, A1, A2), cropped
    kc = k - lo[normal]
    inside = (kc >= 0) & (kc < stack.shape[0])
    planes = stack[torch.from_numpy(np.clip(kc, 0, stack.shape[0] - 1))]
    planes = planes * torch.from_numpy(inside.astype(np.float32))[:, None, None, None]
    out = F.grid_sample(planes, grid((vox[a1] - lo[a1], vox[a2] - lo[a2]), planes.shape[2:]), mode="bilinear",
                        padding_mode="zeros", align_corners=True)
    far = np.moveaxis(T.far, normal, 0)  # 3 mm grid, block b centred on voxel 3 b + 1
    f = np.clip((k - 1) / 3.0, 0, far.shape[0] - 1)
    i0 = np.minimum(np.floor(f).astype(int), far.shape[0] - 2)
    t = (f - i0)[:, None, None]
    fp = torch.from_numpy(((1 - t) * far[i0] + t * far[i0 + 1]).astype(np.float32))[:, None]  # (S, 1, A1', A2')
    fo = F.grid_sample(fp, grid(((vox[a1] - 1) / 3.0, (vox[a2] - 1) / 3.0), fp.shape[2:]), mode="bilinear",
                       padding_mode="zeros", align_corners=True)
    return np.concatenate([out.numpy(), FAR_MM - fo.numpy()], axis=1).transpose(1, 0, 2, 3)


@dataclass
class DemoVolume:
    """One simulated volume: ``kspace`` ``(S, C, H, W)`` complex64, the clean complex ``image`` ``(S, H, W)``,
    the true ``maps`` ``(C, H, W)``, per-slice noise ``sigma`` ``(S,)`` and ``meta`` (orientation,
    contrast, ``levels_mm``, pose, coil parameters...)."""

    kspace: np.ndarray
    image: np.ndarray
    maps: np.ndarray
    sigma: np.ndarray
    meta: dict


def _check_options(size, coils, slices_per_volume, noise, orientations):
    if not 16 <= int(size) <= 512:
        raise ConfigError(f"size must be 16..512 (got {size})")
    if not 1 <= int(coils) <= 64:
        raise ConfigError(f"coils must be 1..64 (got {coils})")
    if int(slices_per_volume) < 1:
        raise ConfigError(f"slices per volume must be >= 1 (got {slices_per_volume})")
    if not noise >= 0:
        raise ConfigError(f"noise level must be >= 0 (got {noise})")
    bad = [o for o in orientations if o not in ORIENTATION_WEIGHTS]
    if bad or not orientations:
        raise ConfigError(f"orientations must be among {', '.join(ORIENTATION_WEIGHTS)} (got {list(orientations)})")


def demo_volume(split: str, index: int, *, slices_per_volume: int = 10, size: int = 64, coils: int = 8,
                noise: float = 0.005, seed: int = 0, orientations=tuple(ORIENTATION_WEIGHTS)) -> DemoVolume:
    """Simulate volume ``index`` of ``split`` (a pure function of the arguments; see the module doc)."""
    from ambient_mri.fft import center_crop, fft2c, ifft2c

    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)} (got {split!r})")
    _check_options(size, coils, slices_per_volume, noise, orientations)
    T = load_template()
    sid = SPLITS.index(split)
    rng = rng_for(seed, sid, index)
    names = list(orientations)
    w = np.asarray([ORIENTATION_WEIGHTS[o] for o in names])
    ori = str(names[rng.choice(len(names), p=w / w.sum())])
    allowed = split_levels(T.levels[ori])[split]
    if allowed.size == 0:
        raise ConfigError(f"no {ori} levels for split {split}")
    S = int(slices_per_volume)
    levels = np.sort(rng.choice(allowed, S, replace=allowed.size < S))
    if ori == "sagittal":
        levels = np.sort(levels * rng.choice([-1.0, 1.0], S))
    contrast = str(rng.choice(list(CONTRASTS)))
    tissue = {k: float(v * rng.uniform(0.85, 1.15)) for k, v in CONTRASTS[contrast].items()}
    gamma = float(rng.uniform(0.8, 1.25))
    pose = {"rotation_deg": float(rng.uniform(-10, 10)), "scale": float(rng.uniform(0.8, 0.95)),
            "aspect": float(rng.uniform(0.96, 1.04)), "shift_mm": rng.uniform(-6, 6, 2).tolist()}
    shells = np.cumsum([rng.uniform(1.5, 3.0), rng.uniform(4.0, 7.0), rng.uniform(4.0, 8.0)])
    bias_coef = rng.standard_normal(5)
    bias_amp = float(rng.uniform(0.05, 0.2))
    maps, coil_meta = coil_maps(rng, coils, size)

    # fine grid (oversampled), centred like fft2c: pixel n // 2 is the centre
    os_ = max(2, math.ceil(FOV_MM / size / 2.0))
    nf = size * os_
    px = FOV_MM / nf
    c = (np.arange(nf) - nf // 2) * px
    v, u = np.meshgrid(c, c, indexing="ij")  # v: rows (down), u: columns (right), mm
    un, vn = u / (FOV_MM / 2), v / (FOV_MM / 2)
    rngs = [rng_for(seed, sid, index, 1 + s) for s in range(S)]
    rot = np.deg2rad(pose["rotation_deg"] + np.asarray([r.uniform(-1, 1) for r in rngs]))
    jit = np.asarray([r.uniform(-1, 1, 2) for r in rngs]) + np.asarray(pose["shift_mm"])
    sx, sy = pose["scale"] * pose["aspect"], pose["scale"] / pose["aspect"]
    cr, sr = np.cos(rot)[:, None, None], np.sin(rot)[:, None, None]
    pu = (cr * u - sr * v) / sx + jit[:, 0, None, None]
    pv = (sr * u + cr * v) / sy + jit[:, 1, None, None]
    lev = np.broadcast_to(levels[:, None, None], pu.shape)
    cx, cy, cz = T.centre_mm
    world = {"axial": (cx + pu, cy - pv, lev), "coronal": (cx + pu, lev, cz - pv),
             "sagittal": (lev, cy - pu, cz - pv)}[ori]
    inv = np.linalg.inv(T.affine)
    vox = [inv[a, 0] * world[0] + inv[a, 1] * world[1] + inv[a, 2] * world[2] + inv[a, 3] for a in range(3)]

    t1, gm, wm, csf, brain, dist = _sample_planes(T, AXIS[ori], vox)
    outside = np.clip(1.0 - brain, 0, 1)
    ramp = 0.7
    csf_o = outside * _sig((shells[0] - dist) / ramp)
    skull = outside * _sig((dist - shells[0]) / ramp) * _sig((shells[1] - dist) / ramp)
    scalp = outside * _sig((dist - shells[1]) / ramp) * _sig((shells[2] - dist) / ramp)
    if contrast == "T1":
        core = tissue["brain"] * np.clip(t1, 0, None) ** gamma
    else:
        core = tissue["gm"] * gm + tissue["wm"] * wm + tissue["csf"] * csf
    mag = core + tissue["csf_outer"] * csf_o + tissue["skull"] * skull + tissue["scalp"] * scalp
    mag *= np.asarray([r.uniform(0.97, 1.03) for r in rngs])[:, None, None]
    mag *= 1.0 + bias_amp * _poly2(un, vn, bias_coef) / max(float(np.abs(_poly2(un, vn, bias_coef)).max()), 1e-6)
    phase = np.stack([r.uniform(-np.pi, np.pi) + _smooth(r, un, vn, r.uniform(0.3, 2.0)) for r in rngs])
    fine = (mag * np.exp(1j * phase)).astype(np.complex64)
    image = (ifft2c(center_crop(fft2c(fine), (size, size))) / os_).astype(np.complex64)  # same FOV, N x N
    sigma = relative_sigma(image, noise)
    coil = image[:, None] * maps[None]
    if noise > 0:
        for s, r in enumerate(rngs):
            coil[s] += complex_noise(r, coil.shape[1:], sigma[s])
    meta = {"split": split, "index": int(index), "orientation": ori, "contrast": contrast,
            "levels_mm": levels.tolist(), **pose, "gamma": gamma if contrast == "T1" else None,
            "tissue": tissue, "shells_mm": shells.tolist(), "bias_amplitude": bias_amp, **coil_meta,
            "oversampling": os_, "fov_mm": FOV_MM}
    return DemoVolume(kspace=fft2c(coil).astype(np.complex64), image=image, maps=maps, sigma=sigma, meta=meta)


def volume_name(split: str, index: int) -> str:
    return f"demo_{split}_{index:03d}.h5"


def generate_demo(out_dir: str | os.PathLike, *, n_train_volumes: int = 24, n_val_volumes: int = 3,
                  n_test_volumes: int = 3, slices_per_volume: int = 10, size: int = 64, coils: int = 8,
                  noise: float = 0.005, seed: int = 0, orientations=tuple(ORIENTATION_WEIGHTS),
                  overwrite: bool = False, progress: bool = False) -> dict[str, list[Path]]:
    """Write the demo dataset: ``out_dir/{train,val,test}/demo_<split>_<i>.h5`` (fully sampled multi-coil
    fastMRI volumes with ``reconstruction_rss`` and the true coil maps as ``sim_coil_maps``) plus
    ``out_dir/demo_manifest.json``. Returns ``{split: [paths]}`` (splits with no volumes map to ``[]``).

    ``.h5`` files of another run in the split folders are an error (``overwrite=True`` deletes them).
    """
    from tqdm import tqdm

    from ambient_mri import __version__
    from ambient_mri.fsutil import write_json

    counts = {"train": int(n_train_volumes), "val": int(n_val_volumes), "test": int(n_test_volumes)}
    if min(counts.values()) < 0 or sum(counts.values()) == 0:
        raise ConfigError(f"volume counts must be >= 0 and not all zero (got {counts})")
    _check_options(size, coils, slices_per_volume, noise, orientations)
    out_dir = Path(out_dir)
    planned = {s: [volume_name(s, i) for i in range(counts[s])] for s in SPLITS}
    prepare_split_dirs(out_dir, planned, overwrite=overwrite)
    load_template()
    options = {"n_train_volumes": counts["train"], "n_val_volumes": counts["val"], "n_test_volumes": counts["test"],
               "slices_per_volume": int(slices_per_volume), "size": int(size), "coils": int(coils),
               "noise_level": float(noise), "seed": int(seed), "orientations": list(orientations)}
    jobs = [(s, i) for s in SPLITS for i in range(counts[s])]
    out, records = {s: [] for s in SPLITS}, []
    for split, i in tqdm(jobs, desc="demo", disable=not progress):
        vol = demo_volume(split, i, slices_per_volume=slices_per_volume, size=size, coils=coils, noise=noise,
                          seed=seed, orientations=orientations)
        m = vol.meta
        path = write_fastmri(
            out_dir / split / volume_name(split, i), vol.kspace,
            acquisition=f"{ORIENTATION_CODE[m['orientation']]}{m['contrast']}", patient_id=f"demo_{split}_{i:03d}",
            datasets={"sim_coil_maps": (vol.maps, {"description": "true coil maps used to simulate this volume"})},
            extra_attrs={"source": "MNI152 2009a template (nilearn package data), simulated", "data_prep": FORMAT,
                         "split": split, "orientation": m["orientation"], "contrast": m["contrast"],
                         "levels_mm": np.asarray(m["levels_mm"]), "noise_level": float(noise),
                         "noise_sigma": vol.sigma, "noise_definition": NOISE_DEFINITION, "seed": int(seed),
                         "fov_mm": FOV_MM, "ambient_mri_version": __version__})
        out[split].append(path)
        records.append({"file": f"{split}/{path.name}", **m, "noise_sigma": vol.sigma.tolist()})
    T = load_template()
    write_json(out_dir / "demo_manifest.json", {
        "format": FORMAT, "ambient_mri_version": __version__, "options": options,
        "level_rule": {"block_mm": BLOCK_MM, "guard_mm": GUARD_MM, "pattern": list(PATTERN),
                       "sagittal_levels": "|x| (left-right symmetric template)"},
        "levels_mm": {o: {s: lv.tolist() for s, lv in split_levels(T.levels[o]).items()} for o in orientations},
        "volumes": records})
    return out


def existing_demo(out_dir: str | os.PathLike, *, n_train_volumes: int = 24, n_val_volumes: int = 3,
                  n_test_volumes: int = 3, slices_per_volume: int = 10, size: int = 64, coils: int = 8,
                  noise: float = 0.005, seed: int = 0, orientations=tuple(ORIENTATION_WEIGHTS)):
    """``{split: [paths]}`` if ``out_dir`` already holds a finished :func:`generate_demo` run with exactly
    these options (its ``demo_manifest.json``, written last, and every file), else ``None``: lets a caller
    skip regeneration."""
    import json

    out_dir = Path(out_dir)
    try:
        manifest = json.loads((out_dir / "demo_manifest.json").read_text())
    except (OSError, ValueError):
        return None
    want = {"n_train_volumes": int(n_train_volumes), "n_val_volumes": int(n_val_volumes),
            "n_test_volumes": int(n_test_volumes), "slices_per_volume": int(slices_per_volume), "size": int(size),
            "coils": int(coils), "noise_level": float(noise), "seed": int(seed), "orientations": list(orientations)}
    if manifest.get("format") != FORMAT or manifest.get("options") != want:
        return None
    counts = {"train": want["n_train_volumes"], "val": want["n_val_volumes"], "test": want["n_test_volumes"]}
    paths = {s: [out_dir / s / volume_name(s, i) for i in range(counts[s])] for s in SPLITS}
    return paths if all(p.is_file() for ps in paths.values() for p in ps) else None


@click.command(name="demo")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--train-volumes", default=24, show_default=True, help="Number of training volumes.")
@click.option("--val-volumes", default=3, show_default=True, help="Number of validation volumes.")
@click.option("--test-volumes", default=3, show_default=True, help="Number of test volumes.")
@click.option("--slices", "slices_per_volume", default=10, show_default=True, help="Slices per volume.")
@click.option("--size", default=64, show_default=True, help="Matrix size N (N x N) over a 256 mm field of view.")
@click.option("--coils", default=8, show_default=True, help="Number of simulated birdcage coils.")
@click.option("--noise", default=0.005, show_default=True,
              help="Noise level: per-coil complex noise std sigma = NOISE x max|x| of each slice.")
@click.option("--seed", default=0, show_default=True, help="Seed: the same seed gives identical files.")
@click.option("--orientations", default="axial,coronal,sagittal", show_default=True,
              help="Comma-separated orientations to draw volumes from (axial weighted 4:1:1).")
@click.option("--overwrite", is_flag=True, help="Delete .h5 files of another run found in OUT_DIR/{train,val,test}.")
def command(out_dir, train_volumes, val_volumes, test_volumes, slices_per_volume, size, coils, noise, seed,
            orientations, overwrite):
    """Simulate multi-coil brain volumes from nilearn's MNI152 template (no download, nothing from
    ../shared) and write OUT_DIR/{train,val,test}/*.h5 in the fastMRI layout plus demo_manifest.json."""
    out = generate_demo(out_dir, n_train_volumes=train_volumes, n_val_volumes=val_volumes,
                        n_test_volumes=test_volumes, slices_per_volume=slices_per_volume, size=size, coils=coils,
                        noise=noise, seed=seed, overwrite=overwrite, progress=True,
                        orientations=tuple(o.strip() for o in orientations.split(",") if o.strip()))
    for s in SPLITS:
        click.echo(f"{s}: {len(out[s])} volumes x {slices_per_volume} slices")
    click.echo(f"wrote {Path(out_dir) / 'demo_manifest.json'}")
