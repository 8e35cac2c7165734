"""``ambient-mri recon``: reconstruct undersampled scans with a diffusion prior or a classical method.

Inputs: prepared val/test files (``ambient-mri prep``: k-space, mask and maps already there), or raw
fastMRI-layout files, either already undersampled (test style, with ``mask``) or fully sampled and
undersampled here (``--accel``, ``--mask-type``, ``--seed``); raw files are prepared in memory with the
same code as ``prep`` (maps from the ACS block, ACS-RSS normalisation).

Output, one ``.h5`` per input (fastMRI's reconstruction layout plus extras): ``reconstruction``
``(S, H, W)`` float32 magnitude (the mean over ``--samples`` posterior samples), ``reconstruction_complex``
``(S, H, W)`` complex64, ``std`` ``(S, H, W)`` float32 (per-pixel standard deviation of the complex
samples, K > 1), ``data_consistency`` ``(S,)`` = ``||A x - y|| / ||y||``, ``slice_index``, ``noise_std``
``(S,)`` (the noise level the noise-aware samplers used, prepared units); attributes name the method,
checkpoint, steps, NFEs, seed, seconds per slice, where the noise level came from (``noise_std_source``),
how ``M~`` was drawn (``further_mask``) and the units (``prepared``: the prepared data's normalised units;
``raw``: multiplied back by each slice's norm). Also a NIfTI magnitude volume
and a PNG preview per input. Finished slices are kept under ``OUT/.partial/`` so an interrupted run
resumes where it stopped; the ``.h5`` appears (atomically) only when every slice is done.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from . import baselines
from .checkpoint import load_denoiser
from .config import CLEAN_KINDS
from .corruption import from_dict
from .errors import AmbientMRIError, ConfigError, DataError
from .fastmri_io import FastMRIVolume
from .fft import fft2c, ifft2c
from .fsutil import atomic_h5, atomic_path, claim, make_dir, write_json
from .operators import InpaintOp, SenseOp
from .prep import PrepOptions, prepare_volume, whitening_note
from .prepared import UNITS_ATTR, UNITS_RAW, Scan, check_noise_std, is_prepared, load_prepared
from .sampling import DC_CG_ITERS, DC_ERROR_VAR, DEFAULT_STEPS, FURTHER, NOISE_AWARE, nfe, posterior
from .sampling import METHODS as MODEL_METHODS
ORACLE_METHODS = ("fsdps", "fsdps-noise")  # DPS with a clean-trained prior (oracle, naive, EM); adps refuses an oracle
# how M~ is drawn by default: inside the test mask for our DC sampler (+0.7 dB at R 4, +0.8 dB at R 8 on the
# demo validation split, docs/recon.md), independently of it for A-DPS (as published)
DEFAULT_FURTHER = {"dc": "within"}
CLASSICAL = ("zf", "sense", "l1")
METHODS = MODEL_METHODS + CLASSICAL


def _print(line: str, err: bool = False) -> None:
    print(line, file=sys.stderr if err else sys.stdout, flush=True)


def list_inputs(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.glob("*.h5") if not p.name.startswith(".") and p.is_file())
    if not files:
        raise DataError("no .h5 files to reconstruct", path)
    return files


def load_raw(path: Path, *, accel, mask_type, seed, center_lines, maps_method, crop, whiten=None, echo=None) -> Scan:
    """Prepare a raw fastMRI file in memory (``prep.prepare_volume``). ``whiten``: ``True``/``False``/``None``
    (automatic: only a 2x-oversampled readout whose image corner is noise, ``prep.whitening_mode``);
    ``echo(line)`` gets one line naming the file when slices were left unwhitened for a reason."""
    with FastMRIVolume(path) as vol:
        if not vol.is_undersampled and accel is None:
            raise ConfigError("this file is fully sampled: give --accel (and --mask-type) to undersample it", path)
        opts = PrepOptions(split="test", accel=(float(accel or 4.0),), mask_type=mask_type, seed=seed,
                           center_lines=center_lines, maps=maps_method, crop=crop, whiten=whiten)
        arrays = prepare_volume(vol, opts.validate())
    attrs = dict(arrays["attrs"])
    note = whitening_note(attrs["whitened"], json.loads(attrs["warnings"]))
    if note and echo is not None:
        echo(f"note: {path}: {note}")
    noise = arrays.get("noise_std")
    return Scan(path, arrays["kspace"], arrays["maps"], arrays["mask"], np.asarray(arrays["norm"]),
                arrays["slice_index"], UNITS_RAW, attrs,
                None if noise is None else check_noise_std(noise, arrays["kspace"].shape[0], path))


def kspace_crop(scan: Scan, shape: tuple[int, int]) -> Scan:
    """Crop the centre of k-space to ``shape`` (the whole field of view at a lower resolution), re-estimate
    nothing: maps are low-passed the same way and re-normalised, the data re-normalised by the ACS norm."""
    H, W = scan.shape
    h, w = shape
    if h > H or w > W:
        raise ConfigError(f"cannot crop a {H}x{W} scan to the model's {h}x{w}: it is smaller", scan.path)
    rows = slice(H // 2 - h // 2, H // 2 - h // 2 + h)
    cols = slice(W // 2 - w // 2, W // 2 - w // 2 + w)
    mask = scan.mask[..., cols] if scan.mask.shape[-2] == 1 else scan.mask[..., rows, cols]
    y = scan.y[..., rows, cols]
    maps = None
    if scan.maps is not None:
        maps = ifft2c(fft2c(scan.maps)[..., rows, cols])
        maps = maps / np.maximum(np.sqrt((np.abs(maps) ** 2).sum(-3, keepdims=True)), 1e-6)
        maps = maps.astype(np.complex64)
    # orthonormal FFT: the image of a cropped k-space is sqrt(h w / H W) times as bright
    scale = math.sqrt(H * W / (h * w))
    noise = None if scan.noise_std is None else scan.noise_std * scale  # per-sample noise scales with the data
    return Scan(scan.path, (y * scale).astype(np.complex64), maps, mask, scan.norm / scale, scan.slice_index,
                scan.units, dict(scan.attrs, kspace_crop=f"{H}x{W}->{h}x{w}"), noise)


def estimate_noise_std(y: np.ndarray, mask: np.ndarray, *, outer: float = 0.1) -> float:
    """Fallback noise level of one slice ``y (C, H, W)`` with ``mask (1|H, W)``: ``sqrt(median |y|^2 / ln 2)``
    over the measured samples in the outermost ``outer`` fraction (by normalised k-space radius).

    For pure complex Gaussian noise ``|n|^2`` is exponential with mean ``s^2`` and median ``s^2 ln 2``;
    any signal left at the edge of k-space only raises the estimate, so this errs towards trusting the data
    less (a smoother, less noisy reconstruction), never towards fitting noise."""
    C, H, W = y.shape
    m = np.broadcast_to(np.asarray(mask) > 0, (H, W))
    ky = (np.arange(H) - H // 2) / (H / 2)
    kx = (np.arange(W) - W // 2) / (W / 2)
    r = np.hypot(ky[:, None], kx[None, :])
    sel = m & (r >= np.quantile(r[m], 1 - outer))
    return float(np.sqrt(np.median(np.abs(y[:, sel]) ** 2) / math.log(2)))


def resolve_noise(scan: Scan, override: float | None) -> tuple[np.ndarray, str]:
    """Per-slice noise std ``(S,)`` for the noise-aware samplers and where it came from: ``flag``
    (``--noise-std``), ``file`` (the prepared ``noise_std``), ``estimated`` (:func:`estimate_noise_std`, for
    slices whose level is unknown), ``assumed 0`` (image-domain data: no k-space noise model), or a mix."""
    S = scan.y.shape[0]
    if override is not None:
        return np.full(S, float(override)), "flag"
    if scan.maps is None:
        return np.zeros(S), "assumed 0 (image domain)"
    known = np.full(S, np.nan) if scan.noise_std is None else scan.noise_std
    out, sources = known.copy(), set()
    for s in range(S):
        if np.isfinite(out[s]):
            sources.add("file")
        else:
            mask = scan.mask[s] if scan.mask.ndim == 3 else scan.mask
            out[s] = estimate_noise_std(scan.y[s], mask)
            sources.add("estimated")
    return out, " + ".join(sorted(sources))


# ----------------------------------------------------------------------------------------------


@dataclass
class Reconstructor:
    """Reconstructs batches of slices with one method; holds the model (if any) and the options."""

    method: str
    denoiser: object = None
    meta: dict | None = None
    steps: int | None = None
    samples: int = 1
    seed: int = 0
    device: str = "cpu"
    lam: float | None = None
    sampler_kwargs: dict = field(default_factory=dict)
    sense_iters: int = 30
    l1_iters: int = 100
    further: str = "independent"

    def nfe(self) -> int:
        if self.method in CLASSICAL:
            return 0
        return nfe(self.method, self.steps or self.default_steps(), **{k: v for k, v in self.sampler_kwargs.items()
                                                                        if k == "cg_iters" and self.method == "mmps"})

    def default_steps(self) -> int:
        return DEFAULT_STEPS.get(self.method, 0)

    def __call__(self, y, maps, mask, first_index: int, noise_std=None):
        """``y`` batch (numpy) -> (mean complex ``(B, H, W)``, std or None, data consistency ``(B,)``);
        ``noise_std (B,)`` goes to the noise-aware samplers."""
        dev = torch.device(self.device)
        yt = torch.from_numpy(np.ascontiguousarray(y)).to(dev)
        mt = torch.from_numpy(np.ascontiguousarray(mask)).to(dev).float()
        st = None if maps is None else torch.from_numpy(np.ascontiguousarray(maps)).to(dev)
        std = None
        if self.method in MODEL_METHODS:
            method = {"fsdps": "adps", "fsdps-noise": "adps-noise"}.get(self.method, self.method)
            noise = None if noise_std is None or self.method not in NOISE_AWARE else \
                torch.as_tensor(np.asarray(noise_std, dtype=np.float32), device=dev)
            post = posterior(method, self.denoiser, self.meta["training"], yt, st, mt, samples=self.samples,
                             seed=self.seed + first_index, steps=self.steps or self.default_steps(),
                             noise_std=noise, further=self.further, **self.sampler_kwargs)
            mean = post.mean
            std = post.std if self.samples > 1 else None
        elif maps is None:
            raise ConfigError(f"--method {self.method} needs k-space data (this input is image-domain)")
        elif self.method == "zf":
            mean = baselines.zero_filled(yt, st, mt)
        elif self.method == "sense":
            mean = baselines.cg_sense(yt, st, mt, iters=self.sense_iters)
        else:
            mean = torch.cat([baselines.l1_wavelet(yt[b : b + 1], st[b : b + 1], mt[b : b + 1], self.lam,
                                                   iters=self.l1_iters) for b in range(yt.shape[0])])
        A = InpaintOp(mt, like=yt) if st is None else SenseOp(st, mt)
        measured = A.mask * yt
        r = A.forward(mean) - measured
        dc = torch.linalg.vector_norm(r.flatten(1), dim=1) / torch.linalg.vector_norm(measured.flatten(1), dim=1)
        out_std = None if std is None else std.cpu().numpy()
        return mean.detach().cpu().numpy(), out_std, dc.detach().cpu().numpy()


def _partial_dir(out: Path, stem: str) -> Path:
    return out / ".partial" / stem


def reconstruct_file(rec: Reconstructor, scan: Scan, out: Path, *, batch: int, label: str, options: dict,
                     nifti: bool = True, png: bool = True, progress=None) -> Path | None:
    """Reconstruct every slice of ``scan`` (resuming from finished slices), then write the outputs."""
    final = out / f"{scan.path.stem}.h5"
    if final.exists():
        return None
    noise, noise_source = resolve_noise(scan, options.get("noise_std"))
    part = _partial_dir(out, scan.path.stem)
    # finished slices are reused only by a run with the same options and batch (the batch fixes the seeds)
    stamp = json.dumps(dict({k: v for k, v in options.items() if k != "shard"}, batch=batch), sort_keys=True,
                       default=str)
    if (part / "options.json").is_file() and (part / "options.json").read_text() != stamp:
        shutil.rmtree(part, ignore_errors=True)
    make_dir(part)
    if not (part / "options.json").is_file():
        with atomic_path(part / "options.json", ".json.tmp") as tmp:
            tmp.write_text(stamp)
    S = scan.y.shape[0]
    done = {int(p.stem[1:]) for p in part.glob("s*.npz")}
    # batches on the fixed grid 0, batch, 2 batch, ...: a resumed run redraws exactly the batches (and
    # seeds) of an uninterrupted one, so it gives the same slices bit for bit
    for b0 in range(0, S, batch):
        idx = list(range(b0, min(b0 + batch, S)))
        if all(s in done for s in idx):
            continue
        t0 = time.perf_counter()
        maps = None if scan.maps is None else scan.maps[idx]
        mask = scan.mask[idx] if scan.mask.ndim == 3 else scan.mask
        mean, std, dc = rec(scan.y[idx], maps, mask, first_index=int(scan.slice_index[idx[0]]), noise_std=noise[idx])
        sec = (time.perf_counter() - t0) / len(idx)
        for j, s in enumerate(idx):
            if s in done:
                continue
            with atomic_path(part / f"s{s:05d}.npz", ".npz.tmp") as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, mean=mean[j], std=std[j] if std is not None else np.zeros(0), dc=dc[j], seconds=sec)
        if progress is not None:
            progress.update(len(idx))
            progress.set_postfix(s_per_slice=f"{sec:.2f}")
    parts = [np.load(part / f"s{s:05d}.npz") for s in range(S)]
    mean = np.stack([p["mean"] for p in parts])
    std = np.stack([p["std"] for p in parts]) if parts[0]["std"].size else None
    dc = np.array([float(p["dc"]) for p in parts])
    seconds = float(np.mean([float(p["seconds"]) for p in parts]))
    scale = scan.norm.reshape(-1, 1, 1) if scan.units == UNITS_RAW else 1.0
    mean = (mean * scale).astype(np.complex64)
    std = None if std is None else (std * scale).astype(np.float32)
    attrs = {"method": rec.method, "label": label, "accel": _accel_label(scan), UNITS_ATTR: scan.units,
             "source": str(scan.path), "samples": rec.samples, "seed": rec.seed, "steps": rec.steps or rec.default_steps(),
             "nfe": rec.nfe(), "seconds_per_slice": seconds, "options": json.dumps(options, default=str)}
    if rec.meta is not None:
        attrs["checkpoint"] = rec.meta["path"]
        attrs["checkpoint_kind"] = rec.meta["training"].get("kind", "")
        attrs["checkpoint_step"] = rec.meta["step"]
    if rec.lam is not None:
        attrs["lam"] = rec.lam
    if scan.attrs.get("whitened") is not None:  # per-slice prewhitening of the input (prepared or raw)
        attrs["whitened"] = np.asarray(scan.attrs["whitened"], dtype=bool)
    noise_used = rec.method in NOISE_AWARE
    attrs["noise_std_source"] = noise_source if noise_used else "not used (the method ignores the noise level)"
    if rec.method in MODEL_METHODS and rec.method != "aos":
        clean = from_dict(rec.meta["training"]["corruption"]).domain == "clean"
        attrs["further_mask"] = "none (the model sees clean images)" if clean else rec.further
    if nifti:  # the by-products first: the .h5, written last, marks the file as finished
        write_nifti(out / f"{scan.path.stem}.nii.gz", np.abs(mean))
    if png:
        write_preview(out / f"{scan.path.stem}.png", np.abs(mean), f"{label} R={attrs['accel']}")
    with atomic_h5(final) as f:
        f["reconstruction"] = np.abs(mean).astype(np.float32)
        f["reconstruction_complex"] = mean
        if std is not None:
            f["std"] = std
        f["data_consistency"] = dc.astype(np.float32)
        f["slice_index"] = scan.slice_index
        if noise_used:
            f["noise_std"] = (noise * (scan.norm if scan.units == UNITS_RAW else 1.0)).astype(np.float32)
        f.attrs.update({k: v for k, v in attrs.items() if v is not None})
    shutil.rmtree(part, ignore_errors=True)
    return final


def _accel_label(scan: Scan) -> str:
    a = scan.attrs.get("accel")
    if a is None:
        m = scan.mask
        a = m.shape[-1] * m.shape[-2] / max(float(m.reshape(-1, m.shape[-2] * m.shape[-1]).sum(1).mean()), 1)
    return f"{float(a):g}"


def write_nifti(path: Path, vol: np.ndarray) -> None:
    img = nib.Nifti1Image(np.transpose(vol, (2, 1, 0)).astype(np.float32), np.eye(4))
    with atomic_path(path, ".nii.gz") as tmp:
        nib.save(img, str(tmp))


def write_preview(path: Path, vol: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(4, vol.shape[0])
    pick = np.linspace(0, vol.shape[0] - 1, n).round().astype(int)
    fig, ax = plt.subplots(1, n, figsize=(2.4 * n, 2.6), squeeze=False)
    vmax = float(np.percentile(vol, 99.5)) or 1.0
    for a, s in zip(ax[0], pick):
        a.imshow(vol[s], cmap="gray", vmin=0, vmax=vmax)
        a.set_title(f"slice {s}", fontsize=8)
        a.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path, ".png.tmp") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def parse_shard(spec: str | None) -> tuple[int, int]:
    if spec is None:
        return 0, 1
    try:
        i, n = (int(v) for v in spec.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like i/n (got {spec!r})") from None
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"--shard {spec}: need 0 <= i < n")
    return i, n


def tune_lambda(val_dir: Path, slices: int, l1_iters: int, candidates=None) -> dict:
    """Choose the L1 weight on the first ``slices`` slices of a prepared VALIDATION folder (never test data)."""
    parts = []
    n = 0
    for p in list_inputs(val_dir):
        scan = load_prepared(p, slices=slices - n, reference=True) if is_prepared(p) else None
        if scan is None or scan.maps is None or scan.reference is None:
            raise DataError("--tune-on needs a prepared val split (k-space with 'reference')", p)
        parts.append(scan)
        n += scan.y.shape[0]
        if n >= slices:
            break
    y, m, s, r = (np.concatenate([getattr(sc, k) for sc in parts]) for k in ("y", "mask", "maps", "reference"))
    kw = {} if candidates is None else {"candidates": candidates}
    return baselines.choose_lambda(y, s, m, r, iters=l1_iters, **kw).as_dict()


def run_recon(inputs, out, method, *, checkpoint=None, steps=None, samples=1, seed=0, accel=None, mask_type="adps",
              center_lines=None, batch=8, device="auto", lam=None, tune_on=None, tune_slices=8, step_size=None,
              cg_iters=None, error_var=None, churn=None, shard=None, label=None, matrix="refuse", maps_method="espirit",
              sense_iters=30, l1_iters=100, nifti=True, png=True, ema=True, quiet=False, whiten=None, noise_std=None,
              further=None, echo=None) -> list[Path]:
    """Reconstruct every input file; returns the written outputs (skipping finished ones). ``whiten``
    applies to raw inputs only (``True``/``False``/``None`` = automatic, as ``prep --whiten``).
    ``echo(line, err=False)`` gets the per-file lines (default: print; ``err`` lines go to stderr)."""
    echo = echo or _print
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    if samples < 1 or batch < 1:
        raise ConfigError("--samples and --batch must be >= 1")
    if accel is not None and not accel >= 1:
        raise ConfigError(f"--accel must be >= 1 (got {accel})")
    if noise_std is not None and not (math.isfinite(noise_std) and noise_std >= 0):
        raise ConfigError(f"--noise-std must be a finite number >= 0 (got {noise_std})")
    further = further or DEFAULT_FURTHER.get(method, "independent")
    if further not in FURTHER:
        raise ConfigError(f"--further-mask must be one of {', '.join(FURTHER)} (got {further!r})")
    i_shard, n_shard = parse_shard(shard)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    denoiser = meta = None
    if method in MODEL_METHODS:
        if checkpoint is None:
            raise ConfigError(f"--method {method} needs --checkpoint")
        denoiser, meta = load_denoiser(checkpoint, ema=ema, device=device)
        for p in denoiser.parameters():
            p.requires_grad_(False)
        kind = meta["training"].get("kind", "")
        if method in ORACLE_METHODS and kind not in CLEAN_KINDS:
            raise ConfigError(f"--method {method} needs a clean-trained checkpoint ({', '.join(CLEAN_KINDS)}); "
                              f"this one is {kind!r}", checkpoint)
        if method in ("adps", "adps-noise") and kind == "oracle":
            raise ConfigError(f"this is an oracle checkpoint: use --method {method.replace('adps', 'fsdps')}",
                              checkpoint)
    elif method == "l1" and lam is None and tune_on is None:
        raise ConfigError("--method l1 needs --lam or --tune-on VAL_PREPARED (a validation split, never the test data)")
    lam_record = None
    if method == "l1" and lam is None:
        lam_record = tune_lambda(Path(tune_on), tune_slices, l1_iters)
        lam = lam_record["lam"]
    kwargs = {}
    if step_size is not None:
        kwargs["step_size"] = step_size
    if cg_iters is not None or method == "dc":  # dc's default is written into the outputs' options
        kwargs["cg_iters"] = DC_CG_ITERS if cg_iters is None else cg_iters
    if error_var is not None or method == "dc":  # likewise
        kwargs["error_var"] = DC_ERROR_VAR if error_var is None else error_var
    if churn is not None:
        kwargs["churn"] = churn
    allowed = {"adps": {"step_size"}, "fsdps": {"step_size"}, "adps-noise": {"step_size"},
               "fsdps-noise": {"step_size"}, "dc": {"cg_iters", "error_var", "churn"},
               "mmps": {"cg_iters"}}.get(method, set())
    unused = set(kwargs) - allowed
    if unused:
        raise ConfigError(f"--{', --'.join(sorted(k.replace('_', '-') for k in unused))} not used by --method {method}")
    if noise_std is not None and method not in NOISE_AWARE:
        raise ConfigError(f"--noise-std is not used by --method {method} (noise-aware: {', '.join(NOISE_AWARE)})")
    if further != DEFAULT_FURTHER.get(method, "independent") and method not in ("adps", "adps-noise", "dc"):
        raise ConfigError(f"--further-mask is not used by --method {method} (only adps, adps-noise and dc)")
    rec = Reconstructor(method, denoiser, meta, steps, samples, seed, device, lam, kwargs, sense_iters, l1_iters,
                        further)
    files = list_inputs(Path(inputs))[i_shard::n_shard]
    out = Path(out)
    if out.resolve() in {p.parent.resolve() for p in files}:
        raise ConfigError("--out is the input folder (inputs are never overwritten)", out)
    make_dir(out)
    options = {"method": method, "checkpoint": str(checkpoint) if checkpoint else None, "steps": rec.steps or rec.default_steps(),
               "samples": samples, "seed": seed, "accel": accel, "mask_type": mask_type, "lam": lam,
               "lam_choice": lam_record, "sampler": kwargs, "matrix": matrix, "shard": shard, "whiten": whiten,
               "noise_std": noise_std, "further_mask": further}
    written, failed = [], []
    label = label or method
    for p in files:
        final = out / f"{p.stem}.h5"
        if final.exists():
            shutil.rmtree(_partial_dir(out, p.stem), ignore_errors=True)  # left by a run killed after finishing
            continue
        with claim(final) as mine:
            if not mine:
                if not quiet:
                    echo(f"skip {p.name}: another process is reconstructing it", err=True)
                continue
            try:
                if is_prepared(p):
                    scan = load_prepared(p)
                else:
                    scan = load_raw(p, accel=accel, mask_type=mask_type, seed=seed, center_lines=center_lines,
                                    maps_method=maps_method, crop=None, whiten=whiten,
                                    echo=None if quiet else (lambda line: echo(line, err=True)))
            except DataError as e:  # a bad input file: report it, reconstruct the others
                failed.append(str(e))
                echo(f"failed: {e}", err=True)
                continue
            if meta is not None:
                train_shape = from_dict(meta["training"]["corruption"]).shape
                if scan.shape != train_shape:
                    if matrix == "refuse":
                        raise ConfigError(f"scan matrix {scan.shape[0]}x{scan.shape[1]} differs from the model's "
                                          f"{train_shape[0]}x{train_shape[1]}: use --matrix crop (k-space centre "
                                          "crop to the model's matrix) or --matrix native (run the size-agnostic "
                                          "network at the scan's own matrix, out of its training distribution)", p)
                    if matrix == "crop":
                        scan = kspace_crop(scan, train_shape)
            bar = tqdm(total=scan.y.shape[0], desc=f"{method} {p.name}", unit="slice", disable=quiet, leave=False)
            try:
                res = reconstruct_file(rec, scan, out, batch=batch, label=label, options=options, nifti=nifti,
                                       png=png, progress=bar)
            finally:
                bar.close()
            if res is not None:
                written.append(res)
                if not quiet:
                    with h5py.File(res) as f:
                        echo(f"{res.name}: {f.attrs['seconds_per_slice']:.3f} s/slice, NFE {f.attrs['nfe']}, "
                                   f"data consistency {float(np.mean(f['data_consistency'][()])):.4f}")
    if lam_record is not None:
        write_json(out / "lambda_choice.json", lam_record)
    try:
        (out / ".partial").rmdir()  # only when empty: another process may still be writing into it
    except OSError:
        pass
    if failed:
        raise DataError(f"{len(failed)} of {len(files)} input file(s) failed (the others were reconstructed); "
                        f"first: {failed[0]}")
    return written
