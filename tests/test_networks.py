import math

import pytest
import torch
from torch import nn

from ambient_mri.errors import ConfigError
from ambient_mri.losses import edm_weight, loss_weight
from ambient_mri.networks import EDMDenoiser, UNet, build_denoiser


class Probe(nn.Module):
    """A 'network' that records its input and returns a constant output F = 1 (real channel)."""

    def forward(self, x, c_noise):
        self.x, self.c_noise = x, c_noise
        out = torch.zeros(x.shape[0], 2, *x.shape[-2:])
        out[:, 0] = 1.0
        return out


@pytest.mark.parametrize("sigma_view", [0.0, 0.3])
def test_preconditioning_coefficients(sigma_view):
    net = Probe()
    D = EDMDenoiser(net, sigma_data=0.5, cond=("mask", "ones"), sigma_view=sigma_view)
    x = torch.full((2, 4, 6), 2.0 + 1.0j)
    sigma = torch.tensor([0.1, 2.0])
    mask = torch.ones(2, 1, 6)
    mask[:, :, 0] = 0
    out = D(x, sigma, mask)
    se = torch.sqrt(sigma**2 + sigma_view**2)
    c_skip = 0.25 / (se**2 + 0.25)
    c_out = se * 0.5 / torch.sqrt(se**2 + 0.25)
    c_in = 1 / torch.sqrt(se**2 + 0.25)
    expect = c_skip[:, None, None] * x + c_out[:, None, None] * (1.0 + 0j)
    assert torch.allclose(out, expect)
    assert torch.allclose(net.x[:, 0], 2.0 * c_in[:, None, None].expand(2, 4, 6))  # Re, scaled by c_in
    assert torch.allclose(net.x[:, 1], 1.0 * c_in[:, None, None].expand(2, 4, 6))  # Im
    assert torch.equal(net.x[:, 2], mask.expand(2, 4, 6)) and torch.all(net.x[:, 3] == 1)  # not scaled
    assert torch.allclose(net.c_noise, sigma.log() / 4)  # the true noise level, also with sigma_view
    # the loss weight makes F's target unit-scaled: lambda(sigma_eff) c_out^2 = 1
    assert torch.allclose(loss_weight(D, sigma, "effective") * c_out**2, torch.ones(2))
    if sigma_view == 0:
        assert torch.allclose(loss_weight(D, sigma), edm_weight(sigma, 0.5))


@pytest.mark.parametrize("shape", [(64, 64), (50, 70), (33, 17)])
def test_unet_is_size_agnostic_and_starts_as_identity_skip(shape):
    D = build_denoiser({"channels": [8, 16, 16], "groups": 4, "attention": [2], "dropout": 0.1})
    x = torch.randn(2, *shape, dtype=torch.complex64)
    out = D(x, torch.tensor([0.5, 1.0]), torch.ones(2, 1, shape[1]))
    assert out.shape == x.shape and out.dtype == torch.complex64
    # the last convolution starts at zero: D = c_skip x until trained
    c_skip = 0.25 / (torch.tensor([0.5, 1.0]) ** 2 + 0.25)
    assert torch.allclose(out, c_skip[:, None, None] * x, atol=1e-6)


def test_build_denoiser_refuses_an_unestimated_sigma_view():
    with pytest.raises(ConfigError, match="sigma_view is null"):
        build_denoiser({"channels": [8, 8], "groups": 4, "sigma_view": None})


def test_unet_learns_and_rejects_bad_cond():
    torch.manual_seed(0)
    net = UNet(3, 2, channels=(8, 16), groups=4)
    assert sum(p.numel() for p in net.parameters()) > 1000
    with pytest.raises(ValueError):
        EDMDenoiser(net, cond=("nonsense",))
    D = EDMDenoiser(net)
    x = torch.randn(4, 16, 16, dtype=torch.complex64)
    noisy = x + 0.3 * torch.randn_like(x)
    opt = torch.optim.Adam(D.parameters(), 1e-2)
    first = None
    for _ in range(30):  # fit one fixed batch: the loss must fall
        loss = (D(noisy, torch.full((4,), 0.3)) - x).abs().pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first and math.isfinite(loss.item())


# --------------------------------------------------------------------------------------------
# The loss weight the trainer actually uses: lambda(sigma_eff) through the trainer's own wrapper.


def closed_form_weight(sigma, sigma_view, sigma_data=0.5):
    """EDM's ``lambda(s) = (s^2 + sd^2) / (s sd)^2`` at ``s^2 = sigma^2 + sigma_view^2`` (docs/training.md)."""
    s2 = sigma**2 + sigma_view**2
    return (s2 + sigma_data**2) / (s2 * sigma_data**2)


@pytest.mark.parametrize("sigma_view", [0.0, 0.3])
def test_trainer_wrapper_weights_with_sigma_eff(sigma_view):
    from ambient_mri.train import DistEnv, loss_denoiser

    model = build_denoiser({"channels": [8, 8], "groups": 4, "sigma_view": sigma_view})
    den = loss_denoiser(model, DistEnv(), torch.device("cpu"))  # exactly as train._train_loop builds it
    sigma = torch.tensor([0.002, 0.05, 1.0], dtype=torch.float64)
    w = loss_weight(den, sigma, "effective")
    assert torch.allclose(w, closed_form_weight(sigma, sigma_view), rtol=1e-12)
    # the default (loss.weight = edm) is EDM's lambda(sigma) at the drawn level, whatever sigma_view
    assert torch.allclose(loss_weight(den, sigma), closed_form_weight(sigma, 0.0), rtol=1e-12)
    if sigma_view:  # at sigma = 0.002: 4 + 1 / 0.090004 = 15.11, not lambda(sigma) = 250004
        assert abs(w[0].item() - 15.11) < 0.01 and edm_weight(sigma, 0.5)[0].item() > 2.5e5
    x = torch.randn(3, 8, 8, dtype=torch.complex64)
    assert torch.equal(den(x, sigma.float(), None), model(x, sigma.float(), None))  # calls reach the model


def test_trainer_wrapper_under_ddp_weights_with_sigma_eff(tmp_path):
    """The same through a real ``DistributedDataParallel`` (a one-process gloo group): DDP has no
    ``sigma_eff``, the wrapper must still find the model's."""
    import torch.distributed as dist

    from ambient_mri.train import DistEnv, loss_denoiser

    if dist.is_initialized():
        pytest.skip("a process group is already running in this interpreter")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = build_denoiser({"channels": [8, 8], "groups": 4, "sigma_view": 0.3})
        den = loss_denoiser(model, DistEnv(rank=0, world=2), torch.device("cpu"))
        assert type(den.module).__name__ == "DistributedDataParallel" and not hasattr(den.module, "sigma_eff")
        sigma = torch.tensor([0.002, 0.5])
        assert torch.allclose(loss_weight(den, sigma, "effective"), closed_form_weight(sigma, 0.3).float())
    finally:
        dist.destroy_process_group()


def test_loss_weight_refuses_a_denoiser_without_sigma_eff():
    class Bare(nn.Module):
        sigma_data = 0.5

    with pytest.raises(AttributeError, match="sigma_eff"):
        loss_weight(Bare(), torch.tensor([0.1]))


def test_preferred_layout_on_cpu():
    """On CPU a denoiser runs channels-last, elsewhere in the default layout; the output is the contiguous
    network's to fp32 rounding."""
    from ambient_mri.networks import build_denoiser, preferred_layout

    torch.manual_seed(0)
    cfg = {"channels": [8, 16], "groups": 4}
    a = build_denoiser(cfg)
    for p in a.parameters():
        p.data.normal_(0, 0.2)
    b = build_denoiser(cfg)
    b.load_state_dict(a.state_dict())
    assert preferred_layout(b, "meta").net.stem.weight.is_contiguous()
    b = preferred_layout(b, "cpu")
    assert b.net.stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert not b.net.stem.weight.is_contiguous()
    x = torch.randn(3, 12, 10, dtype=torch.complex64)
    with torch.no_grad():
        ya, yb = a(x, torch.tensor([0.1, 1.0, 10.0])), b(x, torch.tensor([0.1, 1.0, 10.0]))
    assert ya.shape == yb.shape == x.shape and yb.dtype == torch.complex64
    assert (ya - yb).abs().max() <= 1e-5 * ya.abs().max()
