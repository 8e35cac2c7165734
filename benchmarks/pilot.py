"""Issue 10's pilot on validation slices: each setting (an ambient prior and a prepared validation split) is
scored by the DC sampler against L1-wavelet (weight tuned on the first validation volume), A-OS and zero-filled;
paired DC - L1 difference with a 95 % bootstrap interval over slices. ``--sampler`` adds other samplers (e.g.
A-DPS with more steps or another step size) as extra columns, each with its own paired difference to L1.

Each setting is ``NAME=VAL_FOLDER:RUN``: ``VAL_FOLDER`` a prepared val split (its first file, in sorted order,
tunes L1; the others are scored) and ``RUN`` the ambient run folder. How the 2026-12-06 mask pilot's runs were
made (SIAT 64 x 64, 8 coils, noise 0.005, as ``siat_benchmark.py``; ``MK`` = poisson or random-2d):

    ambient-mri prep DATA/train prep_MK/train --split train --accel 4 --seed 0 --maps espirit-torch \\
        --mask-type MK --center-lines 8 --workers 2
    ambient-mri prep DATA/val prep_MK/val --split val --accel 4 --seed 1 --maps espirit-torch --mask-type MK \\
        --center-lines 8 --workers 2
    ambient-mri train --config cpu64 --data prep_MK/train --out runs/MK train.steps=1500 train.batch=8 \\
        train.lr=0.0006 train.warmup=200 train.ema_halflife=8000 loss.kind=ambient loss.further_accel=5

    python benchmarks/pilot.py --out OUT poisson=prep_poisson/val:runs/poisson random-2d=...

The model, budget and sampler axes of the lines setting (docs/benchmarks.md) change one ``train`` override each,
and are scored the same way, e.g. ``--sampler adps300-l3=adps:steps=300,step_size=3``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ambient_mri.evaluate import run_eval
from ambient_mri.metrics import paired_difference
from ambient_mri.recon import run_recon

sys.path.insert(0, str(Path(__file__).resolve().parent))
from siat_benchmark import slice_psnr  # noqa: E402


def split_sets(val: Path, out: Path) -> tuple[Path, Path]:
    """``out/tune`` (the first volume) and ``out/eval`` (the others), as links to the files in ``val``."""
    files = sorted(val.glob("*.h5"))
    if len(files) < 2:
        sys.exit(f"{val}: needs at least 2 prepared volumes (one tunes L1), found {len(files)}")
    for name, fs in (("tune", files[:1]), ("eval", files[1:])):
        (out / name).mkdir(parents=True, exist_ok=True)
        for f in fs:
            if not (out / name / f.name).exists():
                (out / name / f.name).symlink_to(f.resolve())
    return out / "tune", out / "eval"


def parse_sampler(text: str) -> tuple[str, str, dict]:
    """``"adps300=adps:steps=300,step_size=3"`` -> ``("adps300", "adps", {"steps": 300, "step_size": 3})``
    (values: ``true``/``false`` as booleans, else int, else float, else text; keys are
    :func:`ambient_mri.recon.run_recon`'s)."""
    name, _, rest = text.partition("=")
    method, _, args = rest.partition(":")
    if not (name and method) or name in ("zf", "l1", "aos", "dc"):
        sys.exit(f"--sampler {text!r}: expected NAME=METHOD[:key=value,...] with a new NAME")
    kw = {}
    for item in filter(None, args.split(",")):
        k, _, v = item.partition("=")
        if v.lower() in ("true", "false"):  # "ema=false" must not become the (truthy) text "false"
            kw[k] = v.lower() == "true"
            continue
        for cast in (int, float, str):
            try:
                kw[k] = cast(v)
                break
            except ValueError:
                pass
    return name, method, kw


def score(name: str, val: Path, run: Path, out: Path, dc_steps: int, seed: int, samplers=()) -> str:
    tune, ev = split_sets(val, out / "sets")
    t0 = time.time()
    jobs = [("zf", "zf", {}), ("l1", "l1", dict(tune_on=tune, tune_slices=8, l1_iters=100)),
            ("aos", "aos", dict(checkpoint=run)), ("dc", "dc", dict(checkpoint=run, steps=dc_steps, seed=seed))]
    jobs += [(n, m, dict(dict(checkpoint=run, seed=seed), **kw)) for n, m, kw in samplers]
    for label, m, kw in jobs:
        run_recon(ev, out / label, m, label=label, nifti=False, png=False, quiet=True, batch=10,
                  echo=lambda *a, **k: None, **kw)
    run_eval([out / label for label, _, _ in jobs], ev, out / "report")
    per = slice_psnr(out / "report")
    keys = sorted(per["dc"])  # every method is scored on the same slices; pair them by (volume, slice)

    def versus_l1(label):
        d = paired_difference([per[label][k] for k in keys], [per["l1"][k] for k in keys], seed=seed)
        return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"

    mean = {label: f"{np.mean([per[label][k] for k in keys]):.2f}" for label in per}
    cells = [name, str(len(keys))] + [mean[m] for m in ("zf", "l1", "aos", "dc")] + [versus_l1("dc")]
    for n, _, _ in samplers:
        cells += [mean[n], versus_l1(n)]
    return "| " + " | ".join(cells + [f"{time.time() - t0:.0f}"]) + " |"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings", nargs="+", help="NAME=VAL_FOLDER:RUN")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dc-steps", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sampler", action="append", default=[], metavar="NAME=METHOD[:key=value,...]",
                    help="an extra sampler column, e.g. adps300=adps:steps=300,step_size=3 (repeatable)")
    a = ap.parse_args(argv)
    samplers = [parse_sampler(t) for t in a.sampler]
    torch.set_num_threads(a.threads)
    print(f"command: {' '.join(sys.argv)}\nmachine: {platform.platform()}, {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__}, {a.threads} threads; sampler and bootstrap seed {a.seed}\n")
    head = ["setting", "slices", "ZF", "L1", "A-OS", "DC", "DC - L1 [95 % CI]"]
    for n, _, _ in samplers:
        head += [n, f"{n} - L1 [95 % CI]"]
    head.append("s")
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for s in a.settings:
        name, _, rest = s.partition("=")
        val, _, run = rest.partition(":")
        if not (name and val and run):
            sys.exit(f"setting {s!r}: expected NAME=VAL_FOLDER:RUN")
        print(score(name, Path(val), Path(run), a.out / name, a.dc_steps, a.seed, samplers), flush=True)


if __name__ == "__main__":
    main()
