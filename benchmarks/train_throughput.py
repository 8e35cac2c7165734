"""Training throughput (images/s) of the ambient trainer on this machine, and our UNet vs MONAI's.

1. ``trainer``: the real ``ambient_mri.train.train`` (ambient k-space loss, further masks, Adam, EMA,
   logging; checkpoints only at the end) with ``--config`` (default ``cpu64``: 64x64, 8 coils, batch 8) for
   ``--warmup`` + ``--steps`` steps; images/s over the steps after the warm-up, from ``metrics.csv``.
2. ``--compare-monai``: a bare training step (the same ambient loss on the same batches, forward +
   backward + Adam) with our compact UNet and with MONAI's ``DiffusionModelUNet`` of the same widths
   (one residual block per level, no attention at the levels; MONAI's middle block always has
   attention), each timed over ``--bare-steps`` steps after ``--bare-warmup``. MONAI is not a dependency of
   the package: install the optional extra first, ``pip install -e ".[compare]"``.

Data: ``--data PREPARED`` (a prepared train split), or by default a synthetic prepared set written to a
temporary folder (smooth random blobs x ESPIRiT-free analytic coil maps, A-DPS line masks R = 4).
Prints the command, data, seed, machine, torch version, threads and parameter counts.

3. ``--memory CONFIG``: the memory of one training step of CONFIG at ``--memory-shape H W`` with
   ``--memory-coils`` coils, batch 1, on CPU: the bytes of every tensor autograd saves for the backward
   pass (deduplicated by storage) in fp32 and under bf16 autocast (the trainer's GPU policy, here on CPU),
   the parameter/gradient/Adam/EMA state, the peak RSS growth of the step, and its wall time.

    python benchmarks/train_throughput.py --steps 300 --compare-monai
    python benchmarks/train_throughput.py --no-trainer --memory fastmri_brain
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path


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


def synthetic_prepared(root: Path, slices: int, size: int, coils: int, accel: float, seed: int) -> Path:
    """A prepared train split (docs/data_format.md) of ``slices`` random smooth images, ``coils`` analytic maps."""
    import h5py
    import numpy as np

    from ambient_mri import __version__, masks
    from ambient_mri.fft import fft2c

    rng = np.random.default_rng(seed)
    H = W = size
    yy, xx = np.mgrid[:H, :W] / size
    maps = []
    for c in range(coils):
        a = 2 * np.pi * c / coils
        maps.append(np.exp(-((yy - 0.5 - 0.6 * np.sin(a)) ** 2 + (xx - 0.5 - 0.6 * np.cos(a)) ** 2) / 0.3) * np.exp(1j * a))
    maps = np.stack(maps)
    maps = (maps / np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True))).astype(np.complex64)
    x = np.zeros((slices, H, W), np.complex64)
    for s in range(slices):
        for _ in range(5):
            cy, cx, ry, rx = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75), rng.uniform(0.05, 0.25), rng.uniform(0.05, 0.25)
            x[s] += rng.uniform(0.2, 0.6) * np.exp(-(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2))
    center = max(2, round(W / 16))
    ms = [masks.kspace_mask("adps", (H, W), accel, center=center, seed=s) for s in range(slices)]
    m = np.stack([sm.mask for sm in ms])
    root.mkdir(parents=True, exist_ok=True)
    with h5py.File(root / "synthetic.h5", "w") as f:
        f["kspace"] = (fft2c(maps[None] * x[:, None]) * m[:, None]).astype(np.complex64)
        f["mask"] = m
        f["maps"] = np.broadcast_to(maps, (slices, coils, H, W))
        f["norm"] = np.ones(slices, np.float32)
        f["mask_seed"] = np.arange(slices)
        f["slice_index"] = np.arange(slices)
        f.attrs.update({"format": "ambient_mri.prepared/1", "split": "train", "domain": "kspace", "mask_kind": "adps",
                        "accel": float(accel), "acs": np.array([H, center]), "calib": center,
                        "ambient_mri_version": __version__, "source": "synthetic", "options": "{}"})
    (root / "manifest.json").write_text(json.dumps({
        "format": "ambient_mri.prepared/1", "split": "train", "domain": "kspace", "ambient_mri_version": __version__,
        "options": {}, "reference_kind": None, "failed": [],
        "files": [{"file": "synthetic.h5", "source": "synthetic", "source_sha256": None, "slices": slices,
                   "slice_index": list(range(slices)), "mask_seed": list(range(slices)), "norm": [1.0] * slices,
                   "accel_actual": float(W / m[0].sum())}]}))
    return root


def _model(cfg) -> dict:
    """The config's model section for building a network here: ``sigma_view: null`` (estimated by the trainer from
    the data) becomes 0, which changes neither the parameter count nor the cost of a step."""
    m = cfg.to_dict()["model"]
    return dict(m, sigma_view=m.get("sigma_view") or 0.0)


def trainer_throughput(config, data, overrides, steps, warmup, seed):
    from ambient_mri.config import load_config
    from ambient_mri.train import train

    every = 10
    warmup = max(every, (warmup + every - 1) // every * every)
    total = warmup + (steps + every - 1) // every * every
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        ov = list(overrides) + [f"train.steps={total}", f"train.log_every={every}", f"train.ckpt_every={total}",
                                "train.sample_every=0", f"train.seed={seed}"]
        cfg = load_config(config, ov)
        t0 = time.perf_counter()
        res = train(cfg, data, out, progress=False, echo=lambda m: None)
        wall = time.perf_counter() - t0
        with open(out / "metrics.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f)]
    by_step = {int(r["step"]): float(r["wall_s"]) for r in rows}
    timed_steps = total - warmup
    seconds = by_step[total] - by_step[warmup]
    ips = timed_steps * cfg.train.batch / seconds
    windows = [float(r["images_per_s"]) for r in rows if int(r["step"]) > warmup]
    return {"config": cfg, "images_per_s": ips, "window_min": min(windows), "window_max": max(windows),
            "timed_steps": timed_steps, "seconds": seconds, "wall_total": wall, "final_loss": float(rows[-1]["loss"]),
            "params_sha256": res["params_sha256"]}


class MonaiNet:
    """MONAI's DiffusionModelUNet as ``net(x, c_noise)`` for ``EDMDenoiser`` (timesteps = ``1000 c_noise``)."""

    @staticmethod
    def build(in_ch, channels, groups):
        import torch
        from monai.networks.nets import DiffusionModelUNet

        class Wrap(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.unet = DiffusionModelUNet(spatial_dims=2, in_channels=in_ch, out_channels=2,
                                               channels=tuple(channels), attention_levels=(False,) * len(channels),
                                               num_res_blocks=1, norm_num_groups=groups, num_head_channels=channels[-1])

            def forward(self, x, c_noise):
                return self.unet(x, timesteps=c_noise * 1000)

        return Wrap()


def bare_throughput(cfg, data, net_kind, steps, warmup, seed):
    """images/s of forward + backward + Adam with the ambient k-space loss on real batches (no EMA/logging)."""
    import torch

    from ambient_mri.datasets import AmbientKspaceDataset, collate
    from ambient_mri.losses import ambient_kspace_loss, sample_sigma
    from ambient_mri.masks import further_kspace_mask
    from ambient_mri.networks import EDMDenoiser, build_denoiser

    torch.manual_seed(seed)
    m = cfg.model
    if net_kind == "ours":
        den = build_denoiser(_model(cfg))
    else:
        den = EDMDenoiser(MonaiNet.build(2 + len(m.cond), m.channels, m.groups), sigma_data=m.sigma_data, cond=m.cond)
    opt = torch.optim.Adam(den.parameters(), lr=cfg.train.lr)
    ds = AmbientKspaceDataset(data)
    acs = (1, int(ds.info["acs"][1])) if ds.info["mask_shape"][0] == 1 else tuple(ds.info["acs"])
    B = cfg.train.batch
    g = torch.Generator().manual_seed(seed)
    batches = [collate([ds[(i * B + j) % len(ds)] for j in range(B)]) for i in range(8)]
    key = "further_accel" if cfg.loss.further_accel is not None else "delta"

    def step(i):
        b = batches[i % len(batches)]
        fm = further_kspace_mask(b["mask"], acs, generator=g, **{key: getattr(cfg.loss, key)})
        sigma = sample_sigma(B, generator=g)
        loss = ambient_kspace_loss(den, b["kspace"], b["mask"], b["maps"], fm, sigma, generator=g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(warmup):
        step(i)
    t0 = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    dt = time.perf_counter() - t0
    return {"params": sum(p.numel() for p in den.parameters()), "images_per_s": steps * B / dt, "seconds": dt}


def step_memory(config, overrides, H, W, coils, amp: bool, seed: int = 0):
    """One ambient training step at batch 1: saved-for-backward bytes, state bytes, peak-RSS growth, seconds."""
    import resource

    import torch

    from ambient_mri.config import load_config
    from ambient_mri.losses import ambient_kspace_loss, sample_sigma
    from ambient_mri.masks import further_kspace_mask, kspace_mask
    from ambient_mri.networks import build_denoiser
    from ambient_mri.operators import SenseOp
    from ambient_mri.train import autocast_hooks

    cfg = load_config(config, overrides)
    torch.manual_seed(seed)
    den = build_denoiser(_model(cfg))
    if amp:
        autocast_hooks(den.net, "cpu", torch.bfloat16)
    params = sum(p.numel() for p in den.parameters())
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(1, coils, H, W, dtype=torch.complex64, generator=g)
    maps = maps / maps.abs().pow(2).sum(1, keepdim=True).sqrt()
    sm = kspace_mask("adps", (H, W), 4.0, center=max(2, round(W / 16)), seed=seed)
    mask = torch.from_numpy(sm.mask[None]).float()
    y = SenseOp(maps, mask).forward(torch.randn(1, H, W, dtype=torch.complex64, generator=g) * 0.5)
    fm = further_kspace_mask(mask, (1, sm.acs[1]), further_accel=5.0, generator=g)
    sigma = sample_sigma(1, generator=g)
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
        return t

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = ambient_kspace_loss(den, y, mask, maps, fm, sigma, generator=g).mean()
    loss.backward()
    dt = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"params": params, "saved_bytes": sum(storages.values()), "rss_growth_bytes": (rss1 - rss0) * 1024,
            "seconds": dt, "state_bytes": params * 4 * 5}  # weights, grads, Adam m and v, EMA (fp32)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="cpu64", help="training config (file or packaged name)")
    ap.add_argument("--data", default=None, help="prepared train split (default: synthetic, see --slices/--size)")
    ap.add_argument("--slices", type=int, default=64, help="synthetic data: number of slices")
    ap.add_argument("--size", type=int, default=64, help="synthetic data: matrix size")
    ap.add_argument("--coils", type=int, default=8, help="synthetic data: coils")
    ap.add_argument("--steps", type=int, default=300, help="timed trainer steps after the warm-up")
    ap.add_argument("--warmup", type=int, default=30, help="untimed trainer steps first")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0, help="training seed (and synthetic data seed)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. --set model.channels=[32,64,64] (repeatable)")
    ap.add_argument("--compare-monai", action="store_true",
                    help="also time bare steps: our UNet vs MONAI's (needs the extra: pip install -e \".[compare]\")")
    ap.add_argument("--bare-steps", type=int, default=40, help="timed bare steps per network")
    ap.add_argument("--bare-warmup", type=int, default=5, help="untimed bare steps first")
    ap.add_argument("--no-trainer", action="store_true", help="skip the full-trainer measurement")
    ap.add_argument("--memory", default=None, metavar="CONFIG", help="measure one step's memory of CONFIG (batch 1)")
    ap.add_argument("--memory-shape", type=int, nargs=2, default=[384, 320], metavar=("H", "W"),
                    help="image size for --memory")
    ap.add_argument("--memory-coils", type=int, default=4, help="coils for --memory")
    ap.add_argument("--memory-modes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                    help="precisions for --memory (bf16 autocast is very slow on CPUs without bf16 units)")
    args = ap.parse_args(argv)
    if args.compare_monai and importlib.util.find_spec("monai") is None:
        ap.error('--compare-monai needs MONAI, which is an optional extra: pip install -e ".[compare]" '
                 '(or pip install "monai>=1.3")')

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"command: {' '.join(shlex.quote(a) for a in [sys.executable] + sys.argv)}")
    print(f"machine: {platform.node()} {_cpu_name()}, {os.cpu_count()} CPUs, load average {_load()} (before)")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            data = Path(args.data)
            print(f"data: {data} (prepared)")
        else:
            data = synthetic_prepared(Path(tmp) / "synthetic", args.slices, args.size, args.coils, 4.0, args.seed)
            print(f"data: synthetic prepared set, {args.slices} slices {args.size}x{args.size}, {args.coils} coils, "
                  f"A-DPS lines R=4, seed {args.seed}")
        from ambient_mri.config import load_config
        from ambient_mri.datasets import AmbientKspaceDataset

        info = AmbientKspaceDataset(data).info
        print(f"data shape {info['shape']}, {info['coils']} coils, mask {info['mask_kind']} R={info['accel']}")
        cfg = load_config(args.config, args.overrides)
        from ambient_mri.networks import build_denoiser

        n_ours = sum(p.numel() for p in build_denoiser(_model(cfg)).parameters())
        print(f"config {args.config} {' '.join(args.overrides)}: model.channels={cfg.model.channels} "
              f"blocks={cfg.model.blocks} attention={cfg.model.attention}, {n_ours:,} parameters, "
              f"batch {cfg.train.batch}, seed {args.seed}")
        if not args.no_trainer:
            r = trainer_throughput(args.config, data, args.overrides, args.steps, args.warmup, args.seed)
            print(f"trainer: {r['images_per_s']:.1f} images/s ({r['timed_steps']} steps x batch {cfg.train.batch} "
                  f"in {r['seconds']:.1f} s after warm-up; windows of 10 steps {r['window_min']:.1f}-"
                  f"{r['window_max']:.1f} images/s; total wall {r['wall_total']:.1f} s; last loss {r['final_loss']:.4g})")
        if args.compare_monai:
            for kind in ("ours", "monai"):
                b = bare_throughput(cfg, data, kind, args.bare_steps, args.bare_warmup, args.seed)
                name = "ours (compact EDM UNet)" if kind == "ours" else "MONAI DiffusionModelUNet"
                print(f"bare step, {name}: {b['params']:,} parameters, {b['images_per_s']:.1f} images/s "
                      f"({args.bare_steps} steps in {b['seconds']:.1f} s)")
        if args.memory:
            H, W = args.memory_shape
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            for amp in [m == "bf16" for m in args.memory_modes]:  # each in a fresh process: its own peak RSS
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
                    r = ex.submit(step_memory, args.memory, args.overrides, H, W, args.memory_coils, amp,
                                  args.seed).result()
                gib = 2.0**30
                print(f"memory {args.memory} {H}x{W} {args.memory_coils} coils, batch 1, "
                      f"{'bf16 autocast' if amp else 'fp32'}: {r['params']:,} parameters; saved for backward "
                      f"{r['saved_bytes'] / gib:.3f} GiB; peak RSS growth {r['rss_growth_bytes'] / gib:.3f} GiB; "
                      f"fp32 weights+grads+Adam+EMA {r['state_bytes'] / gib:.2f} GiB; step {r['seconds']:.1f} s; "
                      f"estimate at batch 8: {(8 * r['saved_bytes'] + r['state_bytes']) / gib:.1f} GiB "
                      f"(saved activations x 8 + state, before allocator/cuDNN overheads)")
    print(f"load average {_load()} (after)")


if __name__ == "__main__":
    main()
