"""``ambient-mri info PATH``: describe a fastMRI-layout file, a prepared file or dataset folder, a
checkpoint (``.pt``) or a run folder. Each ``describe_*`` function returns a plain dict (``--json``
prints it); :func:`render` turns it into the text the command prints.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import AmbientMRIError, DataError
from .fastmri_io import FastMRIVolume
from .prepared import MANIFEST, describe_prepared, is_prepared, manifest_json


def kind_of(path: Path) -> str:
    """``fastmri``, ``prepared``, ``checkpoint``, ``prepared-folder``, ``run-folder``, ``fastmri-folder``
    or ``folder`` (anything else)."""
    path = Path(path)
    if path.is_dir():
        if (path / MANIFEST).exists() or any(is_prepared(p) for p in _h5s(path)[:1]):
            return "prepared-folder"
        if any((d / MANIFEST).exists() for d in _subdirs(path)):
            return "prepared-folder"
        if list(path.glob("*.pt")):
            return "run-folder"
        if _h5s(path):
            return "fastmri-folder"
        return "folder"
    if path.suffix in (".pt", ".pth", ".ckpt"):
        return "checkpoint"
    return "prepared" if is_prepared(path) else "fastmri"


def _h5s(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).glob("*.h5") if not p.name.startswith("."))


def _subdirs(folder: Path) -> list[Path]:
    return sorted(d for d in Path(folder).iterdir() if d.is_dir() and not d.name.startswith("."))


# ----------------------------------------------------------------------------------------------
# fastMRI-layout files


def describe_fastmri(path) -> dict:
    """Shapes, coils, header sizes, mask and acceleration of a fastMRI-layout file (validated on open)."""

    with FastMRIVolume(path) as v:
        S, C, H, W = v.shape
        d = {"kind": "fastmri", "path": os.fspath(path), "slices": S, "coils": C, "single_coil": v.single_coil,
             "matrix": [H, W], "kspace_dtype": str(v._ks.dtype), "keys": v.keys(),
             "encoding_size": list(v.header["encoding_size"]), "recon_size": list(v.header["recon_size"]),
             "header_source": v.header["source"], "readout_oversampled": v.readout_oversampled,
             "acquisition": v.attrs.get("acquisition"), "reference_key": v.reference_key,
             "undersampled": v.is_undersampled, "warnings": list(v.warnings)}
        if v.mask is not None:
            d["mask_shape"] = list(v.mask.shape)
            d["mask_samples"] = int(v.mask.sum())
            d["accel_actual"] = float(v.mask.size / v.mask.sum())
            d["acceleration_attr"] = v.attrs.get("acceleration")
            d["num_low_frequency"] = v.attrs.get("num_low_frequency")
    return d


# ----------------------------------------------------------------------------------------------
# Prepared files and folders


def describe_prepared_file(path) -> dict:
    """Split, slices, shapes, mask kind, nominal and actual acceleration, norms of a prepared file."""
    try:
        d = describe_prepared(path)
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"not a readable prepared file ({' '.join(str(e).split())[:200]})", path) from None
    a = d.pop("attrs")
    norm = np.asarray(d["norm"], dtype=float)
    return {"kind": "prepared", "path": os.fspath(path), "split": a.get("split"), "domain": a.get("domain"),
            "slices": d["slices"], "shapes": d["shapes"], "mask_kind": a.get("mask_kind"),
            "accel": a.get("accel"), "accel_actual": d["accel_actual"], "acs": a.get("acs"), "calib": a.get("calib"),
            "norm": {"min": float(norm.min()), "median": float(np.median(norm)), "max": float(norm.max())},
            "reference": d["reference"], "whitened": int(np.sum(a.get("whitened", []))),
            "source": d["source"], "source_sha256": d["source_sha256"], "mask_seed": d["mask_seed"],
            "slice_index": d["slice_index"], "warnings": d["warnings"],
            "ambient_mri_version": a.get("ambient_mri_version")}


def describe_prepared_folder(path) -> dict:
    """A prepared dataset folder (its ``manifest.json`` and files), or a folder of ``R<R>/`` datasets."""
    path = Path(path)
    subsets = [d for d in _subdirs(path) if (d / MANIFEST).exists()]
    out = {"kind": "prepared-folder", "path": os.fspath(path), "datasets": []}
    for folder in ([path] if (path / MANIFEST).exists() or _h5s(path) else []) + subsets:
        ds = {"path": os.fspath(folder), "files": [], "errors": []}
        mf = folder / MANIFEST
        if mf.exists():
            try:
                m = manifest_json(mf)
            except DataError as e:
                ds["errors"].append(str(e))
            else:
                ds.update({k: m.get(k) for k in ("format", "split", "domain", "reference_kind", "options")})
                ds["failed"] = m.get("failed", [])
                ds["manifest_files"] = len(m.get("files", []))
        for p in _h5s(folder):
            try:
                ds["files"].append(describe_prepared_file(p))
            except AmbientMRIError as e:
                ds["errors"].append(str(e))
        ds["slices"] = sum(f["slices"] for f in ds["files"])
        out["datasets"].append(ds)
    return out


# ----------------------------------------------------------------------------------------------
# Checkpoints and run folders (the checkpoint format belongs to the training code: kept generic)


def summarize_value(v, depth: int = 0):
    """Short description of a loaded object: tensors by dtype and shape, containers by size."""

    if isinstance(v, torch.Tensor):
        return f"Tensor({str(v.dtype).replace('torch.', '')}, {list(v.shape)})"
    if isinstance(v, np.ndarray):
        return f"ndarray({v.dtype}, {list(v.shape)})"
    if isinstance(v, dict):
        tensors = [t for t in v.values() if isinstance(t, torch.Tensor)]
        if tensors and len(tensors) == len(v) or len(v) > 8 or depth >= 1:
            n = sum(t.numel() for t in tensors)
            extra = f", {len(tensors)} tensors, {n:,} values" if tensors else ""
            return f"dict({len(v)} keys{extra})"
        return {str(k): summarize_value(x, depth + 1) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        if len(v) <= 8 and all(isinstance(x, (int, float, str, bool, type(None))) for x in v):
            return list(v)
        return f"{type(v).__name__}({len(v)} items)"
    if isinstance(v, (int, float, str, bool, type(None))):
        return v
    return type(v).__name__


def describe_checkpoint(path) -> dict:
    """What ``torch.load(path, weights_only=True)`` gives at the top level: keys, ``config``, ``step``."""


    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before failing anyway
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... depending on the damage
        raise DataError(f"cannot load with torch.load(weights_only=True) ({_torch_reason(e)})", path) from None
    d = {"kind": "checkpoint", "path": os.fspath(path), "size_bytes": Path(path).stat().st_size,
         "type": type(obj).__name__}
    if isinstance(obj, dict):
        d["keys"] = [str(k) for k in obj]
        d["entries"] = {str(k): summarize_value(v) for k, v in obj.items() if k != "config"}
        if "config" in obj:
            d["config"] = _jsonable(obj["config"])
        if "step" in obj:
            d["step"] = _jsonable(obj["step"])
    else:
        d["value"] = summarize_value(obj)
    return d


def _torch_reason(e: BaseException) -> str:
    """The informative part of torch.load's (long, multi-line) error text."""
    text = str(e)
    if "WeightsUnpickler error:" in text:  # the rest is boilerplate about the weights_only default
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
        text = "not a weights-only pickle: " + text
    text = " ".join(text.split()) or type(e).__name__
    return text[:160]


def describe_run_folder(path) -> dict:
    """A run folder: its files, and the newest checkpoint described (``checkpoint.pt`` if present)."""
    path = Path(path)
    pts = sorted(path.glob("*.pt"), key=lambda p: (p.name != "checkpoint.pt", -p.stat().st_mtime))
    d = {"kind": "run-folder", "path": os.fspath(path),
         "files": sorted(p.name for p in path.iterdir() if not p.name.startswith("."))}
    if pts:
        d["checkpoint"] = describe_checkpoint(pts[0])
    return d


def _jsonable(v):

    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else summarize_value(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (int, float, str, bool, type(None))):
        return v
    return summarize_value(v)


# ----------------------------------------------------------------------------------------------


def describe(path) -> dict:
    """Dispatch on :func:`kind_of`; folders of fastMRI files describe each file (bad ones as one line)."""
    path = Path(path)
    if not path.exists():
        raise DataError("no such file or folder", path)
    kind = kind_of(path)
    if kind == "fastmri":
        return describe_fastmri(path)
    if kind == "prepared":
        return describe_prepared_file(path)
    if kind == "checkpoint":
        return describe_checkpoint(path)
    if kind == "prepared-folder":
        return describe_prepared_folder(path)
    if kind == "run-folder":
        return describe_run_folder(path)
    if kind == "fastmri-folder":
        files, errors = [], []
        for p in _h5s(path):
            try:
                files.append(describe_prepared_file(p) if is_prepared(p) else describe_fastmri(p))
            except AmbientMRIError as e:
                errors.append(str(e))
        return {"kind": "fastmri-folder", "path": os.fspath(path), "files": files, "errors": errors}
    raise DataError("no .h5 files, checkpoints or manifest here", path)


def _fmt(x):
    if isinstance(x, float):
        return f"{x:.4g}" if math.isfinite(x) else str(x)
    return str(x)


def render(d: dict) -> list[str]:
    """Human-readable lines for a :func:`describe` dict."""
    k = d["kind"]
    if k == "fastmri":
        kind = "single-coil" if d["single_coil"] else f"{d['coils']}-coil"
        lines = [f"{d['path']}: fastMRI-layout, {d['slices']} slices, {kind}, k-space {d['matrix'][0]}x{d['matrix'][1]} "
                 f"{d['kspace_dtype']}",
                 f"  header ({d['header_source']}): encoded {d['encoding_size'][0]}x{d['encoding_size'][1]}, recon "
                 f"{d['recon_size'][0]}x{d['recon_size'][1]}, readout oversampled: {d['readout_oversampled']}",
                 f"  acquisition: {d['acquisition']}, reference: {d['reference_key']}, keys: {', '.join(d['keys'])}"]
        if d["undersampled"]:
            lines.append(f"  undersampled: mask {tuple(d['mask_shape'])}, {d['mask_samples']} samples, actual R "
                         f"{_fmt(d['accel_actual'])} (attr acceleration {d['acceleration_attr']}, num_low_frequency "
                         f"{d['num_low_frequency']})")
        else:
            lines.append("  fully sampled (no mask)")
        lines += [f"  warning: {w}" for w in d["warnings"]]
        return lines
    if k == "prepared":
        n = d["norm"]
        shapes = ", ".join(f"{key} {tuple(s)}" for key, s in d["shapes"].items())
        return [f"{d['path']}: prepared {d['split']} ({d['domain']}), {d['slices']} slices: {shapes}",
                f"  mask {d['mask_kind']}, R {_fmt(d['accel'])} nominal / {_fmt(d['accel_actual'])} actual, acs "
                f"{d['acs']}, calib {d['calib']}, reference: {d['reference'] or 'none'}, whitened slices: "
                f"{d['whitened']}/{d['slices']}",
                f"  norm min {_fmt(n['min'])} median {_fmt(n['median'])} max {_fmt(n['max'])}; slice_index "
                f"{d['slice_index']}; mask_seed {d['mask_seed']}",
                f"  source {d['source']} (sha256 {str(d['source_sha256'])[:12]}...)"] + \
               [f"  warning: {w}" for w in d["warnings"]]
    if k == "prepared-folder":
        lines = []
        for ds in d["datasets"]:
            accs = sorted({_fmt(f["accel_actual"]) for f in ds["files"]})
            lines.append(f"{ds['path']}: prepared dataset, split {ds.get('split')}, domain {ds.get('domain')}, "
                         f"{len(ds['files'])} files, {ds['slices']} slices, reference {ds.get('reference_kind')}, "
                         f"actual R {', '.join(accs) or '-'}")
            for f in ds["files"]:
                shp = " ".join(f"{key}{tuple(s)}" for key, s in f["shapes"].items())
                lines.append(f"  {Path(f['path']).name}: {f['slices']} slices, {shp}, mask {f['mask_kind']} R "
                             f"{_fmt(f['accel_actual'])}, norm {_fmt(f['norm']['median'])} (median)")
            lines += [f"  failed: {x['error']}" for x in ds.get("failed", [])]
            lines += [f"  error: {e}" for e in ds["errors"]]
        return lines
    if k == "checkpoint":
        lines = [f"{d['path']}: checkpoint ({d['size_bytes']:,} bytes), torch.load(weights_only=True) -> {d['type']}"]
        if "keys" in d:
            lines.append(f"  keys: {', '.join(d['keys'])}")
            if "step" in d:
                lines.append(f"  step: {d['step']}")
            for key, v in d["entries"].items():
                if key != "step":
                    lines.append(f"  {key}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
            if "config" in d:
                lines.append("  config:")
                lines += ["    " + ln for ln in json.dumps(d["config"], indent=2, default=str).splitlines()]
        else:
            lines.append(f"  value: {d['value']}")
        return lines
    if k == "run-folder":
        lines = [f"{d['path']}: run folder: {', '.join(d['files'])}"]
        if "checkpoint" in d:
            lines += render(d["checkpoint"])
        return lines
    if k == "fastmri-folder":
        lines = [f"{d['path']}: {len(d['files'])} readable .h5 files, {len(d['errors'])} unreadable"]
        for f in d["files"]:
            lines += render(f)
        return lines + [f"error: {e}" for e in d["errors"]]
    return [json.dumps(d)]


def has_errors(d: dict) -> bool:
    if d.get("errors"):
        return True
    return any(ds.get("errors") for ds in d.get("datasets", []))
