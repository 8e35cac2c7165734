"""Memory flatness of a long training run: process RSS over ``--steps`` steps of the ``tiny`` config.

Runs the real ``ambient_mri.train.train`` (ambient k-space loss, further masks redrawn every step, Adam,
EMA, metrics.csv/train.log logging and TensorBoard when it imports, a checkpoint every ``--ckpt-every``
steps) on a small synthetic prepared train split written to a temporary folder (``--size`` x ``--size``,
``--coils`` coils, ``--slices`` slices, A-DPS line masks R = 4; the writer of
``benchmarks/train_throughput.py``).

RSS (``VmRSS`` of ``/proc/self/status``) is sampled

* at every logged step (every ``--log-every`` steps), by wrapping ``RunLog.metrics_row`` -- the trainer
  has no per-step callback, and the metrics row is written from the training loop at known steps;
* every 0.5 s by a background thread (its maximum is reported as the peak, with ``VmHWM``).

It prints the table step -> RSS, the growth from step ``--from-step`` (default 200: after the data
cache, allocator pools and the first checkpoints have warmed up) to the last step, a least-squares slope
over the same range, the command, seed and machine, and exits with status 1 when the growth exceeds
``--max-growth-mb`` (default 50 MB).

    OMP_NUM_THREADS=1 python benchmarks/memory_flat.py
    OMP_NUM_THREADS=1 python benchmarks/memory_flat.py --steps 3000 --max-growth-mb 20
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_throughput import _cpu_name, _load, synthetic_prepared  # noqa: E402


def status_kb(field: str = "VmRSS") -> int:
    """A ``/proc/self/status`` field in kB (``VmRSS``: resident set now; ``VmHWM``: its peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


class Sampler(threading.Thread):
    """Samples ``VmRSS`` every ``period`` seconds until :meth:`stop`."""

    def __init__(self, period: float = 0.5):
        super().__init__(daemon=True)
        self.period, self.samples, self._stop_event = period, [], threading.Event()

    def run(self):
        t0 = time.perf_counter()
        while not self._stop_event.is_set():
            self.samples.append((time.perf_counter() - t0, status_kb()))
            self._stop_event.wait(self.period)

    def stop(self):
        self._stop_event.set()
        self.join()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--log-every", type=int, default=50, help="RSS is recorded at these steps")
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--from-step", type=int, default=200, help="growth is measured from this step to the last")
    ap.add_argument("--max-growth-mb", type=float, default=50.0, help="exit 1 if the growth exceeds this")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--coils", type=int, default=2)
    ap.add_argument("--slices", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.from_step % args.log_every or args.steps % args.log_every or not 0 < args.from_step < args.steps:
        ap.error("--from-step and --steps must be multiples of --log-every, with 0 < --from-step < --steps")

    import importlib.util

    import torch

    from ambient_mri import train as train_mod

    tensorboard = importlib.util.find_spec("tensorboard") is not None
    from ambient_mri.config import load_config

    rss = {}  # step -> (VmRSS kB, seconds since start)
    t0 = time.perf_counter()
    original = train_mod.RunLog.metrics_row

    def recording(self, row):
        original(self, row)
        rss[int(row["step"])] = (status_kb(), time.perf_counter() - t0)

    train_mod.RunLog.metrics_row = recording
    sampler = Sampler(0.5)
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_prepared(Path(tmp) / "data", args.slices, args.size, args.coils, 4.0, args.seed)
        overrides = [f"train.steps={args.steps}", f"train.log_every={args.log_every}",
                     f"train.ckpt_every={args.ckpt_every}", "train.sample_every=0", f"train.seed={args.seed}"]
        cfg = load_config("tiny", overrides)
        rss_start = status_kb()
        sampler.start()
        t_train = time.perf_counter()
        res = train_mod.train(cfg, data, Path(tmp) / "run", progress=False, echo=lambda m: None)
        wall = time.perf_counter() - t_train
        sampler.stop()
    train_mod.RunLog.metrics_row = original

    steps = sorted(rss)
    mb = {s: rss[s][0] / 1024 for s in steps}
    print(f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}")
    print(f"config: tiny, overrides {' '.join(overrides)}; batch {cfg.train.batch}; data: synthetic prepared "
          f"{args.slices} slices {args.size}x{args.size}, {args.coils} coils, A-DPS R=4 (seed {args.seed})")
    print(f"machine: {platform.node()} | {_cpu_name()} | {os.cpu_count()} CPUs | load {_load()} | "
          f"torch {torch.__version__} threads {torch.get_num_threads()} | OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')} | python {platform.python_version()} | TensorBoard logging "
          f"{'on' if tensorboard else 'off (not installed)'}")
    print(f"trained {res['step']} steps in {wall:.1f} s ({res['step'] / wall:.1f} steps/s); "
          f"RSS before training {rss_start / 1024:.1f} MB")
    print()
    print(f"{'step':>6} {'RSS MB':>9} {'t (s)':>8}")
    for s in steps:
        print(f"{s:>6} {mb[s]:>9.1f} {rss[s][1]:>8.1f}")
    tail = [s for s in steps if s >= args.from_step]
    growth = mb[steps[-1]] - mb[args.from_step]
    n = len(tail)
    xm, ym = sum(tail) / n, sum(mb[s] for s in tail) / n
    slope = sum((s - xm) * (mb[s] - ym) for s in tail) / max(sum((s - xm) ** 2 for s in tail), 1e-12)
    peak = max(kb for _, kb in sampler.samples) / 1024 if sampler.samples else float("nan")
    print()
    print(f"RSS at step {args.from_step}: {mb[args.from_step]:.1f} MB; at step {steps[-1]}: {mb[steps[-1]]:.1f} MB; "
          f"growth {growth:+.1f} MB (threshold {args.max_growth_mb:g} MB)")
    print(f"least-squares slope over steps {args.from_step}-{steps[-1]}: {slope * 1000:+.2f} MB per 1000 steps; "
          f"min/max over that range {min(mb[s] for s in tail):.1f}/{max(mb[s] for s in tail):.1f} MB")
    print(f"peak RSS (0.5 s sampler, {len(sampler.samples)} samples): {peak:.1f} MB; "
          f"VmHWM {status_kb('VmHWM') / 1024:.1f} MB")
    ok = growth <= args.max_growth_mb
    print("PASS: memory flat" if ok else f"FAIL: RSS grew {growth:.1f} MB > {args.max_growth_mb:g} MB")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
