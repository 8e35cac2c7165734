"""``ambient-mri train``: train an ambient diffusion prior (or an oracle / naive baseline) on a prepared dataset.

One optimiser step on a batch of measured k-space ``y = M F S x0`` (``loss.kind = ambient``):

    sigma ~ exp(P_mean + P_std N(0, 1))                     (losses.sample_sigma)
    M~ = further_kspace_mask(M, acs, R~ or delta)            (redrawn every step, or fixed per slice)
    loss = mean_b lambda(sigma_eff) ||M F S D(A~^H A~ x_t; sigma, M~) - y||^2 / (H W)   (losses.ambient_kspace_loss)

with ``ambient_image_loss`` for pixel/box corruption and the plain ``edm_loss`` for the oracle (FS-EDM,
fully sampled references) and the naive baselines (ZF-/L1-EDM). Adam/AdamW with linear warm-up, gradient
clipping, an EDM-style EMA, bf16/fp16 autocast on GPU, DDP under ``torchrun``.

Determinism: the batch of step ``t`` is fixed by (seed, epoch) through a ``DistributedSampler``, and the
noise levels, noise, further masks and dropout of step ``t`` come from generators seeded by
``(seed, rank, t)``; so a resumed run continues bit for bit like an uninterrupted one (on CPU).
"""

from __future__ import annotations

import csv
import gc
import hashlib
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from . import __version__
from .config import (CLEAN_KINDS, RESUMABLE_KEYS, Config, apply_overrides, changed_keys, dump_yaml, load_config)
from .errors import AmbientMRIError, ConfigError, DataError

METRICS_COLUMNS = ("step", "loss", "lr", "images_per_s", "wall_s", "grad_norm")
LABELS = {
    "ambient": "ambient (k-space): trained on undersampled measurements only",
    "ambient_image": "ambient (image domain): trained on corrupted images only",
    "oracle": "ORACLE (FS-EDM): trained on fully sampled reference images, not an ambient model",
    "naive_zf": "naive ZF-EDM baseline: plain EDM on zero-filled reconstructions",
    "naive_l1": "naive L1-EDM baseline: plain EDM on L1-wavelet reconstructions",
}


def derived_seed(*parts) -> int:
    """A 63-bit seed from any values (``derived_seed("noise", seed, rank, step)``), stable across runs."""
    h = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistEnv:
    """Rank, world size and local rank from ``torchrun``'s environment (defaults: one process)."""
    try:
        return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                       int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise ConfigError("RANK / WORLD_SIZE / LOCAL_RANK are not integers") from None


# ----------------------------------------------------------------------------------------------
# Data order


def step_sampler(dataset, env: DistEnv, seed: int, batch: int):
    """A ``DistributedSampler`` (shuffled by ``seed + epoch``, ``set_epoch``) that can start mid-epoch."""
    from torch.utils.data import DistributedSampler

    class StepSampler(DistributedSampler):
        def __init__(self):
            super().__init__(dataset, num_replicas=env.world, rank=env.rank, shuffle=True, seed=seed, drop_last=True)
            self.batch, self.start = batch, 0

        @property
        def batches_per_epoch(self) -> int:
            return self.num_samples // self.batch

        def __iter__(self):
            idx = list(super().__iter__())[: self.batches_per_epoch * self.batch]
            return iter(idx[self.start :])

        def __len__(self):
            return self.batches_per_epoch * self.batch - self.start

    return StepSampler()


def batches_from(loader, sampler, start_step: int):
    """Yield the batch of every step from ``start_step`` on (epoch ``t // steps_per_epoch``, offset ``t % ...``)."""
    spe = sampler.batches_per_epoch
    step = start_step
    while True:
        epoch, offset = divmod(step, spe)
        sampler.set_epoch(epoch)
        sampler.start = offset * sampler.batch
        for b in loader:
            yield b
            step += 1


# ----------------------------------------------------------------------------------------------
# Pieces of the training state


def ema_beta(cfg_train, images_seen: int, global_batch: int) -> float:
    """EMA decay per step: ``ema_decay``, or EDM's ``0.5 ** (batch / min(halflife, rampup * images_seen))``."""
    if cfg_train.ema_decay is not None:
        return float(cfg_train.ema_decay)
    hl = cfg_train.ema_halflife
    if cfg_train.ema_rampup is not None:
        hl = min(hl, images_seen * cfg_train.ema_rampup)
    return 0.5 ** (global_batch / max(hl, 1e-8))


def lr_at(cfg_train, step: int) -> float:
    """Linear warm-up over ``warmup`` steps, then constant: ``lr * min(1, (step + 1) / warmup)``."""
    if cfg_train.warmup > 0:
        return cfg_train.lr * min(1.0, (step + 1) / cfg_train.warmup)
    return cfg_train.lr


def autocast_hooks(module, device_type: str, dtype):
    """Run ``module.forward`` under ``torch.autocast(device_type, dtype)`` and return fp32 (hooks keep the
    state-dict keys unchanged); the complex FFTs and the loss around it stay fp32."""
    import torch

    stack = []

    def pre(mod, args):
        ctx = torch.autocast(device_type, dtype=dtype)
        ctx.__enter__()
        stack.append(ctx)

    def post(mod, args, out):
        stack.pop().__exit__(None, None, None)
        return out.float()

    return module.register_forward_pre_hook(pre), module.register_forward_hook(post)


class _Call:
    """The denoiser as the losses use it: calls go through ``module`` (the model, or its DDP wrapper, whose
    forward synchronises the gradients), every attribute the losses read (``sigma_data``, ``sigma_eff``)
    comes from the bare ``model``, so the loss weight is ``lambda(sigma_eff)``,
    ``sigma_eff = sqrt(sigma^2 + sigma_view^2)``, whatever the wrapping."""

    def __init__(self, module, model):
        self.module, self.model = module, model

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __getattr__(self, name):  # only for names not set in __init__
        if "model" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["model"], name)


def loss_denoiser(model, env: DistEnv, device):
    """The model as every training step calls it: DDP-wrapped when distributed, inside a :class:`_Call`."""
    net = model
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return _Call(net, model)


class _Stop:
    """SIGINT / SIGTERM: the first one asks for a checkpoint and a clean exit after the current step. A second
    one is ignored (torchrun follows a Ctrl-C with a SIGTERM to its workers, which must not cut the save
    short); a third aborts at once (every checkpoint on disk stays complete: they are written atomically)."""

    def __init__(self):
        self.signal = None
        self.count = 0
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.count += 1
        if self.count >= 3:
            raise KeyboardInterrupt
        if self.signal is None:
            self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------------------------
# Logging


class RunLog:
    """``RUN/train.log`` (text), ``RUN/metrics.csv`` and TensorBoard (when it imports); rank 0 only."""

    def __init__(self, out: Path, enabled: bool, echo, resume_step: int | None):
        self.out, self.enabled, self.echo = out, enabled, echo
        self.tb = None
        if not enabled:
            return
        self.metrics = out / "metrics.csv"
        if resume_step is not None and self.metrics.exists():
            self._truncate(resume_step)
        new = not self.metrics.exists()
        self._csv = open(self.metrics, "a", newline="")
        self._writer = csv.writer(self._csv)
        if new:
            self._writer.writerow(METRICS_COLUMNS)
            self._csv.flush()
        self._log = open(out / "train.log", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.fspath(out / "tensorboard"))
        except Exception:  # tensorboard not installed
            self.tb = None

    def _truncate(self, step: int):
        from .fsutil import atomic_path

        with open(self.metrics, newline="") as f:
            rows = list(csv.reader(f))
        keep = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
        with atomic_path(self.metrics, ".csv.tmp") as tmp:
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows(keep)

    def info(self, msg: str):
        if not self.enabled:
            return
        self.echo(msg)
        self._log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
        self._log.flush()

    def metrics_row(self, row: dict):
        if not self.enabled:
            return
        self._writer.writerow([_fmt(row.get(k)) for k in METRICS_COLUMNS])
        self._csv.flush()
        if self.tb is not None:
            for k in ("loss", "lr", "images_per_s", "grad_norm"):
                if row.get(k) is not None:
                    self.tb.add_scalar(f"train/{k}", row[k], row["step"])

    def close(self):
        if not self.enabled:
            return
        self._csv.close()
        self._log.close()
        if self.tb is not None:
            self.tb.close()


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


# ----------------------------------------------------------------------------------------------
# The trainer


def corruption_for(cfg: Config, info: dict) -> dict:
    """The ``corruption`` dict of ``masks.draw_training_further_masks`` for this config and data."""
    H, W = (int(v) for v in info["shape"])
    kind = cfg.loss.kind
    if kind in CLEAN_KINDS:
        return {"domain": "clean", "shape": [H, W]}
    if kind == "ambient_image":
        return {"domain": "image", "kind": info.get("corruption"), "level": float(info.get("level", 0.0)),
                "further_level": float(cfg.loss.delta), "shape": [H, W]}
    acs = [int(v) for v in info["acs"]]
    line = info["mask_shape"][0] == 1
    d = {"domain": "kspace", "mask_kind": info.get("mask_kind"), "accel": float(info.get("accel", 0.0)),
         "center": acs[1] if line else acs[0], "acs": acs, "shape": [H, W]}
    if cfg.loss.further_accel is not None:
        d["further_accel"] = float(cfg.loss.further_accel)
    else:
        d["delta"] = float(cfg.loss.delta)
    return d


def check_against_data(cfg: Config, info: dict, root) -> None:
    """Config values that only the data can rule out (before any training)."""
    if cfg.loss.kind == "ambient":
        R = float(info.get("accel", 0.0) or 0.0)
        if cfg.loss.further_accel is not None and R and cfg.loss.further_accel <= R:
            raise ConfigError(f"loss.further_accel={cfg.loss.further_accel:g} must exceed the data's acceleration "
                              f"R={R:g} (the further mask keeps fewer lines than M)", root)
    if cfg.loss.kind == "ambient_image" and info.get("corruption") not in ("pixels", "box"):
        raise DataError(f"image-domain data with unknown corruption {info.get('corruption')!r}", root)


def resolve_device(name: str, env: DistEnv):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        idx = env.local_rank if env.distributed else (torch.cuda.current_device() if torch.cuda.is_available() else 0)
        return torch.device("cuda", idx)
    return torch.device("cpu")


def _wait_for(path: Path, what: str, timeout_s: float = 7 * 24 * 3600):
    t0 = time.monotonic()
    while not path.exists():
        if time.monotonic() - t0 > timeout_s:
            raise AmbientMRIError(f"gave up waiting for rank 0 to write {what}", path)
        time.sleep(1.0)


def _load_data(cfg: Config, root, out: Path, env: DistEnv, progress: bool):
    """The dataset of ``cfg.loss.kind``. Naive baselines: rank 0 computes the reconstructions (cached in the
    run folder) before the process group starts; the other ranks wait for the cache file."""
    from .datasets import NaiveDataset, build_dataset

    kw = dict(lam=cfg.loss.lam, l1_iters=cfg.loss.l1_iters, cache_mb=cfg.data.cache_mb)
    if cfg.loss.kind in ("naive_zf", "naive_l1") and not env.main:
        _wait_for(out / f".{NaiveDataset.cache_name(cfg.loss.kind.split('_')[1])}.ready", "the naive reconstructions")
    ds = build_dataset(cfg.loss.kind, root, cache_dir=out, progress=progress and env.main, **kw)
    if cfg.loss.kind in ("naive_zf", "naive_l1") and env.main:
        (out / f".{NaiveDataset.cache_name(cfg.loss.kind.split('_')[1])}.ready").touch()
    return ds


def train(config, data=None, out=None, *, overrides=(), resume: bool = False, init=None, progress: bool = True,
          echo=None) -> dict:
    """Train; returns ``{"step", "interrupted" (None or the signal name), "checkpoint", "run", "params_sha256"}``.

    ``config``: a :class:`Config`, a YAML path / packaged name, or ``None`` with ``resume`` (then the
    checkpoint's config is used). ``data``: the prepared folder (default on resume: the recorded one).
    ``overrides``: ``key=value`` strings. ``init``: a checkpoint whose (EMA) weights start the run.
    """
    import torch

    from .checkpoint import latest_checkpoint, load_checkpoint, remove_stale_temporaries
    from .datasets import read_manifest
    from .fsutil import make_dir

    env = dist_env()
    echo = echo or (lambda m: click.echo(m, err=True))
    if out is None:
        raise ConfigError("give --out RUN (the run folder)")
    out = Path(out)
    ck = None
    if resume:
        try:
            found = latest_checkpoint(out, warn=echo if env.main else None)
        except DataError as e:  # checkpoint files are there, and every one is refused: nothing to continue
            raise DataError(f"--resume: {e.problem}", e.path) from None
        if found is not None:
            ck_path, ck = found
            ck["training"]["resumed_from"] = os.fspath(ck_path)
        elif config is None:
            raise ConfigError("--resume: no checkpoint in this run folder and no --config to start one", out)
        elif env.main:
            echo(f"--resume: no checkpoint in {out} yet; starting a new run there")
    if init is not None and ck is not None:
        raise ConfigError("--init applies to a new run; a resumed run continues from its own checkpoint")

    # ---- configuration
    if ck is not None:
        base = ck["config"]
        if config is not None:
            given = config.to_dict() if isinstance(config, Config) else load_config(config, overrides).to_dict()
        else:
            given = apply_overrides(base, overrides)
        if given.get("model", {}).get("sigma_view", 0) is None:  # "estimate" resumes with the recorded estimate
            given["model"]["sigma_view"] = base["model"].get("sigma_view", 0.0)
        cfg = Config.from_dict(given)
        bad = [k for k in changed_keys(base, cfg.to_dict()) if k not in RESUMABLE_KEYS]
        if bad:
            raise ConfigError(f"cannot change {', '.join(bad)} when resuming (only {', '.join(sorted(RESUMABLE_KEYS))})", out)
    else:
        if config is None:
            raise ConfigError("give --config (a YAML file or a packaged name such as tiny or cpu64)")
        cfg = config if isinstance(config, Config) else load_config(config, overrides)
        if isinstance(config, Config) and overrides:
            cfg = Config.from_dict(apply_overrides(cfg.to_dict(), overrides))
    if data is None:
        if ck is None:
            raise ConfigError("give --data PREPARED (the prepared dataset folder)")
        data = ck["training"]["data"]["root"]
    data = Path(data)
    if ck is None and (out / "checkpoint.pt").exists():
        raise ConfigError("this run folder already holds a checkpoint: pass --resume to continue it, or choose "
                          "another --out", out)
    if ck is None and (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("ckpt_*.pt")):
        raise ConfigError("this run folder already holds checkpoints: pass --resume, or choose another --out", out)
    init_ck = load_checkpoint(init) if init is not None else None  # fail on a bad --init before any work
    read_manifest(data)  # and on a missing or malformed dataset, before the run folder is created
    make_dir(out)
    if env.main:
        remove_stale_temporaries(out)  # half-written checkpoints of a killed run (hidden, never loaded)

    # ---- data (and the naive reconstructions, before any process group exists)
    dataset = _load_data(cfg, data, out, env, progress)
    info = dataset.info
    if ck is not None and ck["training"]["data"]["manifest_sha256"] != dataset.manifest_sha256:
        raise DataError("the prepared data changed since the checkpoint was written (manifest sha256 differs); "
                        "resume with the same --data", data)
    check_against_data(cfg, info, data)
    corruption = corruption_for(cfg, info)
    if cfg.model.sigma_view is None:  # estimate from the measured training data only, then record it
        from .datasets import estimate_sigma_view

        cfg.model.sigma_view = round(estimate_sigma_view(dataset, corruption, seed=cfg.train.seed), 4)
        if env.main:
            echo(f"model.sigma_view estimated from the measured training data: {cfg.model.sigma_view:g}")
    global_batch = cfg.train.batch * env.world
    if len(dataset) < global_batch:
        raise ConfigError(f"the dataset has {len(dataset)} slices, fewer than one global batch "
                          f"({cfg.train.batch} x {env.world} processes)", data)

    # ---- device, process group
    device = resolve_device(cfg.train.device, env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if env.distributed:
        import datetime

        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(minutes=60))
    log = RunLog(out, env.main, echo, resume_step=ck["step"] if ck is not None else None)
    try:
        return _train_loop(cfg, dataset, info, corruption, data, out, env, device, ck, init, init_ck, log,
                           progress, global_batch)
    finally:
        log.close()


def _train_loop(cfg, dataset, info, corruption, data, out, env, device, ck, init, init_ck, log, progress,
                global_batch):
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from .checkpoint import file_sha256, params_sha256, rng_state, save_checkpoint, set_rng_state
    from .datasets import collate, one_line
    from .fsutil import atomic_path
    from .losses import ambient_image_loss, ambient_kspace_loss, edm_loss, sample_sigma
    from .masks import further_image_mask, further_kspace_mask
    from .networks import build_denoiser

    T = cfg.train
    kind = cfg.loss.kind
    seed = T.seed

    # ---- model, EMA, optimiser (same initial weights on every rank)
    torch.manual_seed(seed)
    model = build_denoiser(cfg.to_dict()["model"]).to(device)
    ema = build_denoiser(cfg.to_dict()["model"]).to(device)
    ema.load_state_dict(model.state_dict())
    ema.eval().requires_grad_(False)
    opt_cls = torch.optim.AdamW if T.optimizer == "adamw" else torch.optim.Adam
    try:  # the fused kernel is several times faster than the per-tensor loop (CPU and GPU)
        opt = opt_cls(model.parameters(), lr=T.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=T.weight_decay,
                      fused=True)
    except (RuntimeError, TypeError, ValueError):
        opt = opt_cls(model.parameters(), lr=T.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=T.weight_decay,
                      foreach=True)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(T.precision) if device.type == "cuda" else None
    scaler = torch.amp.GradScaler("cuda") if amp is torch.float16 else None
    if amp is not None:
        autocast_hooks(model.net, device.type, amp)
    n_params = sum(p.numel() for p in model.parameters())

    start, wall0 = 0, 0.0
    training_init = None
    if ck is not None:
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        if ck.get("rng") and env.main:
            set_rng_state(ck["rng"])
        start, wall0 = int(ck["step"]), float(ck.get("wall_s", 0.0))
        training_init = ck["training"].get("init")
    elif init_ck is not None:
        weights = "ema" if init_ck.get("ema") is not None else "model"
        try:
            model.load_state_dict(init_ck[weights])
        except RuntimeError as e:
            raise ConfigError(f"--init: its weights do not fit this model config ({' '.join(str(e).split())[:160]})",
                              init) from None
        ema.load_state_dict(model.state_dict())
        training_init = {"path": os.fspath(Path(init).resolve()), "sha256": file_sha256(init),
                         "step": int(init_ck["step"]), "kind": init_ck["training"].get("kind"), "weights": weights}

    training_meta = {
        "kind": kind, "label": LABELS[kind], "corruption": corruption,
        "further_mask": "redraw" if cfg.loss.redraw else "fixed", "loss_domain": cfg.loss.domain,
        "data": {"root": os.fspath(data.resolve()), "manifest_sha256": dataset.manifest_sha256, "slices": len(dataset),
                 "split": info.get("split"), "domain": info.get("domain"), "shape": list(info["shape"]),
                 "coils": info.get("coils"), "mask_kind": info.get("mask_kind"), "accel": info.get("accel")},
        "version": __version__, "world_size": env.world, "global_batch": global_batch, "init": training_init,
        "precision": T.precision if amp is not None else "fp32", "params": n_params,
    }

    # ---- bookkeeping files
    if env.main:
        with atomic_path(out / "config.yaml", ".yaml.tmp") as tmp:
            tmp.write_text(dump_yaml(cfg.to_dict()))
        (out / "done.json").unlink(missing_ok=True)
    H, W = info["shape"]
    log.info(f"{'resuming' if ck is not None else 'starting'} {cfg.name}: {LABELS[kind]}")
    log.info(f"data {data} ({len(dataset)} slices, {H}x{W}, {info.get('coils')} coils, split {info.get('split')}, "
             f"mask {info.get('mask_kind')} R={info.get('accel')}); model {n_params:,} parameters; device {device}; "
             f"{env.world} process(es), global batch {global_batch}; precision {training_meta['precision']}")
    if T.precision != "fp32" and amp is None:
        log.info(f"train.precision={T.precision} applies on GPU only: running fp32 on {device.type}")
    if kind in ("ambient", "ambient_image", "naive_zf", "naive_l1") and info.get("split") not in (None, "train"):
        log.info(f"note: the data is a {info.get('split')} split; only its measured data are read, never a reference")
    if kind == "oracle":
        log.info("ORACLE: this model sees fully sampled references (ground truth); it is the FS-EDM upper baseline")
    if training_init:
        log.info(f"initialised from {training_init['path']} (step {training_init['step']}, {training_init['weights']} weights)")
    if ck is not None:
        log.info(f"resumed from step {start} ({ck['training'].get('resumed_from')})")

    # ---- DDP
    den = loss_denoiser(model, env, device)

    # ---- data order
    sampler = step_sampler(dataset, env, seed, T.batch)
    loader = DataLoader(dataset, batch_size=T.batch, sampler=sampler, num_workers=T.num_workers, collate_fn=collate,
                        drop_last=True, pin_memory=device.type == "cuda", persistent_workers=T.num_workers > 0)
    batches = batches_from(loader, sampler, start)

    # ---- the further mask
    acs = None
    if kind == "ambient":
        acs = tuple(int(v) for v in info["acs"])
        if info["mask_shape"][0] == 1:
            acs = (1, acs[1])

    def further(mask, index, g):
        def draw(m, gen):
            if kind == "ambient":
                key = "further_accel" if cfg.loss.further_accel is not None else "delta"
                return further_kspace_mask(m, acs, generator=gen, **{key: getattr(cfg.loss, key)})
            return further_image_mask(m, info["corruption"], cfg.loss.delta, generator=gen)

        if cfg.loss.redraw:
            return draw(mask, g)
        return torch.cat([draw(mask[i : i + 1], torch.Generator(device=device).manual_seed(
            derived_seed("fixed-further-mask", seed, int(index[i])))) for i in range(len(mask))])

    def step_loss(batch, g):
        B = T.batch
        sigma = sample_sigma(B, P_mean=cfg.loss.P_mean, P_std=cfg.loss.P_std, generator=g, device=device)
        if kind == "ambient":
            y, mask, maps = batch["kspace"], batch["mask"], batch["maps"]
            per = ambient_kspace_loss(den, y, mask, maps, further(mask, batch["index"], g), sigma,
                                      domain=cfg.loss.domain, generator=g)
        elif kind == "ambient_image":
            y, mask = batch["image"], batch["mask"]
            per = ambient_image_loss(den, y, mask, further(mask, batch["index"], g), sigma, generator=g)
        else:
            per = edm_loss(den, batch["image"], sigma, generator=g)
        return per.mean()

    def payload(step, wall):
        return {"step": step, "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng_state(),
                "config": cfg.to_dict(), "training": dict(training_meta, images_seen=step * global_batch),
                "version": __version__, "wall_s": wall}

    def save(step, wall):
        if env.main:
            return save_checkpoint(out, payload(step, wall), keep=T.keep)
        return None

    sampler_ok = T.sample_every > 0 and env.main

    def sample_grid(step):
        nonlocal sampler_ok
        from .sampling_cli import draw_prior_samples, save_grid

        try:
            x, _ = draw_prior_samples(ema, corruption, T.sample_n, steps=T.sample_steps, seed=seed, device=device)
            p = save_grid(x, out / "samples" / f"step_{step:07d}.png")
        except Exception as e:  # sample grids are a by-product: never let them stop training
            log.info(f"sample grids disabled: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
            sampler_ok = False
            return
        log.info(f"step {step}: prior samples -> {p}")

    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=T.steps, initial=start, desc=f"{cfg.name} [{kind}]", unit="step",
               disable=not (progress and env.main), dynamic_ncols=True, file=sys.stderr)
    t_start = time.perf_counter()
    window = {"loss": 0.0, "n": 0, "t": time.perf_counter(), "gn": 0.0}
    stop = None
    step = start
    last_ckpt = None
    with _Stop() as stopper:
        while step < T.steps:
            try:
                batch = next(batches)
            except Exception as e:
                if stopper.signal is not None:  # a loader worker died of the same Ctrl-C
                    break
                if isinstance(e, DataError) or type(e).__name__ == "DataError":
                    raise DataError(one_line(e)) from None
                raise
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            g = torch.Generator(device=device).manual_seed(derived_seed("noise", seed, env.rank, step))
            torch.manual_seed(derived_seed("dropout", seed, env.rank, step))
            lr = lr_at(T, step)
            for group in opt.param_groups:
                group["lr"] = lr
            model.train()
            loss = step_loss(batch, g)
            opt.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if scaler is not None:
                scaler.unscale_(opt)
            else:
                for p in params:
                    if p.grad is not None:
                        torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)
            if T.grad_clip > 0:
                gn = float(torch.nn.utils.clip_grad_norm_(params, T.grad_clip))
                window["gn"] += gn
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            with torch.no_grad():
                beta = ema_beta(T, (step + 1) * global_batch, global_batch)
                e_p, m_p = list(ema.parameters()), list(model.parameters())
                torch._foreach_lerp_(e_p, [p.detach() for p in m_p], 1.0 - beta)
                for b_e, b_m in zip(ema.buffers(), model.buffers()):
                    b_e.copy_(b_m)
            step += 1
            window["loss"] += float(loss.detach())
            window["n"] += 1
            bar.update(1)

            # stop request (every rank must agree on the step)
            want = stopper.signal is not None
            if env.distributed:
                import torch.distributed as dist

                flag = torch.tensor([1.0 if want else 0.0], device=device)
                dist.all_reduce(flag)
                want = flag.item() > 0
            if step % T.log_every == 0 or step == T.steps or want:
                now = time.perf_counter()
                mean_loss = window["loss"] / max(window["n"], 1)
                if env.distributed:
                    import torch.distributed as dist

                    t = torch.tensor([mean_loss], device=device, dtype=torch.float64)
                    dist.all_reduce(t)
                    mean_loss = float(t) / env.world
                ips = window["n"] * global_batch / max(now - window["t"], 1e-9)
                row = {"step": step, "loss": mean_loss, "lr": lr, "images_per_s": ips,
                       "wall_s": wall0 + now - t_start,
                       "grad_norm": window["gn"] / window["n"] if T.grad_clip > 0 and window["n"] else None}
                log.metrics_row(row)
                bar.set_postfix(loss=f"{mean_loss:.4g}", img_s=f"{ips:.1f}")
                if not math.isfinite(mean_loss):
                    log.info(f"step {step}: loss is {mean_loss} (non-finite gradients were zeroed)")
                window = {"loss": 0.0, "n": 0, "t": time.perf_counter(), "gn": 0.0}
            if want:
                stop = stopper.signal or "SIGTERM"
                break
            if step % T.ckpt_every == 0 or step == T.steps:
                last_ckpt = save(step, wall0 + time.perf_counter() - t_start)
            if sampler_ok and step % T.sample_every == 0:
                sample_grid(step)
        if stop is not None or (stopper.signal is not None and step < T.steps):
            stop = stop or stopper.signal
            last_ckpt = save(step, wall0 + time.perf_counter() - t_start)
            log.info(f"{stop}: stopped at step {step}; checkpoint saved to {out / 'checkpoint.pt'}")
    bar.close()

    result = {"step": step, "interrupted": stop, "checkpoint": os.fspath(out / "checkpoint.pt"), "run": os.fspath(out),
              "params_sha256": params_sha256(model), "ema_sha256": params_sha256(ema)}
    hashes = [result["params_sha256"]]
    if env.distributed:
        import torch.distributed as dist

        gathered = [None] * env.world
        dist.all_gather_object(gathered, result["params_sha256"])
        hashes = gathered
        dist.barrier()
    if env.main and stop is None:
        from .fsutil import write_json

        write_json(out / "done.json", {"step": step, "steps": T.steps, "world_size": env.world,
                                       "params_sha256_per_rank": hashes, "ema_sha256": result["ema_sha256"],
                                       "ranks_in_sync": len(set(hashes)) == 1, "checkpoint": result["checkpoint"],
                                       "wall_s": wall0 + time.perf_counter() - t_start, "kind": kind})
        log.info(f"done: step {step}, checkpoint {out / 'checkpoint.pt'}")
        if len(set(hashes)) != 1:
            log.info("WARNING: the ranks' weights differ at the end of training")
    result["params_sha256_per_rank"] = hashes
    if env.distributed:
        import torch.distributed as dist

        del den, model
        gc.collect()
        dist.destroy_process_group()
    return result


# ----------------------------------------------------------------------------------------------
# CLI


@click.command(context_settings={"ignore_unknown_options": False})
@click.option("--config", "-c", "config", default=None,
              help="YAML config: a file, or a packaged name (tiny, cpu64, block64, demo, fastmri_brain). Optional with --resume "
                   "(the checkpoint's config is used).")
@click.option("--data", "-d", "data", default=None, type=click.Path(file_okay=False),
              help="Prepared dataset folder (ambient-mri prep output with manifest.json). Train split for ambient and "
                   "naive runs, a val-style split (with references) for loss.kind=oracle. Default on --resume: the recorded one.")
@click.option("--out", "-o", "out", required=True, type=click.Path(file_okay=False),
              help="Run folder: config.yaml, checkpoint.pt, checkpoints/ckpt_*.pt, metrics.csv, train.log, samples/.")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its newest complete checkpoint (bit-identical to an uninterrupted "
                   "run on CPU). Only train.steps, logging/checkpoint/sample periods, workers and device may change.")
@click.option("--init", "init", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Start a new run from another checkpoint's EMA weights (fine-tuning); fresh optimiser; recorded in "
                   "the new checkpoints.")
@click.option("--print-config", is_flag=True, help="Print the resolved config (after overrides) and exit.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar (log lines still go to stderr and RUN/train.log).")
@click.argument("overrides", nargs=-1)
def command(config, data, out, resume, init, print_config, quiet, overrides):
    """Train a diffusion prior on a prepared dataset.

    OVERRIDES are key=value pairs with dotted keys that replace config values, read as YAML:
    train.steps=200 train.lr=1e-4 model.channels=[16,32] loss.redraw=false loss.kind=oracle.
    Sections: model (channels, blocks, attention, dropout, groups, sigma_data, cond), loss (kind: ambient |
    ambient_image | oracle | naive_zf | naive_l1; further_accel or delta; redraw; domain; P_mean; P_std; lam;
    l1_iters), train (steps, batch, lr, optimizer, weight_decay, warmup, grad_clip, ema_halflife, ema_rampup,
    ema_decay, precision, seed, log_every, ckpt_every, sample_every, sample_n, sample_steps, keep, num_workers,
    device), data (cache_mb). Every key is checked before any work starts. Ctrl-C or SIGTERM saves a
    checkpoint and exits (130 / 143). Multi-GPU: torchrun --nproc_per_node=N -m ambient_mri.cli train ...
    (see docs/training.md).
    """
    if print_config:
        if config is None:
            raise ConfigError("--print-config needs --config")
        click.echo(dump_yaml(load_config(config, overrides).to_dict()), nl=False)
        return
    env = dist_env()
    res = train(config, data, out, overrides=overrides, resume=resume, init=init, progress=not quiet)
    code = {"SIGINT": 130, "SIGTERM": 143}.get(res["interrupted"], 0)
    if env.distributed:
        # plain exits of gloo/NCCL processes sometimes abort in interpreter teardown (docs/ecosystem section 7)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:  # SystemExit (not click's Exit, whose code cli.main drops in standalone_mode=False)
        sys.exit(code)
