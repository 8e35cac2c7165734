"""Expectation-maximisation from an ambient start (``ambient-mri train --em-from AMBIENT``, ``loss.kind: em``).

DiEM (Rozet et al. 2024) and DiffEM (Hosseintabar et al. 2025) learn a clean diffusion prior from corrupted
data by alternating, for rounds ``r = 1..R`` with the prior ``q_0`` = the ambient model:

    E-step:  x_s^(k) ~ q_{r-1}(x | y_s, A_s),   k = 1..K, for every training slice s
             (its own k-space y_s, mask M_s, maps S_s and noise level; ``sampling.posterior``)
    M-step:  q_r = argmin_theta  E_{s,k} E_sigma lambda(sigma) ||D_theta(x_s^(k) + sigma eta; sigma) - x_s^(k)||^2
             (plain EDM, ``losses.EDMLoss``), warm-started from q_{r-1}

The E-step reads each training file through ``prepared.load_prepared(reference=False)``: measured k-space,
mask, maps, noise level; a reference image, where a file has one, is never read. docs/theory.md says
what the fixed point is and when it is not the clean distribution.

Run folder ``RUN``: ``em.json`` (config, data, the ambient start, finished rounds and their CPU time),
``round_{r}/`` (a training run folder: ``samples.h5`` from the E-step, then ``checkpoint.pt``, ``metrics.csv``,
``done.json``; an interrupted E-step keeps its finished files in ``round_{r}/.estep/``), and at the end
``checkpoint.pt``: the last round's, whose ``training["em"]`` records the lineage (which ambient model, each
round's prior, sampler and steps). Every stage resumes (``--resume``): finished E-step files and rounds are
kept, a killed M-step continues from its checkpoint, bit for bit on CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import LATEST, load_checkpoint, load_denoiser
from .config import Config, apply_overrides, load_config
from .datasets import SAMPLES_FILE
from .distributed import derived_seed, dist_env, resolve_device
from .errors import ConfigError, DataError
from .fsutil import atomic_h5, atomic_path, make_dir, sha256_file, write_json
from .prepared import load_prepared, read_manifest
from .recon import DEFAULT_FURTHER, resolve_noise
from .sampling import DC_CG_ITERS, DEFAULT_STEPS, MMPS_CG_ITERS, nfe, posterior
from .train import resolve_config, train

STATE = "em.json"
PARTIAL = ".estep"


def round_dir(out: Path, r: int) -> Path:
    return Path(out) / f"round_{r}"


def prior_record(path, ck: dict) -> dict:
    """Which checkpoint a prior is: path, sha256, step, training kind (``ck``: the loaded checkpoint, or the
    ``meta`` of ``load_denoiser``; both carry ``step`` and ``training``)."""
    return {"path": os.fspath(Path(path).resolve()), "sha256": sha256_file(path), "step": int(ck["step"]),
            "kind": ck["training"].get("kind")}


def e_step(prior, data, out_dir, *, r: int, em, seed: int = 0, device="cpu", progress: bool = True) -> Path:
    """Round ``r``'s E-step: ``em.samples_per_scan`` posterior samples of every slice of the prepared folder
    ``data``, drawn with the prior checkpoint ``prior`` (sampler ``em.first_sampler`` in round 1, else
    ``em.sampler``; ``em.sampler_steps``; ``em.batch`` slices per call; the slices' own noise levels, or the
    k-space-edge estimate where unknown). Writes ``out_dir/samples.h5`` (``images (N K, H, W)`` complex64,
    attribute ``lineage``) and returns its path. Finished files are kept in ``out_dir/.estep`` so that an
    interrupted E-step resumes where it stopped (each batch's seed depends only on ``seed``, ``r``, file and
    first slice, so a resumed E-step draws the same samples)."""
    out_dir = Path(out_dir)
    target = out_dir / SAMPLES_FILE
    if target.is_file():
        return target
    manifest, manifest_sha = read_manifest(data)
    method = em.first_sampler if r == 1 else em.sampler
    steps = em.sampler_steps or DEFAULT_STEPS[method]
    further = DEFAULT_FURTHER.get(method, "independent")
    cg = {"dc": {"cg_iters": DC_CG_ITERS}, "mmps": {"cg_iters": MMPS_CG_ITERS}}.get(method, {})  # recorded below
    denoiser, meta = load_denoiser(prior, device=device)
    denoiser.requires_grad_(False)
    record = prior_record(prior, meta)
    key = {"manifest_sha256": manifest_sha, "prior_sha256": record["sha256"], "round": r, "sampler": method,
           "steps": steps, "samples_per_scan": em.samples_per_scan, "batch": em.batch, "seed": seed, "further": further,
           **cg}
    part = out_dir / PARTIAL
    make_dir(part)
    key_file = part / "key.json"
    if key_file.is_file() and json.loads(key_file.read_text()) != key:
        raise DataError(f"an interrupted E-step with other settings is here ({key_file}); remove {part} to start "
                        "this round's E-step again", out_dir)
    write_json(key_file, key)

    K, files = em.samples_per_scan, manifest["files"]
    bar = tqdm(total=sum(e["slices"] for e in files), desc=f"EM round {r} E-step ({method}, {steps} steps)",
               unit="slice", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for fi, entry in enumerate(files):
        done = part / f"{fi:05d}.npz"
        if done.is_file():
            bar.update(entry["slices"])
            continue
        scan = load_prepared(Path(data) / entry["file"])  # reference=False: measured data only
        if scan.maps is None:
            raise DataError("EM needs k-space data (kspace, mask, maps); this file is image-domain",
                            Path(data) / entry["file"])
        noise, _ = resolve_noise(scan, None)
        S, t0, chunks = scan.y.shape[0], time.perf_counter(), []
        for b in range(0, S, em.batch):
            sl = slice(b, min(S, b + em.batch))
            post = posterior(method, denoiser, meta["training"], torch.from_numpy(scan.y[sl]).to(device),
                             torch.from_numpy(scan.maps[sl]).to(device),
                             torch.from_numpy(np.asarray(scan.mask[sl])).float().to(device),
                             samples=K, seed=derived_seed("em-estep", seed, r, fi, b), steps=steps,
                             noise_std=torch.as_tensor(noise[sl], dtype=torch.float32, device=device),
                             further=further, **cg)
            chunks.append(post.samples.transpose(0, 1).cpu().numpy())  # (B, K, H, W)
            bar.update(sl.stop - sl.start)
        with atomic_path(done, ".npz.tmp") as tmp, open(tmp, "wb") as fh:
            np.savez(fh, samples=np.concatenate(chunks).astype(np.complex64),
                     seconds=np.float64(time.perf_counter() - t0))
    bar.close()

    samples, seconds = [], 0.0
    for fi in range(len(files)):
        with np.load(part / f"{fi:05d}.npz") as z:
            samples.append(z["samples"].reshape(-1, *z["samples"].shape[-2:]))
            seconds += float(z["seconds"])
    images = np.concatenate(samples)
    if not np.isfinite(images.view(np.float32)).all():
        raise DataError(f"the E-step drew non-finite samples (sampler {method}); try em.sampler: dc", out_dir)
    previous = meta["training"].get("em") or {}
    this = dict(record, round=r, sampler=method, steps=steps, further=further, **cg, samples_per_scan=K,
                slices=len(images) // K, nfe_per_sample=nfe(method, steps, **cg), estep_s=round(seconds, 2))
    lineage = {"manifest_sha256": manifest_sha, "round": r, "ambient": previous.get("ambient", record),
               "rounds": list(previous.get("rounds", [])) + [this]}
    with atomic_h5(target) as f:
        f.create_dataset("images", data=images)
        f.attrs["lineage"] = json.dumps(lineage)
    shutil.rmtree(part, ignore_errors=True)
    return target


def em_config(config, ambient_config: dict, overrides) -> Config:
    """The EM run's config: ``config`` (a Config, a YAML path or packaged name) with ``overrides``, or by
    default the ambient checkpoint's own model and training settings (``ambient_config``, with
    ``model.sigma_view = 0``: a plain EDM prior) and ``loss.kind = em``."""
    if config is None:
        d = dict(ambient_config, name=str(ambient_config.get("name", "run")).removesuffix("-em") + "-em",
                 loss={"kind": "em"})
        d["model"] = dict(d["model"], sigma_view=0.0)
        cfg = Config.from_dict(apply_overrides(d, overrides))
    elif isinstance(config, Config):
        cfg = Config.from_dict(apply_overrides(config.to_dict(), overrides)) if overrides else config
    else:
        cfg = load_config(config, overrides)
    if cfg.loss.kind != "em":
        raise ConfigError(f"an EM run trains loss.kind=em (the config says {cfg.loss.kind!r})")
    return cfg


def round_config(cfg: Config, r: int) -> Config:
    """Round ``r``'s M-step: ``cfg`` with ``train.steps = em.steps_per_round`` and the round in the name."""
    d = cfg.to_dict()
    d["train"]["steps"] = cfg.em.steps_per_round
    d["name"] = f"{cfg.name.removesuffix('-em')}-r{r}-em"
    return Config.from_dict(d)


def _same_architecture(a: dict, b: dict) -> bool:
    drop = lambda m: {k: v for k, v in m.items() if k != "sigma_view"}  # noqa: E731  (preconditioning only)
    return drop(a) == drop(b)


def run_em(config=None, data=None, out=None, *, em_from=None, overrides=(), resume: bool = False,
           progress: bool = True, echo=None) -> dict:
    """Run (or ``resume``) EM in the run folder ``out``; returns ``{"checkpoint", "rounds", "interrupted"}``.

    New run: ``em_from`` (the ambient checkpoint, round 0's prior) and ``data`` (the prepared train split it
    was trained on, or another one with measured k-space). Resumed run: both from ``out/em.json``; only
    ``em.rounds`` and the keys ``train --resume`` allows may change (more rounds continue a finished run).
    """
    echo = echo or (lambda m: print(m, file=sys.stderr, flush=True))
    if dist_env().distributed:
        raise ConfigError("EM runs in one process (its E-step is not sharded yet): run it without torchrun")
    if out is None:
        raise ConfigError("give --out RUN (the EM run folder)")
    out = Path(out)
    state_path = out / STATE
    if state_path.is_file():
        if not resume:
            raise ConfigError("this run folder already holds an EM run: pass --resume to continue it, or choose "
                              "another --out", out)
        state = json.loads(state_path.read_text())
        if em_from is not None and Path(em_from).resolve() != Path(state["ambient"]["path"]):
            raise ConfigError("--em-from differs from the ambient checkpoint this EM run started from", out)
        cfg = resolve_config(config, overrides, {"config": state["config"]}, out)  # the rule of train --resume
        if data is not None and Path(data).resolve() != Path(state["data"]):
            raise ConfigError("--data differs from the prepared folder this EM run uses", out)
        data, ambient = Path(state["data"]), state["ambient"]
        if sha256_file(ambient["path"]) != ambient["sha256"]:
            raise DataError("the ambient checkpoint changed since this EM run started (sha256 differs)", ambient["path"])
    else:
        if em_from is None:
            raise ConfigError("give --em-from AMBIENT_CHECKPOINT (round 0's prior)" if not resume else
                              f"--resume: no EM run here ({STATE} missing)", out)
        if data is None:
            raise ConfigError("give --data PREPARED (the prepared train split: measured k-space, masks, maps)")
        em_from = Path(em_from)
        if em_from.is_dir():
            em_from = em_from / LATEST
        ambient_ck = load_checkpoint(em_from)
        cfg = em_config(config, ambient_ck["config"], overrides)
        ambient = dict(prior_record(em_from, ambient_ck), model=ambient_ck["config"]["model"])
        if ambient["kind"] not in ("ambient",):
            raise ConfigError(f"--em-from needs an ambient k-space checkpoint (this one is {ambient['kind']!r})", em_from)
        read_manifest(data)
        make_dir(out)
        state = {"data": os.fspath(Path(data).resolve()), "ambient": ambient, "rounds": []}
    state["config"] = cfg.to_dict()
    write_json(state_path, state)

    device = resolve_device(cfg.train.device, option="train.device")
    prior, result = Path(ambient["path"]), {"interrupted": None}
    for r in range(1, cfg.em.rounds + 1):
        rd = round_dir(out, r)
        if (rd / "done.json").is_file():
            prior = rd / LATEST
            continue
        echo(f"EM round {r}/{cfg.em.rounds}: E-step with {prior}")
        t0 = time.perf_counter()
        e_step(prior, data, rd, r=r, em=cfg.em, seed=cfg.train.seed, device=device, progress=progress)
        echo(f"EM round {r}: E-step done ({time.perf_counter() - t0:.0f} s this session); M-step, "
             f"{cfg.em.steps_per_round} steps")
        started = (rd / LATEST).is_file() or any((rd / "checkpoints").glob("ckpt_*.pt"))
        init = None
        if not started and (r > 1 or _same_architecture(cfg.to_dict()["model"], ambient["model"])):
            init = prior  # warm start: the previous round's (round 1: the ambient model's) EMA weights
        result = train(round_config(cfg, r), data, rd, resume=started, init=init, progress=progress, echo=echo)
        if result["interrupted"] is not None:
            echo(f"EM round {r}: M-step interrupted ({result['interrupted']}); resume with --resume")
            return {"checkpoint": None, "rounds": r - 1, "interrupted": result["interrupted"]}
        prior = rd / LATEST
        done = json.loads((rd / "done.json").read_text())
        with h5py.File(rd / SAMPLES_FILE, "r") as fh:
            lineage = json.loads(fh.attrs["lineage"])["rounds"][-1]
        state["rounds"] = [x for x in state["rounds"] if x["round"] != r] + [
            {"round": r, "estep_s": lineage["estep_s"], "mstep_s": round(float(done["wall_s"]), 2),
             "checkpoint": os.fspath(prior), "sha256": sha256_file(prior)}]
        write_json(state_path, state)
    final = out / LATEST
    with atomic_path(final, ".pt.tmp") as tmp:
        shutil.copyfile(prior, tmp)
    state["done"] = {"rounds": cfg.em.rounds, "checkpoint": os.fspath(final), "sha256": sha256_file(final),
                     "wall_s": round(sum(x["estep_s"] + x["mstep_s"] for x in state["rounds"]), 2)}
    write_json(state_path, state)
    echo(f"EM done: {cfg.em.rounds} round(s), checkpoint {final}")
    return {"checkpoint": os.fspath(final), "rounds": cfg.em.rounds, "interrupted": None}
