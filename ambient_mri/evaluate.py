"""``ambient-mri eval``: score reconstructions against references; CSV/JSON/Markdown tables and figures.

A reconstruction folder holds one ``.h5`` per input volume (written by ``ambient-mri recon``):
``reconstruction`` ``(S, H, W)`` magnitude, optional ``std`` ``(S, H, W)``, ``slice_index`` ``(S,)``,
attributes ``method``, ``label``, ``accel``. Its reference is the file of the same name in
``--reference``: a prepared val/test dataset (``reference``, in prepared units) or a fastMRI folder
(``reconstruction_rss`` / ``reconstruction_esc``, raw units; the reconstruction is centre-cropped
to the target's size, as fastMRI's ``evaluate`` does). A reconstruction whose ``units`` attribute differs
from its reference's units is refused (:func:`check_units`). Metrics: both conventions of ``metrics.py``.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import h5py
import numpy as np

from .errors import DataError
from .fft import center_crop
from .fsutil import atomic_path, make_dir, write_json
from .metrics import evaluate_volume, psnr_adps
from .prepared import UNITS, UNITS_ATTR, reference_units

SLICE_KEYS = ("psnr_adps", "ssim_adps", "nrmse_adps")
VOLUME_KEYS = ("psnr_fastmri", "ssim_fastmri", "nmse_fastmri")


def read_reference(path: Path, slice_index: np.ndarray | None) -> tuple[np.ndarray, str]:
    """Reference magnitudes ``(S, h, w)`` for the given input slice indices, and their units
    (:func:`ambient_mri.prepared.reference_units`): ``"prepared"`` (a prepared file's ``reference``, already
    divided by each slice's ``norm``) or ``"raw"`` (fastMRI's ``reconstruction_rss`` / ``_esc``)."""
    try:
        with h5py.File(path, "r") as f:
            found = reference_units(f)
            if found is None:
                raise DataError("no reference image (neither 'reference' nor 'reconstruction_rss'/'_esc')", path)
            key, units = found
            ref = np.abs(f[key][()]) if key == "reference" else f[key][()].astype(np.float64)
            own = f["slice_index"][()] if key == "reference" and "slice_index" in f else np.arange(ref.shape[0])
    except OSError as e:
        raise DataError(f"cannot read reference ({e})", path) from None
    if slice_index is None:
        return ref, units
    pos = {int(s): i for i, s in enumerate(own)}
    missing = [int(s) for s in slice_index if int(s) not in pos]
    if missing:
        raise DataError(f"reference lacks slices {missing[:5]}", path)
    return ref[[pos[int(s)] for s in slice_index]], units


def check_units(rec_attrs: dict, ref_units: str, rec_path: Path, ref_path: Path) -> None:
    """A reconstruction is scored only against a reference in its own units (``recon`` writes the ``units``
    attribute): PSNR (A-DPS) uses the reference's maximum but the raw error, so a scale mismatch would
    silently shift it. A file without ``units`` (written by other tools) is taken as it is."""
    units = rec_attrs.get(UNITS_ATTR)
    if isinstance(units, bytes):
        units = units.decode(errors="replace")
    if units is None or units == ref_units:
        return
    if units not in UNITS:
        raise DataError(f"unknown units attribute {units!r} (expected {' or '.join(map(repr, UNITS))})", rec_path)
    raise DataError(f"reconstruction is in {units} units but the reference {ref_path} is in {ref_units} units "
                    f"({UNITS[ref_units]}); score a prepared-input reconstruction against the prepared folder, "
                    f"a raw-input one against the fastMRI folder", rec_path)


def read_recon(path: Path) -> dict:
    try:
        with h5py.File(path, "r") as f:
            if "reconstruction" not in f:
                raise DataError("missing 'reconstruction'", path)
            out = {"reconstruction": f["reconstruction"][()].astype(np.float64),
                   "std": f["std"][()] if "std" in f else None,
                   "slice_index": f["slice_index"][()] if "slice_index" in f else None,
                   "attrs": {k: (v.item() if np.size(v) == 1 and hasattr(v, "item") else v) for k, v in f.attrs.items()}}
    except OSError as e:
        raise DataError(f"cannot read reconstruction ({e})", path) from None
    if not np.all(np.isfinite(out["reconstruction"])):
        raise DataError("reconstruction contains NaN or Inf", path)
    return out


def label_of(attrs: dict, folder: Path) -> str:
    return str(attrs.get("label") or attrs.get("method") or folder.name)


def evaluate_folders(recon_dirs, reference: Path, *, foreground: bool = False, max_figure_slices: int = 3):
    """Score every reconstruction in ``recon_dirs``; returns ``(slice_rows, volume_rows, figure_items)``."""

    slice_rows, volume_rows, figs = [], [], []
    for d in recon_dirs:
        d = Path(d)
        files = sorted(p for p in d.glob("*.h5") if not p.name.startswith("."))
        if not files:
            raise DataError("no reconstruction .h5 files", d)
        for p in files:
            rec = read_recon(p)
            ref_path = reference / p.name if reference.is_dir() else reference
            if not ref_path.exists():
                raise DataError(f"no reference file {p.name} in {reference}", p)
            gt, ref_units = read_reference(ref_path, rec["slice_index"])
            check_units(rec["attrs"], ref_units, p, ref_path)
            x = rec["reconstruction"]
            if x.shape[-2:] != gt.shape[-2:]:
                try:
                    x = center_crop(x, gt.shape[-2:])
                except ValueError:
                    raise DataError(f"reconstruction {x.shape[-2:]} smaller than the reference {gt.shape[-2:]}", p)
            if x.shape != gt.shape:
                raise DataError(f"reconstruction shape {x.shape} does not match the reference {gt.shape}", p)
            m = evaluate_volume(gt, x, foreground=True if foreground else None)
            a = rec["attrs"]
            base = {"label": label_of(a, d), "method": a.get("method", ""), "accel": a.get("accel", ""),
                    "volume": p.stem, "folder": str(d)}
            idx = rec["slice_index"] if rec["slice_index"] is not None else np.arange(x.shape[0])
            for s in range(x.shape[0]):
                row = dict(base, slice=int(idx[s]))
                for k in SLICE_KEYS + tuple(k + "_fg" for k in SLICE_KEYS if foreground):
                    row[k] = float(m[k][s])
                slice_rows.append(row)
            vrow = dict(base, slices=int(x.shape[0]),
                        seconds_per_slice=a.get("seconds_per_slice", ""), nfe=a.get("nfe", ""))
            for k in VOLUME_KEYS + tuple(k + "_fg" for k in VOLUME_KEYS if foreground):
                vrow[k] = float(m[k])
            volume_rows.append(vrow)
            for s in range(min(max_figure_slices, x.shape[0])):
                figs.append({"label": base["label"], "accel": base["accel"], "volume": p.stem, "slice": int(idx[s]),
                             "gt": gt[s], "x": x[s], "std": None if rec["std"] is None else np.abs(rec["std"][s])})
    return slice_rows, volume_rows, figs


def summarise(slice_rows, volume_rows) -> list[dict]:
    """Mean and standard deviation per (label, acceleration): per-slice metrics over slices, per-volume
    metrics over volumes, and the mean seconds per slice."""
    groups = defaultdict(lambda: {"slices": [], "volumes": []})
    for r in slice_rows:
        groups[(r["label"], str(r["accel"]))]["slices"].append(r)
    for r in volume_rows:
        groups[(r["label"], str(r["accel"]))]["volumes"].append(r)
    out = []
    for (label, accel), g in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        row = {"label": label, "accel": accel, "n_slices": len(g["slices"]), "n_volumes": len(g["volumes"])}
        keys = [k for k in g["slices"][0] if k.startswith(SLICE_KEYS)] if g["slices"] else []
        for k in keys:
            v = np.array([r[k] for r in g["slices"]], dtype=float)
            v = v[np.isfinite(v)]
            row[k] = (float(v.mean()), float(v.std())) if v.size else (math.nan, math.nan)
        vkeys = [k for k in g["volumes"][0] if k.startswith(VOLUME_KEYS)] if g["volumes"] else []
        for k in vkeys:
            v = np.array([r[k] for r in g["volumes"]], dtype=float)
            row[k] = (float(v.mean()), float(v.std()))
        sps = [float(r["seconds_per_slice"]) for r in g["volumes"] if r.get("seconds_per_slice") not in ("", None)]
        row["seconds_per_slice"] = float(np.mean(sps)) if sps else math.nan
        nfe = [r["nfe"] for r in g["volumes"] if r.get("nfe") not in ("", None)]
        row["nfe"] = nfe[0] if nfe else ""
        out.append(row)
    return out


def markdown_table(summary: list[dict]) -> str:
    """Markdown: mean +- std per method and acceleration, both conventions."""
    cols = [("psnr_adps", "PSNR dB (A-DPS)", 2), ("ssim_adps", "SSIM (A-DPS)", 4), ("nrmse_adps", "NRMSE", 4),
            ("psnr_fastmri", "PSNR dB (fastMRI)", 2), ("ssim_fastmri", "SSIM (fastMRI)", 4),
            ("nmse_fastmri", "NMSE (fastMRI)", 4)]
    head = "| method | R | slices | " + " | ".join(c[1] for c in cols) + " | s / slice | NFE |"
    lines = [head, "|" + "---|" * (len(cols) + 5)]
    for r in summary:
        cells = []
        for k, _, dec in cols:
            m, s = r.get(k, (math.nan, math.nan))
            cells.append(f"{m:.{dec}f} ± {s:.{dec}f}")
        sps = r["seconds_per_slice"]
        lines.append(f"| {r['label']} | {r['accel']} | {r['n_slices']} | " + " | ".join(cells)
                     + f" | {sps:.3g} | {r['nfe']} |")
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(path, ".csv.tmp") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def figures(figs: list[dict], out: Path, per_figure: int = 3) -> list[Path]:
    """One PNG per (volume, slice): columns reference / each method / error maps / std maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_slice = defaultdict(list)
    for f in figs:
        by_slice[(f["volume"], f["slice"], str(f["accel"]))].append(f)
    paths = []
    for (vol, s, accel), items in sorted(by_slice.items())[: per_figure * 4]:
        gt = items[0]["gt"]
        vmax = float(np.percentile(gt, 99.5)) or 1.0
        has_std = any(i["std"] is not None for i in items)
        rows = 3 if has_std else 2
        fig, ax = plt.subplots(rows, len(items) + 1, figsize=(2.4 * (len(items) + 1), 2.5 * rows), squeeze=False)
        ax[0, 0].imshow(gt, cmap="gray", vmin=0, vmax=vmax)
        ax[0, 0].set_title("reference", fontsize=8)
        for a in ax.flat:
            a.axis("off")
        for j, it in enumerate(items, start=1):
            ax[0, j].imshow(it["x"], cmap="gray", vmin=0, vmax=vmax)

            ax[0, j].set_title(f"{it['label']}\n{psnr_adps(gt, it['x']):.2f} dB", fontsize=8)
            ax[1, j].imshow(np.abs(it["x"] - gt), cmap="magma", vmin=0, vmax=0.25 * vmax)
            ax[1, j].set_title("|error| (x4)", fontsize=8)
            if has_std and it["std"] is not None:
                ax[2, j].imshow(it["std"], cmap="viridis", vmin=0, vmax=0.25 * vmax)
                ax[2, j].set_title("std (x4)", fontsize=8)
        fig.suptitle(f"{vol} slice {s}, R = {accel}", fontsize=9)
        fig.tight_layout()
        p = out / f"figure_{vol}_s{s}_R{accel}.png"
        with atomic_path(p, ".png.tmp") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        paths.append(p)
    return paths


def run_eval(recon_dirs, reference, out, *, foreground: bool = False) -> dict:
    """Evaluate and write ``metrics_slices.csv``, ``metrics_volumes.csv``, ``summary.json``,
    ``summary.md`` and figures into ``out``; returns the summary."""
    out = make_dir(out)  # an unwritable report folder: one line, before any scoring
    slice_rows, volume_rows, figs = evaluate_folders(recon_dirs, Path(reference), foreground=foreground)
    summary = summarise(slice_rows, volume_rows)
    _write_csv(out / "metrics_slices.csv", slice_rows)
    _write_csv(out / "metrics_volumes.csv", volume_rows)
    write_json(out / "summary.json", {"reference": str(reference), "recon": [str(d) for d in recon_dirs],
                                      "summary": summary})
    md = markdown_table(summary)
    with atomic_path(out / "summary.md", ".md.tmp") as tmp:
        tmp.write_text(md)
    paths = figures(figs, out)
    return {"summary": summary, "markdown": md, "figures": paths}
