#!/usr/bin/env python
"""How good were an EM run's E-step samples? Scores each round's posterior samples of the training scans
(``RUN/round_r/samples.h5``) against the references of the same scans, with the A-DPS PSNR and the background
noise of ``background_noise.py``.

A diagnostic, outside the training path: the references come from a prepared split that holds them (in the
SIAT benchmark ``prep/train_oracle``, which only the oracle baseline trains on); the EM run itself never reads
them. The two splits must be the same scans in the same order with the same norm (checked).

    python benchmarks/em_estep_quality.py OUT/runs/em OUT/prep/train OUT/prep/train_oracle
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from background_noise import background_std  # noqa: E402

from ambient_mri.datasets import SAMPLES_FILE  # noqa: E402
from ambient_mri.metrics import psnr_adps_batch  # noqa: E402


def references(train: Path, with_ref: Path) -> np.ndarray:
    """References ``(S, H, W)`` of the training scans, in the training split's file and slice order."""
    refs = []
    for a in sorted(train.glob("*.h5")):
        b = with_ref / a.name
        with h5py.File(a, "r") as f, h5py.File(b, "r") as g:
            if "reference" not in g:
                raise SystemExit(f"{b}: no 'reference'")
            if not np.allclose(f["norm"][()], g["norm"][()]):
                raise SystemExit(f"{b}: norm differs from {a} (not the same prepared scans)")
            refs.append(g["reference"][()])
    return np.concatenate(refs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="EM run folder (round_1/, round_2/, ...)")
    ap.add_argument("train", type=Path, help="the prepared train split the EM run read")
    ap.add_argument("with_reference", type=Path, help="a prepared split of the same scans that holds references")
    a = ap.parse_args(argv)
    ref = references(a.train, a.with_reference)
    print(f"# {' '.join(sys.argv)}\n# {platform.node()}, {len(ref)} training slices")
    print(f"references' own background std: {np.nanmean(background_std(ref, ref)):.4f}")
    for d in sorted(a.run.glob("round_*"), key=lambda p: int(p.name.split("_")[1])):
        with h5py.File(d / SAMPLES_FILE, "r") as f:
            x = f["images"][()]
        if x.shape != ref.shape:
            raise SystemExit(f"{d / SAMPLES_FILE}: {x.shape} samples for {ref.shape} references")
        p, bg = psnr_adps_batch(ref, x), background_std(ref, x)
        print(f"{d.name}: PSNR {p.mean():.2f} +- {p.std():.2f} dB, background std {np.nanmean(bg):.4f}")


if __name__ == "__main__":
    main()
