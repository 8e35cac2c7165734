"""One slice through ``ambient-mri prep``, in memory (numpy in, numpy out).

Per slice ``k`` ``(C, H, W)`` (:func:`prepare_slice`; :func:`prepare_slice_all` does every target of the
options at once, sharing steps 1-3 and 5-6):

1. prewhiten ``k <- L^-1 k`` over coils, ``Psi = L L^H`` the noise covariance of the 30 x 30 corner of the
   coil images (default: only when the header's readout is 2x oversampled, and only slices whose corner
   is noise: neighbouring pixels no more correlated than noise through the mask,
   :func:`~ambient_mri.whitening.prewhiten_slice`);
2. centre crop to ``(h, w)`` (:func:`~ambient_mri.crop.crop_kspace`): in image space for fully sampled
   input; for input that carries its own mask, the readout in image space and the phase encode in k-space
   (every unsampled line stays exactly zero);
3. SVD coil compression to ``N`` virtual coils, the compression matrix from the calibration block;
4. mask ``M``: the input's own (``mask_seed = -1``) or drawn per slice with a seed derived from
   ``--seed``, the input file name and the slice index (:func:`~ambient_mri.prep_options.slice_seed`);
5. maps ``S`` from measured samples only (:func:`~ambient_mri.coils.estimate_maps`): the centred
   ``calib x calib`` block (``calib`` <= the mask's fully sampled centre), or for ``espirit-sake`` (default)
   every sample measured in every target's mask; or the input's true maps (``true``), put through the same
   whitening, crop and compression as the k-space;
6. ``norm`` = 99th percentile of ``RSS(ifft2c(k restricted to the calib x calib block))``; ``k <- k / norm``;
   ``noise_std`` = the noise std of one prepared sample (:func:`~ambient_mri.whitening.prepared_noise_std`);
7. ``M k`` (exactly zero where ``M = 0``) with ``M``, ``S``, ``norm``, ``noise_std``, seeds; val/test
   also a ``reference`` (:func:`reference_image`: ``iters`` steps of CG-SENSE ``(A^H A) x = A^H k`` with
   ``M = 1``, or RSS) and the forward-model residual ``||y - M F S x_ref|| / ||y||`` beside the noise share
   (:func:`~ambient_mri.coils.forward_residual`). ``--domain image``: ``image = M x`` with ``M`` an
   image-domain box/pixel mask and ``x`` the reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np

from .baselines import cg_sense
from .coils import (MEASURED_MAPS, acs_kspace, acs_norm, apply_coil_matrix, as_mask2d, calibration_block,
                    coil_compress, coil_matrix, estimate_maps, forward_residual)
from .crop import crop_kspace, crop_maps
from .errors import ConfigError, DataError
from .fft import ifft2c, rss
from .masks import acceleration, image_mask, kspace_mask
from .prep_options import PrepOptions, resolve_calib
from .whitening import corner_noise_covariance, prepared_noise_std, prewhiten_slice

TRUE_MAPS_KEY = "sim_coil_maps"  # dataset of simulated inputs holding the maps they were made with


def reference_image(kspace: np.ndarray, maps: np.ndarray, kind: str = "cg-sense", iters: int = 30) -> np.ndarray:
    """Coil-combined image ``(H, W)`` complex64 of fully sampled ``kspace (C, H, W)``: ``cg-sense`` is
    :func:`~ambient_mri.baselines.cg_sense` with ``M = 1`` and no regularisation, ``iters`` CG steps on
    ``S^H F^H F S x = S^H F^H k`` from 0; ``rss`` is ``sqrt(sum_c |F^-1 k_c|^2)``."""
    if kind == "rss":
        return rss(ifft2c(kspace), dim=0).astype(np.complex64)
    y = np.ascontiguousarray(kspace, dtype=np.complex64)[None]
    S = np.ascontiguousarray(maps, dtype=np.complex64)[None]
    x = cg_sense(y, S, np.ones((1, kspace.shape[-1]), dtype=np.float32), iters=iters, lam=0.0)
    return x[0].numpy().astype(np.complex64)


@dataclass
class _Slice:
    """A slice between steps: k-space ``k (C, H, W)`` (zero where ``mask`` is 0), the input's own ``mask``
    (``(1|H, W)`` or ``None``), the true maps ``S_true`` and the corner noise covariance ``corner_cov``
    ``(C, C)`` when known; every coil transform and crop of ``k`` is applied to them too."""

    k: np.ndarray
    mask: np.ndarray | None
    S_true: np.ndarray | None = None
    corner_cov: np.ndarray | None = None
    whitened: bool = False


def _read_slice(kspace, mask, opts: PrepOptions, path) -> _Slice:
    """Raw ``(C, H, W)`` or ``(H, W)`` k-space as complex64 ``(C, H, W)`` times its own mask, checked."""
    k = np.asarray(kspace)
    if k.ndim == 2:
        k = k[None]
    k = k.astype(np.complex64)
    C, H, W = k.shape
    if not np.isfinite(k).all():
        raise DataError("k-space holds NaN or Inf", path)
    m_in = None if mask is None else as_mask2d(mask, H, W)
    if m_in is not None:
        if opts.domain == "image":
            raise DataError("--domain image needs fully sampled input; this one carries its own mask", path)
        k = k * m_in
    return _Slice(k, m_in)


def _prewhiten(s: _Slice, whiten: bool | str, notes: list, path) -> None:
    """Step 1: ``k <- L^-1 k`` when ``whiten`` (``"try"``: keep ``k`` and note why when the corner is not noise)."""
    if not whiten:
        return
    k_w, reason = prewhiten_slice(s.k, mask=s.mask)
    if reason is None:
        s.k, s.whitened = k_w, True
    elif whiten == "try":
        notes.append(f"not prewhitened: {reason}")
    else:
        raise DataError(f"cannot prewhiten: {reason} (use --no-whiten)", path)


def _checked_true_maps(true_maps, shape: tuple, path) -> np.ndarray:
    """The input's true maps ``(C, H, W)`` complex64 for ``--maps true``, or a one-line error."""
    if true_maps is None:
        raise ConfigError(f"--maps true: the input carries no true coil maps (dataset {TRUE_MAPS_KEY})", path)
    S_true = np.asarray(true_maps, dtype=np.complex64)
    if S_true.shape != shape:
        raise DataError(f"{TRUE_MAPS_KEY} of shape {S_true.shape} does not match k-space {shape}", path)
    return S_true


def _crop(s: _Slice, crop: tuple[int, int]) -> None:
    """Step 2: crop ``k`` and its mask (:func:`crop_kspace`), and the true maps alike (:func:`crop_maps`)."""
    mask_before_crop = s.mask
    s.k, s.mask = crop_kspace(s.k, crop, s.mask)
    if s.S_true is not None:
        s.S_true = crop_maps(s.S_true, crop, mask_before_crop)


def _sampling(s: _Slice, opts: PrepOptions, seed: int, path) -> tuple[dict, tuple | None, int]:
    """Step 4 and the calibration block: ``(drawn masks {R: SampledMask}, acs, calib)``; masks are drawn on
    the cropped matrix (none for input with its own mask or the image domain)."""
    H, W = s.k.shape[-2:]
    drawn = {}
    if s.mask is not None:
        acs = calibration_block(s.mask)
    elif opts.domain == "kspace":
        drawn = {R: kspace_mask(opts.mask_type, (H, W), R, center=opts.center_lines, seed=seed) for R in opts.accel}
        acs = tuple(drawn[opts.accel[0]].acs)
    else:
        acs = None
    return drawn, acs, resolve_calib(opts, acs, (H, W), path if s.mask is not None else None)


def _compress(s: _Slice, n: int, calib: int, path) -> None:
    """Step 3: ``k <- U^H k`` with ``U`` the leading ``n`` left singular vectors of the calibration block;
    true maps ``U^H S``, corner covariance ``U^H Psi U``."""
    C = s.k.shape[0]
    if n > C:
        raise ConfigError(f"--coils {n} is more than the {C} coils of the input", path)
    s.k, U = coil_compress(s.k, n, (calib, calib))
    s.k = s.k * s.mask if s.mask is not None else s.k
    if s.S_true is not None:
        s.S_true = apply_coil_matrix(U.conj().T, s.S_true)
    if s.corner_cov is not None:
        s.corner_cov = U.conj().T @ s.corner_cov @ U


def _maps(s: _Slice, opts: PrepOptions, single: bool, drawn: dict, calib: int) -> np.ndarray:
    """Step 5: the maps ``(C, H, W)`` from measured samples only (every sample measured in every target's
    mask for :data:`~ambient_mri.coils.MEASURED_MAPS`, so no file sees more), the true maps, or ones."""
    k = s.k
    if single:
        return np.ones_like(k)
    if s.S_true is not None:
        return s.S_true.astype(np.complex64)
    if opts.maps in MEASURED_MAPS:
        H, W = k.shape[-2:]
        meas = s.mask if s.mask is not None else _common_mask([sm.mask for sm in drawn.values()], (H, W))
        meas = np.broadcast_to(meas, (H, W))
        return estimate_maps((k * meas)[None], calib, opts.maps, mask=meas[None, None])[0]
    return estimate_maps(acs_kspace(k, (calib, calib))[None], calib, opts.maps)[0]


def _common_mask(masks: list, shape: tuple[int, int]) -> np.ndarray:
    """The samples measured by every mask in ``masks`` (all-True for none: fully sampled data)."""
    out = np.ones(shape, dtype=bool)
    for m in masks:
        out = out & np.broadcast_to(np.asarray(m, dtype=bool), shape)
    return out


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
    opts = options or PrepOptions()
    s = _read_slice(kspace, mask, opts, path)
    C = s.k.shape[0]
    single = C == 1 if single_coil is None else bool(single_coil)
    notes = []
    k_raw = s.k  # the whitening matrix of true maps is fitted from k before and after
    _prewhiten(s, whiten, notes, path)
    if noise_corner and not s.whitened and noise_sigma is None:
        s.corner_cov = corner_noise_covariance(s.k)
    if opts.maps == "true" and not single:
        s.S_true = _checked_true_maps(true_maps, s.k.shape, path)
        if s.whitened:
            s.S_true = apply_coil_matrix(coil_matrix(k_raw, s.k), s.S_true)
    if opts.crop is not None:
        _crop(s, tuple(opts.crop))
    drawn, acs, calib = _sampling(s, opts, seed, path)
    if opts.coils is not None and opts.coils != C:
        _compress(s, opts.coils, calib, path)
    maps = _maps(s, opts, single, drawn, calib)

    # 6. norm and noise level, 7. reference (fully sampled input only) and the stored arrays
    norm = acs_norm(s.k, calib)
    if not (np.isfinite(norm) and norm > 0):
        raise DataError(f"the {calib}x{calib} calibration block is empty (norm {norm:g})", path)
    k = (s.k / norm).astype(np.complex64)
    noise_std, noise_source = prepared_noise_std(norm, s.whitened, noise_sigma, s.corner_cov)
    need_ref = s.mask is None and (opts.split != "train" or opts.domain == "image")
    ref = reference_image(k, maps, opts.reference, opts.cg_iters) if need_ref else None
    H, W = k.shape[-2:]
    common = {"norm": np.float32(norm), "calib": calib, "whitened": s.whitened, "warnings": notes,
              "shape": (H, W), "noise_std": np.float32(noise_std), "noise_source": noise_source,
              "maps_kind": "none (single coil)" if single else "true" if s.S_true is not None else opts.maps}
    if opts.domain == "image":
        return {None: _image_domain_slice(common, ref, opts, seed)}
    out = {}
    for R in opts.accel:
        if s.mask is None:
            sm = drawn[R]
            m, mask_seed, kind, nominal = sm.mask, sm.seed, sm.kind, float(R)
        else:
            m, mask_seed, kind = s.mask, -1, "input"
            nominal = float(input_accel) if input_accel else float(m.size / m.sum())
        d = dict(common, kspace=(k * m).astype(np.complex64), mask=m.astype(bool), maps=maps, mask_seed=int(mask_seed),
                 mask_kind=kind, accel=nominal, accel_actual=acceleration(m),
                 acs=(H, acs[1]) if acs[0] == 1 else tuple(acs))
        if ref is not None and opts.split != "train":
            d["reference"] = ref
            if opts.reference == "cg-sense":
                d["forward_residual"], d["noise_residual"] = forward_residual(d["kspace"], maps, d["mask"], ref,
                                                                             noise_std)
        out[R] = d
    return out


def _image_domain_slice(common: dict, ref: np.ndarray, opts: PrepOptions, seed: int) -> dict:
    """``--domain image``: ``image = M x`` with ``M`` a box/pixel mask drawn with ``seed``, ``x`` the reference."""
    m = image_mask(opts.corruption, common["shape"], float(opts.level), seed=seed)
    d = dict(common, image=(m * ref).astype(np.complex64), mask=m, mask_seed=seed, mask_kind=opts.corruption,
             accel=1.0 / (1.0 - float(opts.level)), accel_actual=acceleration(m), acs=(0, 0))
    d.pop("noise_std")  # a k-space quantity: image-domain files do not carry it
    if opts.split != "train":
        d["reference"] = ref
    return d


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
