"""``ambient-mri sample``: unconditional prior samples from a trained checkpoint.

The fixed-mask sampler of the seed paper (``sampling.prior_sample``: EDM Heun, ``d = (x - D(A~^H A~ x;
sigma)) / sigma`` with one further mask ``M~`` drawn from the *training* distribution and held fixed).
K-space models see the view they were trained on, ``A~^H A~ x = S^H F^-1 M~ F S x``, with the coil maps
``S`` of one training slice per sample (read from the checkpoint's training data, or ``--maps-from``);
oracle/naive models get ``M~ = 1``. Outputs in ``--out``: ``samples.png`` (magnitude grid),
``samples.npy`` (complex64 ``(N, H, W)``), ``samples.h5`` (samples, further masks, attributes) and
``sample.json`` (what was run).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import click

from .errors import AmbientMRIError, ConfigError


def prior_sampler():
    """``(prior_sample, View)`` from ``ambient_mri.sampling``, or a one-line error while they do not exist."""
    try:
        from .sampling import View, prior_sample
    except ImportError as e:
        raise AmbientMRIError(f"the prior sampler (ambient_mri.sampling.prior_sample) is not available ({e})") from None
    return prior_sample, View


def training_maps(data_root, n: int, *, shape=None, seed: int = 0) -> tuple:
    """Coil maps of ``n`` training slices drawn at random (seeded) from the prepared files in ``data_root``:
    ``(maps (n, C, H, W) complex64, [(file name, slice), ...])``. A missing folder, no readable ``maps``,
    or maps of another matrix than ``shape`` raise a one-line :class:`AmbientMRIError`."""
    import h5py
    import numpy as np
    import torch

    root = Path(data_root)
    files = sorted(p for p in root.glob("*.h5") if not p.name.startswith(".")) if root.is_dir() else []
    counts = []
    for p in files:
        try:
            with h5py.File(p, "r") as f:
                if "maps" in f and f["maps"].ndim == 4:
                    counts.append((p, f["maps"].shape[0], f["maps"].shape))
        except (OSError, RuntimeError, KeyError, ValueError):
            continue
    if not counts:
        raise AmbientMRIError(f"{root}: no prepared files with coil maps (the prior sampler of a k-space model needs "
                              "the training maps: give --maps-from PREPARED_TRAIN_DIR)")
    if shape is not None and tuple(counts[0][2][-2:]) != tuple(shape):
        raise AmbientMRIError(f"{counts[0][0]}: coil maps are {tuple(counts[0][2][-2:])}, the model's matrix is "
                              f"{tuple(shape)}")
    index = [(p, s) for p, S, _ in counts for s in range(S)]
    pick = np.random.default_rng(int(seed)).integers(0, len(index), size=n)
    out, names = [], []
    for i in pick:
        p, s = index[int(i)]
        with h5py.File(p, "r") as f:
            m = f["maps"][s]
        if m.shape != counts[0][2][1:]:
            raise AmbientMRIError(f"{p}: coil maps of shape {m.shape} differ from {counts[0][2][1:]} in "
                                  f"{counts[0][0].name}")
        out.append(m)
        names.append((p.name, s))
    maps = torch.from_numpy(np.stack(out).astype(np.complex64))
    if not torch.isfinite(torch.view_as_real(maps)).all():
        raise AmbientMRIError(f"{root}: coil maps hold NaN or Inf")
    return maps, names


def draw_prior_samples(denoiser, corruption: dict, n: int, *, steps: int = 18, seed: int = 0, batch: int | None = None,
                       device="cpu", progress: bool = False, maps=None):
    """``n`` prior samples ``(n, H, W)`` complex64 (CPU) and the further masks they used (``(n, h, W)`` bool;
    all ones for oracle/naive models).

    ``M~`` of sample ``i`` is ``masks.draw_training_further_masks(corruption, n, seed=seed)[i]``, held fixed
    over the steps; the noise comes from one ``torch.Generator(device)`` seeded with ``seed`` and consumed
    batch after batch (so the samples depend on ``batch``). Per batch of ``b`` samples this calls
    ``sampling.prior_sample(denoiser, View(domain, M~[i:i+b]), (b, H, W), steps=steps, generator=g, device=device)``
    with ``domain`` = ``corruption["domain"]`` (``kspace``: ``View("kspace", M~, maps[i:i+b])``, the view
    ``S^H F^-1 M~ F S x`` a k-space model was trained on; ``image``; ``clean``: ``View("clean")``).

    ``maps``: ``(n, C, H, W)`` coil maps for a k-space model (:func:`training_maps`). ``None`` means
    single-coil identity maps, correct only for a model trained on single-coil data (the ``sample``
    command always passes the training maps).
    """
    import torch
    from tqdm import tqdm

    from .masks import draw_training_further_masks

    prior_sample, View = prior_sampler()
    H, W = corruption["shape"]
    domain = corruption.get("domain", "kspace")
    try:
        fmasks = draw_training_further_masks(corruption, n, seed=seed)
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise AmbientMRIError(f"cannot redraw the training further masks from the recorded corruption "
                              f"{corruption} ({' '.join(str(e).split())[:120]})") from None
    batch = batch or n
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(int(seed))
    out = []
    bar = tqdm(total=n, desc="prior samples", unit="img", disable=not progress, leave=False)
    with torch.no_grad():
        for start in range(0, n, batch):
            m = fmasks[start : start + batch].to(device)
            mb = None if maps is None or domain != "kspace" else maps[start : start + batch].to(device)
            view = View("clean") if domain == "clean" else View(domain, m.float(), mb)
            x = prior_sample(denoiser, view, (len(m), H, W), steps=steps, generator=g, device=device)
            out.append(x.detach().to("cpu", torch.complex64))
            bar.update(len(m))
    bar.close()
    return torch.cat(out), fmasks


def magnitude_grid(samples, ncol: int | None = None, pad: int = 2):
    """``(N, H, W)`` complex -> uint8 ``(rows (H + pad), cols (W + pad))`` grid of magnitudes, each image
    scaled by its own 99.5th percentile."""
    import numpy as np

    x = np.abs(np.asarray(samples))
    n, H, W = x.shape
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    grid = np.zeros((nrow * (H + pad) + pad, ncol * (W + pad) + pad), dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, ncol)
        scale = np.percentile(x[i], 99.5)
        img = np.clip(x[i] / scale, 0, 1) if scale > 0 and np.isfinite(scale) else np.zeros_like(x[i])
        grid[pad + r * (H + pad) : pad + r * (H + pad) + H, pad + c * (W + pad) : pad + c * (W + pad) + W] = img
    return (grid * 255 + 0.5).astype(np.uint8)


def save_grid(samples, path, ncol: int | None = None) -> Path:
    """Write :func:`magnitude_grid` as a PNG, atomically."""
    from PIL import Image

    from .fsutil import atomic_path

    path = Path(path)
    with atomic_path(path, ".png.tmp") as tmp:
        Image.fromarray(magnitude_grid(samples, ncol)).save(tmp, format="PNG")
    return path


def write_outputs(out_dir, samples, fmasks, info: dict) -> dict:
    """``samples.png``, ``samples.npy``, ``samples.h5`` and ``sample.json`` in ``out_dir`` (atomic)."""
    import h5py
    import numpy as np

    from .fsutil import atomic_path, write_json

    out_dir = Path(out_dir)
    x = samples.numpy().astype(np.complex64)
    files = {"png": out_dir / "samples.png", "npy": out_dir / "samples.npy", "h5": out_dir / "samples.h5",
             "json": out_dir / "sample.json"}
    save_grid(x, files["png"])
    with atomic_path(files["npy"], ".npy.tmp") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, x)
    with atomic_path(files["h5"], ".h5.tmp") as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("samples", data=x)
            f.create_dataset("further_mask", data=fmasks.numpy().astype(bool))
            for k, v in info.items():
                f.attrs[k] = v if isinstance(v, (int, float, str)) else json.dumps(v)
    write_json(files["json"], dict(info, files={k: v.name for k, v in files.items()}))
    return files


@click.command()
@click.option("--checkpoint", "-c", "checkpoint", required=True, type=click.Path(exists=True),
              help="A training checkpoint (RUN/checkpoint.pt or a snapshot), or a run folder (its newest checkpoint).")
@click.option("--n", "n", type=click.IntRange(min=1), default=16, show_default=True, help="Number of samples.")
@click.option("--out", "-o", "out", required=True, type=click.Path(file_okay=False),
              help="Output folder: samples.png (magnitude grid), samples.npy (complex), samples.h5, sample.json.")
@click.option("--steps", type=click.IntRange(min=2), default=18, show_default=True,
              help="Heun steps of the EDM schedule (sigma 80 -> 0.002, rho 7).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the further masks and of the sampler's noise.")
@click.option("--batch", "-b", type=click.IntRange(min=1), default=None,
              help="Samples per network batch (default: all N at once).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where to run the network.")
@click.option("--ema/--no-ema", default=True, show_default=True, help="Use the EMA weights (default) or the raw ones.")
@click.option("--maps-from", "maps_from", type=click.Path(exists=True, file_okay=False),
              help="k-space models: prepared folder whose coil maps the view uses (default: the checkpoint's "
                   "training data folder).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def command(checkpoint, n, out, steps, seed, batch, device, ema, maps_from, quiet):
    """Draw N unconditional samples from a trained prior with the fixed-mask Heun sampler.

    One further mask per sample is drawn from the recorded training distribution and held fixed over
    the steps; k-space models see S^H F^-1 M~ F S x with the coil maps of a random training slice
    (--maps-from, default the training data folder). Oracle and naive models sample with no mask.
    Samples are in the normalised units of the training data.
    """
    import torch

    from .checkpoint import file_sha256, load_denoiser
    from .fsutil import make_dir

    make_dir(out)  # an unwritable output folder: one line now, not after drawing the samples
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available")
    prior_sampler()  # fail fast, before loading anything
    den, meta = load_denoiser(checkpoint, ema=ema, device=dev)
    corruption = meta["training"]["corruption"]
    maps, maps_info = None, None
    if corruption.get("domain", "kspace") == "kspace":
        root = maps_from or (meta["training"].get("data") or {}).get("root")
        if root is None:
            raise ConfigError("the checkpoint records no training data folder: give --maps-from PREPARED_TRAIN_DIR")
        maps, names = training_maps(root, n, shape=corruption["shape"], seed=seed)
        maps_info = {"from": os.fspath(Path(root).resolve()), "slices": [list(v) for v in names]}
    samples, fmasks = draw_prior_samples(den, corruption, n, steps=steps, seed=seed, batch=batch, device=dev,
                                         progress=not quiet, maps=maps)
    if not torch.isfinite(torch.view_as_real(samples)).all():
        raise AmbientMRIError("the sampler produced NaN or Inf (is the checkpoint trained?)", meta["path"])
    info = {"checkpoint": os.fspath(Path(meta["path"]).resolve()), "checkpoint_sha256": file_sha256(meta["path"]),
            "step": meta["step"], "kind": meta["training"].get("kind"), "ema": meta["ema"], "n": n, "steps": steps,
            "seed": seed, "batch": batch or n, "device": str(dev), "corruption": corruption, "sampler": "fixed-mask Heun",
            "maps": maps_info}
    files = write_outputs(out, samples, fmasks, info)
    label = " (ORACLE model)" if info["kind"] == "oracle" else ""
    click.echo(f"wrote {n} prior samples{label} to {files['png'].parent}: "
               + ", ".join(p.name for k, p in files.items()))
