"""Training checkpoints: written atomically, read only with ``torch.load(..., weights_only=True)``.

A run folder keeps ``RUN/checkpoint.pt`` (the latest) and numbered snapshots
``RUN/checkpoints/ckpt_{step:07d}.pt`` (the last ``keep``). Each file is written to a temporary name,
flushed to disk and renamed, and ``checkpoint.pt`` is a hard link to (or copy of) the newest snapshot,
also swapped in by a rename: a kill at any moment leaves every checkpoint on disk complete.

Content (plain tensors, numbers, strings, lists and dicts only, so that ``weights_only=True`` reads it):
``format``, ``step``, ``model`` and ``ema`` state dicts, ``optimizer``, ``scaler`` (fp16), ``rng``
(torch, CUDA, numpy and python states as tensors/lists), ``config`` (the full resolved config),
``training`` (``kind``, ``corruption`` as plain data: ``corruption.Corruption.to_dict``, read with
``corruption.from_dict``; data with their own masks add the ``bank`` of training masks,
``further_mask`` redraw|fixed, data manifest sha256, ...), ``version``, ``wall_s``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .fsutil import WriteGuard, atomic_path
from .networks import build_denoiser, preferred_layout

FORMAT = "ambient_mri.checkpoint/1"
LATEST = "checkpoint.pt"
SNAPSHOT_DIR = "checkpoints"
_SNAP = re.compile(r"^ckpt_(\d+)\.pt$")
ASSETS = Path(__file__).resolve().with_name("assets")
# checkpoints shipped with the package (model cards in docs/), usable by name wherever a checkpoint is read
PACKAGED = {"demo": "demo_ckpt.pt", "siat64-lines-r4": "siat64_lines_r4_ambient.pt"}


def resolve(path) -> Path:
    """``path`` itself, or the packaged checkpoint of that name (:data:`PACKAGED`) when no such file or folder exists."""
    p = Path(path)
    if not p.exists() and str(path) in PACKAGED:
        return ASSETS / PACKAGED[str(path)]
    return p


# ----------------------------------------------------------------------------------------------
# RNG states as weights-only-loadable values


def rng_state() -> dict:
    """The torch, CUDA, numpy and python RNG states, as tensors/ints/floats/strings."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, pystate, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(pystate, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }


def set_rng_state(d: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(d["torch"].cpu())
    if d.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in d["cuda"]][: torch.cuda.device_count()])
    n = d["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = d["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))


# ----------------------------------------------------------------------------------------------
# Writing


def snapshot_path(run_dir, step: int) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / f"ckpt_{int(step):07d}.pt"


def _write(obj, path: Path) -> None:
    with atomic_path(path, ".pt.tmp") as tmp:
        with open(tmp, "wb") as raw:
            f = WriteGuard(raw)  # a full disk: one clear OSError, not torch's "unexpected pos" RuntimeError
            torch.save(obj, f)
            f.flush()
            f.fsync()
        f.check()


def _publish_latest(snapshot: Path, latest: Path) -> None:
    """Make ``latest`` a hard link to ``snapshot`` (a copy where links are impossible), via rename."""
    tmp = latest.with_name(f".{latest.name}.{os.getpid()}.link.tmp")
    try:
        if tmp.exists():
            tmp.unlink()
        os.link(snapshot, tmp)
        os.replace(tmp, latest)
        return
    except OSError:
        if tmp.exists():
            tmp.unlink()
    with atomic_path(latest, ".pt.tmp") as t:
        shutil.copyfile(snapshot, t)


def list_snapshots(run_dir) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of the numbered snapshots, oldest first."""
    d = Path(run_dir) / SNAPSHOT_DIR
    out = []
    for p in d.glob("ckpt_*.pt") if d.is_dir() else []:
        m = _SNAP.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def remove_stale_temporaries(run_dir) -> list[Path]:
    """Delete the hidden ``.*.tmp`` files a killed run left in ``run_dir`` and its snapshot folder (half-written
    checkpoints: never loaded, but as large as a checkpoint). Call only while no other process trains there."""
    removed = []
    for d in (Path(run_dir), Path(run_dir) / SNAPSHOT_DIR):
        for p in d.glob(".*.tmp") if d.is_dir() else []:
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def save_checkpoint(run_dir, payload: dict, *, keep: int = 3) -> Path:
    """Write ``payload`` as snapshot ``ckpt_{step}.pt``, point ``checkpoint.pt`` at it, drop all but the
    newest ``keep`` snapshots. Returns the snapshot path."""
    run_dir = Path(run_dir)
    step = int(payload["step"])
    snap = snapshot_path(run_dir, step)
    _write(dict(payload, format=FORMAT), snap)
    _publish_latest(snap, run_dir / LATEST)
    for _, old in list_snapshots(run_dir)[:-keep]:
        try:
            old.unlink()
        except OSError:
            pass
    return snap


# ----------------------------------------------------------------------------------------------
# Reading


def _reason(e: BaseException) -> str:
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in text:
        detail = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else \
            "\n".join(ln for ln in text.splitlines() if "GLOBAL" in ln or "Unsupported" in ln)
        detail = " ".join(detail.split("Check the documentation")[0].split())[:140]
        return "refused: it holds pickled objects, not only weights" + (f" ({detail})" if detail else "")
    return " ".join(text.split())[:160] or type(e).__name__


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint with ``torch.load(path, weights_only=True)``; one-line :class:`DataError` for a
    missing, damaged or pickled file, or one that is not an ambient_mri training checkpoint. ``path`` may name a
    packaged checkpoint (:data:`PACKAGED`)."""
    path = resolve(path)
    if not path.is_file():
        raise DataError(f"no such checkpoint (packaged ones: {', '.join(PACKAGED)})", path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError... depending on the damage
        raise DataError(f"cannot load with torch.load(weights_only=True): {_reason(e)}", path) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        got = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"not an ambient_mri checkpoint (format {got!r}, expected {FORMAT!r})", path)
    for k in ("step", "model", "config", "training"):
        if k not in obj:
            raise DataError(f"checkpoint has no {k!r}", path)
    return obj


def latest_checkpoint(run_dir, map_location="cpu", warn=None) -> tuple[Path, dict] | None:
    """The newest complete checkpoint of a run folder: ``(path, payload)``, or ``None`` if it holds no
    checkpoint file at all. Unreadable or refused files are skipped (``warn(message)`` is told of each); when
    every file is refused, the newest one's :class:`DataError` is raised (which file, and why), never ``None``."""
    run_dir = Path(run_dir)
    cands = [p for _, p in reversed(list_snapshots(run_dir))]
    if (run_dir / LATEST).is_file():
        cands.insert(0, run_dir / LATEST)
    best, refused = None, []
    for p in cands:
        m = _SNAP.match(p.name)
        if best is not None and m and int(m.group(1)) <= best[1]["step"]:
            break  # snapshots are newest first; nothing older can win
        try:
            ck = load_checkpoint(p, map_location)
        except DataError as e:
            refused.append(e)
            continue
        if best is None or ck["step"] > best[1]["step"]:
            best = (p, ck)
    if best is None and refused:
        n = len(refused)
        others = "the only checkpoint file" if n == 1 else f"the newest of {n} checkpoint files, all refused,"
        raise DataError(f"{refused[0].problem} ({others} in the run folder {run_dir})", refused[0].path)
    for e in refused if warn else ():
        warn(f"skipping {e}")
    return best


def build_from_checkpoint(ck: dict, ema: bool = True, device="cpu"):
    """The denoiser of a loaded checkpoint (EMA weights by default), in eval mode."""
    den = build_denoiser(ck["config"]["model"])
    sd = ck["ema"] if ema and ck.get("ema") is not None else ck["model"]
    den.load_state_dict(sd)
    return preferred_layout(den.to(device), device).eval()


def load_denoiser(path, ema: bool = True, device="cpu"):
    """``(EDMDenoiser in eval mode, meta)`` from a checkpoint file (or a run folder: its newest checkpoint).

    ``meta``: ``{"path", "step", "config", "training", "version", "ema"}``; ``meta["training"]["corruption"]``
    is the plain-data ``corruption.Corruption`` (``corruption.from_dict``); ``meta["training"]["kind"]`` is
    ambient | ambient_image | oracle | naive_zf | naive_l1 | em (``meta["training"]["em"]``: the EM lineage).
    ``path`` may name a packaged checkpoint (:data:`PACKAGED`)."""
    path = resolve(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise DataError(f"no checkpoint in this run folder (neither {LATEST} nor {SNAPSHOT_DIR}/ckpt_*.pt)", path)
        path, ck = found
    else:
        ck = load_checkpoint(path)
    try:
        den = build_from_checkpoint(ck, ema=ema, device=device)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"weights do not fit the recorded model config ({' '.join(str(e).split())[:160]})", path) from None
    meta = {"path": os.fspath(path), "step": int(ck["step"]), "config": ck["config"], "training": ck["training"],
            "version": ck.get("version"), "ema": bool(ema and ck.get("ema") is not None)}
    return den, meta


def params_sha256(module: torch.nn.Module) -> str:
    """SHA-256 over a module's parameters and buffers (names and exact bytes): equal iff bit-identical."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


_ABSOLUTE = re.compile(r"^(/|[A-Za-z]:[\\/]|\\\\)")  # POSIX root, a Windows drive, a UNC share


def without_machine_paths(obj):
    """A copy of checkpoint metadata in which every absolute path keeps only its last component
    (``/home/me/runs/prep/train`` -> ``train``): a released file names no folder of the machine that trained it."""
    if isinstance(obj, dict):
        return {k: without_machine_paths(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(without_machine_paths(v) for v in obj)
    if isinstance(obj, str) and _ABSOLUTE.match(obj):
        return re.split(r"[\\/]", obj.rstrip("/\\"))[-1]
    return obj


def export_weights(src, dst) -> Path:
    """Write a small release copy of a checkpoint (or a run folder's newest one): the EMA weights as
    ``model`` plus config, training metadata (absolute paths reduced to their last component,
    :func:`without_machine_paths`), step and version; no optimiser, RNG or raw weights.
    It loads like any checkpoint (``load_denoiser``, ``recon``, ``sample``, ``train --init``); exporting an
    exported file again gives the same weights and metadata."""
    src = Path(src)
    if src.is_dir():
        found = latest_checkpoint(src)
        if found is None:
            raise DataError(f"no checkpoint in this run folder (neither {LATEST} nor {SNAPSHOT_DIR}/ckpt_*.pt)", src)
        ck = found[1]
    else:
        ck = load_checkpoint(src)
    weights = ck.get("ema") if ck.get("ema") is not None else ck["model"]
    from_ema = ck.get("ema") is not None or bool(ck.get("exported_from_ema", False))
    keep = {k: without_machine_paths(ck[k]) for k in ("format", "step", "config", "training", "version") if k in ck}
    out = dict(keep, model={k: v.clone() for k, v in weights.items()}, ema=None, exported_from_ema=from_ema)
    dst = Path(dst)
    _write(out, dst)
    return dst
