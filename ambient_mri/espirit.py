"""Batched ESPIRiT coil sensitivities in torch (one map set, like BART ``ecalib -m 1`` and sigpy's
``EspiritCalib``), from the centred calibration (ACS) block of k-space only.

For each slice, with ``X`` the ``C x h x w`` calibration block and ``k = kernel_width``:

1. calibration matrix ``A``: one row per ``k x k`` patch of ``X`` (all coils), ``N x C k^2``;
2. kernels: the right singular vectors ``v_j`` of ``A`` with ``s_j > thresh * s_max``, i.e. the
   eigenvectors of ``A^H A`` with ``s_j^2 > thresh^2 s_max^2`` (one batched ``eigh``);
3. image-space matrix at every pixel ``x``: ``AHA(x) = (1 / k^2) sum_j a_j(x) a_j(x)^H`` with
   ``a_j = N_pix^(1/2) ifft2c(zero-pad(v_j))`` (``C``-vector per pixel). Summing over ``j`` first,
   ``AHA(x)_{cd} = (1 / k^2) sum_D G_{cd}(D) exp(2 pi i D . (x - x_0) / N)`` where
   ``G_{cd}(D) = sum_{r - r' = D} P_{(c, r), (d, r')}`` and ``P = sum_j conj(v_j) v_j^T``: a zero-padded
   DFT of the ``(2k - 1)^2`` autocorrelation of the kernels, evaluated exactly with two small DFT
   matrices (so it can be done a few rows at a time);
4. maps: the top eigenvector of ``AHA(x)`` by ``max_iter`` power iterations from the all-ones vector
   (sigpy's ``PowerMethod``), computed as ``AHA^max_iter 1 / ||AHA^max_iter 1||`` by repeated
   squaring (the same vector, ~log2(max_iter) per-pixel matrix products instead of ``max_iter``
   matrix-vector products), eigenvalue ``||AHA x_{n-1}||``;
5. ``S(x) *= conj(S_0(x)) / |S_0(x)|`` (first coil real, non-negative) and ``S(x) = 0`` where the
   eigenvalue is ``<= crop``.

Shapes: k-space ``(B, C, H, W)`` (or ``(C, H, W)``), maps the same, complex64, on k-space's device.
"""

from __future__ import annotations

import math
import numbers

import torch

from .errors import ConfigError, DataError
from .masks import center_slice

METHODS = ("power", "eigh")
# bytes of per-pixel C x C matrices handled at once (the image-space step is chunked over rows)
CHUNK_BYTES = {"cpu": 1 << 21, "cuda": 1 << 29}
# bytes of calibration matrices handled at once (slices are grouped)
CALIB_BYTES = 1 << 27


def calib_shape(calib, shape: tuple[int, int]) -> tuple[int, int]:
    """``calib`` (int = square, or ``(h, w)``) checked against the matrix ``shape = (H, W)``."""
    hw = (calib, calib) if isinstance(calib, numbers.Integral) else tuple(calib)
    if len(hw) != 2:
        raise ConfigError(f"calibration block must be an int or (h, w), got {calib!r}")
    h, w = int(hw[0]), int(hw[1])
    H, W = shape
    if not (1 <= h <= H and 1 <= w <= W):
        raise ConfigError(f"calibration block {h}x{w} does not fit the {H}x{W} matrix")
    return h, w


def default_kernel_width(calib: tuple[int, int]) -> int:
    """``min(6, (min(h, w) + 1) // 3)``, at least 2: 3 for an 8 x 8 block, 5 for 16, 6 from 17 on.

    A ``k x k`` kernel on an ``n x n`` block gives ``(n - k + 1)^2`` calibration rows for ``C k^2``
    unknowns; with ``k = n // 2`` (the old rule) an 8 x 8 block gave 25 rows for 128 columns (8 coils) and
    maps 2-5 dB worse in L1-wavelet reconstructions than ``k = 3`` (measured: ``docs/espirit.md``)."""
    return max(2, min(6, (min(calib) + 1) // 3))


def default_thresh(kernel_width: int) -> float:
    """Singular-value threshold: 0.05 for kernels of at most 3 x 3, else BART's 0.02 (measured best at
    8 x 8 / 3 x 3 and at 16-24 / 5-6 x 5-6 calibration, ``docs/espirit.md``)."""
    return 0.05 if kernel_width <= 3 else 0.02


@torch.no_grad()
def espirit_maps_torch(kspace: torch.Tensor, calib, *, kernel_width: int | None = None, thresh: float | None = None,
                       crop: float = 0.0, max_iter: int = 100, method: str = "power") -> torch.Tensor:
    """ESPIRiT maps ``(B, C, H, W)`` complex64 from k-space ``(B, C, H, W)`` (or ``(C, H, W)``), batched.

    Only the centred ``calib`` block of k-space is read (fastMRI's centring, as
    :func:`ambient_mri.masks.acs_region`). ``calib``: int (square, as sigpy) or ``(h, w)`` (a rectangle,
    e.g. ``(H, 20)`` for the 20 ACS lines of a 1-D line mask). ``kernel_width``: side of the square
    kernel, default :func:`default_kernel_width` (``min(6, (min(h, w) + 1) // 3)``, at least 2). ``thresh``:
    keep singular vectors with ``s > thresh * s_max``, default :func:`default_thresh`. ``crop``: zero the maps where the top eigenvalue is ``<= crop`` (0 keeps
    them everywhere, like ``ecalib -c0``). ``max_iter``: power iterations (sigpy's semantics).
    ``method``: ``"power"`` (sigpy's power iteration, evaluated by repeated squaring) or ``"eigh"``
    (exact top eigenvector by ``torch.linalg.eigh``; differs from sigpy only where 100 power iterations
    have not converged, i.e. outside the object).
    """
    if method not in METHODS:
        raise ConfigError(f"unknown ESPIRiT eigen-solver {method!r} (choose from {', '.join(METHODS)})")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ConfigError(f"max_iter must be a positive integer (got {max_iter!r})")
    k = torch.as_tensor(kspace)
    single = k.ndim == 3
    if single:
        k = k[None]
    if k.ndim != 4:
        raise DataError(f"k-space must be (B, C, H, W) or (C, H, W), got shape {tuple(kspace.shape)}")
    B, C, H, W = k.shape
    h, w = calib_shape(calib, (H, W))
    kw = default_kernel_width((h, w)) if kernel_width is None else int(kernel_width)
    thresh = default_thresh(kw) if thresh is None else thresh
    if not 0 <= thresh < 1:
        raise ConfigError(f"thresh must be in [0, 1) (got {thresh})")
    if not 1 <= kw <= min(h, w):
        raise ConfigError(f"kernel width {kw} does not fit the {h}x{w} calibration block "
                          "(for a 1-D line mask pass calib=(H, n_acs))")

    block = k[..., center_slice(H, h), center_slice(W, w)].to(torch.complex64)
    if not torch.isfinite(torch.view_as_real(block)).all():
        raise DataError("the k-space calibration block contains NaN or Inf")
    empty = block.flatten(1).abs().amax(1) == 0
    if empty.any():
        raise DataError(f"the k-space calibration block of slice {int(empty.nonzero()[0])} is all zero")

    G = torch.cat([kernel_autocorrelation(kernel_projector(block[i:i + n], kw, thresh), C, kw)
                   for i, n in _slice_groups(B, block[0].numel() * kw * kw * 8, CALIB_BYTES)])
    maps = image_space_maps(G, (H, W), kw, max_iter=max_iter, method=method, crop=crop)
    return maps[0] if single else maps


def _slice_groups(B: int, bytes_per_slice: int, budget: int):
    """``(start, count)`` groups of slices with about ``budget`` bytes of work each (at least one slice)."""
    n = max(1, budget // max(1, bytes_per_slice))
    return [(i, min(n, B - i)) for i in range(0, B, n)]


def calibration_matrix(block: torch.Tensor, kw: int) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, N, C kw^2)``: one row per ``kw x kw`` patch (sigpy's column order c, ky, kx)."""
    B, C = block.shape[:2]
    patches = block.unfold(2, kw, 1).unfold(3, kw, 1)  # (B, C, ny, nx, kw, kw)
    return patches.permute(0, 2, 3, 1, 4, 5).reshape(B, -1, C * kw * kw)


def kernel_projector(block: torch.Tensor, kw: int, thresh: float) -> torch.Tensor:
    """``P = sum_j conj(v_j) v_j^T`` over the kept right singular vectors ``v_j`` of the calibration
    matrix (``s_j > thresh s_max``), ``(B, C kw^2, C kw^2)`` complex64, from ``eigh(A^H A)`` (complex64
    is ample: the threshold ``thresh^2 = 4e-4`` of ``s_max^2`` is far above float32 rounding)."""
    A = calibration_matrix(block, kw)
    lam, V = torch.linalg.eigh(A.mH @ A)  # (B, M), (B, M, M); ascending eigenvalues s^2
    keep = lam > (thresh**2) * lam[:, -1:]
    Vk = V * keep[:, None, :]
    return Vk.conj() @ Vk.mT


def kernel_autocorrelation(P: torch.Tensor, C: int, kw: int) -> torch.Tensor:
    """``G_{cd}(D) = sum_{r - r' = D} P_{(c, r), (d, r')}`` for offsets ``D`` in ``[-(kw-1), kw-1]^2``:
    ``(B, C k^2, C k^2)`` -> ``(B, C, C, 2 kw - 1, 2 kw - 1)``."""
    B = P.shape[0]
    n = 2 * kw - 1
    r = torch.arange(kw, device=P.device)
    ry, rx = r.repeat_interleave(kw), r.repeat(kw)  # kernel position of each of the kw^2 entries
    dy = ry[:, None] - ry[None, :] + kw - 1
    dx = rx[:, None] - rx[None, :] + kw - 1
    S = torch.zeros(kw**4, n * n, dtype=P.dtype, device=P.device)
    S[torch.arange(kw**4, device=P.device), (dy * n + dx).flatten()] = 1
    Pc = P.reshape(B, C, kw * kw, C, kw * kw).permute(0, 1, 3, 2, 4).reshape(B, C, C, kw**4)
    return (Pc @ S).reshape(B, C, C, n, n)


def _phasors(N: int, kw: int, device) -> torch.Tensor:
    """``E[x, D] = exp(2 pi i D (x - N // 2) / N)``, ``(N, 2 kw - 1)`` complex64."""
    x = torch.arange(N, dtype=torch.float64, device=device) - N // 2
    D = torch.arange(-(kw - 1), kw, dtype=torch.float64, device=device)
    return torch.exp(2j * math.pi * torch.outer(x, D) / N).to(torch.complex64)


def image_space_maps(G: torch.Tensor, shape: tuple[int, int], kw: int, *, max_iter: int = 100,
                     method: str = "power", crop: float = 0.0, chunk_bytes: int | None = None) -> torch.Tensor:
    """Maps ``(B, C, H, W)`` complex64: the top eigenvector of ``AHA(x)`` at every pixel, first coil made
    real non-negative, zero where the eigenvalue is ``<= crop``.

    ``AHA`` (``C x C`` per pixel) is built from ``G (B, C, C, 2 kw - 1, 2 kw - 1)`` for a few slices or a
    few rows at a time, ``chunk_bytes`` of matrices (default :data:`CHUNK_BYTES` for the device)."""
    B, C = G.shape[:2]
    H, W = shape
    dev = G.device
    Ey, Ex = _phasors(H, kw, dev), _phasors(W, kw, dev) / kw**2
    if chunk_bytes is None:
        chunk_bytes = CHUNK_BYTES["cuda" if dev.type == "cuda" else "cpu"]
    row_bytes = W * C * C * 8
    maps = torch.empty(B, C, H, W, dtype=torch.complex64, device=dev)
    if chunk_bytes >= H * row_bytes:  # whole slices at a time
        chunks = [(b, n, 0, H) for b, n in _slice_groups(B, H * row_bytes, chunk_bytes)]
    else:  # a block of rows of one slice at a time
        r = max(1, chunk_bytes // row_bytes)
        chunks = [(b, 1, y, min(r, H - y)) for b in range(B) for y in range(0, H, r)]
    tiny = torch.finfo(torch.float32).tiny
    for b, nb, y, ny in chunks:
        # AHA[b, y, x, c, d] = sum_{i, j} Ey[y, i] G[b, c, d, i, j] Ex[x, j]
        T = torch.einsum("yi,bcdij->bycdj", Ey[y:y + ny], G[b:b + nb])
        AHA = torch.einsum("bycdj,xj->byxcd", T, Ex).reshape(-1, C, C)
        v, lam = _power(AHA, max_iter) if method == "power" else _top_eigh(AHA)
        # phase relative to the first coil, eigenvalue crop
        v = v * (v[:, :1].conj() / v[:, :1].abs().clamp_min(tiny)) * (lam > crop)[:, None]
        maps[b:b + nb, :, y:y + ny] = v.reshape(nb, ny, W, C).permute(0, 3, 1, 2)
    return maps


def _normalise(x: torch.Tensor):
    """``x / ||x||`` over the coil axis of ``x (P, C, 1)`` complex, in place; returns it and ``||x|| (P,)``."""
    xr = torch.view_as_real(x)
    n = xr.square().sum((1, 2, 3)).sqrt_()
    xr.mul_(n.clamp_min(torch.finfo(n.dtype).tiny).reciprocal()[:, None, None, None])
    return x, n


def _trace_normalise(M: torch.Tensor) -> torch.Tensor:
    """``M / tr M`` for ``M (P, C, C)`` Hermitian PSD, in place (real arithmetic on the real view)."""
    tr = M.diagonal(dim1=-2, dim2=-1).real.sum(-1)
    torch.view_as_real(M).mul_(tr.clamp_min(torch.finfo(tr.dtype).tiny).reciprocal()[:, None, None, None])
    return M


def _power(A: torch.Tensor, n: int):
    """sigpy's power method on ``A (P, C, C)`` Hermitian PSD: ``x_0 = 1``, ``x_{t+1} = A x_t / ||A x_t||``,
    eigenvalue ``||A x_{n-1}||``; ``A^(n-1) 1`` is evaluated by repeated squaring of ``A / tr A``.
    Returns ``x_n (P, C)`` and the eigenvalue ``(P,)``."""
    x = torch.ones(A.shape[0], A.shape[1], 1, dtype=A.dtype, device=A.device)
    M = _trace_normalise(A.clone())
    e = n - 1
    while e:
        if e & 1:
            x, _ = _normalise(M @ x)
        e >>= 1
        if e:
            M = _trace_normalise(M @ M)
    x, lam = _normalise(A @ x)
    return x[..., 0], lam


def _top_eigh(A: torch.Tensor):
    lam, V = torch.linalg.eigh(A)
    return V[..., -1], lam[..., -1].clamp_min(0)


# ----------------------------------------------------------------------------------------------
# Calibration from more than the fully sampled block: structured low-rank completion (SAKE)

COMPLETE_BELOW = 16  # calibration blocks smaller than this are grown by completion in `espirit_maps_completed`
COMPLETE_KERNEL = 5
COMPLETE_ITERS = 100  # SAKE converges slowly: 40 -> 100 iterations gained 0.3-0.4 dB on SIAT (docs/espirit.md)
SELECT_ITERS = 40  # hold-out: every candidate rank runs this many iterations, ...
SELECT_KEEP = 2  # ... the best this many per slice continue to COMPLETE_ITERS, the best of those ...
POLISH_ITERS = 20  # ... runs this many more with the held-out samples put back
SUBSPACE_EVERY = 4  # the rank-r subspace is recomputed every this many iterations (eigh dominates the cost)
RANK_FRACTIONS = (0.15, 0.2, 0.25, 0.3)  # candidate ranks, as fractions of C k^2
HOLDOUT = 0.15  # fraction of the measured samples outside the calibration block held out to choose the rank


def completion_size(calib: int, shape: tuple[int, int]) -> int:
    """Side of the block completed for a ``calib x calib`` fully sampled centre: ``max(16, 3 calib)``,
    at most 24 and the matrix (24 for an 8 x 8 centre)."""
    return int(min(shape[0], shape[1], 24, max(COMPLETE_BELOW, 3 * calib)))


def _sake(y: torch.Tensor, m: torch.Tensor, kw: int, ranks: torch.Tensor, iters: int,
          x0: torch.Tensor | None = None) -> torch.Tensor:
    """SAKE iterations on blocks ``y (B, C, n, n)`` measured where ``m (B, 1, n, n)``, rank ``ranks[b]``
    for block ``b``: project the calibration matrix onto its top right singular vectors (``eigh`` of
    ``A^H A``, refreshed every :data:`SUBSPACE_EVERY` iterations), average back over the patches, put the
    measured samples back. Starts from ``x0`` where ``m`` is False (default 0)."""
    B, C, size, _ = y.shape
    n = size - kw + 1
    ones = torch.ones(1, 1, size, size, device=y.device)
    count = torch.nn.functional.fold(torch.nn.functional.unfold(ones, kw), (size, size), kw)
    M = C * kw * kw
    rmax = int(ranks.max())
    keep = (torch.arange(rmax, device=y.device)[None] >= (rmax - ranks)[:, None]).to(y.dtype)  # ascending eigh
    x = y.clone() if x0 is None else torch.where(m, y, x0)
    for it in range(iters):
        A = calibration_matrix(x, kw)  # (B, n^2, C k^2), columns (c, ky, kx)
        if it % SUBSPACE_EVERY == 0:
            _, V = torch.linalg.eigh(A.mH @ A)
            Vr = V[..., M - rmax:] * keep[:, None, :]
        cols = ((A @ Vr) @ Vr.mH).mT  # (B, C k^2, n^2): unfold's layout
        re = torch.nn.functional.fold(cols.real.contiguous(), (size, size), kw)
        im = torch.nn.functional.fold(cols.imag.contiguous(), (size, size), kw)
        x = torch.where(m, y, torch.complex(re, im) / count)
    return x


@torch.no_grad()
def complete_block(kspace: torch.Tensor, mask: torch.Tensor, size: int, *, calib: int = 0,
                   kernel_width: int = COMPLETE_KERNEL, rank: int | None = None, iters: int = COMPLETE_ITERS,
                   fractions=RANK_FRACTIONS, seed: int = 0) -> torch.Tensor:
    """Fill the unmeasured samples of the centred ``size x size`` block of k-space by structured low-rank
    completion (SAKE, Shin et al. 2014): alternate (1) the calibration matrix ``A`` of the block (every
    ``k x k`` patch of all coils, as :func:`calibration_matrix`) projected onto its top ``rank`` right
    singular vectors, (2) back to k-space by averaging each sample over the patches that hold it, (3) the
    measured samples put back. Only measured samples enter (the rest starts at 0).

    ``rank`` ``None``: chosen per slice from ``fractions x C k^2`` by hold-out (the best fixed rank differed
    between a phantom, 30, and brain data, 50-55: docs/espirit.md): :data:`HOLDOUT` of the measured
    samples outside the centred ``calib`` block (seeded) are left out; every candidate completes the rest
    for :data:`SELECT_ITERS` iterations, the :data:`SELECT_KEEP` that predict the held-out samples best
    continue to ``iters``, and the better of those, with the held-out samples put back, runs
    :data:`POLISH_ITERS` more (docs/espirit.md: as good as running every candidate for ``iters``, at 60 % of
    the cost). ``kspace (B, C, H, W)``, ``mask`` broadcastable to
    ``(B, 1, H, W)`` (True = measured). Returns the completed block ``(B, C, size, size)`` complex64.
    """
    k = torch.as_tensor(kspace).to(torch.complex64)
    B, C, H, W = k.shape
    sl = (Ellipsis, center_slice(H, size), center_slice(W, size))
    m = torch.as_tensor(mask).to(k.device).bool()
    while m.ndim < 4:
        m = m[None] if m.ndim < 3 else m[:, None]
    m = m.expand(B, 1, H, W)[sl]
    y = k[sl] * m
    kw = int(kernel_width)
    M = C * kw * kw
    if rank is not None:
        return _sake(y, m, kw, torch.full((B,), int(rank), device=k.device), iters)
    cands = torch.tensor(sorted({max(1, round(f * M)) for f in fractions}), device=k.device)
    g = torch.Generator().manual_seed(int(seed))
    held = (torch.rand(m.shape, generator=g) < HOLDOUT).to(k.device) & m
    c = min(calib, size)
    held[..., center_slice(size, c), center_slice(size, c)] = False  # the calibration block stays
    R = len(cands)
    ranks = cands.repeat(B)  # (B R,): slice b's candidates at rows b R ... b R + R - 1
    fit_y, fit_m = (y * ~held).repeat_interleave(R, 0), (m & ~held).repeat_interleave(R, 0)
    x = _sake(fit_y, fit_m, kw, ranks, min(SELECT_ITERS, iters))
    rows = torch.arange(B, device=k.device)[:, None] * R
    keep = min(SELECT_KEEP, R)
    rows = (rows + _holdout_error(x, y, held, R).argsort(1)[:, :keep]).reshape(-1)  # (B keep,)
    x = _sake(fit_y[rows], fit_m[rows], kw, ranks[rows], max(iters - SELECT_ITERS, 0), x0=x[rows])
    rows, x = rows.reshape(B, keep), x.reshape(B, keep, *x.shape[1:])
    best = _holdout_error(x.flatten(0, 1), y, held, keep).argmin(1)
    pick = torch.arange(B, device=k.device)
    return _sake(y, m, kw, ranks[rows[pick, best]], POLISH_ITERS, x0=x[pick, best])


def _holdout_error(fits: torch.Tensor, y: torch.Tensor, held: torch.Tensor, R: int) -> torch.Tensor:
    """``sum |fit - y|^2`` over the held-out samples, ``(B, R)`` for ``fits (B R, C, n, n)`` (``R`` per slice)."""
    err = (fits - y.repeat_interleave(R, 0)) * held.repeat_interleave(R, 0)
    return err.abs().pow(2).sum((1, 2, 3)).reshape(-1, R)


@torch.no_grad()
def espirit_maps_completed(kspace: torch.Tensor, mask, calib: int, **kwargs) -> torch.Tensor:
    """ESPIRiT maps from more than a small calibration block: when ``calib < 16`` the centred
    :func:`completion_size` block is filled from the measured samples by :func:`complete_block` and ESPIRiT
    (its default kernel) runs on it; otherwise plain :func:`espirit_maps_torch` on ``calib``. Reads only
    samples where ``mask`` is True (plus the fully sampled ``calib`` block). ``(B, C, H, W)`` -> maps."""
    k = torch.as_tensor(kspace)
    single = k.ndim == 3
    if single:
        k = k[None]
    H, W = k.shape[-2:]
    h, _ = calib_shape(calib, (H, W))
    size = completion_size(h, (H, W))
    if h >= COMPLETE_BELOW or size <= h:
        maps = espirit_maps_torch(k, calib, **kwargs)
    else:
        block = complete_block(k, mask, size, calib=h)
        full = torch.zeros(k.shape, dtype=torch.complex64, device=k.device)
        full[..., center_slice(H, size), center_slice(W, size)] = block
        maps = espirit_maps_torch(full, size, **kwargs)
    return maps[0] if single else maps
