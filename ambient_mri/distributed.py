"""Processes, devices and data order of a training run (one process, or ``torchrun`` with DDP).

* :class:`DistEnv` / :func:`dist_env`: rank, world size and local rank from ``torchrun``'s environment;
* :func:`resolve_device` / :func:`setup_device`: ``auto | cpu | cuda`` -> a ``torch.device`` (the local
  rank's GPU under DDP), and the process group (NCCL on GPU, gloo on CPU);
* :func:`derived_seed`: the seeds of step ``t`` on rank ``r`` (``derived_seed("noise", seed, r, t)``);
* :func:`step_sampler` / :func:`batches_from`: the batch of step ``t`` is fixed by ``(seed, epoch)``, so a
  resumed run reads the same batches as an uninterrupted one;
* :func:`loss_denoiser`: the model as the losses call it (DDP-wrapped when distributed);
* :func:`any_rank`, :func:`mean_over_ranks`, :func:`gather`: the few collectives the trainer needs, the
  identity in a single process.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler

from .errors import AmbientMRIError, ConfigError


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


def derived_seed(*parts) -> int:
    """A 63-bit seed from any values (``derived_seed("noise", seed, rank, step)``), stable across runs."""
    h = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def resolve_device(name: str, env: DistEnv | None = None, *, option: str = "train.device"):
    """``auto`` (a GPU when there is one), ``cpu`` or ``cuda`` -> ``torch.device``; under DDP the local
    rank's GPU. ``cuda`` without a GPU is a :class:`ConfigError` naming ``option``."""
    env = env or DistEnv()
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option}=cuda but no CUDA device is available")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        idx = env.local_rank if env.distributed else (torch.cuda.current_device() if torch.cuda.is_available() else 0)
        return torch.device("cuda", idx)
    return torch.device("cpu")


def setup_device(name: str, env: DistEnv):
    """:func:`resolve_device`, the GPU's fast-math switches (cuDNN autotuning, TF32), and the process
    group when distributed (NCCL on GPU, gloo on CPU; 60 min timeout: rank 0 may be busy saving)."""
    device = resolve_device(name, env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if env.distributed:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(minutes=60))
    return device


def wait_for(path: Path, what: str, timeout_s: float = 7 * 24 * 3600) -> None:
    """Block until rank 0 has written ``path`` (before any process group exists)."""
    t0 = time.monotonic()
    while not path.exists():
        if time.monotonic() - t0 > timeout_s:
            raise AmbientMRIError(f"gave up waiting for rank 0 to write {what}", path)
        time.sleep(1.0)


# ----------------------------------------------------------------------------------------------
# Data order


def step_sampler(dataset, env: DistEnv, seed: int, batch: int):
    """A ``DistributedSampler`` (shuffled by ``seed + epoch``, ``set_epoch``) that can start mid-epoch."""
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
# The model as the losses call it


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
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return _Call(net, model)


# ----------------------------------------------------------------------------------------------
# Collectives (the identity in one process)


def any_rank(flag: bool, env: DistEnv, device) -> bool:
    """True on every rank when ``flag`` is true on any (so that all ranks stop at the same step)."""
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return t.item() > 0


def mean_over_ranks(value: float, env: DistEnv, device) -> float:
    """``(1 / world) sum_r value_r`` (float64 all-reduce)."""
    if not env.distributed:
        return value
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / env.world


def gather(obj, env: DistEnv) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank, then a barrier."""
    if not env.distributed:
        return [obj]
    gathered = [None] * env.world
    dist.all_gather_object(gathered, obj)
    dist.barrier()
    return gathered


def shut_down(env: DistEnv) -> None:
    """Destroy the process group (after the caller has dropped its DDP modules)."""
    if env.distributed:
        gc.collect()
        dist.destroy_process_group()
