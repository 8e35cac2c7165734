"""Seconds per slice of ESPIRiT maps: sigpy ``EspiritCalib`` (one slice at a time, via
``ambient_mri.coils.espirit_maps``) against ``ambient_mri.espirit.espirit_maps_torch`` (batched).

Data: Shepp-Logan with a smooth phase (a different phase offset per slice) times birdcage coil maps
normalised to sum |S|^2 = 1, centred FFT, complex noise of std ``--noise`` (seeded). Both methods get
the same settings: square ``calib`` block, kernel width ``min(6, calib // 2)``, thresh 0.02, crop 0,
100 power iterations. sigpy and torch run with the same number of threads (torch.set_num_threads and
threadpoolctl for numpy's BLAS). Rounds are interleaved (sigpy, ours batched, ours one slice) so that
both see the same load from other users; each timing is reported as median and min over ``--repeats``
rounds after one warm-up round, divided by the number of slices. The maps are checked against sigpy's
(per-pixel coherence |<S_ours, S_sigpy>| / (|S_ours| |S_sigpy|) inside the object).

    python benchmarks/espirit_speed.py --cases 256:24 64:8 --coils 8 --slices 8 --threads 1 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import statistics
import sys
import time


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


def make_slices(shape: tuple[int, int], coils: int, slices: int, noise: float, seed: int):
    """``(slices, coils, H, W)`` complex64 k-space and the object support ``(H, W)``."""
    import numpy as np
    import sigpy
    import sigpy.mri

    from ambient_mri.fft import fft2c

    H, W = shape
    maps = sigpy.mri.birdcage_maps((coils, H, W), r=1.2).astype(np.complex64)
    maps /= np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True))
    mag = np.abs(sigpy.shepp_logan((H, W))).astype(np.float32)
    yy, xx = np.mgrid[:H, :W] / np.array([H, W])[:, None, None]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(slices):
        img = mag * np.exp(1j * (2.0 * (xx - 0.3) * (yy + 0.2) + rng.uniform(0, 2 * np.pi)))
        k = fft2c((maps * img).astype(np.complex64))
        k = k + noise * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))
        out.append(k.astype(np.complex64))
    return np.stack(out), mag > 0.05


def _threads(n: int):
    import torch

    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        print("  (threadpoolctl missing: numpy's BLAS thread count not set)")
        return contextlib.nullcontext()
    return threadpool_limits(n)


def run_case(shape: tuple[int, int], calib: int, args) -> dict:
    import numpy as np
    import torch

    from ambient_mri.coils import espirit_maps
    from ambient_mri.espirit import espirit_maps_torch

    ksp, support = make_slices(shape, args.coils, args.slices, args.noise, args.seed)
    k_t = torch.from_numpy(ksp)
    ns = min(args.sigpy_slices, args.slices)
    times = {"sigpy": [], "ours": [], "ours_1": []}
    if args.eigh:
        times["ours_eigh"] = []
    coh = []
    for rnd in range(args.repeats + 1):  # round 0 is the warm-up
        t0 = time.perf_counter()
        ref = [espirit_maps(ksp[i], calib) for i in range(ns)]
        t1 = time.perf_counter()
        est = espirit_maps_torch(k_t, calib).numpy()
        t2 = time.perf_counter()
        espirit_maps_torch(k_t[:1], calib)
        t3 = time.perf_counter()
        if args.eigh:
            espirit_maps_torch(k_t, calib, method="eigh")
            times["ours_eigh"].append((time.perf_counter() - t3) / args.slices)
        if rnd == 0:
            for i in range(ns):
                num = np.abs((est[i].conj() * ref[i]).sum(0))
                den = np.sqrt((np.abs(est[i]) ** 2).sum(0) * (np.abs(ref[i]) ** 2).sum(0)) + 1e-12
                coh.append((num / den)[support])
            for v in times.values():
                v.clear()
            continue
        times["sigpy"].append((t1 - t0) / ns)
        times["ours"].append((t2 - t1) / args.slices)
        times["ours_1"].append(t3 - t2)
    coh = np.concatenate(coh)
    return {"times": times, "coh_min": float(coh.min()), "coh_mean": float(coh.mean())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["256:24", "64:8"],
                    help="matrix and square calibration width, N:CALIB (N x N) or HxW:CALIB")
    ap.add_argument("--coils", type=int, default=8, help="number of coils")
    ap.add_argument("--slices", type=int, default=8, help="slices per batched torch call")
    ap.add_argument("--sigpy-slices", type=int, default=2, help="slices timed for sigpy (one by one) per round")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to time, each for both")
    ap.add_argument("--noise", type=float, default=1e-3, help="complex noise std (image peak is 1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the noise and per-slice phase offsets")
    ap.add_argument("--eigh", action="store_true", help="also time method='eigh' (per-pixel torch.linalg.eigh)")
    args = ap.parse_args(argv)

    import numpy as np
    import sigpy
    import torch

    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) if argv is None
          else " ".join(shlex.quote(a) for a in ["benchmarks/espirit_speed.py", *argv]))
    print(f"data: birdcage maps x Shepp-Logan (smooth phase, per-slice phase offset), {args.coils} coils, "
          f"noise std {args.noise}, seed {args.seed}; sigpy {args.sigpy_slices} slices one by one, "
          f"ours {args.slices} slices batched (and 1 slice); {args.repeats} rounds after a warm-up")
    print(f"machine: {_cpu_name()}, {os.cpu_count()} CPUs, {platform.platform()}, load avg {_load()} at start")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, sigpy {sigpy.__version__}, "
          f"numpy {np.__version__}")
    rows = []
    for nt in args.threads:
        with _threads(nt):
            for case in args.cases:
                size, calib = case.split(":")
                H, W = (int(v) for v in size.split("x")) if "x" in size else (int(size), int(size))
                calib = int(calib)
                r = run_case((H, W), calib, args)
                t = {k: (statistics.median(v), min(v)) for k, v in r["times"].items()}
                rows.append((nt, f"{H}x{W}", calib, t, r))
                print(f"threads {nt} {H}x{W} calib {calib}: " + ", ".join(
                    f"{k} {m:.3f} s/slice (min {lo:.3f})" for k, (m, lo) in t.items())
                    + f"; coherence with sigpy min {r['coh_min']:.6f} mean {r['coh_mean']:.7f}; load {_load()}",
                    flush=True)
    print(f"load avg {_load()} at end\n")
    eig = " ours eigh |" if args.eigh else ""
    print(f"| threads | matrix | calib | sigpy s/slice | ours batched ({args.slices}) s/slice | ours 1 slice s |"
          f"{eig} speed-up batched | coherence min |")
    print("|---|---|---|---|---|---|" + ("---|" if args.eigh else "") + "---|---|")
    for nt, hw, calib, t, r in rows:
        e = f" {t['ours_eigh'][0]:.3f} |" if args.eigh else ""
        print(f"| {nt} | {hw}x{args.coils} | {calib} | {t['sigpy'][0]:.3f} (min {t['sigpy'][1]:.3f}) | "
              f"{t['ours'][0]:.4f} (min {t['ours'][1]:.4f}) | {t['ours_1'][0]:.3f} |{e} "
              f"{t['sigpy'][0] / t['ours'][0]:.0f}x | {r['coh_min']:.5f} |")


if __name__ == "__main__":
    main()
