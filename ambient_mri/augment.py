"""Exact augmentation of training batches: the readout flip (config ``train.augment: readout-flip``).

Reflecting an image about the centre of its rows, ``(R x)[n] = x[(2 c - n) mod H]`` with ``c = H // 2`` (the
pixel that the centred FFT, ``fft.fft2c``, treats as the origin), reflects its k-space the same way along
the same axis: ``F R = R F``. A measured slice ``y = M F S x`` of ``x`` is therefore, exactly, a measured slice of
``R x``:

    R y = (R M) F (R S) (R x),

so the flipped triple ``(R y, R M, R S)`` is new training data of the same kind, with no interpolation and
no unmeasured value made up. Line masks (``(1, W)``: phase-encode lines along the columns) are unchanged,
``R M = M``, so the further-mask rule and the identifiability of the ambient loss are untouched; 2-D masks
are reflected with the data. The flip is drawn per slice with probability 1/2, from its own generator, so
a run without augmentation draws exactly what it drew before. The prepared data never change.

Whether ``R x`` is as likely as ``x`` is a property of the data: for the SIAT benchmark's (mostly axial) slices the
rows run left-right across the head (docs/training.md), the symmetry a brain has; the demo's simulated slices come in
several orientations, so it is not used there.
"""

from __future__ import annotations

import torch

from .config import AUGMENTS  # noqa: F401  (the names train.augment accepts)

FLIPPED = ("kspace", "maps", "mask", "image")  # batch entries that live on the (H, W) grid


def reflect_rows(t: torch.Tensor) -> torch.Tensor:
    """``(R t)[..., n, :] = t[..., (2 (H // 2) - n) mod H, :]``: reflection about the centred FFT's origin row."""
    H = t.shape[-2]
    return torch.roll(torch.flip(t, dims=(-2,)), shifts=1 - H % 2, dims=-2)


def readout_flip(batch: dict, generator: torch.Generator) -> dict:
    """A new batch in which each slice is reflected (:func:`reflect_rows`) with probability 1/2.

    Reflects ``kspace (B, C, H, W)``, ``maps``, ``image (B, H, W)`` and ``mask`` where present (a line mask
    ``(B, 1, W)`` is its own reflection); every other entry is passed on as is. ``batch`` is not modified."""
    ref = next(batch[k] for k in FLIPPED if k in batch)
    flip = torch.rand(len(ref), generator=generator, device=generator.device) < 0.5
    out = dict(batch)
    for k in FLIPPED:
        t = batch.get(k)
        if t is None or t.shape[-2] == 1:
            continue
        where = flip.to(t.device).view(-1, *[1] * (t.dim() - 1))
        out[k] = torch.where(where, reflect_rows(t), t)
    return out


def augmentation(name: str):
    """The batch transform of ``train.augment`` (one of :data:`AUGMENTS`; ``None`` for ``"none"``)."""
    return {"none": None, "readout-flip": readout_flip}[name]
