#!/usr/bin/env python
"""Why an ambient prior's unconditional samples are streaked, and what other mask schedules give.

The package's prior sampler (``sampling.prior_sample``, the seed paper's fixed-mask Heun sampler) holds one
further mask ``M~`` per sample for all steps: the network sees only the k-space lines in ``M~`` (about one
line in five for A-DPS R = 4 -> 5), samples those, and fills the others with its conditional mean given them.
This script draws ``--n`` samples of an ambient prior with three schedules of ``M~``, the same noise and the
same Heun steps:

- ``fixed``: the package's sampler (one ``M~`` per sample, drawn from the training distribution);
- ``fresh``: a new ``M~`` at every noise level;
- ``mean-K``: at every step the mean of the denoiser over ``K`` fresh masks (``K`` evaluations per call).

and scores each set, with no network as judge, against held-out references (a prepared split with a
``reference`` dataset, e.g. validation): the log-spectral distance (dB) between the mean normalised k-space power
spectra, the same for the spectrum's phase-encode marginal, and the share of high-frequency energy
(``|k| > W / 4`` along the phase-encode direction) relative to the references'. ``--oracle`` adds a
clean-trained prior's samples (its package sampler) as a reference row. A grid of the first 8 samples of each
row is saved as ``--out``.

    python benchmarks/prior_sampler_variants.py --ambient FULL4500/runs/ambient --oracle FULL4500/runs/oracle \\
        --maps-from FULL4500/prep/train --reference FULL4500/prep/val/R4 --out variants.png
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from ambient_mri.checkpoint import load_denoiser
from ambient_mri.corruption import from_dict
from ambient_mri.fft import fft2c
from ambient_mri.sampling import View, draw_prior_samples, magnitude_grid, prior_sample, training_maps


class MaskSchedule:
    """A denoiser ``D(x; sigma)`` for ``prior_sample`` with the clean view: the ambient denoiser applied to its
    own views ``A~_k^H A~_k x`` (coil maps ``maps``), averaged over ``K`` masks drawn fresh for every noise level
    (seeded by the level's index: Heun's correction at ``sigma_{i+1}`` and the next step's first evaluation see
    the same masks)."""

    def __init__(self, denoiser, corruption, maps: torch.Tensor, K: int, seed: int):
        self.den, self.corruption, self.maps, self.K, self.seed = denoiser, corruption, maps, K, seed
        self.levels: dict = {}

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, mask=None) -> torch.Tensor:
        step = self.levels.setdefault(round(float(sigma[0]), 8), len(self.levels))
        out = 0
        for k in range(self.K):
            m = self.corruption.draw(len(x), seed=self.seed + 7919 * (step + 1) + 104729 * k).float()
            out = out + self.den(View("kspace", m, self.maps)(x), sigma, m)
        return out / self.K


def spectrum(x: torch.Tensor) -> torch.Tensor:
    """Mean over images of the k-space power spectrum normalised to unit sum per image, ``(H, W)``."""
    p = fft2c(x).abs().pow(2)
    return (p / p.sum((-2, -1), keepdim=True)).mean(0)


def spectral_scores(x: torch.Tensor, ref: torch.Tensor) -> dict:
    a, b = spectrum(x), spectrum(ref)
    W = a.shape[-1]
    hf = (torch.arange(W) - W // 2).abs() > W // 4
    return {"lsd_db": float((10 * (a.log10() - b.log10())).pow(2).mean().sqrt()),
            "pe_lsd_db": float((10 * (a.sum(0).log10() - b.sum(0).log10())).pow(2).mean().sqrt()),
            "hf_ratio": float(a[:, hf].sum() / b[:, hf].sum())}


def references(folder: Path, n: int) -> torch.Tensor:
    """The first ``n`` references of the prepared files in ``folder`` (sorted), ``(n', H, W)``; files after those
    are not read."""
    out, have = [], 0
    for p in sorted(folder.glob("*.h5")):
        if have >= n:
            break
        with h5py.File(p, "r") as f:
            if "reference" not in f:
                sys.exit(f"{p}: no 'reference' dataset (give a prepared validation or test split)")
            out.append(torch.from_numpy(f["reference"][: n - have].astype(np.complex64)))
        have += len(out[-1])
    if not out:
        sys.exit(f"{folder}: no prepared .h5 files")
    return torch.cat(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ambient", required=True, help="ambient checkpoint or run folder")
    ap.add_argument("--oracle", default=None, help="optional clean-trained checkpoint, sampled as a reference row")
    ap.add_argument("--maps-from", required=True, type=Path, help="prepared training split (coil maps of the views)")
    ap.add_argument("--reference", required=True, type=Path, help="prepared split with references (validation)")
    ap.add_argument("--n", type=int, default=16, help="samples per schedule (and references scored)")
    ap.add_argument("--steps", type=int, default=18, help="Heun steps")
    ap.add_argument("--K", type=int, default=4, help="masks averaged per step by the mean-K schedule")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("prior_sampler_variants.png"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    print("# command: " + " ".join(shlex.quote(v) for v in [Path(sys.argv[0]).name, *sys.argv[1:]]))
    print(f"# machine: {platform.node()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{a.threads} threads; seed {a.seed}, {a.n} samples, {a.steps} Heun steps")
    den, meta = load_denoiser(a.ambient)
    corruption = from_dict(meta["training"]["corruption"])
    if corruption.domain != "kspace":
        sys.exit(f"{a.ambient}: not a k-space ambient prior (corruption domain {corruption.domain!r})")
    H, W = corruption.shape
    maps, _ = training_maps(a.maps_from, a.n, shape=(H, W), seed=a.seed)
    ref = references(a.reference, a.n)
    rows = []
    for name, K in (("fixed", 0), ("fresh", 1), (f"mean-{a.K}", a.K)):
        t0 = time.perf_counter()
        if K == 0:
            x, _ = draw_prior_samples(den, corruption, a.n, steps=a.steps, seed=a.seed, maps=maps)
        else:
            g = torch.Generator().manual_seed(a.seed)
            x = prior_sample(MaskSchedule(den, corruption, maps, K, a.seed), View("clean"), (a.n, H, W),
                             steps=a.steps, generator=g)
        rows.append((f"ambient, {name}", x, time.perf_counter() - t0))
    if a.oracle:
        oden, ometa = load_denoiser(a.oracle)
        t0 = time.perf_counter()
        x, _ = draw_prior_samples(oden, ometa["training"]["corruption"], a.n, steps=a.steps, seed=a.seed)
        rows.append(("oracle (clean-trained), fixed", x, time.perf_counter() - t0))
    print(f"\n| samples ({a.n}) | spectral distance to the references (dB) | phase-encode marginal (dB) | "
          "high-frequency energy / references' | s |\n|---|---|---|---|---|")
    for name, x, s in rows:
        sc = spectral_scores(x, ref)
        print(f"| {name} | {sc['lsd_db']:.2f} | {sc['pe_lsd_db']:.2f} | {sc['hf_ratio']:.2f} | {s:.0f} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(12, 1.75 * len(rows)))
    for ax, (name, x, _) in zip(np.atleast_1d(axes), rows):
        ax.imshow(magnitude_grid(x[:8], ncol=8), cmap="gray")
        ax.set_title(name, loc="left", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(a.out, dpi=60)
    print(f"\nfigure: {a.out}")


if __name__ == "__main__":
    main()
