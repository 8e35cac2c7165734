"""``ambient-mri prep``: fastMRI-layout ``.h5`` volumes -> a prepared dataset (``docs/data_format.md``).

Per slice ``k`` ``(C, H, W)`` (:func:`prepare_slice`; :func:`prepare_volume` does a whole file):

1. prewhiten ``k <- L^-1 k`` over coils, ``Psi = L L^H`` the noise covariance of the 30 x 30 corner of the
   coil images (default: only when the header's readout is 2x oversampled, and only slices whose corner
   is noise: neighbouring pixels no more correlated than noise through the mask, :func:`prewhiten_slice`);
2. centre crop to ``(h, w)``: in image space (fastMRI's ``center_crop(ifft2c(k))``) for fully sampled
   input; for input that carries its own mask, the readout ``H`` in image space (a 1-D FFT per column,
   which keeps every unsampled line exactly zero) and the phase-encode axis in k-space (keep the
   ``w`` lines around DC);
3. SVD coil compression to ``N`` virtual coils, the compression matrix from the calibration block;
4. mask ``M``: the input's own (``mask_seed = -1``) or drawn per slice with a seed derived from
   ``--seed``, the input file name and the slice index (:func:`slice_seed`);
5. maps ``S`` from measured samples only: the centred ``calib x calib`` block (``calib`` <= the mask's
   fully sampled centre), or for ``espirit-sake`` (default) every sample measured in every target's mask
   (a larger centred block completed from them when ``calib < 16``); or the input's true maps (``true``);
6. ``norm`` = 99th percentile of ``RSS(ifft2c(k restricted to the calib x calib block))``; ``k <- k / norm``;
   ``noise_std`` = the noise std of one prepared sample (:func:`prepared_noise_std`);
7. store ``M k`` (exactly zero where ``M = 0``) with ``M``, ``S``, ``norm``, ``noise_std``, seeds; val/test
   also a ``reference`` (30 iterations of CG-SENSE ``(A^H A) x = A^H k`` with ``M = 1``, or RSS) and the
   forward-model residual ``||y - M F S x_ref|| / ||y||`` beside the noise share (:func:`forward_residual`).
   ``--domain image``: ``image = M x`` with ``M`` an image-domain box/pixel mask and ``x`` the reference.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import click
import numpy as np

from . import __version__
from .errors import AmbientMRIError, ConfigError, DataError
from .prepared import DOMAINS, FORMAT, PER_SLICE_KEYS, SPLITS, manifest_entry
from .prepared import describe_prepared  # noqa: F401  (kept importable from here)
from .prepared import array_keys as _array_keys
from .prepared import stored

REFERENCE_KINDS = ("cg-sense", "rss")
CORRUPTIONS = ("box", "pixels")
MASK_TYPES = ("random", "adps", "equispaced", "gaussian", "poisson", "sigpy-poisson")  # == masks.KSPACE_KINDS
LINE_MASK_TYPES = ("random", "adps", "equispaced", "gaussian")
NOISE_CORNER = 30
IMAGE_DOMAIN_CALIB = 24  # A-DPS's 24 x 24 training calibration block
_MAX_SEED = 2**31 - 2**20  # room for sigpy-poisson's seed + 1000 k retries below 2**31


TRUE_MAPS_KEY = "sim_coil_maps"  # dataset of simulated inputs holding the maps they were made with
FIT_WARN_RATIO = 1.5  # warn when the forward-model residual exceeds this multiple of the noise share


def maps_methods() -> tuple[str, ...]:
    """Coil-map sources: ``espirit`` (sigpy), ``lowres``, ``true`` (the input's own ``sim_coil_maps``), and
    ``espirit-torch`` once ``ambient_mri/espirit.py`` (batched torch ESPIRiT) exists in the package."""
    methods = ("espirit", "lowres", "true")
    if importlib.util.find_spec("ambient_mri.espirit") is not None:
        methods += ("espirit-torch", "espirit-sake")
    return methods


# maps methods that read every measured sample (not only the calibration block)
MEASURED_MAPS = ("espirit-sake",)
DEFAULT_MAPS = "espirit-sake"


# ----------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class PrepOptions:
    """Everything that changes the prepared data (``workers`` and ``nifti`` do not, so they are not here).

    ``whiten``: ``None`` = automatic (tried when the header's readout is 2x oversampled, :func:`whitening_mode`);
    ``crop``: ``(h, w)`` or ``None`` (keep the matrix); ``coils``: virtual coils or ``None`` (keep);
    ``calib``: side of the square calibration block for maps and norm, ``None`` = the mask's fully
    sampled centre (image domain: 24); ``slices``: a selection such as ``"0:5"``, ``"2"``, ``"0,4,8"``.
    """

    split: str = "train"
    domain: str = "kspace"
    accel: tuple[float, ...] = (4.0,)
    mask_type: str = "adps"
    center_lines: int | None = None
    crop: tuple[int, int] | None = None
    coils: int | None = None
    seed: int = 0
    maps: str = DEFAULT_MAPS
    calib: int | None = None
    whiten: bool | None = None
    reference: str = "cg-sense"
    corruption: str | None = None
    level: float | None = None
    slices: str | None = None
    cg_iters: int = 30

    def validate(self) -> "PrepOptions":
        """Check every value on its own (no data needed); raise a one-line :class:`ConfigError`."""
        if self.split not in SPLITS:
            raise ConfigError(f"--split must be one of {', '.join(SPLITS)} (got {self.split!r})")
        if self.domain not in DOMAINS:
            raise ConfigError(f"--domain must be one of {', '.join(DOMAINS)} (got {self.domain!r})")
        if self.domain == "kspace":
            if not self.accel:
                raise ConfigError("give at least one --accel")
            for r in self.accel:
                if not (math.isfinite(r) and r >= 1):
                    raise ConfigError(f"--accel must be >= 1 (got {r:g})")
            if len(set(self.accel)) != len(self.accel):
                raise ConfigError(f"--accel lists a value twice ({', '.join(f'{r:g}' for r in self.accel)})")
            if self.mask_type not in MASK_TYPES:
                raise ConfigError(f"unknown mask type {self.mask_type!r} (choose from {', '.join(MASK_TYPES)})")
            if self.corruption is not None or self.level is not None:
                raise ConfigError("--corruption and --level need --domain image")
        else:
            if self.corruption not in CORRUPTIONS:
                raise ConfigError(f"--domain image needs --corruption {' or '.join(CORRUPTIONS)}")
            if self.level is None or not 0 <= self.level < 1:
                raise ConfigError(f"--level must be in [0, 1) for --domain image (got {self.level})")
        if self.center_lines is not None and self.center_lines < 1:
            raise ConfigError(f"--center-lines must be >= 1 (got {self.center_lines})")
        if self.crop is not None and min(self.crop) < 1:
            raise ConfigError(f"--crop must be positive (got {self.crop[0]} {self.crop[1]})")
        if self.coils is not None and self.coils < 1:
            raise ConfigError(f"--coils must be >= 1 (got {self.coils})")
        if self.maps not in maps_methods():
            raise ConfigError(f"unknown maps method {self.maps!r} (choose from {', '.join(maps_methods())})")
        min_calib = 4 if self.maps.startswith("espirit") else 1
        if self.calib is not None and self.calib < min_calib:
            raise ConfigError(f"--calib must be >= {min_calib} for --maps {self.maps} (got {self.calib})")
        if self.reference not in REFERENCE_KINDS:
            raise ConfigError(f"--reference must be one of {', '.join(REFERENCE_KINDS)} (got {self.reference!r})")
        if self.cg_iters < 1:
            raise ConfigError(f"CG iterations must be >= 1 (got {self.cg_iters})")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"--seed must be a non-negative integer (got {self.seed})")
        parse_slices(self.slices, 1)
        return self

    def to_json(self) -> dict:
        d = asdict(self)
        d["accel"] = list(self.accel)
        d["crop"] = None if self.crop is None else list(self.crop)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "PrepOptions":
        d = dict(d)
        d["accel"] = tuple(d.get("accel") or ())
        d["crop"] = None if d.get("crop") is None else tuple(d["crop"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @property
    def targets(self) -> tuple:
        """Output keys: one per acceleration (k-space domain) or ``(None,)`` (image domain)."""
        return tuple(self.accel) if self.domain == "kspace" else (None,)


def parse_slices(spec: str | None, n: int) -> list[int]:
    """Slice selection ``spec`` for a volume of ``n`` slices: ``None`` all, ``"a:b"`` (python slice,
    negative ends allowed), ``"i"`` or ``"i,j,k"``; indices beyond the volume are dropped."""
    if spec is None:
        return list(range(n))
    try:
        if ":" in spec:
            parts = [int(p) if p.strip() else None for p in spec.split(":")]
            if len(parts) > 3:
                raise ValueError
            return list(range(n))[slice(*parts)]
        idx = [int(p) for p in spec.split(",")]
    except ValueError:
        raise ConfigError(f"--slices {spec!r} is not a:b, a:b:step, i or i,j,k") from None
    return [i % n for i in idx if -n <= i < n]


def slice_seed(seed: int, name: str, index: int) -> int:
    """Per-slice mask seed: a hash of (``--seed``, input file name, slice index) in ``[0, 2^31 - 2^20)``.

    Independent of the acceleration, so nested fastMRI-style masks stay nested across ``--accel``."""
    h = hashlib.sha256(f"ambient_mri.prep/{int(seed)}/{name}/{int(index)}".encode()).digest()
    return int.from_bytes(h[:8], "little") % _MAX_SEED


# ----------------------------------------------------------------------------------------------
# Per-slice pieces (numpy in, numpy out)


def _fft1c(x, axis):
    return np.fft.fftshift(np.fft.fft(np.fft.ifftshift(x, axes=axis), axis=axis, norm="ortho"), axes=axis)


def _ifft1c(x, axis):
    return np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(x, axes=axis), axis=axis, norm="ortho"), axes=axis)


def as_mask2d(mask, H: int, W: int) -> np.ndarray:
    """An input mask ``(W,)``, ``(1, W)`` or ``(H, W)`` as bool ``(1, W)`` or ``(H, W)``."""
    m = np.asarray(mask) != 0
    if m.shape == (W,):
        m = m[None]
    if m.shape not in ((1, W), (H, W)):
        raise ConfigError(f"mask of shape {m.shape} does not fit k-space {H}x{W}")
    return m


def _kspace_window(n: int, m: int) -> slice:
    """The ``m`` k-space indices around DC (index ``n // 2``) of an axis of ``n``; DC lands on ``m // 2``."""
    start = n // 2 - m // 2
    return slice(start, start + m)


def crop_kspace(kspace: np.ndarray, crop: tuple[int, int], mask: np.ndarray | None = None):
    """Centre crop ``kspace (C, H, W)`` to ``crop = (h, w)``; returns ``(kspace, mask)``.

    No mask (fully sampled): ``fft2c(center_crop(ifft2c(k), (h, w)))``, fastMRI's image crop.
    Line mask ``(1, W)``: readout cropped in image space (1-D FFTs along H only), phase encode in k-space
    (the ``w`` lines around DC, so unsampled lines stay exactly zero). 2-D mask ``(H, W)``: both axes in
    k-space (a 2-D mask samples the readout too).
    """
    from .fft import center_crop, fft2c, ifft2c

    h, w = crop
    H, W = kspace.shape[-2:]
    if h > H or w > W:
        raise ConfigError(f"--crop {h} {w} is larger than the {H}x{W} matrix")
    if (h, w) == (H, W):
        return kspace, mask
    if mask is None:
        return fft2c(center_crop(ifft2c(kspace), (h, w))).astype(np.complex64), None
    cols = _kspace_window(W, w)
    if mask.shape[0] == 1:
        top = (H - h) // 2
        k = _fft1c(_ifft1c(kspace, -2)[..., top : top + h, :], -2)[..., cols]
        m = mask[:, cols]
    else:
        rows = _kspace_window(H, h)
        k, m = kspace[..., rows, cols], mask[rows, cols]
    return (k * m).astype(np.complex64), m


def calibration_block(mask: np.ndarray) -> tuple[int, int]:
    """The largest centred fully sampled block of a mask, fastMRI centring (``n`` of ``N`` start at
    ``(N - n + 1) // 2``): line mask ``(1, W)`` -> ``(1, n)`` lines; 2-D ``(H, W)`` -> ``(n, n)``."""
    m = np.asarray(mask, dtype=bool)
    H, W = m.shape
    if H == 1:
        cs = np.concatenate(([0], np.cumsum(m[0])))
        n = np.arange(W + 1)
        start = (W - n + 1) // 2
        full = cs[start + n] - cs[start] == n
        return 1, int(n[full].max())
    ii = np.zeros((H + 1, W + 1), dtype=np.int64)
    ii[1:, 1:] = np.cumsum(np.cumsum(m, 0), 1)
    n = np.arange(min(H, W) + 1)
    t, l = (H - n + 1) // 2, (W - n + 1) // 2
    count = ii[t + n, l + n] - ii[t, l + n] - ii[t + n, l] + ii[t, l]
    full = count == n * n
    return int(n[full].max()), int(n[full].max())


CORNER_SMOOTH_MAX = 0.25  # the largest share of the noise corner's power allowed to be spatially smooth


def noise_neighbour_correlation(mask: np.ndarray) -> np.ndarray:
    """Correlation between neighbouring pixels of white k-space noise seen through ``mask (H, W)``:
    ``rho_a = |sum_k M(k) exp(2 pi i k_a / N_a)| / sum_k M(k)`` for ``a`` = H, W (the normalised point-spread
    function of ``M`` one pixel from its peak). Fully sampled: ``(0, 0)``. Returns ``(rho_H, rho_W)``."""
    m = np.asarray(mask, dtype=np.float64)
    rho = []
    for axis in (0, 1):
        n = m.shape[axis]
        profile = m.sum(axis=1 - axis)  # samples per frequency along this axis
        phase = np.exp(2j * np.pi * (np.arange(n) - n // 2) / n)
        rho.append(abs(np.sum(profile * phase)) / max(profile.sum(), 1e-30))
    return np.asarray(rho)


def corner_neighbour_correlation(corner_images: np.ndarray) -> np.ndarray:
    """``r_a = |sum_{c,p} conj(I_c(p)) I_c(p + e_a)| / sum_{c,p} |I_c(p)|^2`` (pooled over coils, no mean
    removed) of coil-image patches ``(C, h, w)``: ~0 for white noise, ~1 for a smooth image. Returns
    ``(r_H, r_W)``."""
    x = np.asarray(corner_images, dtype=np.complex128)
    power = np.sum(np.abs(x) ** 2)
    r_h = abs(np.vdot(x[:, :-1], x[:, 1:])) / max(power, 1e-300)
    r_w = abs(np.vdot(x[:, :, :-1], x[:, :, 1:])) / max(power, 1e-300)
    return np.asarray([r_h, r_w])


def corner_smooth_fraction(patch: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """How much of an image-corner patch's power ``(C, h, w)`` is *not* noise, per axis:
    ``f_a = (r_a - rho_a) / (1 - rho_a)`` with ``r_a`` the measured neighbour correlation
    (:func:`corner_neighbour_correlation`) and ``rho_a`` that of white noise through the sampling ``mask``
    (:func:`noise_neighbour_correlation`, ``mask (H, W)``). A corner that is ``f`` smooth image
    (neighbour correlation ~1) and ``1 - f`` noise gives ``f_a ~ f``: ~0 for a genuine noise corner (the
    removed half of a 2x-oversampled readout), large for an aliased object. ``NaN`` where ``rho_a`` is so
    close to 1 that noise and image cannot be told apart. Returns ``(f_H, f_W)``."""
    r = corner_neighbour_correlation(patch)
    rho = noise_neighbour_correlation(mask)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(rho < 0.9, (r - rho) / (1 - rho), np.nan)


def prewhiten_slice(kspace: np.ndarray, corner: int = NOISE_CORNER, mask: np.ndarray | None = None):
    """Whiten ``kspace (C, H, W)`` (zero where ``mask`` is 0; ``None`` = fully sampled) with the noise
    covariance ``Psi`` of the ``corner x corner`` top-left corner of the coil images: ``k <- L^-1 k``,
    ``Psi = L L^H``. Returns ``(whitened k-space, None)``, or ``(kspace, reason)`` when the corner is not
    usable noise: fewer samples than coils, no power, neighbouring pixels more correlated than noise through
    ``mask`` would be (:func:`corner_smooth_fraction` > ``CORNER_SMOOTH_MAX``: an object or its aliases,
    e.g. a readout that is not oversampled), or a singular covariance."""
    from .coils import noise_covariance, noise_from_corner, prewhiten
    from .fft import ifft2c

    C, H, W = kspace.shape
    size = min(corner, H, W)
    if size * size <= C:
        return kspace, f"the {size}x{size} noise corner has fewer samples than the {C} coils"
    noise = noise_from_corner(kspace, size)
    p_noise = float(np.mean(np.abs(noise.astype(np.complex128)) ** 2))
    p_img = float(np.mean(np.abs(ifft2c(kspace).astype(np.complex128)) ** 2))
    if not np.isfinite(p_noise) or p_noise <= 1e-12 * p_img:
        return kspace, f"the {size}x{size} image corner holds no noise"
    m = np.ones((H, W)) if mask is None else np.broadcast_to(as_mask2d(mask, H, W), (H, W))
    f = corner_smooth_fraction(noise.reshape(C, size, size), m)
    if np.isnan(f).any():
        return kspace, f"the sampling mask correlates neighbouring pixels too much to tell noise in the {size}x{size} corner"
    if f.max() > CORNER_SMOOTH_MAX:
        return kspace, (f"the {size}x{size} image corner is not noise: its neighbouring pixels correlate like an image "
                        f"(smooth share {f.max():.2f} > {CORNER_SMOOTH_MAX}: an object or its aliases)")
    cov = noise_covariance(noise)
    ev = np.linalg.eigvalsh(cov)
    if ev.min() <= 1e-10 * ev.max():
        return kspace, "the noise covariance of the image corner is singular"
    return prewhiten(kspace, cov), None


def whitening_mode(requested: bool | None, vol) -> tuple[bool | str, str | None]:
    """Resolve ``--whiten/--no-whiten`` (``requested``: ``True``, ``False``, ``None`` = automatic) for an open
    volume: ``(whiten, note)`` with ``whiten`` ``True`` (whiten or fail), ``"try"`` (whiten each slice whose
    corner passes :func:`prewhiten_slice`'s checks, else keep it and note why) or ``False``. Automatic =
    ``"try"`` only when the header's readout is 2x oversampled (``vol.readout_oversampled``: then the
    corner lies outside the reconstructed field of view), else ``False``. An explicit ``--whiten`` overrides
    the header (the corner is still checked) and says so in ``note``."""
    if requested is False:
        return False, None
    enc, rec = vol.header["encoding_size"][0], vol.header["recon_size"][0]
    if requested is None:
        return ("try", None) if vol.readout_oversampled else (False, None)
    if not vol.readout_oversampled:
        return True, f"prewhitened on request although the header's readout is not 2x oversampled (encoded {enc}, recon {rec})"
    return True, None


def whitening_note(whitened, notes) -> str | None:
    """One line for the user when slices were left unwhitened: ``"not prewhitened (k of n slices): reason"``
    (``whitened``: per-slice booleans; ``notes``: the slices' warnings), or ``None``."""
    whitened = np.asarray(whitened, dtype=bool)
    reasons = [w for w in notes if w.startswith("not prewhitened")]
    if not reasons or whitened.all():
        return None
    n_off = int((~whitened).sum())
    return f"not prewhitened ({n_off} of {whitened.size} slices): {reasons[0].removeprefix('not prewhitened: ')}"


def acs_norm(kspace: np.ndarray, calib: int) -> float:
    """99th percentile of the RSS image of the centred ``calib x calib`` k-space block alone."""
    from .coils import acs_kspace
    from .fft import ifft2c, rss

    return float(np.percentile(rss(ifft2c(acs_kspace(kspace, (calib, calib))), dim=0), 99))


def estimate_maps(kspace_acs: np.ndarray, calib: int, method: str = "espirit", mask: np.ndarray | None = None) -> np.ndarray:
    """Coil maps ``(B, C, H, W)`` complex64 from k-space ``(B, C, H, W)``. ``method``: one of
    :func:`maps_methods` except ``true``.

    ``espirit``, ``espirit-torch``, ``lowres`` read only the centred ``calib x calib`` block (pass k-space
    zero outside it). ``espirit-sake`` (:func:`ambient_mri.espirit.espirit_maps_completed`) reads every
    measured sample: pass the measured k-space and its ``mask`` (broadcastable to ``(B, 1, H, W)``; default
    the non-zero samples); for ``calib < 16`` it completes a larger centred block from them first."""
    from . import coils

    k = np.ascontiguousarray(kspace_acs, dtype=np.complex64)
    if method == "espirit-sake":
        import torch

        from .espirit import espirit_maps_completed

        dev = "cuda" if torch.cuda.is_available() else "cpu"
        m = (np.abs(k) > 0).any(axis=1, keepdims=True) if mask is None else np.array(mask, dtype=bool)
        maps = espirit_maps_completed(torch.from_numpy(k).to(dev), torch.from_numpy(m), calib)
        return maps.detach().cpu().numpy().astype(np.complex64)
    if method == "espirit":
        return np.stack([coils.espirit_maps(s, calib) for s in k]).astype(np.complex64)
    if method == "lowres":
        return np.asarray(coils.lowres_maps(k, (calib, calib)), dtype=np.complex64)
    if method == "espirit-torch":
        import torch

        from .espirit import espirit_maps_torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
        maps = espirit_maps_torch(torch.from_numpy(k).to(dev), calib)
        return maps.detach().cpu().numpy().astype(np.complex64)
    raise ConfigError(f"unknown maps method {method!r} (choose from {', '.join(maps_methods())})")


def reference_image(kspace: np.ndarray, maps: np.ndarray, kind: str = "cg-sense", iters: int = 30) -> np.ndarray:
    """Coil-combined image ``(H, W)`` complex64 of fully sampled ``kspace (C, H, W)``: ``cg-sense`` solves
    ``S^H F^H F S x = S^H F^H k`` by ``iters`` CG steps from 0; ``rss`` is ``sqrt(sum_c |F^-1 k_c|^2)``."""
    from .fft import ifft2c, rss

    if kind == "rss":
        return rss(ifft2c(kspace), dim=0).astype(np.complex64)
    import torch

    from .operators import SenseOp, conjugate_gradient

    y = torch.from_numpy(np.ascontiguousarray(kspace, dtype=np.complex64))[None]
    op = SenseOp(torch.from_numpy(np.ascontiguousarray(maps, dtype=np.complex64))[None],
                 torch.ones(1, kspace.shape[-1]))
    with torch.no_grad():
        x = conjugate_gradient(op.normal, op.adjoint(y), iters=iters)
    return x[0].numpy().astype(np.complex64)


def _mask_acs(options: PrepOptions, shape: tuple[int, int]) -> tuple[int, int]:
    """Fully sampled centre of the masks ``options`` draws on ``shape``: ``(1, n)`` lines or ``(n, n)``
    (the same for every seed and acceleration)."""
    return _mask_acs_cached(options.mask_type, tuple(shape), float(options.accel[0]), options.center_lines)


@functools.lru_cache(maxsize=64)
def _mask_acs_cached(kind, shape, accel, center):
    from .masks import kspace_mask

    return tuple(kspace_mask(kind, shape, accel, center=center, seed=0).acs)


def resolve_calib(options: PrepOptions, acs: tuple[int, int] | None, shape: tuple[int, int],
                  where: str | os.PathLike | None = None) -> int:
    """Side of the calibration square for maps and norm: ``--calib`` or the mask's fully sampled centre
    (``min(n, H)`` for ``n`` lines), never larger than that centre; image domain default 24."""
    H, W = shape
    if acs is None:  # fully sampled data, image domain
        return min(options.calib or IMAGE_DOMAIN_CALIB, H, W)
    avail = min(H if acs[0] == 1 else acs[0], acs[1], H, W)
    if avail < 1:
        err = ConfigError if where is None else DataError
        raise err("the mask has no fully sampled centre; coil maps and the norm need one", where)
    if options.calib is None:
        return avail
    if options.calib > avail:
        what = "its own mask" if where is not None else f"--mask-type {options.mask_type}"
        raise ConfigError(f"--calib {options.calib} exceeds the {avail}-wide fully sampled centre of {what}", where)
    return options.calib


def prepare_slice_all(kspace: np.ndarray, mask: np.ndarray | None = None, options: PrepOptions | None = None, *,
                      seed: int = 0, whiten: bool | str = False, single_coil: bool | None = None,
                      input_accel: float | None = None, path: str | os.PathLike | None = None,
                      true_maps: np.ndarray | None = None, noise_sigma: float | None = None,
                      noise_corner: bool = False) -> dict:
    """:func:`prepare_slice` for every target of ``options`` at once (whitening, crop, compression, maps,
    norm and reference are shared): ``{R: slice dict}`` (``{None: ...}`` for ``--domain image``).

    ``true_maps`` ``(C, H, W)``: the maps the input was simulated with (used when ``options.maps ==
    "true"``; whitened, cropped and compressed exactly as the k-space). ``noise_sigma``: the input's known
    per-coil k-space noise std (``E|n|^2 = sigma^2``, raw units), converted to ``noise_std`` in prepared units.
    ``noise_corner``: the readout is oversampled, so the image corner holds noise (used for ``noise_std``
    when the data are neither whitened nor of known noise).

    ``whiten``: ``True`` (fail if impossible), ``False``, or ``"try"`` (skip with a warning if the corner
    holds no noise). ``input_accel``: nominal acceleration recorded for an input mask (the file's
    ``acceleration`` attribute); default its actual acceleration.
    """
    from .coils import acs_kspace, coil_compress
    from .masks import acceleration, image_mask, kspace_mask

    opts = options or PrepOptions()
    k = np.asarray(kspace)
    if k.ndim == 2:
        k = k[None]
    k = k.astype(np.complex64)
    C, H, W = k.shape
    single = C == 1 if single_coil is None else bool(single_coil)
    notes = []
    if not np.isfinite(k).all():
        raise DataError("k-space holds NaN or Inf", path)
    m_in = None if mask is None else as_mask2d(mask, H, W)
    if m_in is not None:
        if opts.domain == "image":
            raise DataError("--domain image needs fully sampled input; this one carries its own mask", path)
        k = k * m_in

    k_pre = k  # the whitening matrix of true maps is fitted from k before and after
    # 1. prewhitening (before the crop: the corner lies in the oversampled readout)
    whitened = False
    if whiten:
        k_w, reason = prewhiten_slice(k, mask=m_in)
        if reason is None:
            k, whitened = k_w, True
        elif whiten == "try":
            notes.append(f"not prewhitened: {reason}")
        else:
            raise DataError(f"cannot prewhiten: {reason} (use --no-whiten)", path)

    corner_cov = None
    if noise_corner and not whitened and noise_sigma is None:
        corner_cov = corner_noise_covariance(k)
    S_true = None
    if opts.maps == "true" and not single:
        if true_maps is None:
            raise ConfigError(f"--maps true: the input carries no true coil maps (dataset {TRUE_MAPS_KEY})", path)
        S_true = np.asarray(true_maps, dtype=np.complex64)
        if S_true.shape != (C, H, W):
            raise DataError(f"{TRUE_MAPS_KEY} of shape {S_true.shape} does not match k-space {(C, H, W)}", path)
        if whitened:
            S_true = apply_coil_matrix(coil_matrix(k_pre, k), S_true)

    # 2. crop
    if opts.crop is not None:
        mask_before_crop = m_in
        k, m_in = crop_kspace(k, tuple(opts.crop), m_in)
        if S_true is not None:
            S_true = crop_maps(S_true, tuple(opts.crop), mask_before_crop)
    H, W = k.shape[-2:]

    # sampling masks (drawn on the cropped matrix) and the calibration block they all share
    drawn = {}
    if m_in is not None:
        acs = calibration_block(m_in)
    elif opts.domain == "kspace":
        drawn = {R: kspace_mask(opts.mask_type, (H, W), R, center=opts.center_lines, seed=seed) for R in opts.accel}
        acs = tuple(drawn[opts.accel[0]].acs)
    else:
        acs = None
    calib = resolve_calib(opts, acs, (H, W), path if m_in is not None else None)

    # 3. coil compression (compression matrix from the calibration block only)
    if opts.coils is not None and opts.coils != C:
        if opts.coils > C:
            raise ConfigError(f"--coils {opts.coils} is more than the {C} coils of the input", path)
        k, U = coil_compress(k, opts.coils, (calib, calib))
        k = k * m_in if m_in is not None else k
        if S_true is not None:
            S_true = apply_coil_matrix(U.conj().T, S_true)
        if corner_cov is not None:
            corner_cov = U.conj().T @ corner_cov @ U

    # 4. maps from measured samples only (the calibration block, or all of them for MEASURED_MAPS), 5. norm
    if single:
        maps = np.ones_like(k)
    elif S_true is not None:
        maps = S_true.astype(np.complex64)
    elif opts.maps in MEASURED_MAPS:  # every sample measured in every target's mask (so no file sees more)
        meas = m_in if m_in is not None else _common_mask([sm.mask for sm in drawn.values()], (H, W))
        meas = np.broadcast_to(meas, (H, W))
        maps = estimate_maps((k * meas)[None], calib, opts.maps, mask=meas[None, None])[0]
    else:
        maps = estimate_maps(acs_kspace(k, (calib, calib))[None], calib, opts.maps)[0]
    norm = acs_norm(k, calib)
    if not (np.isfinite(norm) and norm > 0):
        raise DataError(f"the {calib}x{calib} calibration block is empty (norm {norm:g})", path)
    k = (k / norm).astype(np.complex64)
    noise_std, noise_source = prepared_noise_std(norm, whitened, noise_sigma, corner_cov)

    # 6. reference (fully sampled input only)
    need_ref = m_in is None and (opts.split != "train" or opts.domain == "image")
    ref = reference_image(k, maps, opts.reference, opts.cg_iters) if need_ref else None

    common = {"norm": np.float32(norm), "calib": calib, "whitened": whitened, "warnings": notes,
              "shape": (H, W), "noise_std": np.float32(noise_std), "noise_source": noise_source,
              "maps_kind": "none (single coil)" if single else "true" if S_true is not None else opts.maps}
    out = {}
    if opts.domain == "image":
        m = image_mask(opts.corruption, (H, W), float(opts.level), seed=seed)
        d = dict(common, image=(m * ref).astype(np.complex64), mask=m, mask_seed=seed, mask_kind=opts.corruption,
                 accel=1.0 / (1.0 - float(opts.level)), accel_actual=acceleration(m), acs=(0, 0))
        d.pop("noise_std")  # a k-space quantity: image-domain files do not carry it
        if opts.split != "train":
            d["reference"] = ref
        out[None] = d
        return out
    for R in opts.accel:
        if m_in is None:
            sm = drawn[R]
            m, s, kind, nominal = sm.mask, sm.seed, sm.kind, float(R)
        else:
            m, s, kind = m_in, -1, "input"
            nominal = float(input_accel) if input_accel else float(m.size / m.sum())
        d = dict(common, kspace=(k * m).astype(np.complex64), mask=m.astype(bool), maps=maps, mask_seed=int(s),
                 mask_kind=kind, accel=nominal, accel_actual=acceleration(m),
                 acs=(H, acs[1]) if acs[0] == 1 else tuple(acs))
        if ref is not None and opts.split != "train":
            d["reference"] = ref
            if opts.reference == "cg-sense":
                d["forward_residual"], d["noise_residual"] = forward_residual(d["kspace"], maps, d["mask"], ref,
                                                                             noise_std)
        out[R] = d
    return out


def _common_mask(masks: list, shape: tuple[int, int]) -> np.ndarray:
    """The samples measured by every mask in ``masks`` (all-True for none: fully sampled data)."""
    out = np.ones(shape, dtype=bool)
    for m in masks:
        out = out & np.broadcast_to(np.asarray(m, dtype=bool), shape)
    return out


def coil_matrix(k_before: np.ndarray, k_after: np.ndarray) -> np.ndarray:
    """The ``C' x C`` matrix ``W`` with ``k_after = W k_before`` over the coil axis of ``(C, H, W)`` k-space
    (least squares over all samples; exact for a linear coil transform such as prewhitening)."""
    A = np.asarray(k_before).reshape(k_before.shape[0], -1)
    B = np.asarray(k_after).reshape(k_after.shape[0], -1)
    return np.linalg.lstsq(A.T, B.T, rcond=None)[0].T.astype(np.complex64)


def apply_coil_matrix(Wm: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """``S'_d = sum_c W_dc S_c``: a coil transform of k-space applied to the maps ``(C, H, W)`` keeps
    ``k = F(S x)`` exact (``W k = F((W S) x)``)."""
    return np.tensordot(Wm, np.asarray(maps), axes=(1, 0)).astype(np.complex64)


def crop_maps(maps: np.ndarray, crop: tuple[int, int], mask: np.ndarray | None = None) -> np.ndarray:
    """Maps ``(C, H, W)`` cropped as :func:`crop_kspace` crops the k-space: an image-space crop stays an
    image-space crop of the maps (exact); an axis cropped in k-space (the phase encode of masked input,
    both axes of a 2-D mask) keeps the field of view at a coarser pixel size, so the maps are linearly
    interpolated onto the coarser pixel centres (:func:`_regrid`; smooth maps need no more)."""
    from .fft import center_crop

    h, w = crop
    H, W = maps.shape[-2:]
    if (h, w) == (H, W):
        return maps
    if mask is None:
        return center_crop(maps, (h, w)).astype(np.complex64)
    out = np.asarray(maps)
    if mask.shape[0] == 1:
        top = (H - h) // 2
        out = out[..., top : top + h, :]
    else:
        out = _regrid(out, h, -2)
    return _regrid(out, w, -1).astype(np.complex64)


def _regrid(a: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Resample ``a`` along ``axis`` from ``N`` to ``n`` pixels over the same field of view (k-space crop to
    the ``n`` lines around DC): pixel ``j`` of the coarse grid sits at ``(j - n // 2) N / n`` fine pixels from
    the centre pixel ``N // 2``; linear interpolation of real and imaginary parts, ends held."""
    N = a.shape[axis]
    if n == N:
        return a
    pos = (np.arange(n) - n // 2) * (N / n) + N // 2
    moved = np.moveaxis(a, axis, -1)
    flat = moved.reshape(-1, N)
    grid = np.arange(N)
    out = np.stack([np.interp(pos, grid, r.real) + 1j * np.interp(pos, grid, r.imag) for r in flat])
    return np.moveaxis(out.reshape(moved.shape[:-1] + (n,)), -1, axis)


def corner_noise_covariance(kspace: np.ndarray, corner: int = NOISE_CORNER) -> np.ndarray | None:
    """Coil noise covariance ``(C, C)`` of the ``corner x corner`` top-left corner of the coil images of
    ``kspace (C, H, W)`` (noise only when the readout is oversampled), or ``None`` if it holds too few
    samples."""
    from .coils import noise_covariance, noise_from_corner

    C, H, W = kspace.shape
    size = min(corner, H, W)
    if size * size <= C:
        return None
    return noise_covariance(noise_from_corner(kspace, size))


def prepared_noise_std(norm: float, whitened: bool, noise_sigma: float | None = None,
                       corner_cov: np.ndarray | None = None) -> tuple[float, str]:
    """Std of the complex noise of one prepared k-space sample of one coil (``E|n|^2 = noise_std^2``) and
    where it comes from. Crops (orthonormal FFTs, centred windows) keep white noise white with the same
    std, SVD compression too (orthonormal columns), so only whitening and the norm change it:

    1. ``"whitened"``: unit covariance after prewhitening -> ``1 / norm``;
    2. ``"simulated"``: the input's known ``noise_sigma`` (raw units) -> ``noise_sigma / norm``;
    3. ``"image corner"``: ``sqrt(tr Psi / C) / norm`` with ``Psi`` the (compressed) coil covariance of the
       image corner of an oversampled readout (the mean over coils when the noise is not white);
    4. otherwise ``NaN`` (``"unknown"``). (The k-space periphery of non-oversampled data was tried and
       rejected: on SIAT 64 x 64 it overestimated the known sigma 1.6-2.1x, signal remains there.)
    """
    if whitened:
        return 1.0 / float(norm), "whitened"
    if noise_sigma is not None and np.isfinite(noise_sigma) and noise_sigma >= 0:
        return float(noise_sigma) / float(norm), "simulated"
    if corner_cov is not None:
        var = float(np.trace(corner_cov).real) / corner_cov.shape[0]
        if np.isfinite(var) and var > 0:
            return math.sqrt(var) / float(norm), "image corner"
    return math.nan, "unknown"


def forward_residual(y: np.ndarray, maps: np.ndarray, mask: np.ndarray, x_ref: np.ndarray,
                     noise_std: float) -> tuple[float, float]:
    """``(||y - M F S x_ref|| / ||y||, noise_std sqrt(C n_M) / ||y||)`` for measured k-space ``y (C, H, W)``
    (zero where ``M = 0``), ``n_M`` the measured samples per coil: how far the maps ``S`` explain the data,
    and the part of it that the noise alone explains (the expected ``||n|| / ||y||``)."""
    from .fft import fft2c

    m = np.broadcast_to(np.asarray(mask, dtype=bool), y.shape[-2:])
    r = m * (np.asarray(y) - fft2c(np.asarray(maps) * np.asarray(x_ref)[None]))
    ny = float(np.linalg.norm(y))
    if ny == 0:
        return math.nan, math.nan
    return float(np.linalg.norm(r)) / ny, float(noise_std) * math.sqrt(y.shape[0] * int(m.sum())) / ny


def prepare_slice(kspace: np.ndarray, mask: np.ndarray | None = None, options: PrepOptions | None = None, *,
                  accel: float | None = None, seed: int = 0, whiten: bool | str = False,
                  single_coil: bool | None = None) -> dict:
    """Prepare one slice in memory (what ``ambient-mri recon`` does on raw files).

    ``kspace``: ``(C, H, W)`` (or ``(H, W)`` single-coil) raw k-space; ``mask``: the input's own sampling
    mask ``(W,)``/``(1, W)``/``(H, W)`` or ``None`` (then one is drawn with ``seed`` at ``accel``, default
    ``options.accel[0]``). Returns a dict with the per-slice arrays of ``docs/data_format.md`` (normalised):
    ``kspace (C', h, w)`` zero where ``mask`` is 0, ``mask`` ``(1, w)`` or ``(h, w)``, ``maps (C', h, w)``,
    ``norm``, ``mask_seed`` (-1 for the input's mask), ``reference (h, w)`` (val/test, fully sampled input),
    or for ``--domain image`` ``image (h, w)`` and ``mask (h, w)``; plus ``mask_kind``, ``accel``,
    ``accel_actual``, ``acs``, ``calib``, ``whitened``, ``warnings``.
    """
    opts = options or PrepOptions()
    if accel is not None and opts.domain == "kspace":
        opts = replace(opts, accel=(float(accel),))
    out = prepare_slice_all(kspace, mask, opts, seed=seed, whiten=whiten, single_coil=single_coil)
    return next(iter(out.values()))


# ----------------------------------------------------------------------------------------------
# Per volume


@dataclass
class VolumePlan:
    """What prep will do with one input file (resolved from the file and the options, before any work)."""

    path: Path
    indices: list[int]
    whiten: bool | str
    out_shape: tuple[int, int]
    calib: int
    single_coil: bool
    undersampled: bool
    input_accel: float | None
    voxel_size_mm: tuple[float, float, float]
    warnings: list[str] = field(default_factory=list)


def plan_volume(vol, options: PrepOptions) -> VolumePlan:
    """Check ``options`` against an open :class:`~ambient_mri.fastmri_io.FastMRIVolume` and resolve the
    per-file settings. Impossible options raise :class:`ConfigError` (naming the file), unusable data
    :class:`DataError`."""
    S, C, H, W = vol.shape
    p = vol.path
    indices = parse_slices(options.slices, S)
    if not indices:
        raise DataError(f"--slices {options.slices} selects none of its {S} slices", p)
    if options.crop is not None and (options.crop[0] > H or options.crop[1] > W):
        raise ConfigError(f"--crop {options.crop[0]} {options.crop[1]} is larger than the {H}x{W} matrix", p)
    if options.coils is not None and options.coils > C:
        raise ConfigError(f"--coils {options.coils} is more than the {C} coils of the input", p)
    if options.domain == "image" and vol.is_undersampled:
        raise DataError("--domain image needs fully sampled input; this one carries its own mask", p)
    h, w = options.crop or (H, W)
    mask = None
    if vol.is_undersampled:
        mask = as_mask2d(vol.mask, H, W)
        if options.crop is not None:
            mask = crop_kspace(np.zeros((1, H, W), np.complex64), (h, w), mask)[1]
        acs = calibration_block(mask)
    elif options.domain == "kspace":
        acs = _mask_acs(options, (h, w))
    else:
        acs = None
    calib = resolve_calib(options, acs, (h, w), p if mask is not None else None)
    if options.maps == "true" and not vol.single_coil:
        true_maps(vol, 0)  # a one-line ConfigError naming the file if it carries none
    whiten, whiten_note = whitening_mode(options.whiten, vol)
    hdr = vol.header
    fov, enc = hdr["encoding_fov_mm"], hdr["encoding_size"]
    dx, dy = fov[0] / enc[0], fov[1] / enc[1]
    if mask is not None and w != W:  # k-space crop along the phase encode changes the pixel size
        dy *= W / w
    return VolumePlan(path=Path(p), indices=indices, whiten=whiten, out_shape=(h, w), calib=calib,
                      single_coil=vol.single_coil, undersampled=vol.is_undersampled, input_accel=vol.acceleration,
                      voxel_size_mm=(float(dx), float(dy), float(fov[2])),
                      warnings=list(vol.warnings) + ([whiten_note] if whiten_note else []))


def true_maps(vol, i: int) -> np.ndarray:
    """The true coil maps ``(C, H, W)`` of slice ``i`` that a simulated input carries as dataset
    :data:`TRUE_MAPS_KEY` (``(C, H, W)`` for the whole volume or ``(S, C, H, W)`` per slice)."""
    import h5py

    f = vol._file
    ds = f.get(TRUE_MAPS_KEY) if f is not None else None
    if not isinstance(ds, h5py.Dataset):
        raise ConfigError(f"--maps true: the file carries no true coil maps (no dataset {TRUE_MAPS_KEY})", vol.path)
    S, C, H, W = vol.shape
    if ds.shape == (C, H, W):
        return np.asarray(ds[()], dtype=np.complex64)
    if ds.shape == (S, C, H, W):
        return np.asarray(ds[i], dtype=np.complex64)
    raise DataError(f"{TRUE_MAPS_KEY} has shape {ds.shape}, expected {(C, H, W)} or {(S, C, H, W)}", vol.path)


def known_noise_sigma(vol, i: int) -> float | None:
    """The input's known per-coil k-space noise std of slice ``i`` (attribute ``noise_sigma`` that the
    simulating converters write: a scalar or one value per slice, ``E|n|^2 = sigma^2``), else ``None``."""
    v = vol.attrs.get("noise_sigma")
    if v is None:
        return None
    a = np.asarray(v, dtype=np.float64).ravel()
    if a.size == 1:
        return float(a[0])
    return float(a[i]) if a.size == vol.shape[0] else None


def iter_prepared(vol, options: PrepOptions, plan: VolumePlan | None = None):
    """Yield ``(slice_index, {target: slice dict})`` for the selected slices of an open volume, one
    slice read at a time."""
    plan = plan or plan_volume(vol, options)
    name = vol.path.name
    want_true = options.maps == "true" and not plan.single_coil
    for i in plan.indices:
        seed = slice_seed(options.seed, name, i)
        yield i, prepare_slice_all(vol.slice(i), vol.mask, options, seed=seed, whiten=plan.whiten,
                                   single_coil=plan.single_coil, input_accel=plan.input_accel, path=vol.path,
                                   true_maps=true_maps(vol, i) if want_true else None,
                                   noise_sigma=known_noise_sigma(vol, i), noise_corner=vol.readout_oversampled)


def prepare_volume(volume, options: PrepOptions | None = None, *, accel: float | None = None,
                   slices: str | None = None) -> dict:
    """Prepare a whole volume in memory: ``volume`` is a path or an open ``FastMRIVolume``.

    Returns the stacked arrays of one prepared file (``kspace (S, C, h, w)``, ``mask``, ``maps``, ``norm``,
    ``mask_seed``, ``slice_index``, ``reference`` for val/test; or ``image`` for ``--domain image``) and
    ``"attrs"`` (the file attributes of ``docs/data_format.md``). ``accel`` picks one acceleration.
    """
    from .fastmri_io import FastMRIVolume

    opts = options or PrepOptions()
    if accel is not None and opts.domain == "kspace":
        opts = replace(opts, accel=(float(accel),))
    if slices is not None:
        opts = replace(opts, slices=slices)
    opts.validate()
    ctx = FastMRIVolume(volume) if not isinstance(volume, FastMRIVolume) else contextlib.nullcontext(volume)
    with ctx as vol:
        plan = plan_volume(vol, opts)
        rows = [(i, out[opts.targets[0]]) for i, out in iter_prepared(vol, opts, plan)]
    arrays = {"slice_index": np.array([i for i, _ in rows], dtype=np.int64)}
    for key in _array_keys(rows[0][1]):
        arrays[key] = np.stack([stored(key, r[key]) for _, r in rows])
    arrays["attrs"] = _file_attrs(plan, opts, opts.targets[0], [r for _, r in rows], source_sha256=None)
    return arrays


def _meta(d: dict) -> dict:
    """A slice dict without its arrays (what the file attributes need)."""
    out = {k: v for k, v in d.items() if k not in PER_SLICE_KEYS or k in ("norm", "noise_std")}
    out["has_reference"] = d.get("has_reference", "reference" in d)
    return out


def _file_attrs(plan: VolumePlan, opts: PrepOptions, target, rows: list[dict], source_sha256) -> dict:
    first = _meta(rows[0])
    notes = list(plan.warnings) + sorted({w for r in rows for w in r["warnings"]})
    attrs = {
        "format": FORMAT, "split": opts.split, "domain": opts.domain, "mask_kind": first["mask_kind"],
        "accel": float(first["accel"]), "acs": np.asarray(first["acs"], dtype=np.int64),
        "calib": int(first["calib"]), "source": os.fspath(Path(plan.path).resolve()),
        "ambient_mri_version": __version__, "options": json.dumps(opts.to_json(), sort_keys=True),
        "whitened": np.array([bool(r["whitened"]) for r in rows]),
        "voxel_size_mm": np.asarray(plan.voxel_size_mm, dtype=np.float64),
        "warnings": json.dumps(notes),
        "maps_kind": first.get("maps_kind", opts.maps),
        "noise_std_source": json.dumps([r.get("noise_source", "unknown") for r in rows]),
    }
    if "forward_residual" in first:
        attrs["forward_residual"] = np.array([r["forward_residual"] for r in rows], dtype=np.float64)
        attrs["noise_residual"] = np.array([r["noise_residual"] for r in rows], dtype=np.float64)
    if source_sha256 is not None:
        attrs["source_sha256"] = source_sha256
    if opts.split != "train":
        attrs["reference_kind"] = opts.reference if first["has_reference"] else "none"
    if opts.domain == "image":
        attrs["corruption"], attrs["level"] = opts.corruption, float(opts.level)
        attrs.pop("noise_std_source")  # image-domain files carry no noise_std
    return attrs


def sha256_file(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Writing a dataset


def output_dirs(output: Path, options: PrepOptions) -> dict:
    """``{target: folder}``: ``OUTPUT`` for one acceleration (or the image domain), ``OUTPUT/R{R:g}`` each
    for several."""
    if options.domain == "kspace" and len(options.accel) > 1:
        return {R: Path(output) / f"R{R:g}" for R in options.accel}
    return {t: Path(output) for t in options.targets}


def _write_volume_unit(unit: dict) -> dict:
    """Worker: prepare one input into every pending output (each claimed, written atomically).

    Returns ``{"source", "status": done|skipped|busy|failed, "written": [...], "error"}``; never raises
    for a data problem (the error text is one line naming the file); ``"fatal": True`` marks an output that
    cannot be written (disk full, unwritable folder), which stops the run."""
    from .fastmri_io import FastMRIVolume
    from .fsutil import OutputError, atomic_h5, claim

    src = Path(unit["source"])
    opts = PrepOptions.from_json(unit["options"])
    outs = {float(k) if k is not None else None: Path(v) for k, v in unit["outputs"]}
    res = {"source": os.fspath(src), "written": [], "busy": [], "error": None, "status": "done"}
    if unit.get("threads"):
        import torch

        torch.set_num_threads(unit["threads"])
    try:
        with contextlib.ExitStack() as stack:
            todo = {}
            for t, out in outs.items():
                if out.exists():
                    continue
                held = stack.enter_context(claim(out))
                if not held:
                    res["busy"].append(os.fspath(out))
                elif not out.exists():  # finished by another process between the check and the claim
                    todo[t] = out
            if not todo:
                res["status"] = "busy" if res["busy"] else "skipped"
                return res
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # reported by the pre-flight, kept in the file
                vol = stack.enter_context(FastMRIVolume(src))
            plan = plan_volume(vol, opts)
            digest = sha256_file(src)
            files = {t: stack.enter_context(atomic_h5(out)) for t, out in todo.items()}
            bar = _bar(len(plan.indices), f"{src.name}", unit.get("progress") and unit.get("slice_bar"))
            rows = {t: [] for t in todo}
            for n, (i, per_target) in enumerate(iter_prepared(vol, opts, plan)):
                for t, f in files.items():
                    d = per_target[t]
                    if n == 0:
                        _create_datasets(f, d, len(plan.indices))
                    for key in _array_keys(d):
                        f[key][n] = stored(key, d[key])
                    f["slice_index"][n] = i
                    rows[t].append(_meta(d))
                    f.guard.check()  # stop at the first failed write (full disk), not after the last slice
                bar.update(1)
            bar.close()
            for t, f in files.items():
                attrs = _file_attrs(plan, opts, t, rows[t], digest)
                for k, v in attrs.items():
                    f.attrs[k] = v
                fit = fit_warning(attrs)
                if fit:
                    res.setdefault("warnings", []).append(f"{todo[t]}: {fit}")
            first = next(iter(rows.values()))
            note = whitening_note([r["whitened"] for r in first], [w for r in first for w in r["warnings"]])
            res["notes"] = [note] if note else []
        res["written"] = [os.fspath(o) for o in todo.values()]  # renamed into place when the stack closed
    except AmbientMRIError as e:
        res.update(status="failed", error=str(e), fatal=isinstance(e, OutputError))
    except Exception as e:  # an unexpected failure in one file must not stop the others
        res.update(status="failed", error=f"{src}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
    return res


def fit_warning(attrs: dict) -> str | None:
    """A one-line warning when the maps explain the data worse than the noise allows: the median over
    slices of ``||y - M F S x_ref|| / ||y||`` above :data:`FIT_WARN_RATIO` times the median noise share
    (``noise_std sqrt(C n_M) / ||y||``); ``None`` otherwise or when either is unknown."""
    if "forward_residual" not in attrs:
        return None
    res = float(np.nanmedian(attrs["forward_residual"])) if np.isfinite(attrs["forward_residual"]).any() else math.nan
    noise = float(np.nanmedian(attrs["noise_residual"])) if np.isfinite(attrs["noise_residual"]).any() else math.nan
    if not (np.isfinite(res) and np.isfinite(noise)) or res <= FIT_WARN_RATIO * noise:
        return None
    return (f"the coil maps explain the data worse than the noise allows: forward-model residual "
            f"||y - MFSx_ref||/||y|| = {res:.3f}, noise alone {noise:.3f} (median over slices, "
            f"> {FIT_WARN_RATIO:g}x)")


def _create_datasets(f, d: dict, n: int):
    for key in _array_keys(d):
        v = stored(key, d[key])
        shape = (n,) + np.shape(v)
        chunks = (1,) + np.shape(v) if np.ndim(v) else None
        f.create_dataset(key, shape=shape, dtype=v.dtype, chunks=chunks)
    f.create_dataset("slice_index", shape=(n,), dtype=np.int64)


def _bar(total, desc, enabled):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="slice", leave=False, disable=not enabled, file=sys.stderr)


def build_manifest(folder: Path, options: PrepOptions, failed: list[dict]) -> dict:
    """``manifest.json`` content, built from the finished files in ``folder`` (so it is right after a resume)."""
    from .fastmri_io import list_volumes

    files = [manifest_entry(p) for p in (list_volumes(folder) if Path(folder).is_dir() else [])]
    with_ref = any(f["reference"] for f in files)
    return {"format": FORMAT, "split": options.split, "domain": options.domain, "ambient_mri_version": __version__,
            "options": options.to_json(), "reference_kind": options.reference if with_ref else None,
            "files": files, "failed": failed}


def write_manifest(folder: Path, options: PrepOptions, failed: list[dict], wait_s: float = 600.0) -> Path:
    """Build and write ``folder/manifest.json`` atomically, under a claim, so that concurrent prep runs on
    the same output never interleave (the last one to finish lists every finished file)."""
    from .fsutil import claim, write_json

    path = Path(folder) / "manifest.json"
    t0 = time.monotonic()
    while True:
        with claim(path) as held:
            if held:
                write_json(path, build_manifest(folder, options, failed))
                return path
        if time.monotonic() - t0 > wait_s:
            raise AmbientMRIError("another process holds the manifest claim for too long", path)
        time.sleep(0.2)


def export_nifti(prepared: Path, out_dir: Path) -> list[Path]:
    """NIfTI magnitude volumes of a prepared file for radiology viewers: ``<stem>_zerofilled.nii.gz``
    (RSS of ``ifft2c(kspace)``, or ``|image|``) and ``<stem>_reference.nii.gz`` (val/test); array
    ``(W, H, slices)`` with the header's voxel size."""
    import h5py
    import nibabel as nib

    from .fft import ifft2c, rss
    from .fsutil import atomic_path

    written = []
    with h5py.File(prepared, "r") as f:
        vox = np.asarray(f.attrs.get("voxel_size_mm", (1.0, 1.0, 1.0)), dtype=float)
        vols = {}
        if "kspace" in f:
            vols["zerofilled"] = np.stack([rss(ifft2c(f["kspace"][s]), dim=0) for s in range(f["kspace"].shape[0])])
        else:
            vols["zerofilled"] = np.abs(f["image"][()])
        if "reference" in f:
            vols["reference"] = np.abs(f["reference"][()])
    affine = np.diag([vox[1], vox[0], vox[2], 1.0])
    for kind, v in vols.items():
        out = Path(out_dir) / f"{Path(prepared).stem}_{kind}.nii.gz"
        img = nib.Nifti1Image(np.ascontiguousarray(np.transpose(v, (2, 1, 0))).astype(np.float32), affine)
        with atomic_path(out, ".nii.gz") as tmp:
            nib.save(img, tmp)
        written.append(out)
    return written


@dataclass
class PrepResult:
    written: list[str]
    skipped: list[str]
    failed: list[dict]
    manifests: list[str]


def run_prep(input_path, output, options: PrepOptions, *, workers: int = 1, nifti: bool = False,
             progress: bool = True, echo=None) -> PrepResult:
    """Prepare every ``*.h5`` of ``input_path`` (a folder or one file) into ``output``.

    Options are checked first, then every input is opened and the options are checked against it; an
    impossible option raises :class:`ConfigError` before any output is written. Bad input files are
    skipped (listed in ``failed``); finished outputs are skipped (resume); each output is claimed and
    written atomically, so concurrent runs on the same ``output`` cooperate.
    """
    from .fastmri_io import FastMRIVolume, list_volumes
    from .fsutil import OutputError, make_dir

    echo = echo or (lambda msg: click.echo(msg, err=True))
    options.validate()
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1 (got {workers})")
    input_path, output = Path(input_path), Path(output)
    if not input_path.exists():
        raise ConfigError("input does not exist", input_path)
    inputs = list_volumes(input_path)
    if not inputs:
        raise ConfigError("no .h5 files here", input_path)
    dirs = output_dirs(output, options)
    in_dirs = {p.parent.resolve() for p in inputs}
    for d in set(dirs.values()):
        if d.exists() and not d.is_dir():
            raise ConfigError("output exists and is not a folder", d)
        if d.resolve() in in_dirs:
            raise ConfigError("output folder is the input folder (inputs are never overwritten)", d)

    # pre-flight: open every input, check the options against it, and check finished outputs
    failed, units, skipped = [], [], []
    opts_json = options.to_json()
    for p in inputs:
        try:
            with warnings.catch_warnings():  # header problems: echoed once here, recorded in the output
                warnings.simplefilter("ignore", UserWarning)
                with FastMRIVolume(p) as vol:
                    plan_volume(vol, options)
                    for w in vol.warnings:
                        echo(f"warning: {p}: {w}")
        except DataError as e:
            failed.append({"source": os.fspath(p), "error": str(e)})
            continue
        outs = [(t, dirs[t] / f"{p.stem}.h5") for t in options.targets]
        for _, out in outs:
            if out.exists():
                _check_same_options(out, opts_json)
        if all(out.exists() for _, out in outs):
            skipped.append(os.fspath(p))
            continue
        units.append({"source": os.fspath(p), "options": opts_json, "progress": progress,
                      "slice_bar": workers == 1, "outputs": [(t, os.fspath(o)) for t, o in outs]})
    for f in failed:
        echo(f"skipped: {f['error']}")

    for d in sorted(set(dirs.values())):
        make_dir(d)  # an unwritable output: one line now, before any work
    written = []

    def collect(res):
        written.extend(res["written"])
        for w in res.get("warnings", ()):
            echo(f"warning: {w}")
        if res.get("fatal"):  # the output cannot be written (disk full, unwritable): stop the whole run
            raise OutputError(res["error"])
        if res["status"] == "failed":
            failed.append({"source": res["source"], "error": res["error"]})
            echo(f"failed: {res['error']}")
        for note in res.get("notes", []):
            echo(f"note: {res['source']}: {note}")
        return bool(res["busy"])

    busy = _run_units(units, workers, progress, collect)
    if busy:
        echo(f"waiting for {len(busy)} file(s) that another process is writing")
    while busy:  # outputs another process is writing: wait for it, take over if it died
        time.sleep(0.5)
        busy = [u for u in busy if collect(_write_volume_unit(dict(u, progress=False)))]

    if nifti:
        for d in sorted(set(dirs.values())):
            for p in list_volumes(d):
                stem = p.stem
                if not all((d / "nifti" / f"{stem}_{k}.nii.gz").exists() for k in _nifti_kinds(p)):
                    export_nifti(p, d / "nifti")
    failed.sort(key=lambda f: f["source"])
    manifests = [os.fspath(write_manifest(d, options, failed)) for d in sorted(set(dirs.values()))]
    return PrepResult(written=written, skipped=skipped, failed=failed, manifests=manifests)


def _nifti_kinds(p):
    import h5py

    with h5py.File(p, "r") as f:
        return ("zerofilled", "reference") if "reference" in f else ("zerofilled",)


def _check_same_options(out: Path, opts_json: dict):
    import h5py

    try:
        with h5py.File(out, "r") as f:
            old = json.loads(f.attrs["options"])
    except (OSError, KeyError, ValueError):
        raise ConfigError("output exists but is not a prepared file (remove it to redo it)", out) from None
    if old != opts_json:
        diff = sorted(k for k in set(old) | set(opts_json) if old.get(k) != opts_json.get(k))
        raise ConfigError(f"was prepared with different options ({', '.join(diff)}); use a new output folder", out)


def _run_units(units, workers, progress, collect):
    from tqdm import tqdm

    busy = []
    bar = tqdm(total=len(units), desc="volumes", unit="vol", disable=not progress or not units, file=sys.stderr)
    if workers == 1 or len(units) <= 1:
        for u in units:
            if collect(_write_volume_unit(u)):
                busy.append(u)
            bar.update(1)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_write_volume_unit, dict(u, threads=threads)): u for u in units}
            from concurrent.futures import as_completed

            try:
                for fut in as_completed(futures):
                    if collect(fut.result()):
                        busy.append(futures[fut])
                    bar.update(1)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # a fatal error: start nothing new
                raise
    bar.close()
    return busy


# ----------------------------------------------------------------------------------------------
# Command line


def _parse_accel(values) -> tuple[float, ...] | None:
    if not values:
        return None
    out = []
    for v in values:
        for part in str(v).split(","):
            try:
                out.append(float(part))
            except ValueError:
                raise ConfigError(f"--accel {part!r} is not a number") from None
    return tuple(out)


HELP = """Turn fastMRI-layout .h5 files (INPUT: a folder or one file) into a prepared dataset in OUTPUT.

\b
Per slice: prewhiten (noise from the 30x30 image corner), centre crop, SVD coil compression,
sampling mask (the input's own, or drawn with a per-slice seed), coil maps and the norm from the
calibration block only, k-space divided by the norm. The train split stores only the masked k-space
(zero where the mask is 0), mask, maps, norm and seeds; val/test also a reference image. Several
--accel values write OUTPUT/R<R>/ folders. Re-running skips finished files; a bad input file is
skipped with a one-line error and the exit status is 1. See docs/prep.md and docs/data_format.md.
"""


@click.command(name="prep", help=HELP)
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.argument("output", metavar="OUTPUT", type=click.Path(path_type=Path))
@click.option("--split", type=click.Choice(SPLITS), required=True,
              help="train: masked k-space only (no reference); val/test: also the reference image.")
@click.option("--accel", multiple=True, metavar="R",
              help="Nominal acceleration R >= 1 of the drawn masks; repeat or comma-separate for several "
                   "(one OUTPUT/R<R>/ folder each). Default 4. Ignored for inputs that carry a mask.")
@click.option("--mask-type", default="adps", show_default=True,
              help="Mask drawn for fully sampled inputs: random (fastMRI RandomMaskFunc), adps (floor(W/R) "
                   "lines, centre + uniform), equispaced, gaussian (variable-density lines), poisson or "
                   "sigpy-poisson (2-D Poisson disc).")
@click.option("--center-lines", type=int, default=None,
              help="Fully sampled centre lines of line masks (side of the square block of 2-D masks). "
                   "Default: W/16 for adps/gaussian, 8% of W for random/equispaced, 8 for poisson.")
@click.option("--crop", nargs=2, type=int, default=None, metavar="H W",
              help="Centre crop to H x W: image space for fully sampled input (fastMRI convention); for "
                   "inputs with a mask the readout in image space and the phase encode in k-space. "
                   "Default: keep the matrix.")
@click.option("--coils", type=int, default=None,
              help="SVD-compress to this many virtual coils (matrix from the calibration block). Default: keep.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Base seed; each slice's mask seed is a hash of it, the input file name and the slice index.")
@click.option("--workers", type=int, default=1, show_default=True, help="Volumes prepared in parallel (processes).")
@click.option("--maps", type=click.Choice(maps_methods()), default=DEFAULT_MAPS, show_default=True,
              help="Coil maps: espirit-sake (ESPIRiT; below a 16x16 calibration block it first completes a larger "
                   "centred block from the measured samples by low-rank completion), espirit / espirit-torch "
                   "(ESPIRiT of the calibration block only, sigpy / torch), lowres (ACS coil images / RSS); or true: "
                   "the maps a simulated input carries (dataset sim_coil_maps), whitened, cropped and compressed "
                   "like its k-space.")
@click.option("--calib", type=int, default=None,
              help="Side of the centred square calibration block used for maps, coil compression and the "
                   "norm; at most the mask's fully sampled centre. Default: that centre (image domain: 24).")
@click.option("--whiten/--no-whiten", default=None,
              help="Prewhiten the coils with the noise of the 30x30 image corner. Default: only when the "
                   "header's readout is 2x oversampled (fastMRI 640 = 2 x 320), and per slice only when the "
                   "corner is noise (neighbouring pixels uncorrelated, not an aliased object), with a one-line "
                   "note otherwise. --whiten: whiten even without oversampling; fail if the corner is not noise.")
@click.option("--reference", type=click.Choice(REFERENCE_KINDS), default="cg-sense", show_default=True,
              help="val/test reference image: cg-sense (30 CG iterations on the fully sampled k-space and the "
                   "maps) or rss (root sum of squares).")
@click.option("--nifti", is_flag=True,
              help="Also write NIfTI magnitude volumes (reference, zero-filled) to OUTPUT/nifti/ for viewers.")
@click.option("--domain", type=click.Choice(DOMAINS), default="kspace", show_default=True,
              help="kspace: k-space masks (A-DPS). image: image-domain corruption of the coil-combined image "
                   "(the seed paper's box/pixel setting); stores image = mask * x.")
@click.option("--corruption", type=click.Choice(CORRUPTIONS), default=None,
              help="--domain image only: box (one erased square) or pixels (random erased pixels).")
@click.option("--level", type=float, default=None,
              help="--domain image only: erased area fraction (box) or erasure probability (pixels), in [0, 1).")
@click.option("--slices", default=None, metavar="SPEC",
              help="Slices of each volume to keep: a:b (python slice, e.g. 0:5), i, or i,j,k. Default: all.")
@click.option("--cg-iters", type=int, default=30, show_default=True, help="CG-SENSE iterations of the reference.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def command(input_path, output, split, accel, mask_type, center_lines, crop, coils, seed, workers, maps, calib,
            whiten, reference, nifti, domain, corruption, level, slices, cg_iters, quiet):
    acc = _parse_accel(accel)
    if domain == "image" and acc is not None:
        raise ConfigError("--accel does not apply to --domain image (use --corruption and --level)")
    opts = PrepOptions(split=split, domain=domain, accel=acc or ((4.0,) if domain == "kspace" else ()),
                       mask_type=mask_type, center_lines=center_lines, crop=tuple(crop) if crop else None,
                       coils=coils, seed=seed, maps=maps, calib=calib, whiten=whiten, reference=reference,
                       corruption=corruption, level=level, slices=slices, cg_iters=cg_iters)
    t0 = time.monotonic()
    res = run_prep(input_path, output, opts, workers=workers, nifti=nifti, progress=not quiet)
    click.echo(f"prepared {len(res.written)} file(s), skipped {len(res.skipped)} finished, "
               f"{len(res.failed)} failed in {time.monotonic() - t0:.1f} s; manifest: {', '.join(res.manifests)}")
    if res.failed:
        click.echo(f"{len(res.failed)} input file(s) failed:", err=True)
        for f in res.failed:
            click.echo(f"  {f['error']}", err=True)
        raise click.exceptions.Exit(1)
