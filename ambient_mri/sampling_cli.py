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
import os
from pathlib import Path

import click

from .errors import AmbientMRIError, ConfigError
from .sampling import draw_prior_samples, magnitude_grid, save_grid, training_maps  # noqa: F401  (magnitude_grid re-exported)


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
    from .distributed import resolve_device
    from .fsutil import make_dir

    make_dir(out)  # an unwritable output folder: one line now, not after drawing the samples
    dev = resolve_device(device, option="--device")
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
