#!/usr/bin/env python
"""Background noise of reconstructions: the standard deviation of the magnitude where the reference is
background (``|ref| < frac * max |ref|`` per slice, default 2 %), averaged over the test slices.

A method that fits the measurement noise (SENSE-like noise over the whole field of view) scores high
here even when its PSNR is close to a cleaner method's. Used for the demo (docs/quickstart.md):

    ambient-mri demo --out demo_out
    python benchmarks/background_noise.py demo_out/prep/test/R4 demo_out/recon/R4/*
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import h5py
import numpy as np


def background_std(reference: np.ndarray, recon: np.ndarray, frac: float = 0.02) -> np.ndarray:
    """Per-slice ``std(|x|)`` over the background ``|ref| < frac max|ref|``; ``reference``, ``recon``: ``(S, H, W)``."""
    mag, out = np.abs(reference), []
    for s in range(len(mag)):
        bg = mag[s] < frac * mag[s].max()
        out.append(float(np.std(np.abs(recon[s])[bg])) if bg.any() else np.nan)
    return np.asarray(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reference", type=Path, help="prepared test folder (files with 'reference')")
    ap.add_argument("recon", type=Path, nargs="+", help="reconstruction folders (recon outputs, same file names)")
    ap.add_argument("--frac", type=float, default=0.02, help="background threshold, fraction of the slice max")
    a = ap.parse_args(argv)
    print(f"# background std, threshold {a.frac:g} x slice max; {platform.node()}")
    refs = sorted(a.reference.glob("*.h5"))
    for d in a.recon:
        vals = []
        for p in refs:
            if not (d / p.name).exists():  # e.g. the demo's A-DPS runs on the first volume only
                continue
            with h5py.File(p, "r") as f:
                ref = f["reference"][()]
            with h5py.File(d / p.name, "r") as f:
                if f.attrs.get("units", "prepared") != "prepared":
                    raise SystemExit(f"{d / p.name}: reconstruction is not in prepared units")
                vals.append(background_std(ref, f["reconstruction"][()], a.frac))
        if not vals:
            print(f"{d}: no reconstructions of the reference files")
            continue
        v = np.concatenate(vals)
        print(f"{d}: {np.nanmean(v):.4f} (+- {np.nanstd(v):.4f} over {np.isfinite(v).sum()} slices)")


if __name__ == "__main__":
    main()
