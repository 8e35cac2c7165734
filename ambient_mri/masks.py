"""Sampling masks, image-domain corruption masks, and the ambient *further* corruption ``M~ <= M``.

Conventions: k-space masks are boolean numpy arrays whose last two axes are ``(1, W)`` for 1-D
Cartesian line masks (phase-encode lines = columns) or ``(H, W)`` for 2-D masks; they broadcast
against k-space ``(..., H, W)``. The fully sampled calibration (ACS) block is centred with fastMRI's
convention: ``n`` lines start at ``(N - n + 1) // 2``. Every mask is a pure function of its seed.

Prep-time masks are drawn with numpy (:class:`SamplingMask`); training-time further masks are drawn
batched on the training device with torch (:func:`further_kspace_mask`, :func:`further_image_mask`).
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError

LINE_KINDS = ("random", "adps", "equispaced", "gaussian")
KSPACE_KINDS = LINE_KINDS + ("poisson", "sigpy-poisson", "random-2d")
IMAGE_KINDS = ("pixels", "box")


@dataclass(frozen=True)
class SamplingMask:
    """A drawn mask: ``mask`` (bool, ``(1, W)`` or ``(H, W)``), centred ``acs`` block ``(h, w)``, its seed."""

    mask: np.ndarray
    acs: tuple[int, int]
    seed: int
    kind: str

    def __post_init__(self):
        if not np.asarray(self.mask).any():
            raise ConfigError(f"the {self.kind} mask of shape {np.shape(self.mask)} samples nothing (seed {self.seed})")

    @property
    def acceleration(self) -> float:
        """Actual acceleration: number of grid points over number sampled."""
        return acceleration(self.mask)

    def full(self, height: int) -> np.ndarray:
        """The mask broadcast to ``(height, W)``."""
        return np.broadcast_to(self.mask, (height, self.mask.shape[-1])).copy()


def acceleration(mask) -> float:
    """``size / count`` over the last two axes (averaged over any leading axes); ``inf`` if empty."""
    m = np.asarray(mask)
    n = m.reshape(-1, m.shape[-2] * m.shape[-1]).sum(axis=1).mean()
    return float(m.shape[-2] * m.shape[-1] / n) if n > 0 else math.inf


def center_slice(n_total: int, n_center: int) -> slice:
    """Indices of a centred block of ``n_center`` out of ``n_total`` (fastMRI: start ``(N - n + 1) // 2``)."""
    start = (n_total - n_center + 1) // 2
    return slice(start, start + n_center)


def acs_region(shape: tuple[int, int], acs: tuple[int, int]) -> np.ndarray:
    """Boolean ``shape`` array that is True on the centred ``acs`` block."""
    out = np.zeros(shape, dtype=bool)
    out[center_slice(shape[0], min(acs[0], shape[0])), center_slice(shape[1], min(acs[1], shape[1]))] = True
    return out


def _check(accel: float, n: int, n_center: int) -> None:
    if not (accel >= 1 and math.isfinite(accel)):
        raise ConfigError(f"acceleration must be a finite number >= 1 (got {accel})")
    if n < 1:
        raise ConfigError(f"cannot draw a mask for an empty matrix ({n} samples)")
    if accel > n:
        raise ConfigError(f"acceleration {accel:g} keeps less than one of the {n} samples")
    if not 0 <= n_center <= n:
        raise ConfigError(f"calibration size {n_center} does not fit a matrix of {n}")


def _check_seed(seed) -> int:
    """Seeds are integers in [0, 2^32) (what numpy's ``RandomState`` accepts)."""
    if not (isinstance(seed, (int, np.integer)) and 0 <= seed < 2**32):
        raise ConfigError(f"mask seed must be an integer in [0, 2^32) (got {seed!r})")
    return int(seed)


def _check_shape(shape) -> tuple[int, int]:
    """A 2-D matrix with both sides >= 1."""
    if len(shape) != 2 or not all(isinstance(n, (int, np.integer)) and n >= 1 for n in shape):
        raise ConfigError(f"mask shape must be two positive integers (got {tuple(shape)})")
    return int(shape[0]), int(shape[1])


def _check_fraction(name: str, value, upper_open: bool = True) -> None:
    ok = value is not None and math.isfinite(value) and (0 <= value < 1 if upper_open else 0 <= value <= 1)
    if not ok:
        raise ConfigError(f"{name} must be in [0, 1{')' if upper_open else ']'} (got {value})")


def _n_center(W: int, center_fraction: float | None, center_lines: int | None) -> int:
    if center_lines is not None:
        return int(center_lines)
    if center_fraction is not None:
        _check_fraction("center_fraction", center_fraction, upper_open=False)
    return int(round(W * (0.08 if center_fraction is None else center_fraction)))


# ----------------------------------------------------------------------------------------------
# 1-D Cartesian line masks, shape (1, W)


def random_lines(W: int, accel: float, *, center_fraction: float | None = None, center_lines: int | None = None,
                 seed: int = 0) -> SamplingMask:
    """fastMRI ``RandomMaskFunc``: ACS block of ``round(W * center_fraction)`` lines; every other line is
    kept independently with ``p = (W / R - n_acs) / (W - n_acs)`` (so ``W / R`` lines on average).

    With one centre fraction and acceleration, the same seed gives fastMRI's mask bit for bit.
    """
    n_acs = _n_center(W, center_fraction, center_lines)
    _check(accel, W, n_acs)
    rng = np.random.RandomState(_check_seed(seed))
    rng.randint(1)  # fastMRI first draws which (centre fraction, acceleration) pair to use
    prob = (W / accel - n_acs) / (W - n_acs) if W > n_acs else 0.0
    m = rng.uniform(size=W) < prob
    m[center_slice(W, n_acs)] = True
    return SamplingMask(m[None], (1, n_acs), seed, "random")


def adps_lines(W: int, accel: float, *, center_lines: int = 20, seed: int = 0) -> SamplingMask:
    """A-DPS rule: exactly ``floor(W / R)`` lines, ``center_lines`` of them the central ACS block, the rest
    drawn uniformly without replacement from the outer lines."""
    _check(accel, W, center_lines)
    _check_seed(seed)
    m = np.zeros(W, dtype=bool)
    m[center_slice(W, center_lines)] = True
    outer = np.flatnonzero(~m)
    n_rand = max(0, min(int(math.floor(W / accel)) - center_lines, outer.size))
    m[np.random.default_rng(seed).choice(outer, n_rand, replace=False)] = True
    return SamplingMask(m[None], (1, center_lines), seed, "adps")


def equispaced_spacing(W: int, accel: float, n_acs: int) -> float:
    """fastMRI's adjusted acceleration ``a = R (W - n_acs) / (W - n_acs R)``: outer lines one every ``a``
    columns add ``(W - n_acs) / a = W / R - n_acs`` lines to the ACS block, ``W / R`` in all (needs ``n_acs R < W``)."""
    return accel * (W - n_acs) / (W - n_acs * accel)


def equispaced_lines(W: int, accel: float, *, center_fraction: float | None = None,
                     center_lines: int | None = None, seed: int = 0, offset: int | None = None) -> SamplingMask:
    """fastMRI 0.3.0 ``EquispacedMaskFractionFunc([cf], [R])((.., W, 1), offset, seed)``, as a ``(1, W)`` mask.

    The ACS block of ``n_acs = round(W cf)`` centred lines (or ``center_lines``), plus the columns
    ``around(offset + k a)``, ``k = 0, 1, ...`` while ``offset + k a < W - 1``, with ``a`` the adjusted
    acceleration (:func:`equispaced_spacing`). Without ``offset`` it is drawn uniformly from
    ``[0, round(a))`` by ``RandomState(seed)``, after the one draw fastMRI spends on choosing among its
    (here single) accelerations. When ``n_acs R >= W`` the ACS block alone reaches ``R`` (fastMRI fails there).
    """
    n_acs = _n_center(W, center_fraction, center_lines)
    _check(accel, W, n_acs)
    seed = _check_seed(seed)
    m = np.zeros(W, dtype=bool)
    if n_acs * accel < W:
        a = equispaced_spacing(W, accel, n_acs)
        if offset is None:
            rng = np.random.RandomState(seed)
            rng.randint(1)  # fastMRI's choice of (center_fraction, acceleration)
            offset = rng.randint(0, high=round(float(a)))
        elif not (isinstance(offset, (int, np.integer)) and 0 <= offset < W):
            raise ConfigError(f"equispaced offset must be an integer in [0, {W}) (got {offset!r})")
        m[np.around(np.arange(offset, W - 1, a)).astype(np.int64)] = True
    m[center_slice(W, n_acs)] = True
    return SamplingMask(m[None], (1, n_acs), seed, "equispaced")


def gaussian_lines(W: int, accel: float, *, center_lines: int = 20, std_fraction: float = 0.25,
                   seed: int = 0) -> SamplingMask:
    """Variable-density lines: exactly ``floor(W / R)`` lines, the ACS block plus lines drawn without
    replacement with probability ``exp(-k^2 / (2 (std_fraction W)^2))`` of their distance ``k`` to the centre."""
    _check(accel, W, center_lines)
    _check_seed(seed)
    if not (math.isfinite(std_fraction) and std_fraction > 0):
        raise ConfigError(f"std_fraction must be a positive number (got {std_fraction})")
    m = np.zeros(W, dtype=bool)
    m[center_slice(W, center_lines)] = True
    outer = np.flatnonzero(~m)
    k = outer - W // 2
    # log-density, shifted so its largest value is 0: a narrow profile cannot underflow to all zeros
    logp = -(k.astype(float) ** 2) / (2 * (std_fraction * W) ** 2)
    p = np.exp(logp - logp.max()) if logp.size else logp
    p = np.maximum(p, np.finfo(float).tiny)  # every outer line stays drawable (numpy needs enough p > 0)
    n_rand = max(0, min(int(math.floor(W / accel)) - center_lines, outer.size))
    if n_rand > 0:  # (no outer line left to draw: p would be empty)
        m[np.random.default_rng(seed).choice(outer, n_rand, replace=False, p=p / p.sum())] = True
    return SamplingMask(m[None], (1, center_lines), seed, "gaussian")


# ----------------------------------------------------------------------------------------------
# 2-D masks, shape (H, W)


def poisson_disc(shape: tuple[int, int], accel: float, *, calib: tuple[int, int] = (8, 8), seed: int = 0,
                 density_slope: float = 2.0) -> SamplingMask:
    """2-D variable-density Poisson-disc mask with exactly ``floor(H W / R)`` samples.

    Dart throwing in a seeded random order: a point is accepted when no accepted point lies closer
    than ``s (1 + density_slope * r)``, ``r`` its normalised distance to the centre (denser near DC).
    The scale ``s`` is found by bisection (a fixed number of passes, each ``O(H W)``: bounded time on any
    seed, unlike rejection loops), then points are added or removed at random to hit the count exactly.
    The ``calib`` block is always fully sampled.
    """
    H, W, target, cal, r = _grid_2d(shape, accel, calib, seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(H * W).astype(np.int64)
    grow = 1 + density_slope * r
    lo, hi = 0.0, min(3.0 * math.sqrt(accel), math.hypot(H, W))  # nearest-neighbour spacing ~ sqrt(R)
    best = None
    for _ in range(16):
        s = 0.5 * (lo + hi)
        m = _dart_throw(order, grow * s, H, W, cal)
        if m.sum() >= target:
            best, lo = m, s
        else:
            hi = s
    m = _hit_count(best if best is not None else cal.copy(), cal, target, rng)
    return SamplingMask(m.reshape(H, W), tuple(calib), seed, "poisson")


def _grid_2d(shape, accel: float, calib, seed):
    """Checked ``(H, W)``, the sample count ``floor(H W / R)``, the flat calibration block and the flat
    normalised distance to the centre ``r`` in [0, 1] (the corners are 1) that the 2-D densities use."""
    H, W = _check_shape(shape)
    if not all(0 <= c <= n for c, n in zip(calib, (H, W))):
        raise ConfigError(f"calibration block {tuple(calib)} does not fit a {H} x {W} matrix")
    _check(accel, H * W, calib[0] * calib[1])
    _check_seed(seed)
    yy, xx = np.meshgrid(np.arange(H) - H // 2, np.arange(W) - W // 2, indexing="ij")
    r = np.sqrt((yy / max(H / 2, 1)) ** 2 + (xx / max(W / 2, 1)) ** 2) / math.sqrt(2)
    return H, W, int(math.floor(H * W / accel)), acs_region((H, W), calib).ravel(), r.ravel()


def _hit_count(m: np.ndarray, cal: np.ndarray, target: int, rng) -> np.ndarray:
    """Remove (never from the calibration block, which wins when it alone exceeds ``target``) or add points
    of the flat mask ``m`` at random until it holds ``target``; modifies and returns ``m``."""
    if m.sum() > target:
        free = np.flatnonzero(m & ~cal)
        m[rng.choice(free, min(m.sum() - target, free.size), replace=False)] = False
    elif m.sum() < target:
        m[rng.choice(np.flatnonzero(~m), target - m.sum(), replace=False)] = True
    return m


def random_points(shape: tuple[int, int], accel: float, *, calib: tuple[int, int] = (8, 8), seed: int = 0,
                  density_slope: float = 2.0) -> SamplingMask:
    """2-D variable-density *random* mask: every point drawn independently, ``floor(H W / R)`` samples.

    Point ``k`` outside the ``calib`` block is kept with probability ``p(k) = min(1, c / (1 + density_slope r)^2)``
    (``r`` as in :func:`poisson_disc`, whose spacing law gives the same density), ``c`` set by bisection so that
    the expected count is the target; the few points the draw misses or exceeds it by are then added or removed
    at random. Unlike a Poisson disc, a point's neighbours say nothing about it, so points that the ambient further
    mask removes look like points never acquired (the identifiability condition, docs/theory.md).
    """
    H, W, target, cal, r = _grid_2d(shape, accel, calib, seed)
    weight = (1 + density_slope * r) ** -2.0
    need = target - cal.sum()
    lo, hi = 0.0, 1.0 / weight.min()
    for _ in range(60):  # expected count sum(min(1, c w)) over the outer points is increasing in c
        c = 0.5 * (lo + hi)
        lo, hi = (c, hi) if np.minimum(1.0, c * weight[~cal]).sum() < need else (lo, c)
    rng = np.random.default_rng(seed)
    m = _hit_count(cal | (rng.uniform(size=H * W) < np.minimum(1.0, hi * weight)), cal, target, rng)
    return SamplingMask(m.reshape(H, W), tuple(calib), seed, "random-2d")


def _dart_throw(order, radius, H, W, calib):
    return _dart_throw_impl()(order, radius, H, W, calib)


_DART = None


def _dart_throw_impl():
    """Compile (once) the numba dart-throwing kernel; pure Python fallback if numba is missing."""
    global _DART
    if _DART is not None:
        return _DART

    def kernel(order, radius, H, W, calib):
        # a candidate is accepted when no accepted point lies at a distance < its radius; that test scans
        # the candidate's window of the grid or the list of accepted points, whichever is shorter, so that a
        # pass costs O(H W min(window, accepted)) even for very sparse masks (large R, large radii)
        m = calib.copy()
        ay = np.empty(m.size, np.int64)
        ax = np.empty(m.size, np.int64)
        k = 0
        for idx in range(m.size):
            if m[idx]:
                ay[k], ax[k] = idx // W, idx % W
                k += 1
        for idx in order:
            if m[idx]:
                continue
            y, x = idx // W, idx % W
            rad = radius[idx]
            r2 = rad * rad
            ri = int(rad)
            y0, y1 = max(y - ri, 0), min(y + ri, H - 1)
            x0, x1 = max(x - ri, 0), min(x + ri, W - 1)
            ok = True
            if k < (y1 - y0 + 1) * (x1 - x0 + 1):
                for j in range(k):
                    dy, dx = ay[j] - y, ax[j] - x
                    if dy * dy + dx * dx < r2:
                        ok = False
                        break
            else:
                for yy in range(y0, y1 + 1):
                    dy = yy - y
                    for xx in range(x0, x1 + 1):
                        dx = xx - x
                        if dy * dy + dx * dx < r2 and m[yy * W + xx]:
                            ok = False
                            break
                    if not ok:
                        break
            if ok:
                m[idx] = True
                ay[k], ax[k] = y, x
                k += 1
        return m

    try:
        import numba

        _DART = numba.njit(cache=False)(kernel)
    except ImportError:  # pragma: no cover
        _DART = kernel
    return _DART


class _Stalled(Exception):
    """sigpy's slope bisection stopped making progress (see :func:`_bounded_steps`)."""


@contextlib.contextmanager
def _bounded_steps(fn, max_lines: int):
    """Stop the Python function ``fn`` (with :class:`_Stalled`) once it has run ``max_lines`` lines.

    ``sigpy.mri.poisson`` bisects its density slope while ``slope_min < slope_max``; when no slope reaches
    the acceleration within its tolerance and the midpoint rounds onto an end point, that loop never ends
    (e.g. shape (37, 30), R = 57, calib 3, seed 3620467). A converging call runs a few hundred lines; a
    local line tracer on ``fn``'s frame alone turns the endless case into an exception (the thread's
    previous tracer is put back afterwards)."""
    code = fn.__code__
    count = [0]

    def local(frame, event, arg):
        if event == "line":
            count[0] += 1
            if count[0] > max_lines:
                raise _Stalled(f"{fn.__module__}.{fn.__name__} stalled after {max_lines} lines")
        return local

    def calls(frame, event, arg):
        return local if frame.f_code is code else None

    old = sys.gettrace()
    sys.settrace(calls)
    try:
        yield
    finally:
        sys.settrace(old)


def sigpy_poisson(shape: tuple[int, int], accel: float, *, calib: tuple[int, int] = (8, 8), seed: int = 0,
                  attempts: int = 10) -> SamplingMask:
    """``sigpy.mri.poisson`` with a deterministic retry: when sigpy raises for a seed (it does on small
    matrices), seeds ``seed + 1000 k`` are tried in turn; the seed that worked is recorded."""
    import sigpy.mri

    shape = _check_shape(shape)
    if not all(0 <= c <= n for c, n in zip(calib, shape)):
        raise ConfigError(f"calibration block {tuple(calib)} does not fit a {shape[0]} x {shape[1]} matrix")
    _check(accel, shape[0] * shape[1], calib[0] * calib[1])
    _check_seed(seed)
    last = None
    for k in range(attempts):
        s = seed + 1000 * k
        try:
            with _bounded_steps(sigpy.mri.poisson, 2000):
                m = sigpy.mri.poisson(tuple(shape), accel, calib=tuple(calib), dtype=np.float32, seed=s)
        except (ValueError, _Stalled) as e:  # sigpy: "Cannot generate mask to satisfy accel", or a stall
            last = e
            continue
        m = np.abs(m) > 0
        m |= acs_region(tuple(shape), calib)
        return SamplingMask(m, tuple(calib), s, "sigpy-poisson")
    raise ConfigError(f"sigpy.mri.poisson found no {shape} mask at R={accel} in {attempts} seeds ({last})")


def kspace_mask(kind: str, shape: tuple[int, int], accel: float, *, center: int | None = None,
                center_fraction: float | None = None, seed: int = 0) -> SamplingMask:
    """Draw a k-space mask of ``kind`` (one of :data:`KSPACE_KINDS`) for a ``(H, W)`` matrix.

    ``center``: number of ACS lines (line masks) or the side of the square calibration block (2-D);
    defaults: ``W / 16`` lines for ``adps``/``gaussian`` (A-DPS's 20 of 320), fastMRI's 8 % for ``random``/
    ``equispaced``, 8 x 8 for the 2-D masks.
    """
    H, W = shape
    if kind == "random":
        return random_lines(W, accel, center_fraction=center_fraction, center_lines=center, seed=seed)
    if kind == "equispaced":
        return equispaced_lines(W, accel, center_fraction=center_fraction, center_lines=center, seed=seed)
    if kind in ("adps", "gaussian"):
        n = center if center is not None else max(2, round(W / 16))
        fn = adps_lines if kind == "adps" else gaussian_lines
        return fn(W, accel, center_lines=n, seed=seed)
    draw_2d = {"poisson": poisson_disc, "sigpy-poisson": sigpy_poisson, "random-2d": random_points}.get(kind)
    if draw_2d is not None:
        c = center if center is not None else 8
        return draw_2d((H, W), accel, calib=(min(c, H), min(c, W)), seed=seed)
    raise ConfigError(f"unknown mask type {kind!r} (choose from {', '.join(KSPACE_KINDS)})")


# ----------------------------------------------------------------------------------------------
# Image-domain corruption masks (the seed paper's inpainting setting), shape (H, W); True = observed


def random_pixels(shape: tuple[int, int], p: float, *, seed: int = 0) -> np.ndarray:
    """Each pixel erased independently with probability ``p`` (kept with ``1 - p``)."""
    _check_fraction("erasure probability", p)
    shape = _check_shape(shape)
    return np.random.default_rng(_check_seed(seed)).uniform(size=shape) >= p


def random_box(shape: tuple[int, int], area_fraction: float, *, seed: int = 0) -> np.ndarray:
    """One square box covering ``area_fraction`` of the image erased at a uniformly random position."""
    _check_fraction("box area fraction", area_fraction)
    H, W = shape = _check_shape(shape)
    side = int(round(math.sqrt(area_fraction * H * W)))
    bh, bw = min(side, H), min(side, W)
    rng = np.random.default_rng(_check_seed(seed))
    top, left = rng.integers(0, H - bh + 1), rng.integers(0, W - bw + 1)
    m = np.ones(shape, dtype=bool)
    m[top : top + bh, left : left + bw] = False
    return m


def image_mask(kind: str, shape: tuple[int, int], level: float, *, seed: int = 0) -> np.ndarray:
    """``pixels`` (``level`` = erasure probability) or ``box`` (``level`` = erased area fraction)."""
    if kind == "pixels":
        return random_pixels(shape, level, seed=seed)
    if kind == "box":
        return random_box(shape, level, seed=seed)
    raise ConfigError(f"unknown image corruption {kind!r} (choose from {', '.join(IMAGE_KINDS)})")


# ----------------------------------------------------------------------------------------------
# Further corruption M~ <= M (training time, batched, torch)


def further_count(n_grid: int, further_accel: float) -> int:
    """Samples kept by the further mask: ``floor(n_grid / R~)`` (W = 320, R~ = 5 -> 64 lines)."""
    return int(math.floor(n_grid / further_accel))


def further_kspace_mask(mask: torch.Tensor, acs: tuple[int, int], *, further_accel: float | None = None,
                        delta: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``M~ <= M`` by switching off sampled, non-ACS lines (or points, for 2-D masks).

    ``mask``: ``(B, 1, W)`` line masks or ``(B, H, W)`` 2-D masks (bool or 0/1). Exactly one of:

    * ``further_accel = R~``: keep ``floor(N / R~)`` samples (``N = W`` lines or ``H W`` points), i.e.
      remove ``count(M) - floor(N / R~)``; the A-DPS schedule (W = 320: R 4 -> 80 lines, 16 removed, 5.00);
    * ``delta``: remove ``round(delta * n_outer)`` of the ``n_outer`` sampled non-ACS samples.

    At least one sample is removed (while any non-ACS sample remains), so ``M~ != M``. The ACS block
    is never touched. Returns a mask of ``mask``'s shape and dtype.
    """
    if (further_accel is None) == (delta is None):
        raise ConfigError("give exactly one of further_accel and delta")
    if further_accel is not None and not (math.isfinite(further_accel) and further_accel >= 1):
        raise ConfigError(f"further_accel must be a finite number >= 1 (got {further_accel})")
    if delta is not None:
        _check_fraction("delta", delta, upper_open=False)
    if mask.dim() != 3:
        raise ConfigError(f"mask must be (B, 1, W) or (B, H, W), got shape {tuple(mask.shape)}")
    B, h, W = mask.shape
    m = mask.reshape(B, h * W) > 0
    acs_block = torch.from_numpy(acs_region((h, W), acs).ravel()).to(mask.device)
    outer = m & ~acs_block
    n_outer = outer.sum(1)
    if further_accel is not None:
        remove = m.sum(1) - further_count(h * W, further_accel)
    else:
        remove = torch.round(delta * n_outer.float()).long()
    remove = torch.minimum(remove.clamp_min(1), n_outer)
    score = torch.rand(m.shape, generator=generator, device=mask.device)
    score = torch.where(outer, score, torch.full_like(score, 2.0))
    rank = torch.argsort(torch.argsort(score, dim=1), dim=1)
    drop = rank < remove[:, None]
    return (m & ~drop).reshape(mask.shape).to(mask.dtype)


def further_image_mask(mask: torch.Tensor, kind: str, level: float,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Image-domain further corruption, ``mask`` ``(B, H, W)``: ``pixels`` erases a further fraction
    ``level`` (delta) of the surviving pixels; ``box`` erases a second random box of area fraction ``level``."""
    if mask.dim() != 3:
        raise ConfigError(f"mask must be (B, H, W), got shape {tuple(mask.shape)}")
    _check_fraction(f"further {kind} level", level)
    B, H, W = mask.shape
    m = mask > 0
    if kind == "pixels":
        keep = torch.rand(m.shape, generator=generator, device=mask.device) >= level
        return (m & keep).to(mask.dtype)
    if kind == "box":
        side = int(round(math.sqrt(level * H * W)))
        bh, bw = min(side, H), min(side, W)
        top = torch.randint(0, H - bh + 1, (B, 1, 1), generator=generator, device=mask.device)
        left = torch.randint(0, W - bw + 1, (B, 1, 1), generator=generator, device=mask.device)
        yy = torch.arange(H, device=mask.device)[None, :, None]
        xx = torch.arange(W, device=mask.device)[None, None, :]
        box = (yy >= top) & (yy < top + bh) & (xx >= left) & (xx < left + bw)
        return (m & ~box).to(mask.dtype)
    raise ConfigError(f"unknown image corruption {kind!r} (choose from {', '.join(IMAGE_KINDS)})")
