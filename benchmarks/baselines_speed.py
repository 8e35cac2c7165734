"""Seconds per slice of the classical baselines (zero-filled, CG-SENSE, L1-wavelet) on this machine.

Data: ``tests/phantom.py: phantom_problem`` (Shepp-Logan with a smooth phase, birdcage coil maps
normalised to sum |S|^2 = 1, seeded Poisson-disc mask, complex noise). zero-filled and CG-SENSE run
batched over ``--slices`` slices (torch); L1-wavelet runs slice by slice (sigpy), its step-size power
iteration included. Each timing is the median of ``--repeats`` runs after one warm-up run, divided by
the number of slices. Prints the command, data, seed, machine, and a Markdown table.

    python benchmarks/baselines_speed.py --sizes 64 256 --coils 8
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test fixture tests/phantom.py
from tests.phantom import phantom_problem  # noqa: E402


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="square matrix sizes H = W")
    ap.add_argument("--coils", type=int, default=8, help="number of coils")
    ap.add_argument("--slices", type=int, default=4, help="slices per batched call (zero-filled, CG-SENSE)")
    ap.add_argument("--l1-slices", type=int, default=2, help="slices timed for L1-wavelet (run one by one)")
    ap.add_argument("--accel", type=float, default=4.0, help="acceleration of the Poisson-disc mask")
    ap.add_argument("--noise", type=float, default=0.01, help="complex noise std (image peak is 1)")
    ap.add_argument("--cg-iters", type=int, default=30, help="CG-SENSE iterations")
    ap.add_argument("--l1-iters", type=int, default=100, help="L1-wavelet (FISTA) iterations")
    ap.add_argument("--lam", type=float, default=1e-3, help="L1-wavelet weight")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per method (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the masks and the noise")
    args = ap.parse_args(argv)

    import numpy as np
    import sigpy
    import torch

    from ambient_mri import __version__
    from ambient_mri import baselines as B
    from ambient_mri import metrics as M

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print("command:", " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv))
    print(f"data: phantom_problem (Shepp-Logan, smooth phase), {args.coils} birdcage coils, Poisson-disc "
          f"R={args.accel}, noise std {args.noise}; zf/CG batched over {args.slices} slices, "
          f"L1 over {args.l1_slices} slices one by one; CG {args.cg_iters} it, L1 {args.l1_iters} it, "
          f"lam {args.lam}, wavelet db4")
    print(f"seed: {args.seed}")
    print(f"machine: {platform.node()} | {_cpu_name()} | {os.cpu_count()} CPUs | torch threads "
          f"{torch.get_num_threads()} | load average before {_load()} | python {platform.python_version()} | "
          f"torch {torch.__version__} | sigpy {sigpy.__version__} | numpy {np.__version__} | "
          f"ambient_mri {__version__}")

    rows = []
    for n in args.sizes:
        p = phantom_problem((n, n), coils=args.coils, accel=args.accel, mask_kind="poisson",
                              noise=args.noise, slices=max(args.slices, args.l1_slices), seed=args.seed)
        yb, mb, sb = p["y"][: args.slices], p["maps"][: args.slices], p["mask"][: args.slices]
        yl, ml, sl = p["y"][: args.l1_slices], p["maps"][: args.l1_slices], p["mask"][: args.l1_slices]
        runs = {
            "zero-filled": (lambda: B.zero_filled(yb, mb, sb), args.slices, p["x"][: args.slices]),
            f"CG-SENSE ({args.cg_iters} it)": (lambda: B.cg_sense(yb, mb, sb, iters=args.cg_iters), args.slices,
                                               p["x"][: args.slices]),
            f"L1-wavelet ({args.l1_iters} it)": (lambda: B.l1_wavelet(yl, ml, sl, args.lam, iters=args.l1_iters),
                                                 args.l1_slices, p["x"][: args.l1_slices]),
        }
        for name, (fn, count, ref) in runs.items():
            sec = _time(fn, args.repeats) / count
            psnr = float(np.mean(M.psnr_adps_batch(ref, fn())))
            rows.append((f"{n}x{n}", args.coils, name, sec, psnr))
            print(f"  {n}x{n} {name}: {sec:.4f} s/slice, PSNR {psnr:.2f} dB", flush=True)

    print(f"load average after: {_load()}")
    print("\n| matrix | coils | method | s / slice | PSNR (A-DPS, dB) |\n|---|---|---|---|---|")
    for m, c, name, sec, psnr in rows:
        print(f"| {m} | {c} | {name} | {sec:.4f} | {psnr:.2f} |")


if __name__ == "__main__":
    main()
