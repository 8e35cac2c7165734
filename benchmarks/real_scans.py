#!/usr/bin/env python
"""Reconstruct the real undersampled scans in ../shared/data that nobody here simulated.

* ``bart_brain8ch_poisson``: 8-coil brain k-space undersampled with a 2-D Poisson-disc mask (R ~ 8); no ground
  truth (BART's own PICS reconstruction is shown for comparison, labelled as such).
* ``brain512``: single-coil 2-D FSE k-space, 201 of 512 phase-encode lines; no ground truth.

Classical methods at the scans' own matrix; the SIAT-trained ambient and oracle models (64 x 64) with
``--matrix crop`` (k-space centre cropped to 64 x 64: the whole field of view at the model's resolution) and
``--matrix native`` (the size-agnostic network at the scan's own matrix, out of its training distribution).
Reports data consistency ``||A x - y|| / ||y||`` and writes figures.

Usage: python benchmarks/real_scans.py --main OUT_OF_siat_benchmark --out OUT [--figures docs/figures]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--main", type=Path, required=True, help="siat_benchmark output (its trained models).")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--figures", type=Path, default=None, help="Also copy the figures here (e.g. docs/figures).")
    ap.add_argument("--steps", type=int, default=25, help="DC sampler steps.")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    py = sys.executable
    amb, orc = args.main.resolve() / "runs" / "ambient" / "checkpoint.pt", args.main.resolve() / "runs" / "oracle" / "checkpoint.pt"
    lam = json.loads((args.main.resolve() / "state.json").read_text())["tune_l1"]["lam"]["R8"]
    scans = {"bart": ("bart", args.shared / "bart_brain8ch_poisson"), "brain512": ("brain512", args.shared / "brain512_singlecoil" / "brain512.mat")}
    results = {}
    for name, (conv, src) in scans.items():
        raw = out / "raw" / name
        if not any(raw.glob("*.h5")):
            run([py, "-m", "data_prep", conv, src, raw], log)
        jobs = [("zf", []), ("sense", []), ("l1", ["--lam", lam])]
        jobs += [(f"{m}-{k}-{mat}", ["--checkpoint", ck, "--matrix", mat, "--steps", st, *extra])
                 for mat in ("crop", "native")
                 for (m, k, ck, st, extra) in (("dc", "ambient", amb, args.steps, []), ("aos", "ambient", amb, 1, []),
                                               ("dc", "oracle", orc, args.steps, []))]
        for label, extra in jobs:
            method = label.split("-")[0]
            dest = out / "rec" / name / label
            t = time.perf_counter()
            if not any(dest.glob("*.h5")):
                run(["ambient-mri", "recon", "--input", raw, "--out", dest, "--method", method, "--label", label,
                     "--no-nifti", "-q", *[str(e) for e in extra]], log)
            results.setdefault(name, {})[label] = _read(dest)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    figs = _figures(out, results, args.figures)
    print(json.dumps(results, indent=2))
    print("figures:", *figs, sep="\n  ")


def _read(dest: Path) -> dict:
    import h5py
    import numpy as np

    p = sorted(dest.glob("*.h5"))[0]
    with h5py.File(p) as f:
        return {"file": str(p), "data_consistency": float(np.mean(f["data_consistency"][()])),
                "seconds_per_slice": float(f.attrs["seconds_per_slice"]), "nfe": int(f.attrs["nfe"]),
                "shape": list(f["reconstruction"].shape[-2:])}


def _figures(out: Path, results: dict, copy_to: Path | None) -> list[Path]:
    import shutil

    import h5py
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    for name, res in results.items():
        labels = list(res)
        extra = []
        raw = sorted((out / "raw" / name).glob("*.h5"))[0]
        with h5py.File(raw) as f:
            if "bart_pics_reconstruction" in f:
                extra = [("BART PICS (not ground truth)", np.abs(f["bart_pics_reconstruction"][()]).reshape(-1, *f["bart_pics_reconstruction"].shape[-2:])[0])]
        n = len(labels) + len(extra)
        fig, ax = plt.subplots(1, n, figsize=(2.3 * n, 2.8), squeeze=False)
        for a, (title, img) in zip(ax[0], extra + [(l, _img(res[l]["file"])) for l in labels]):
            a.imshow(img, cmap="gray", vmin=0, vmax=np.percentile(img, 99.5))
            dc = res.get(title, {}).get("data_consistency")
            a.set_title(title + (f"\nDC {dc:.3f}" if dc is not None else ""), fontsize=7)
            a.axis("off")
        fig.suptitle(f"{name}: real undersampled scan (no fully sampled reference)", fontsize=9)
        fig.tight_layout()
        p = out / f"real_{name}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
        if copy_to:
            copy_to.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, copy_to / p.name)
    return paths


def _img(path):
    import h5py

    with h5py.File(path) as f:
        return f["reconstruction"][0]


if __name__ == "__main__":
    main()
