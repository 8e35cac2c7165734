"""Throughput of ``ambient-mri prep`` (slices per second) per coil-map method.

Data: generated, ``--slices`` slices of a ``--coils``-coil ``--size`` x ``--size`` volume (sigpy birdcage maps x
Shepp-Logan with a smooth phase that changes per slice, plus complex noise, seeded), written in the
fastMRI layout. Each maps method runs the full prep (read, mask, maps from the ACS block, norm, CG-SENSE
reference for val, write, manifest) into a fresh folder; the time excludes data generation and imports.

    python benchmarks/prep_throughput.py [--slices 8] [--size 256] [--coils 8] [--split val] [--seed 0]
                                         [--methods espirit,lowres,espirit-torch] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_volume(path: Path, S: int, C: int, N: int, seed: int) -> None:
    import sigpy
    import sigpy.mri

    from ambient_mri.fastmri_io import write_volume
    from ambient_mri.fft import fft2c

    rng = np.random.default_rng(seed)
    maps = sigpy.mri.birdcage_maps((C, N, N), r=1.2).astype(np.complex64)
    base = np.abs(sigpy.shepp_logan((N, N))).astype(np.float32)
    yy, xx = np.mgrid[:N, :N] / N
    k = np.empty((S, C, N, N), np.complex64)
    for s in range(S):
        img = base * (1 + 0.05 * s) * np.exp(1j * (2 * xx - 1 + 0.2 * s * yy))
        noise = 0.01 * (rng.standard_normal((C, N, N)) + 1j * rng.standard_normal((C, N, N)))
        k[s] = fft2c(maps * img) + noise
    write_volume(path, k)


def machine() -> str:
    import sigpy
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("n/a",)
    return (f"{platform.platform()}, python {platform.python_version()}, {os.cpu_count()} CPUs (load avg "
            f"{', '.join(f'{x:.2f}' for x in load)}), torch {torch.__version__} ({torch.get_num_threads()} threads, "
            f"cuda {'yes: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'}), "
            f"sigpy {sigpy.__version__}, numpy {np.__version__}")


def main(argv=None):
    from ambient_mri.coils import maps_methods
    from ambient_mri.prep import PrepOptions, run_prep

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--coils", type=int, default=8)
    ap.add_argument("--split", default="val", choices=("train", "val", "test"))
    ap.add_argument("--accel", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=",".join(maps_methods()))
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"data: {args.slices} slices, {args.coils} coils, {args.size}x{args.size}, generated (birdcage x Shepp-Logan "
          f"+ noise 0.01), seed {args.seed}; prep --split {args.split} --accel {args.accel:g} --mask-type adps "
          f"(default centre W/16 = {max(2, round(args.size / 16))} lines = calib)")
    print("machine:", machine())
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        make_volume(raw / "bench.h5", args.slices, args.coils, args.size, args.seed)
        print(f"{'maps':<14} {'seconds':>8} {'slices/s':>9} {'s/slice':>8}")
        for method in args.methods.split(","):
            if method not in maps_methods():
                print(f"{method:<14} not available in this build")
                continue
            opts = PrepOptions(split=args.split, accel=(args.accel,), maps=method, seed=args.seed)
            out = Path(tmp) / f"out_{method}"
            t0 = time.perf_counter()
            res = run_prep(raw, out, opts, progress=False, echo=lambda m: None)
            dt = time.perf_counter() - t0
            if res.failed:
                print(f"{method:<14} failed: {res.failed[0]['error']}")
                continue
            print(f"{method:<14} {dt:8.2f} {args.slices / dt:9.3f} {dt / args.slices:8.2f}")


if __name__ == "__main__":
    main()
