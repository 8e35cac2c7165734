#!/usr/bin/env python
"""Reconstruct the real undersampled scans in ../shared/data that nobody here simulated, with the
documented commands (``python -m data_prep bart|brain512``, then ``ambient-mri recon`` on the raw file).

* ``bart_brain8ch_poisson``: 8-coil brain k-space undersampled with a 2-D Poisson-disc mask (R ~ 8). No
  fully sampled reference exists; BART's own PICS reconstruction (2 ESPIRiT map sets) is the comparison:
  ``b = RSS over the 2 sets of |BART|``, each reconstruction's magnitude ``|x|`` scaled by the least-squares
  factor ``s = <|x|, b> / <|x|, |x|>``, ``NRMSE = || s |x| - b || / || b ||`` (:func:`nrmse_to_bart`).
  This measures agreement with BART, not truth.
* ``brain512``: single-coil 2-D FSE k-space, 201 of 512 phase-encode lines; no reference at all.

Classical methods (zero-filled, CG-SENSE, L1-wavelet) at the scans' own matrix, with recon's default
whitening decision (neither scan has an oversampled readout, so neither is whitened). With ``--main`` (the
output of ``benchmarks/siat_benchmark.py``) also the SIAT-trained ambient and oracle models, ``--matrix
crop`` (k-space centre cropped to the models' 64 x 64) and ``--matrix native``. Reports data consistency
``||A x - y|| / ||y||``, seconds per slice, NRMSE against BART (native matrix), and writes the figures.

Usage: python benchmarks/real_scans.py --out OUT --lam LAM [--main SIAT_BENCH_OUT] [--figures docs/figures]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLASSICAL = ("zf", "sense", "l1")
TITLES = {"zf": "zero-filled", "sense": "CG-SENSE", "l1": "L1-wavelet"}


def run(args, log):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    line = " ".join(str(a) for a in args)
    print(f"$ {line}", flush=True)
    with open(log, "a") as f:
        f.write(f"$ {line}\n")
        f.flush()
        r = subprocess.run([str(a) for a in args], stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode != 0:
        raise SystemExit(f"failed: {line} (see {log})")


def bart_reference(raw_file) -> np.ndarray | None:
    """``RSS over map sets of |bart_pics_reconstruction|`` of slice 0 ``(H, W)``, or None if absent."""
    import h5py

    with h5py.File(raw_file) as f:
        if "bart_pics_reconstruction" not in f:
            return None
        pics = f["bart_pics_reconstruction"][0]  # (map sets, H, W)
    return np.sqrt(np.sum(np.abs(pics.astype(np.complex128)) ** 2, axis=0))


def nrmse_to_bart(x, b) -> float:
    """``|| s |x| - b || / || b ||`` with the least-squares scale ``s = <|x|, b> / <|x|, |x|>`` (the methods'
    units differ from BART's; only the shape of the image is compared)."""
    from ambient_mri.metrics import nrmse

    x = np.abs(np.asarray(x, np.float64))
    s = float(np.sum(x * b) / np.sum(x * x))
    return nrmse(b, s * x)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--main", type=Path, default=None,
                    help="siat_benchmark output: its trained models and its validation-tuned L1 weight at R = 8.")
    ap.add_argument("--lam", type=float, default=None, help="L1 weight (default: --main's tuned one; needed without --main).")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--figures", type=Path, default=None, help="Also copy the figures here (e.g. docs/figures).")
    ap.add_argument("--steps", type=int, default=25, help="DC sampler steps.")
    args = ap.parse_args()
    if args.lam is None and args.main is None:
        ap.error("give --lam (or --main, whose tuned L1 weight is used)")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    py = sys.executable
    cli = Path(py).parent / "ambient-mri"  # the console script of this interpreter's environment
    cli = cli if cli.exists() else "ambient-mri"
    lam = args.lam if args.lam is not None else json.loads((args.main.resolve() / "state.json").read_text())["tune_l1"]["lam"]["R8"]
    scans = {"bart": ("bart", args.shared / "bart_brain8ch_poisson"),
             "brain512": ("brain512", args.shared / "brain512_singlecoil" / "brain512.mat")}
    jobs = [("zf", []), ("sense", []), ("l1", ["--lam", lam])]
    if args.main is not None:
        amb, orc = (args.main.resolve() / "runs" / k / "checkpoint.pt" for k in ("ambient", "oracle"))
        jobs += [(f"{m}-{k}-{mat}", ["--checkpoint", ck, "--matrix", mat, "--steps", st])
                 for mat in ("crop", "native")
                 for (m, k, ck, st) in (("dc", "ambient", amb, args.steps), ("aos", "ambient", amb, 1),
                                        ("dc", "oracle", orc, args.steps))]
    results = {}
    for name, (conv, src) in scans.items():
        raw = out / "raw" / name
        if not any(raw.glob("*.h5")):
            run([py, "-m", "data_prep", conv, src, raw], log)
        ref = bart_reference(sorted(raw.glob("*.h5"))[0])
        for label, extra in jobs:
            method = label.split("-")[0]
            dest = out / "rec" / name / label
            if not any(dest.glob("*.h5")):
                run([cli, "recon", "--input", raw, "--out", dest, "--method", method,
                     "--label", label, "--no-nifti", "--no-png", "-q", *[str(e) for e in extra]], log)
            results.setdefault(name, {})[label] = _read(dest, ref)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    figs = _figures(out, results, args.figures)
    print(json.dumps(results, indent=2))
    print("figures:", *figs, sep="\n  ")


def _read(dest: Path, ref) -> dict:
    import h5py

    p = sorted(dest.glob("*.h5"))[0]
    with h5py.File(p) as f:
        x = f["reconstruction"][0]
        r = {"file": str(p), "data_consistency": float(np.mean(f["data_consistency"][()])),
             "seconds_per_slice": float(f.attrs["seconds_per_slice"]), "nfe": int(f.attrs["nfe"]),
             "shape": list(x.shape), "whitened": bool(np.any(f.attrs.get("whitened", False)))}
    if ref is not None and x.shape == ref.shape:
        r["nrmse_vs_bart"] = nrmse_to_bart(x, ref)
    return r


def _figures(out: Path, results: dict, copy_to: Path | None) -> list[Path]:
    import shutil

    import h5py
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, res in results.items():
        ref = bart_reference(sorted((out / "raw" / name).glob("*.h5"))[0])
        panels = [("BART PICS, RSS of 2 sets\n(not ground truth)", ref, None)] if ref is not None else []
        for label, r in res.items():
            with h5py.File(r["file"]) as f:
                x = f["reconstruction"][0].astype(np.float64)
            title = TITLES.get(label, label) + f"\nDC {r['data_consistency']:.3f}"
            if "nrmse_vs_bart" in r:
                title += f", NRMSE {r['nrmse_vs_bart']:.3f}"
                x = x * float(np.sum(x * ref) / np.sum(x * x))  # BART's scale, as in the NRMSE
            panels.append((title, x, ref if "nrmse_vs_bart" in r else None))
        rows = 2 if any(p[2] is not None for p in panels) else 1
        n = len(panels)
        fig, ax = plt.subplots(rows, n, figsize=(2.4 * n, 2.9 * rows), squeeze=False)
        vmax = np.percentile(ref if ref is not None else panels[0][1], 99.5)
        for j, (title, img, r) in enumerate(panels):
            ax[0, j].imshow(img, cmap="gray", vmin=0, vmax=np.percentile(img, 99.5) if ref is None else vmax)
            ax[0, j].set_title(title, fontsize=7)
            ax[0, j].axis("off")
            if rows == 2:
                ax[1, j].axis("off")
                if r is not None:
                    ax[1, j].imshow(np.abs(img - r), cmap="gray", vmin=0, vmax=vmax / 5)
                    ax[1, j].set_title("|scaled - BART| x 5", fontsize=7)
        kind = "compared with BART's reconstruction" if ref is not None else "no reference exists"
        fig.suptitle(f"{name}: real undersampled scan ({kind})", fontsize=9)
        fig.tight_layout()
        p = out / f"real_{name}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
        if copy_to:
            copy_to.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, copy_to / p.name)
    return paths


if __name__ == "__main__":
    main()
