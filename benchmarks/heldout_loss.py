"""Does an ambient prior overfit its training scans? Its own loss on the training split against held-out scans.

For each checkpoint (EMA weights) and each prepared k-space split, the ambient k-space loss without its weight,

    e(sigma) = ||M F S D(A~^H A~ x_t, sigma, M~) - y||^2 / ||y||^2      (mean over slices)

at a fixed grid of noise levels, with the further masks ``M~`` and the noise ``eta`` drawn from fixed seeds
(the same draws for every checkpoint). Only the measured k-space ``y``, its mask ``M`` and the maps ``S`` are
read (``AmbientKspaceDataset``), so a validation split is scored exactly as the training split is: a gap
between the two that grows with training is overfitting of the measured lines of the training scans, the
only thing the ambient loss sees of them.

    python benchmarks/heldout_loss.py --split train=PREP/train --split val=PREP/val/R4 \
        --checkpoint 1500=RUN1/checkpoint.pt --checkpoint 4500=RUN2/checkpoint.pt [--slices 120] [--out CSV]

A clean-trained checkpoint (oracle, naive, EM) is scored the same way on the references of ``--ref-split``
folders (val-style prepared splits: ``prep/train_oracle`` holds the training slices' references), with its own
loss, ``e(sigma) = ||D(x0 + sigma eta, sigma) - x0||^2 / ||x0||^2``.

Prints a table (one row per checkpoint and split, one column per noise level) and the held-out / training ratio.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time

import torch

from ambient_mri.checkpoint import load_denoiser
from ambient_mri.corruption import from_dict
from ambient_mri.config import CLEAN_KINDS
from ambient_mri.datasets import AmbientKspaceDataset, ReferenceDataset, collate
from ambient_mri.distributed import derived_seed
from ambient_mri.losses import ambient_kspace_loss, edm_loss, edm_weight

SIGMAS = (0.01, 0.03, 0.1, 0.3, 1.0)


def named(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, value


@torch.no_grad()
def relative_errors(den, corruption, dataset, sigmas, *, slices: int, batch: int, seed: int) -> list[float]:
    """``e(sigma)`` for each sigma, mean over the first ``slices`` slices of ``dataset``: the training loss itself
    (``losses.ambient_kspace_loss`` or ``losses.edm_loss``, EDM weight), unweighted and divided by the energy of
    its target instead of ``H W``."""
    n = min(slices, len(dataset))
    sums = [0.0] * len(sigmas)
    for start in range(0, n, batch):
        b = collate([dataset[i] for i in range(start, min(n, start + batch))])
        target = b["image"] if "image" in b else b["kspace"]  # a clean prior on references, else measured k-space
        scale = target.shape[-2] * target.shape[-1] / target.abs().pow(2).flatten(1).sum(1)
        for j, s in enumerate(sigmas):
            g = torch.Generator().manual_seed(derived_seed("heldout", seed, start, j))
            sigma = torch.full((len(target),), float(s))
            if "image" in b:
                loss = edm_loss(den, target, sigma, generator=g)
            else:  # M~ first, then eta, from the same generator (as in training)
                further = corruption.further(b["mask"], generator=g)
                loss = ambient_kspace_loss(den, target, b["mask"], b["maps"], further, sigma, generator=g)
            sums[j] += float((loss / edm_weight(sigma, den.sigma_data) * scale).sum())
    return [v / n for v in sums]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", type=named, action="append", default=[], help="NAME=PREPARED_FOLDER (k-space)")
    p.add_argument("--ref-split", type=named, action="append", default=[],
                   help="NAME=PREPARED_FOLDER with references (for clean-trained checkpoints)")
    p.add_argument("--checkpoint", type=named, action="append", required=True, help="NAME=CHECKPOINT")
    p.add_argument("--sigmas", type=float, nargs="+", default=list(SIGMAS))
    p.add_argument("--slices", type=int, default=120, help="first N slices of each split (default 120)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the table as CSV here")
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    t0 = time.perf_counter()
    print(f"# {' '.join(sys.argv)}\n# machine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; seed {a.seed}; first {a.slices} slices of each split")
    splits = {name: AmbientKspaceDataset(path) for name, path in a.split}
    refs = {name: ReferenceDataset(path) for name, path in a.ref_split}
    rows = []
    for ck_name, ck_path in a.checkpoint:
        den, meta = load_denoiser(ck_path)
        corruption = from_dict(meta["training"]["corruption"])
        clean = meta["training"]["kind"] in CLEAN_KINDS
        if not (refs if clean else splits):
            need = "--ref-split" if clean else "--split"
            sys.exit(f"{ck_path}: a {meta['training']['kind']} checkpoint needs {need}")
        for split_name, ds in (refs if clean else splits).items():
            errs = relative_errors(den, corruption, ds, a.sigmas, slices=a.slices, batch=a.batch, seed=a.seed)
            rows.append({"checkpoint": ck_name, "step": meta["step"], "split": split_name,
                         "slices": min(a.slices, len(ds)), **{f"e({s:g})": e for s, e in zip(a.sigmas, errs)}})
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    print("\nsecond split / first (held-out over training error; 1 = no overfitting):")
    for ck_name, _ in a.checkpoint:
        mine = [r for r in rows if r["checkpoint"] == ck_name]
        if len(mine) >= 2:
            r0, r1 = mine[:2]
            print(f"  {ck_name} ({r1['split']} / {r0['split']}): " + ", ".join(
                f"sigma {s:g}: {r1[f'e({s:g})'] / r0[f'e({s:g})']:.3f}" for s in a.sigmas))
    if a.out:
        with open(a.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
    print(f"# wall time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
