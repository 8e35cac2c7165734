"""The readout flip (``train.augment: readout-flip``) against its known answer: reflecting the image's rows
about the centred FFT's origin reflects k-space the same way, so ``(R y, R M, R S)`` is exactly a measurement
of ``R x``. The expected k-space is computed with numpy's FFT from the definition, not with the code under test."""

import numpy as np
import pytest
import torch

from ambient_mri.augment import readout_flip, reflect_rows
from ambient_mri.config import load_config
from ambient_mri.errors import ConfigError
from ambient_mri.operators import SenseOp


def _measure(x, maps, mask):
    """``M F S x`` with numpy's centred orthonormal FFT (fftshift(fft2(ifftshift(.))))."""
    k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(maps * x[:, None], axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    return mask[:, None] * k


@pytest.mark.parametrize("H", [8, 9])
@pytest.mark.parametrize("lines", [True, False])
def test_flipped_measurement_is_a_measurement_of_the_flipped_image(H, lines):
    rng = np.random.default_rng(0)
    W = 6
    x = rng.standard_normal((2, H, W)) + 1j * rng.standard_normal((2, H, W))
    maps = rng.standard_normal((2, 3, H, W)) + 1j * rng.standard_normal((2, 3, H, W))
    mask = (rng.random((2, 1 if lines else H, W)) < 0.5).astype(np.float64)
    y = _measure(x, maps, mask)
    rows = (2 * (H // 2) - np.arange(H)) % H  # the reflection, written as an index map
    mask_r = mask if lines else mask[:, rows]
    expected = _measure(x[:, rows], maps[:, :, rows], mask_r)
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    got = reflect_rows(t(y))
    assert np.allclose(got.numpy(), expected, atol=1e-12)
    # the project's own operator agrees on the flipped triple
    op = SenseOp(reflect_rows(t(maps)), t(mask_r))
    assert np.allclose(op.forward(reflect_rows(t(x))).numpy(), expected, atol=1e-10)
    # and a plain flip of the rows (no roll) is not the reflection the centred FFT needs at even H
    if H % 2 == 0:
        assert not np.allclose(torch.flip(t(y), dims=(-2,)).numpy(), expected, atol=1e-6)


def test_readout_flip_flips_whole_slices_and_leaves_the_batch_alone():
    g = torch.Generator().manual_seed(3)
    B, C, H, W = 16, 2, 8, 6
    cplx = lambda: torch.randn(B, C, H, W, dtype=torch.complex64)  # noqa: E731
    batch = {"kspace": cplx(), "maps": cplx(),
             "mask": (torch.rand(B, 1, W) < 0.5).float(), "norm": torch.rand(B), "index": torch.arange(B)}
    before = {k: v.clone() for k, v in batch.items()}
    out = readout_flip(batch, g)
    for k in batch:
        assert torch.equal(batch[k], before[k]), k  # the input batch is not modified
    assert torch.equal(out["mask"], batch["mask"]) and torch.equal(out["norm"], batch["norm"])
    assert torch.equal(out["index"], batch["index"])
    flipped = []
    for i in range(B):
        same = torch.equal(out["kspace"][i], batch["kspace"][i])
        assert same or torch.equal(out["kspace"][i], reflect_rows(batch["kspace"][i]))
        assert torch.equal(out["maps"][i], batch["maps"][i] if same else reflect_rows(batch["maps"][i]))
        flipped.append(not same)
    assert 0 < sum(flipped) < B  # both outcomes occur (probability 1/2 each)
    again = readout_flip(batch, torch.Generator().manual_seed(3))
    assert torch.equal(again["kspace"], out["kspace"])  # reproducible from the generator
    img = {"image": torch.randn(B, H, W, dtype=torch.complex64), "mask": (torch.rand(B, H, W) < 0.5).float()}
    o = readout_flip(img, torch.Generator().manual_seed(3))
    for i in range(B):  # 2-D masks go with their images
        f = not torch.equal(o["image"][i], img["image"][i])
        assert f == flipped[i]
        assert torch.equal(o["mask"][i], reflect_rows(img["mask"][i]) if f else img["mask"][i])


def test_augment_config_is_checked():
    assert load_config("tiny").train.augment == "none"
    assert load_config("tiny", ["train.augment=readout-flip"]).train.augment == "readout-flip"
    with pytest.raises(ConfigError, match="train.augment"):
        load_config("tiny", ["train.augment=rotate"])
