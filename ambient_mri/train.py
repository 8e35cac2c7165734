"""``ambient-mri train``: train an ambient diffusion prior (or an oracle / naive baseline) on a prepared dataset.

One optimiser step on a batch of measured k-space ``y = M F S x0`` (``loss.kind = ambient``):

    sigma ~ exp(P_mean + P_std N(0, 1))                     (losses.sample_sigma)
    M~ = further_kspace_mask(M, acs, R~ or delta)            (redrawn every step, or fixed per slice)
    loss = mean_b lambda(sigma_eff) ||M F S D(A~^H A~ x_t; sigma, M~) - y||^2 / (H W)   (losses.ambient_kspace_loss)

with ``ambient_image_loss`` for pixel/box corruption and the plain ``edm_loss`` for the oracle (FS-EDM,
fully sampled references) and the naive baselines (ZF-/L1-EDM); ``losses.build_loss`` gives the object of
``loss.kind`` and the loop calls ``loss(denoiser, batch, generator)`` whatever the kind. Adam/AdamW with
linear warm-up, gradient clipping, an EDM-style EMA, bf16/fp16 autocast on GPU (bf16 also on CPUs with native
bf16; fp32 CPU training keeps the network channels-last, which oneDNN runs faster), DDP under ``torchrun``
(processes and devices: ``distributed``; log, metrics, checkpoint policy and stop requests: ``runlog``).

Determinism: the batch of step ``t`` is fixed by (seed, epoch) through a ``DistributedSampler``, and the
noise levels, noise, further masks and dropout of step ``t`` come from generators seeded by
``(seed, rank, t)``; so a resumed run continues bit for bit like an uninterrupted one (on CPU).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import __version__
from .augment import augmentation
from .checkpoint import (latest_checkpoint, load_checkpoint, params_sha256, remove_stale_temporaries,
                         rng_state, set_rng_state)
from .config import RESUMABLE_KEYS, Config, apply_overrides, changed_keys, dump_yaml, load_config
from .corruption import Corruption, from_data
from .datasets import NaiveDataset, build_dataset, collate, estimate_sigma_view, one_line, read_manifest
from .distributed import (DistEnv, any_rank, batches_from, derived_seed, dist_env, gather, loss_denoiser,
                          mean_over_ranks, resolve_device, setup_device, shut_down, step_sampler, wait_for)
from .errors import ConfigError, DataError
from .fsutil import atomic_path, make_dir, sha256_file
from .losses import build_loss
from .networks import build_denoiser, preferred_layout
from .runlog import (LABELS, METRICS_COLUMNS, Checkpoints, RunLog, StopRequest, Window, describe_run,
                     write_done)
from .sampling import sample_grid

# public names; DistEnv, dist_env, derived_seed, resolve_device, loss_denoiser (distributed) and RunLog, LABELS,
# METRICS_COLUMNS (runlog) moved out and stay importable from here (tests and benchmarks import them)
__all__ = ["train", "DistEnv", "dist_env", "derived_seed", "resolve_device", "loss_denoiser", "RunLog",
           "LABELS", "METRICS_COLUMNS", "ema_beta", "lr_at", "autocast_hooks", "autocast_dtype", "check_against_data",
           "resolve_config"]


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
    stack = []

    def pre(mod, args):
        ctx = torch.autocast(device_type, dtype=dtype)
        ctx.__enter__()
        stack.append(ctx)

    def post(mod, args, out):
        stack.pop().__exit__(None, None, None)
        return out.float()

    return module.register_forward_pre_hook(pre), module.register_forward_hook(post)


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX), where oneDNN's bf16 convolutions beat fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def autocast_dtype(precision: str, device) -> torch.dtype | None:
    """The autocast dtype for ``train.precision`` on ``device``: bf16 or fp16 on CUDA; bf16 on a CPU with native
    bf16 (:func:`cpu_has_native_bf16`); None (fp32) otherwise. Weights, Adam and EMA stay fp32 either way."""
    if device.type == "cuda":
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if device.type == "cpu" and precision == "bf16" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


@dataclass
class TrainState:
    """The network, its EMA, the optimiser (and the fp16 gradient scaler), the autocast dtype (None: fp32;
    :func:`autocast_dtype`), the step and wall time the run starts from, and the ``--init`` record."""

    model: object
    ema: object
    opt: object
    scaler: object = None
    amp: object = None
    start: int = 0
    wall0: float = 0.0
    init: dict | None = None


def build_state(cfg: Config, device, env: DistEnv, ck: dict | None = None, init=None, init_ck: dict | None = None):
    """Model and EMA (the same initial weights on every rank: ``torch.manual_seed(train.seed)``), Adam(W)
    (fused when available), then the weights of the resumed checkpoint ``ck`` or of ``--init``."""

    T = cfg.train
    torch.manual_seed(T.seed)
    model = build_denoiser(cfg.to_dict()["model"]).to(device)
    ema = build_denoiser(cfg.to_dict()["model"]).to(device)
    ema.load_state_dict(model.state_dict())
    ema.eval().requires_grad_(False)
    amp = autocast_dtype(T.precision, device)
    if amp is None:  # fp32: channels-last on CPU (under bf16 autocast NCHW is faster; docs/training.md)
        model, ema = preferred_layout(model, device), preferred_layout(ema, device)
    opt_cls = torch.optim.AdamW if T.optimizer == "adamw" else torch.optim.Adam
    kw = dict(lr=T.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=T.weight_decay)
    try:  # the fused kernel is several times faster than the per-tensor loop (CPU and GPU)
        opt = opt_cls(model.parameters(), fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        opt = opt_cls(model.parameters(), foreach=True, **kw)
    scaler = torch.amp.GradScaler("cuda") if amp is torch.float16 else None
    if amp is not None:
        autocast_hooks(model.net, device.type, amp)
    state = TrainState(model, ema, opt, scaler, amp)
    if ck is not None:
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        if ck.get("rng") and env.main:
            set_rng_state(ck["rng"])
        state.start, state.wall0 = int(ck["step"]), float(ck.get("wall_s", 0.0))
        state.init = ck["training"].get("init")
    elif init_ck is not None:
        weights = "ema" if init_ck.get("ema") is not None else "model"
        try:
            model.load_state_dict(init_ck[weights])
        except RuntimeError as e:
            raise ConfigError(f"--init: its weights do not fit this model config ({' '.join(str(e).split())[:160]})",
                              init) from None
        ema.load_state_dict(model.state_dict())
        state.init = {"path": os.fspath(Path(init).resolve()), "sha256": sha256_file(init),
                      "step": int(init_ck["step"]), "kind": init_ck["training"].get("kind"), "weights": weights}
    return state


def optimizer_step(state: TrainState, loss, params: list, grad_clip: float) -> float | None:
    """``backward`` (fp16: scaled), non-finite gradients zeroed (fp32), ``||g||`` clipped to ``grad_clip``,
    one optimiser step. Returns ``||g||`` before clipping (None without clipping)."""
    opt, scaler = state.opt, state.scaler
    opt.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(opt)
    else:
        for p in params:
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)
    gn = float(torch.nn.utils.clip_grad_norm_(params, grad_clip)) if grad_clip > 0 else None
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return gn


def ema_update(ema, model, beta: float) -> None:
    """``theta_ema <- beta theta_ema + (1 - beta) theta`` for the parameters; buffers copied."""
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - beta)
        for b_e, b_m in zip(ema.buffers(), model.buffers()):
            b_e.copy_(b_m)


# ----------------------------------------------------------------------------------------------
# The run: config, data, then the loop


def check_against_data(cfg: Config, info: dict, root) -> None:
    """Config values that only the data can rule out (before any training)."""
    if cfg.loss.kind == "ambient":
        R = float(info.get("accel", 0.0) or 0.0)
        if cfg.loss.further_accel is not None and R and cfg.loss.further_accel <= R:
            raise ConfigError(f"loss.further_accel={cfg.loss.further_accel:g} must exceed the data's acceleration "
                              f"R={R:g} (the further mask keeps fewer lines than M)", root)
    if cfg.loss.kind == "ambient_image" and info.get("corruption") not in ("pixels", "box"):
        raise DataError(f"image-domain data with unknown corruption {info.get('corruption')!r}", root)



def _load_data(cfg: Config, root, out: Path, env: DistEnv, progress: bool):
    """The dataset of ``cfg.loss.kind``. Naive baselines: rank 0 computes the reconstructions (cached in the
    run folder) before the process group starts; the other ranks wait for the cache file."""
    kw = dict(lam=cfg.loss.lam, l1_iters=cfg.loss.l1_iters, cache_mb=cfg.data.cache_mb)
    naive = cfg.loss.kind in ("naive_zf", "naive_l1")
    ready = out / f".{NaiveDataset.cache_name(cfg.loss.kind.split('_')[-1])}.ready"
    if naive and not env.main:
        wait_for(ready, "the naive reconstructions")
    ds = build_dataset(cfg.loss.kind, root, cache_dir=out, progress=progress and env.main, **kw)
    if naive and env.main:
        ready.touch()
    return ds


def _resume_checkpoint(out: Path, resume: bool, config, env: DistEnv, echo) -> dict | None:
    """``--resume``: the newest complete checkpoint in ``out`` (None: start a new run there, if a config is given)."""
    if not resume:
        return None
    try:
        found = latest_checkpoint(out, warn=echo if env.main else None)
    except DataError as e:  # checkpoint files are there, and every one is refused: nothing to continue
        raise DataError(f"--resume: {e.problem}", e.path) from None
    if found is not None:
        ck_path, ck = found
        ck["training"]["resumed_from"] = os.fspath(ck_path)
        return ck
    if config is None:
        raise ConfigError("--resume: no checkpoint in this run folder and no --config to start one", out)
    if env.main:
        echo(f"--resume: no checkpoint in {out} yet; starting a new run there")
    return None


def resolve_config(config, overrides, ck: dict | None, out: Path) -> Config:
    """The run's config: ``config`` + ``overrides``; when resuming, checked against the checkpoint's (only
    :data:`config.RESUMABLE_KEYS` may change; ``config=None`` means the checkpoint's own)."""
    if ck is None:
        if config is None:
            raise ConfigError("give --config (a YAML file or a packaged name such as tiny or cpu64)")
        cfg = config if isinstance(config, Config) else load_config(config, overrides)
        if isinstance(config, Config) and overrides:
            cfg = Config.from_dict(apply_overrides(cfg.to_dict(), overrides))
        return cfg
    base = Config.from_dict(ck["config"]).to_dict()  # sections added since the checkpoint was written: defaults
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
    return cfg


def train(config, data=None, out=None, *, overrides=(), resume: bool = False, init=None, progress: bool = True,
          echo=None) -> dict:
    """Train; returns ``{"step", "interrupted" (None or the signal name), "checkpoint", "run", "params_sha256"}``.

    ``config``: a :class:`Config`, a YAML path / packaged name, or ``None`` with ``resume`` (then the
    checkpoint's config is used). ``data``: the prepared folder (default on resume: the recorded one).
    ``overrides``: ``key=value`` strings. ``init``: a checkpoint whose (EMA) weights start the run.
    """
    env = dist_env()
    echo = echo or (lambda m: print(m, file=sys.stderr, flush=True))
    if out is None:
        raise ConfigError("give --out RUN (the run folder)")
    out = Path(out)
    ck = _resume_checkpoint(out, resume, config, env, echo)
    if init is not None and ck is not None:
        raise ConfigError("--init applies to a new run; a resumed run continues from its own checkpoint")
    cfg = resolve_config(config, overrides, ck, out)
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
    corruption = from_data(cfg, info, masks=getattr(dataset, "masks", None))  # (M, M~); data with own masks: their bank
    if cfg.model.sigma_view is None:  # estimate from the measured training data only, then record it
        cfg.model.sigma_view = round(estimate_sigma_view(dataset, corruption, seed=cfg.train.seed), 4)
        if env.main:
            echo(f"model.sigma_view estimated from the measured training data: {cfg.model.sigma_view:g}")
    global_batch = cfg.train.batch * env.world
    if len(dataset) < global_batch:
        raise ConfigError(f"the dataset has {len(dataset)} slices, fewer than one global batch "
                          f"({cfg.train.batch} x {env.world} processes)", data)

    device = setup_device(cfg.train.device, env)
    log = RunLog(out, env.main, echo, resume_step=ck["step"] if ck is not None else None)
    try:
        state = build_state(cfg, device, env, ck, init, init_ck)
        meta = _training_meta(cfg, dataset, corruption, data, env, state, global_batch)
        if env.main:
            with atomic_path(out / "config.yaml", ".yaml.tmp") as tmp:
                tmp.write_text(dump_yaml(cfg.to_dict()))
            (out / "done.json").unlink(missing_ok=True)
        describe_run(log, cfg=cfg, meta=meta, data=data, device=device, env=env,
                     resumed=None if ck is None else (state.start, ck["training"].get("resumed_from")),
                     fp32_fallback=cfg.train.precision != "fp32" and state.amp is None)
        return _train_loop(cfg, state, meta, corruption, dataset, out, env, device, log, progress)
    finally:
        log.close()


def _training_meta(cfg: Config, dataset, corruption: Corruption, data: Path, env: DistEnv, state: TrainState,
                   global_batch: int) -> dict:
    """``checkpoint["training"]``: what this model is (kind, label, the corruption (M, M~) as plain data,
    ``Corruption.to_dict``, which the samplers read back), what it was trained on (data folder, manifest hash) and how (ranks, precision, init)."""
    info, kind = dataset.info, cfg.loss.kind
    return {
        "kind": kind, "label": LABELS[kind], "corruption": corruption.to_dict(),
        "further_mask": "redraw" if cfg.loss.redraw else "fixed", "loss_domain": cfg.loss.domain,
        "data": {"root": os.fspath(data.resolve()), "manifest_sha256": dataset.manifest_sha256, "slices": len(dataset),
                 "split": info.get("split"), "domain": info.get("domain"), "shape": list(info["shape"]),
                 "coils": info.get("coils"), "mask_kind": info.get("mask_kind"), "accel": info.get("accel")},
        "em": getattr(dataset, "lineage", None),  # EM rounds: the ambient start, each E-step's prior and sampler
        "version": __version__, "world_size": env.world, "global_batch": global_batch, "init": state.init,
        "precision": cfg.train.precision if state.amp is not None else "fp32",
        "params": sum(p.numel() for p in state.model.parameters()),
    }


def _payload(step: int, wall: float, *, state: TrainState, cfg: Config, meta: dict) -> dict:
    """The checkpoint at ``step`` (``checkpoint.py`` lists the keys)."""
    return {"step": step, "model": state.model.state_dict(), "ema": state.ema.state_dict(),
            "optimizer": state.opt.state_dict(), "scaler": state.scaler.state_dict() if state.scaler is not None else None,
            "rng": rng_state(), "config": cfg.to_dict(), "training": dict(meta, images_seen=step * meta["global_batch"]),
            "version": __version__, "wall_s": wall}


def _next_batch(batches, stopper: StopRequest):
    """The next batch; None when a loader worker died of the same Ctrl-C; a data problem as one line."""
    try:
        return next(batches)
    except Exception as e:
        if stopper.signal is not None:
            return None
        if isinstance(e, DataError) or type(e).__name__ == "DataError":
            raise DataError(one_line(e)) from None
        raise


def _sample_grid(ema, corruption: Corruption, meta: dict, out: Path, step: int, T, device, log: RunLog) -> bool:
    """``RUN/samples/step_{step}.png``: prior samples of the EMA model (k-space models with the coil maps of
    training slices). A failure is logged and turns the grids off (returns False); training goes on."""
    try:
        p = sample_grid(ema, corruption, out / "samples" / f"step_{step:07d}.png", T.sample_n,
                        steps=T.sample_steps, seed=T.seed, device=device, maps_from=meta["data"]["root"])
    except Exception as e:  # sample grids are a by-product: never let them stop training
        log.info(f"sample grids disabled: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
        return False
    log.info(f"step {step}: prior samples -> {p}")
    return True


def _train_loop(cfg: Config, state: TrainState, meta: dict, corruption: Corruption, dataset, out: Path, env: DistEnv,
                device, log: RunLog, progress: bool) -> dict:
    """Steps ``state.start .. train.steps``: batch, seeds of the step, loss, optimiser step, EMA, then the
    metrics row, checkpoint and sample grid when due; a stop request saves and leaves after the step."""
    T, seed, global_batch = cfg.train, cfg.train.seed, meta["global_batch"]
    model = state.model
    den = loss_denoiser(model, env, device)
    loss_fn = build_loss(cfg.loss, corruption, seed)
    augment = augmentation(T.augment)
    sampler = step_sampler(dataset, env, seed, T.batch)
    loader = DataLoader(dataset, batch_size=T.batch, sampler=sampler, num_workers=T.num_workers, collate_fn=collate,
                        drop_last=True, pin_memory=device.type == "cuda", persistent_workers=T.num_workers > 0)
    batches = batches_from(loader, sampler, state.start)
    ckpts = Checkpoints(out, env, every=T.ckpt_every, last=T.steps, keep=T.keep,
                        payload=lambda step, wall: _payload(step, wall, state=state, cfg=cfg, meta=meta))
    grids = T.sample_every > 0 and env.main
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=T.steps, initial=state.start, desc=f"{cfg.name} [{cfg.loss.kind}]", unit="step",
               disable=not (progress and env.main), dynamic_ncols=True, file=sys.stderr)
    t_start = time.perf_counter()
    wall = lambda: state.wall0 + time.perf_counter() - t_start  # noqa: E731
    window = Window()
    stop, step = None, state.start
    with StopRequest() as stopper:
        while step < T.steps:
            batch = _next_batch(batches, stopper)
            if batch is None:
                break
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if augment is not None:  # its own generator: the loss's draws below are those of a run without it
                batch = augment(batch, torch.Generator(device=device).manual_seed(
                    derived_seed("augment", seed, env.rank, step)))
            g = torch.Generator(device=device).manual_seed(derived_seed("noise", seed, env.rank, step))
            torch.manual_seed(derived_seed("dropout", seed, env.rank, step))
            lr = lr_at(T, step)
            for group in state.opt.param_groups:
                group["lr"] = lr
            model.train()
            loss = loss_fn(den, batch, g).mean()
            gn = optimizer_step(state, loss, params, T.grad_clip)
            ema_update(state.ema, model, ema_beta(T, (step + 1) * global_batch, global_batch))
            step += 1
            window.add(float(loss.detach()), gn)
            bar.update(1)

            want = any_rank(stopper.signal is not None, env, device)  # every rank stops at the same step
            if step % T.log_every == 0 or step == T.steps or want:
                _metrics_row(log, bar, window, step, lr, T, env, device, global_batch, wall())
                window = Window()
            if want:
                stop = stopper.signal or "SIGTERM"
                break
            if ckpts.due(step):
                ckpts.save(step, wall())
            if grids and step % T.sample_every == 0:
                grids = _sample_grid(state.ema, corruption, meta, out, step, T, device, log)
        if stop is not None or (stopper.signal is not None and step < T.steps):
            stop = stop or stopper.signal
            ckpts.save(step, wall())
            log.info(f"{stop}: stopped at step {step}; checkpoint saved to {out / 'checkpoint.pt'}")
    bar.close()

    result = {"step": step, "interrupted": stop, "checkpoint": os.fspath(out / "checkpoint.pt"), "run": os.fspath(out),
              "params_sha256": params_sha256(model), "ema_sha256": params_sha256(state.ema)}
    hashes = gather(result["params_sha256"], env)
    if env.main and stop is None:
        write_done(out, step=step, steps=T.steps, world=env.world, hashes=hashes, ema_sha256=result["ema_sha256"],
                   checkpoint=result["checkpoint"], wall_s=wall(), kind=cfg.loss.kind)
        log.info(f"done: step {step}, checkpoint {out / 'checkpoint.pt'}")
        if len(set(hashes)) != 1:
            log.info("WARNING: the ranks' weights differ at the end of training")
    result["params_sha256_per_rank"] = hashes
    del den, model, state
    shut_down(env)
    return result


def _metrics_row(log: RunLog, bar, window: Window, step: int, lr: float, T, env: DistEnv, device, global_batch: int,
                 wall_s: float) -> None:
    """One row of ``metrics.csv``: the loss averaged over the window's steps and over the ranks."""
    mean_loss = mean_over_ranks(window.mean_loss, env, device)
    ips = window.images_per_s(global_batch, time.perf_counter())
    log.metrics_row({"step": step, "loss": mean_loss, "lr": lr, "images_per_s": ips, "wall_s": wall_s,
                     "grad_norm": window.grad_norm / window.n if T.grad_clip > 0 and window.n else None})
    bar.set_postfix(loss=f"{mean_loss:.4g}", img_s=f"{ips:.1f}")
    if not math.isfinite(mean_loss):
        log.info(f"step {step}: loss is {mean_loss} (non-finite gradients were zeroed)")
