"""``ambient-mri prep``: fastMRI-layout ``.h5`` volumes -> a prepared dataset (``docs/data_format.md``).

* the options: :class:`~ambient_mri.prep_options.PrepOptions` (:mod:`ambient_mri.prep_options`);
* one slice: :func:`~ambient_mri.prep_slice.prepare_slice` (:mod:`ambient_mri.prep_slice`: prewhiten, crop,
  compress, mask, maps, norm, reference), built from :mod:`~ambient_mri.whitening`, :mod:`~ambient_mri.crop`,
  :mod:`~ambient_mri.coils`, :mod:`~ambient_mri.masks` and :func:`~ambient_mri.baselines.cg_sense`;
* one volume, here: :func:`plan_volume` checks the options against an input file, :func:`iter_prepared`
  yields its prepared slices, :func:`prepare_volume` stacks them in memory;
* the dataset writer, here: :func:`run_prep` prepares every input into ``OUTPUT`` (one folder per
  acceleration), each output claimed and written atomically (resume, concurrent runs, worker processes),
  then ``manifest.json`` (:func:`~ambient_mri.prepared.write_manifest`) and optional NIfTI volumes.

The command line is :mod:`ambient_mri.commands.prep`.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from .coils import DEFAULT_MAPS, maps_methods  # noqa: F401  (kept importable from here)
from .coils import as_mask2d, calibration_block
from .crop import crop_kspace
from .errors import AmbientMRIError, ConfigError, DataError
from .fastmri_io import FastMRIVolume, list_volumes
from .fsutil import OutputError, atomic_h5, claim, make_dir, sha256_file
from .nifti import export_nifti, nifti_done
from .prep_options import PrepOptions, mask_acs, parse_slices, resolve_calib, slice_seed
from .prep_slice import TRUE_MAPS_KEY, prepare_slice_all
from .prep_slice import prepare_slice  # noqa: F401  (kept importable from here)
from .prepared import FORMAT, PER_SLICE_KEYS, array_keys, create_datasets, stored, write_manifest
from .whitening import whitening_mode, whitening_note

FIT_WARN_RATIO = 1.5  # warn when the forward-model residual exceeds this multiple of the noise share


# ----------------------------------------------------------------------------------------------
# Per volume


@dataclass
class VolumePlan:
    """What prep will do with one input file (resolved from the file and the options, before any work)."""

    path: Path
    indices: list[int]
    whiten: bool | str
    out_shape: tuple[int, int]
    calib: int
    single_coil: bool
    undersampled: bool
    input_accel: float | None
    voxel_size_mm: tuple[float, float, float]
    warnings: list[str] = field(default_factory=list)


def plan_volume(vol, options: PrepOptions) -> VolumePlan:
    """Check ``options`` against an open :class:`~ambient_mri.fastmri_io.FastMRIVolume` and resolve the
    per-file settings. Impossible options raise :class:`ConfigError` (naming the file), unusable data
    :class:`DataError`."""
    S, C, H, W = vol.shape
    p = vol.path
    indices = parse_slices(options.slices, S)
    if not indices:
        raise DataError(f"--slices {options.slices} selects none of its {S} slices", p)
    if options.crop is not None and (options.crop[0] > H or options.crop[1] > W):
        raise ConfigError(f"--crop {options.crop[0]} {options.crop[1]} is larger than the {H}x{W} matrix", p)
    if options.coils is not None and options.coils > C:
        raise ConfigError(f"--coils {options.coils} is more than the {C} coils of the input", p)
    if options.domain == "image" and vol.is_undersampled:
        raise DataError("--domain image needs fully sampled input; this one carries its own mask", p)
    h, w = options.crop or (H, W)
    mask = None
    if vol.is_undersampled:
        mask = as_mask2d(vol.mask, H, W)
        if options.crop is not None:
            mask = crop_kspace(np.zeros((1, H, W), np.complex64), (h, w), mask)[1]
        acs = calibration_block(mask)
    elif options.domain == "kspace":
        acs = mask_acs(options, (h, w))
    else:
        acs = None
    calib = resolve_calib(options, acs, (h, w), p if mask is not None else None)
    if options.maps == "true" and not vol.single_coil:
        true_maps(vol, 0)  # a one-line ConfigError naming the file if it carries none
    whiten, whiten_note = whitening_mode(options.whiten, vol)
    hdr = vol.header
    fov, enc = hdr["encoding_fov_mm"], hdr["encoding_size"]
    dx, dy = fov[0] / enc[0], fov[1] / enc[1]
    if mask is not None and w != W:  # k-space crop along the phase encode changes the pixel size
        dy *= W / w
    return VolumePlan(path=Path(p), indices=indices, whiten=whiten, out_shape=(h, w), calib=calib,
                      single_coil=vol.single_coil, undersampled=vol.is_undersampled, input_accel=vol.acceleration,
                      voxel_size_mm=(float(dx), float(dy), float(fov[2])),
                      warnings=list(vol.warnings) + ([whiten_note] if whiten_note else []))


def true_maps(vol, i: int) -> np.ndarray:
    """The true coil maps ``(C, H, W)`` of slice ``i`` that a simulated input carries as dataset
    :data:`TRUE_MAPS_KEY` (``(C, H, W)`` for the whole volume or ``(S, C, H, W)`` per slice)."""
    f = vol._file
    ds = f.get(TRUE_MAPS_KEY) if f is not None else None
    if not isinstance(ds, h5py.Dataset):
        raise ConfigError(f"--maps true: the file carries no true coil maps (no dataset {TRUE_MAPS_KEY})", vol.path)
    S, C, H, W = vol.shape
    if ds.shape == (C, H, W):
        return np.asarray(ds[()], dtype=np.complex64)
    if ds.shape == (S, C, H, W):
        return np.asarray(ds[i], dtype=np.complex64)
    raise DataError(f"{TRUE_MAPS_KEY} has shape {ds.shape}, expected {(C, H, W)} or {(S, C, H, W)}", vol.path)


def known_noise_sigma(vol, i: int) -> float | None:
    """The input's known per-coil k-space noise std of slice ``i`` (attribute ``noise_sigma`` that the
    simulating converters write: a scalar or one value per slice, ``E|n|^2 = sigma^2``), else ``None``."""
    v = vol.attrs.get("noise_sigma")
    if v is None:
        return None
    a = np.asarray(v, dtype=np.float64).ravel()
    if a.size == 1:
        return float(a[0])
    return float(a[i]) if a.size == vol.shape[0] else None


def iter_prepared(vol, options: PrepOptions, plan: VolumePlan | None = None):
    """Yield ``(slice_index, {target: slice dict})`` for the selected slices of an open volume, one
    slice read at a time."""
    plan = plan or plan_volume(vol, options)
    name = vol.path.name
    want_true = options.maps == "true" and not plan.single_coil
    for i in plan.indices:
        seed = slice_seed(options.seed, name, i)
        yield i, prepare_slice_all(vol.slice(i), vol.mask, options, seed=seed, whiten=plan.whiten,
                                   single_coil=plan.single_coil, input_accel=plan.input_accel, path=vol.path,
                                   true_maps=true_maps(vol, i) if want_true else None,
                                   noise_sigma=known_noise_sigma(vol, i), noise_corner=vol.readout_oversampled)


def prepare_volume(volume, options: PrepOptions | None = None, *, accel: float | None = None,
                   slices: str | None = None) -> dict:
    """Prepare a whole volume in memory: ``volume`` is a path or an open ``FastMRIVolume``.

    Returns the stacked arrays of one prepared file (``kspace (S, C, h, w)``, ``mask``, ``maps``, ``norm``,
    ``mask_seed``, ``slice_index``, ``reference`` for val/test; or ``image`` for ``--domain image``) and
    ``"attrs"`` (the file attributes of ``docs/data_format.md``). ``accel`` picks one acceleration.
    """
    opts = options or PrepOptions()
    if accel is not None and opts.domain == "kspace":
        opts = replace(opts, accel=(float(accel),))
    if slices is not None:
        opts = replace(opts, slices=slices)
    opts.validate()
    ctx = FastMRIVolume(volume) if not isinstance(volume, FastMRIVolume) else contextlib.nullcontext(volume)
    with ctx as vol:
        plan = plan_volume(vol, opts)
        rows = [(i, out[opts.targets[0]]) for i, out in iter_prepared(vol, opts, plan)]
    arrays = {"slice_index": np.array([i for i, _ in rows], dtype=np.int64)}
    for key in array_keys(rows[0][1]):
        arrays[key] = np.stack([stored(key, r[key]) for _, r in rows])
    arrays["attrs"] = _file_attrs(plan, opts, opts.targets[0], [r for _, r in rows], source_sha256=None)
    return arrays


def _meta(d: dict) -> dict:
    """A slice dict without its arrays (what the file attributes need)."""
    out = {k: v for k, v in d.items() if k not in PER_SLICE_KEYS or k in ("norm", "noise_std")}
    out["has_reference"] = d.get("has_reference", "reference" in d)
    return out


def _file_attrs(plan: VolumePlan, opts: PrepOptions, target, rows: list[dict], source_sha256) -> dict:
    """The attributes of one prepared file (``docs/data_format.md``) from its plan, options and slice dicts."""
    first = _meta(rows[0])
    notes = list(plan.warnings) + sorted({w for r in rows for w in r["warnings"]})
    attrs = {
        "format": FORMAT, "split": opts.split, "domain": opts.domain, "mask_kind": first["mask_kind"],
        "accel": float(first["accel"]), "acs": np.asarray(first["acs"], dtype=np.int64),
        "calib": int(first["calib"]), "source": os.fspath(Path(plan.path).resolve()),
        "ambient_mri_version": __version__, "options": json.dumps(opts.to_json(), sort_keys=True),
        "whitened": np.array([bool(r["whitened"]) for r in rows]),
        "voxel_size_mm": np.asarray(plan.voxel_size_mm, dtype=np.float64),
        "warnings": json.dumps(notes),
        "maps_kind": first.get("maps_kind", opts.maps),
        "noise_std_source": json.dumps([r.get("noise_source", "unknown") for r in rows]),
    }
    if "forward_residual" in first:
        attrs["forward_residual"] = np.array([r["forward_residual"] for r in rows], dtype=np.float64)
        attrs["noise_residual"] = np.array([r["noise_residual"] for r in rows], dtype=np.float64)
    if source_sha256 is not None:
        attrs["source_sha256"] = source_sha256
    if opts.split != "train":
        attrs["reference_kind"] = opts.reference if first["has_reference"] else "none"
    if opts.domain == "image":
        attrs["corruption"], attrs["level"] = opts.corruption, float(opts.level)
        attrs.pop("noise_std_source")  # image-domain files carry no noise_std
    return attrs


# ----------------------------------------------------------------------------------------------
# Writing a dataset


def output_dirs(output: Path, options: PrepOptions) -> dict:
    """``{target: folder}``: ``OUTPUT`` for one acceleration (or the image domain), ``OUTPUT/R{R:g}`` each
    for several."""
    if options.domain == "kspace" and len(options.accel) > 1:
        return {R: Path(output) / f"R{R:g}" for R in options.accel}
    return {t: Path(output) for t in options.targets}


def _write_volume_unit(unit: dict) -> dict:
    """Worker: prepare one input into every pending output (each claimed, written atomically).

    Returns ``{"source", "status": done|skipped|busy|failed, "written": [...], "error"}``; never raises
    for a data problem (the error text is one line naming the file); ``"fatal": True`` marks an output that
    cannot be written (disk full, unwritable folder), which stops the run."""
    src = Path(unit["source"])
    opts = PrepOptions.from_json(unit["options"])
    outs = {float(k) if k is not None else None: Path(v) for k, v in unit["outputs"]}
    res = {"source": os.fspath(src), "written": [], "busy": [], "error": None, "status": "done"}
    if unit.get("threads"):
        torch.set_num_threads(unit["threads"])
    try:
        with contextlib.ExitStack() as stack:
            todo = {}
            for t, out in outs.items():
                if out.exists():
                    continue
                held = stack.enter_context(claim(out))
                if not held:
                    res["busy"].append(os.fspath(out))
                elif not out.exists():  # finished by another process between the check and the claim
                    todo[t] = out
            if not todo:
                res["status"] = "busy" if res["busy"] else "skipped"
                return res
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # reported by the pre-flight, kept in the file
                vol = stack.enter_context(FastMRIVolume(src))
            plan = plan_volume(vol, opts)
            digest = sha256_file(src)
            files = {t: stack.enter_context(atomic_h5(out)) for t, out in todo.items()}
            bar = _bar(len(plan.indices), f"{src.name}", unit.get("progress") and unit.get("slice_bar"))
            rows = {t: [] for t in todo}
            for n, (i, per_target) in enumerate(iter_prepared(vol, opts, plan)):
                for t, f in files.items():
                    d = per_target[t]
                    if n == 0:
                        create_datasets(f, d, len(plan.indices))
                    for key in array_keys(d):
                        f[key][n] = stored(key, d[key])
                    f["slice_index"][n] = i
                    rows[t].append(_meta(d))
                    f.guard.check()  # stop at the first failed write (full disk), not after the last slice
                bar.update(1)
            bar.close()
            for t, f in files.items():
                attrs = _file_attrs(plan, opts, t, rows[t], digest)
                for k, v in attrs.items():
                    f.attrs[k] = v
                fit = fit_warning(attrs)
                if fit:
                    res.setdefault("warnings", []).append(f"{todo[t]}: {fit}")
            first = next(iter(rows.values()))
            note = whitening_note([r["whitened"] for r in first], [w for r in first for w in r["warnings"]])
            res["notes"] = [note] if note else []
        res["written"] = [os.fspath(o) for o in todo.values()]  # renamed into place when the stack closed
    except AmbientMRIError as e:
        res.update(status="failed", error=str(e), fatal=isinstance(e, OutputError))
    except Exception as e:  # an unexpected failure in one file must not stop the others
        res.update(status="failed", error=f"{src}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
    return res


def fit_warning(attrs: dict) -> str | None:
    """A one-line warning when the maps explain the data worse than the noise allows: the median over
    slices of ``||y - M F S x_ref|| / ||y||`` above :data:`FIT_WARN_RATIO` times the median noise share
    (``noise_std sqrt(C n_M) / ||y||``); ``None`` otherwise or when either is unknown."""
    if "forward_residual" not in attrs:
        return None
    res = float(np.nanmedian(attrs["forward_residual"])) if np.isfinite(attrs["forward_residual"]).any() else math.nan
    noise = float(np.nanmedian(attrs["noise_residual"])) if np.isfinite(attrs["noise_residual"]).any() else math.nan
    if not (np.isfinite(res) and np.isfinite(noise)) or res <= FIT_WARN_RATIO * noise:
        return None
    return (f"the coil maps explain the data worse than the noise allows: forward-model residual "
            f"||y - MFSx_ref||/||y|| = {res:.3f}, noise alone {noise:.3f} (median over slices, "
            f"> {FIT_WARN_RATIO:g}x)")


def _bar(total, desc, enabled):
    return tqdm(total=total, desc=desc, unit="slice", leave=False, disable=not enabled, file=sys.stderr)


@dataclass
class PrepResult:
    written: list[str]
    skipped: list[str]
    failed: list[dict]
    manifests: list[str]


def _echo_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_prep(input_path, output, options: PrepOptions, *, workers: int = 1, nifti: bool = False,
             progress: bool = True, echo=None) -> PrepResult:
    """Prepare every ``*.h5`` of ``input_path`` (a folder or one file) into ``output``.

    Options are checked first, then every input is opened and the options are checked against it; an
    impossible option raises :class:`ConfigError` before any output is written. Bad input files are
    skipped (listed in ``failed``); finished outputs are skipped (resume); each output is claimed and
    written atomically, so concurrent runs on the same ``output`` cooperate.
    """
    echo = echo or _echo_stderr
    options.validate()
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1 (got {workers})")
    input_path, output = Path(input_path), Path(output)
    if not input_path.exists():
        raise ConfigError("input does not exist", input_path)
    inputs = list_volumes(input_path)
    if not inputs:
        raise ConfigError("no .h5 files here", input_path)
    dirs = output_dirs(output, options)
    in_dirs = {p.parent.resolve() for p in inputs}
    for d in set(dirs.values()):
        if d.exists() and not d.is_dir():
            raise ConfigError("output exists and is not a folder", d)
        if d.resolve() in in_dirs:
            raise ConfigError("output folder is the input folder (inputs are never overwritten)", d)

    # pre-flight: open every input, check the options against it, and check finished outputs
    failed, units, skipped = [], [], []
    opts_json = options.to_json()
    for p in inputs:
        try:
            with warnings.catch_warnings():  # header problems: echoed once here, recorded in the output
                warnings.simplefilter("ignore", UserWarning)
                with FastMRIVolume(p) as vol:
                    plan_volume(vol, options)
                    for w in vol.warnings:
                        echo(f"warning: {p}: {w}")
        except DataError as e:
            failed.append({"source": os.fspath(p), "error": str(e)})
            continue
        outs = [(t, dirs[t] / f"{p.stem}.h5") for t in options.targets]
        for _, out in outs:
            if out.exists():
                _check_same_options(out, opts_json)
        if all(out.exists() for _, out in outs):
            skipped.append(os.fspath(p))
            continue
        units.append({"source": os.fspath(p), "options": opts_json, "progress": progress,
                      "slice_bar": workers == 1, "outputs": [(t, os.fspath(o)) for t, o in outs]})
    for f in failed:
        echo(f"skipped: {f['error']}")

    for d in sorted(set(dirs.values())):
        make_dir(d)  # an unwritable output: one line now, before any work
    written = []

    def collect(res):
        written.extend(res["written"])
        for w in res.get("warnings", ()):
            echo(f"warning: {w}")
        if res.get("fatal"):  # the output cannot be written (disk full, unwritable): stop the whole run
            raise OutputError(res["error"])
        if res["status"] == "failed":
            failed.append({"source": res["source"], "error": res["error"]})
            echo(f"failed: {res['error']}")
        for note in res.get("notes", []):
            echo(f"note: {res['source']}: {note}")
        return bool(res["busy"])

    busy = _run_units(units, workers, progress, collect)
    if busy:
        echo(f"waiting for {len(busy)} file(s) that another process is writing")
    while busy:  # outputs another process is writing: wait for it, take over if it died
        time.sleep(0.5)
        busy = [u for u in busy if collect(_write_volume_unit(dict(u, progress=False)))]

    if nifti:
        for d in sorted(set(dirs.values())):
            for p in list_volumes(d):
                if not nifti_done(p, d / "nifti"):
                    export_nifti(p, d / "nifti")
    failed.sort(key=lambda f: f["source"])
    manifests = [os.fspath(write_manifest(d, options, failed)) for d in sorted(set(dirs.values()))]
    return PrepResult(written=written, skipped=skipped, failed=failed, manifests=manifests)


def _check_same_options(out: Path, opts_json: dict):
    try:
        with h5py.File(out, "r") as f:
            old = json.loads(f.attrs["options"])
    except (OSError, KeyError, ValueError):
        raise ConfigError("output exists but is not a prepared file (remove it to redo it)", out) from None
    old.setdefault("maps_revision", 1)  # files written before the revision was recorded
    if old != opts_json:
        diff = sorted(k for k in set(old) | set(opts_json) if old.get(k) != opts_json.get(k))
        raise ConfigError(f"was prepared with different options ({', '.join(diff)}); use a new output folder", out)


def _run_units(units, workers, progress, collect):
    busy = []
    bar = tqdm(total=len(units), desc="volumes", unit="vol", disable=not progress or not units, file=sys.stderr)
    if workers == 1 or len(units) <= 1:
        for u in units:
            if collect(_write_volume_unit(u)):
                busy.append(u)
            bar.update(1)
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_write_volume_unit, dict(u, threads=threads)): u for u in units}
            try:
                for fut in as_completed(futures):
                    if collect(fut.result()):
                        busy.append(futures[fut])
                    bar.update(1)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # a fatal error: start nothing new
                raise
    bar.close()
    return busy


# ----------------------------------------------------------------------------------------------
# Command line


