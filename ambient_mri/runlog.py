"""What a training run writes besides its weights, and when: ``RUN/train.log``, ``RUN/metrics.csv``,
TensorBoard, the run description in every checkpoint, ``done.json``, and the stop policy on SIGINT / SIGTERM.

Rank 0 writes; the other ranks hold disabled objects (every method is then a no-op), so the training loop
calls them the same way on every rank.
"""

from __future__ import annotations

import csv
import os
import signal
import threading
import time
from pathlib import Path

from .checkpoint import save_checkpoint
from .fsutil import atomic_path, write_json

METRICS_COLUMNS = ("step", "loss", "lr", "images_per_s", "wall_s", "grad_norm")
LABELS = {
    "ambient": "ambient (k-space): trained on undersampled measurements only",
    "ambient_image": "ambient (image domain): trained on corrupted images only",
    "oracle": "ORACLE (FS-EDM): trained on fully sampled reference images, not an ambient model",
    "naive_zf": "naive ZF-EDM baseline: plain EDM on zero-filled reconstructions",
    "naive_l1": "naive L1-EDM baseline: plain EDM on L1-wavelet reconstructions",
    "em": "EM (ambient start): plain EDM on posterior samples of the undersampled training scans",
}


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


class Window:
    """The steps since the last metrics row: their summed loss and gradient norm, and the time they took."""

    def __init__(self):
        self.loss, self.grad_norm, self.n, self.t = 0.0, 0.0, 0, time.perf_counter()

    def add(self, loss: float, grad_norm: float | None) -> None:
        self.loss += loss
        self.n += 1
        if grad_norm is not None:
            self.grad_norm += grad_norm

    @property
    def mean_loss(self) -> float:
        return self.loss / max(self.n, 1)

    def images_per_s(self, global_batch: int, now: float) -> float:
        return self.n * global_batch / max(now - self.t, 1e-9)


def describe_run(log: RunLog, *, cfg, meta: dict, data, device, env, resumed: tuple | None, fp32_fallback: bool):
    """The first lines of ``train.log``: what is trained on what, where, and from which weights.
    ``resumed``: ``(step, checkpoint path)`` of a resumed run, else None."""
    info, kind = meta["data"], meta["kind"]
    H, W = info["shape"]
    log.info(f"{'resuming' if resumed is not None else 'starting'} {cfg.name}: {LABELS[kind]}")
    log.info(f"data {data} ({info['slices']} slices, {H}x{W}, {info.get('coils')} coils, split {info.get('split')}, "
             f"mask {info.get('mask_kind')} R={info.get('accel')}); model {meta['params']:,} parameters; device "
             f"{device}; {env.world} process(es), global batch {meta['global_batch']}; precision {meta['precision']}")
    if fp32_fallback:
        where = "a GPU or a CPU with native bf16 (AVX512-BF16 or AMX)" if cfg.train.precision == "bf16" else "a GPU"
        log.info(f"train.precision={cfg.train.precision} needs {where}: running fp32 on {device.type}")
    if cfg.train.augment != "none":
        log.info(f"augmentation: {cfg.train.augment} (each slice reflected about its centre row with probability 1/2)")
    if kind in ("ambient", "ambient_image", "naive_zf", "naive_l1", "em") and info.get("split") not in (None, "train"):
        log.info(f"note: the data is a {info.get('split')} split; only its measured data are read, never a reference")
    if kind == "oracle":
        log.info("ORACLE: this model sees fully sampled references (ground truth); it is the FS-EDM upper baseline")
    init = meta["init"]
    if init:
        log.info(f"initialised from {init['path']} (step {init['step']}, {init['weights']} weights)")
    if resumed is not None:
        log.info(f"resumed from step {resumed[0]} ({resumed[1]})")


class Checkpoints:
    """When and what to save: every ``ckpt_every`` steps, at the last step and on a stop request (rank 0
    writes, ``checkpoint.save_checkpoint`` keeps the newest ``keep`` snapshots); ``payload`` gives the
    state at a step (a callable of ``(step, wall_s)``)."""

    def __init__(self, out: Path, env, *, every: int, last: int, keep: int, payload):
        self.out, self.env, self.every, self.last, self.keep, self.payload = out, env, every, last, keep, payload

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.last

    def save(self, step: int, wall: float):
        if not self.env.main:
            return None
        return save_checkpoint(self.out, self.payload(step, wall), keep=self.keep)


def write_done(out: Path, *, step: int, steps: int, world: int, hashes: list, ema_sha256: str, checkpoint: str,
               wall_s: float, kind: str) -> None:
    """``RUN/done.json``: the finished run, with each rank's parameter hash (DDP ranks must agree)."""
    write_json(out / "done.json", {"step": step, "steps": steps, "world_size": world, "params_sha256_per_rank": hashes,
                                   "ema_sha256": ema_sha256, "ranks_in_sync": len(set(hashes)) == 1,
                                   "checkpoint": checkpoint, "wall_s": wall_s, "kind": kind})


class StopRequest:
    """SIGINT / SIGTERM: the first one asks for a checkpoint and a clean exit after the current step. A second
    one is ignored (torchrun follows a Ctrl-C with a SIGTERM to its workers, which must not cut the save
    short); a third aborts at once (every checkpoint on disk stays complete: they are written atomically)."""

    def __init__(self):
        self.signal = None
        self.count = 0
        self._old = {}

    def __enter__(self):
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
