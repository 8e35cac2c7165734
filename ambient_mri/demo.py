"""``ambient-mri demo``: the whole pipeline on built-in demo data, in a few minutes on a laptop CPU.

1. Generate demo data (``data_prep.demo_data``: MNI152 anatomy from nilearn's wheel, simulated contrast,
   phase and 8 birdcage coils, 64 x 64) in the fastMRI layout; nothing is downloaded or read from elsewhere.
2. ``prep``: the train split at R = 4 (2-D Poisson-disc, 8 x 8 calibration centre; undersampled k-space only),
   the val and test splits at R = 4 and R = 8.
3. A short ambient training run from scratch on the undersampled train split, to show the loss falling.
4. Reconstruction of the held-out test scans at R = 4 and R = 8 with the packaged demo checkpoint (trained
   by ``ambient-mri train`` on undersampled train splits from the same generator, the demo's 240 slices and then
   1920, 27,500 steps; see docs/model_card_demo.md) and with the classical baselines, then ``eval``: a PSNR/SSIM
   table and figures.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

from data_prep.demo_data import existing_demo, generate_demo

from .checkpoint import ASSETS, PACKAGED
from .errors import DataError
from .evaluate import run_eval
from .fsutil import make_dir
from .prep import PrepOptions, run_prep
from .recon import run_recon
from .train import train

DEMO_CHECKPOINT = ASSETS / PACKAGED["demo"]
TRAIN_ACCEL, TEST_ACCELS = 4.0, (4.0, 8.0)
# A-DPS step l for the demo checkpoint, chosen on the demo's *validation* volume demo_val_000 at R = 8
# (100 steps; for the packaged checkpoint l = 0.3 / 1 / 3 gave 24.79 / 27.50 / 26.84 dB, docs/model_card_demo.md),
# never on the test scans
ADPS_STEP_SIZE = 1.0
# L1-wavelet iterations: converged on the demo's validation split (R = 4 / 8: 50 iterations 32.23 / 24.23 dB,
# 100: 33.22 / 25.68, 200: 33.17 / 26.15, 400: 33.16 / 26.14 with the weight chosen each time; docs/quickstart.md)
L1_ITERS = 200
DATA_OPTIONS = dict(n_train_volumes=24, n_val_volumes=3, n_test_volumes=3, slices_per_volume=10, size=64, coils=8,
                    seed=0)


def _stage(echo, t0, msg):
    echo(f"[{time.perf_counter() - t0:6.1f} s] {msg}")


def prepare_demo_data(out: Path, echo, t0, *, progress: bool) -> Path:
    """Demo raw data and the prepared splits under ``out`` (reused when already there)."""
    raw = out / "data"
    if existing_demo(raw, **DATA_OPTIONS) is None:
        _stage(echo, t0, f"generating demo data in {raw}")
        generate_demo(raw, **DATA_OPTIONS)
    common = dict(mask_type="poisson", center_lines=8, maps="espirit-torch", seed=0)
    quiet = dict(progress=progress, echo=lambda m: None)
    _stage(echo, t0, "prep: train split at R = 4 (undersampled k-space, mask and maps only)")
    run_prep(raw / "train", out / "prep" / "train", PrepOptions(split="train", accel=(TRAIN_ACCEL,), **common),
             workers=1, **quiet)
    for split, seed in (("val", 1), ("test", 2)):
        _stage(echo, t0, f"prep: {split} split at R = 4 and R = 8")
        run_prep(raw / split, out / "prep" / split,
                 PrepOptions(split=split, accel=TEST_ACCELS, **dict(common, seed=seed)), workers=1, **quiet)
    return out / "prep"


def short_training(prep: Path, run: Path, steps: int, echo, t0, *, progress: bool) -> tuple[float, float]:
    """A short ambient run from scratch; returns the mean loss over the first and the last fifth of steps."""
    _stage(echo, t0, f"train: {steps} ambient steps from scratch on the undersampled train split")
    if not (run / "checkpoint.pt").exists():
        train("demo", prep / "train", run, overrides=[f"train.steps={steps}", "train.log_every=5",
                                                       "train.sample_every=0", f"train.ckpt_every={steps}"],
              progress=progress, echo=lambda m: None)
    with open(run / "metrics.csv", newline="") as f:
        loss = [float(r["loss"]) for r in csv.DictReader(f)]
    k = max(1, len(loss) // 5)
    return sum(loss[:k]) / k, sum(loss[-k:]) / k


def run_demo(out, *, train_steps: int = 150, checkpoint=None, adps_steps: int = 100, dc_steps: int = 25,
             samples: int = 1, progress: bool = False, echo=print) -> dict:
    """Run every stage; returns ``{"summary": [...], "markdown", "figures", "loss": (first, last), "seconds"}``."""
    t0 = time.perf_counter()
    ckpt = Path(checkpoint) if checkpoint else DEMO_CHECKPOINT
    if not ckpt.exists():
        raise DataError("demo checkpoint is missing (reinstall the package)", ckpt)
    out = make_dir(out)  # an unwritable working folder: one line now, before any data are generated
    prep = prepare_demo_data(out, echo, t0, progress=progress)
    first, last = short_training(prep, out / "runs" / "short", train_steps, echo, t0, progress=progress)
    echo(f"         loss fell from {first:.3f} (first fifth of steps) to {last:.3f} (last fifth)")
    recon_dirs = {}
    for R in TEST_ACCELS:
        test = prep / "test" / f"R{R:g}"
        val = prep / "val" / f"R{R:g}"
        rec = out / "recon" / f"R{R:g}"
        runs = [("zf", {}), ("sense", {}), ("l1", dict(tune_on=val, tune_slices=4, l1_iters=L1_ITERS)),
                ("aos", dict(checkpoint=ckpt)),
                ("dc", dict(checkpoint=ckpt, steps=dc_steps, samples=samples, label=f"dc ({2 * dc_steps - 1} NFE)"))]
        if adps_steps:
            runs.append(("adps", dict(checkpoint=ckpt, steps=adps_steps, step_size=ADPS_STEP_SIZE,
                                      label=f"adps ({adps_steps} NFE, 1 vol)", _first=True)))
        for method, kw in runs:
            first_only = kw.pop("_first", False)
            label = kw.pop("label", method)
            dest = rec / label.split(" ")[0]
            _stage(echo, t0, f"recon R = {R:g}: {label}")
            inputs = sorted(test.glob("*.h5"))[0] if first_only else test
            run_recon(inputs, dest, method, label=label, nifti=False, quiet=not progress, batch=10, **kw)
            recon_dirs.setdefault(R, []).append(dest)
    results = {}
    for R, dirs in recon_dirs.items():
        _stage(echo, t0, f"eval R = {R:g}")
        results[R] = run_eval(dirs, prep / "test" / f"R{R:g}", out / "report" / f"R{R:g}")
    md = "\n".join(results[R]["markdown"] for R in TEST_ACCELS)
    figures = [p for R in TEST_ACCELS for p in results[R]["figures"]]
    return {"summary": {R: results[R]["summary"] for R in TEST_ACCELS}, "markdown": md, "figures": figures,
            "loss": (first, last), "seconds": time.perf_counter() - t0}
