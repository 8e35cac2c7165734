import numpy as np
import pytest
import sigpy as sp
import torch

from ambient_mri.fft import center_crop, center_pad, fft2c, ifft2c, rss

from .conftest import cnp


def numpy_fft2c(x):
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def fastmri_fft2c_ported(x: torch.Tensor) -> torch.Tensor:
    """fastMRI ``fft2c`` on a real ``(..., H, W, 2)`` tensor, ported: its own roll-based shifts."""

    def roll(t, shift, dim):
        return torch.cat((t.narrow(dim, t.size(dim) - shift, shift), t.narrow(dim, 0, t.size(dim) - shift)), dim)

    def shift(t, dims, back):
        for d in dims:
            n = t.shape[d]
            t = roll(t, (n + 1) // 2 if back else n // 2, d)
        return t

    x = shift(x, (-3, -2), back=True)
    k = torch.view_as_real(torch.fft.fftn(torch.view_as_complex(x.contiguous()), dim=(-2, -1), norm="ortho"))
    return shift(k, (-3, -2), back=False)


@pytest.mark.parametrize("shape", [(3, 3), (4, 6), (10, 8, 4), (2, 5, 7), (2, 3, 64, 64)])
def test_fft2c_matches_sigpy_numpy_and_fastmri(rng, shape):
    x = cnp(rng, *shape).astype(np.complex64)
    ref = sp.fft(x, axes=(-2, -1), center=True, norm="ortho")
    k_t = fft2c(torch.from_numpy(x))
    np.testing.assert_allclose(k_t.numpy(), ref, atol=2e-5)
    np.testing.assert_allclose(fft2c(x), ref, atol=2e-5)
    np.testing.assert_allclose(numpy_fft2c(x), ref, atol=2e-5)
    fm = torch.view_as_complex(fastmri_fft2c_ported(torch.view_as_real(torch.from_numpy(x))).contiguous())
    np.testing.assert_allclose(k_t.numpy(), fm.numpy(), atol=2e-5)
    np.testing.assert_allclose(ifft2c(torch.from_numpy(ref)).numpy(), sp.ifft(ref, axes=(-2, -1)), atol=2e-5)


def test_roundtrip_parseval_dc_position(rng):
    x = torch.from_numpy(cnp(rng, 3, 6, 5))
    k = fft2c(x)
    assert torch.allclose(ifft2c(k), x, atol=1e-12)
    assert torch.allclose(torch.linalg.vector_norm(k), torch.linalg.vector_norm(x))
    ones = torch.ones(4, 6, dtype=torch.complex64)
    dc = fft2c(ones)
    assert abs(dc[2, 3] - np.sqrt(24)) < 1e-5 and dc.abs().sum() - dc[2, 3].abs() < 1e-5


def test_rss_and_crop_pad(rng):
    x = cnp(rng, 2, 4, 6, 6)
    np.testing.assert_allclose(rss(x, dim=1), np.sqrt((np.abs(x) ** 2).sum(1)))
    np.testing.assert_allclose(rss(torch.from_numpy(x), dim=1).numpy(), rss(x, dim=1))
    c = center_crop(x, (4, 2))
    assert c.shape == (2, 4, 4, 2)
    np.testing.assert_array_equal(c, x[..., 1:5, 2:4])
    np.testing.assert_array_equal(center_crop(center_pad(c, (6, 6)), (4, 2)), c)
    with pytest.raises(ValueError):
        center_crop(x, (7, 6))
