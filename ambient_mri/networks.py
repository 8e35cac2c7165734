"""The denoiser: EDM preconditioning (Karras et al. 2022) around a compact, size-agnostic UNet.

``D(x_in; sigma) = c_skip x_in + c_out F_theta([c_in x_in, cond], c_noise)`` with
``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``,
``c_in = 1 / sqrt(sigma^2 + sd^2)``, ``c_noise = ln(sigma) / 4`` and ``sd = sigma_data``.

Images are complex ``(B, H, W)``; the network sees ``[Re, Im]`` plus conditioning channels (the
further-corruption mask ``M~`` broadcast to ``(H, W)``, and/or a constant channel) and returns
``[Re, Im]`` of the clean-image estimate. The conditioning channels are not scaled by ``c_in``.

``sigma_view`` (default 0: plain EDM) is an option for ambient models: their input ``A~^H A~ x_t`` misses
the k-space removed by ``M~`` even as ``sigma -> 0``, so the part ``D`` must add does not vanish with
``sigma`` while EDM's ``c_out -> sigma`` does, and ``F_theta`` must output ``O(1 / sigma)`` values at low
noise. With ``sigma_view > 0`` the coefficients use ``sigma_eff = sqrt(sigma^2 + sigma_view^2)`` (the
missing part counted as extra noise of RMS ``sigma_view``), ``c_noise`` keeps ``ln(sigma) / 4``, and the
loss weight is ``lambda(sigma_eff)`` (``losses.loss_weight``), so ``F_theta``'s target stays of unit
scale. The weight and the coefficients depend on ``sigma`` only, so the minimiser (``E[x0 | A~ x_t, A~]``)
is unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .fft import to_channels, to_complex

COND_CHANNELS = ("mask", "ones")


class NoiseEmbedding(nn.Module):
    """Sinusoidal embedding of ``c_noise`` (``(B,)``) followed by a 2-layer MLP -> ``(B, dim)``."""

    def __init__(self, dim: int, freqs: int = 32):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(1000), freqs)), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * freqs, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        a = c_noise[:, None].float() * self.freqs[None]
        return self.mlp(torch.cat((a.cos(), a.sin()), dim=1))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, FiLM by the noise embedding (scale, shift), GroupNorm-SiLU-dropout-conv, skip."""

    def __init__(self, cin: int, cout: int, emb: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb, 2 * cout)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return (h + self.skip(x)) / math.sqrt(2)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, pre-norm, residual."""

    def __init__(self, ch: int, groups: int, heads: int = 1):
        super().__init__()
        self.norm = nn.GroupNorm(min(groups, ch), ch)
        self.attn = nn.MultiheadAttention(ch, heads, batch_first=True)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)
        h, _ = self.attn(h, h, h, need_weights=False)
        return (x + h.transpose(1, 2).reshape(B, C, H, W)) / math.sqrt(2)


class UNet(nn.Module):
    """Compact EDM/ADM-style UNet: ``len(channels)`` levels, ``blocks`` residual blocks per level,
    optional self-attention at the levels in ``attention`` (0 = full resolution), dropout.

    Encoder: stem, then per level ``blocks`` x (ResBlock [+ attention]) and a strided-conv downsample;
    every output is kept as a skip. Decoder: per level ``blocks + 1`` x (ResBlock on [h, skip]
    [+ attention]), then nearest upsample + conv. Size-agnostic: inputs are zero-padded to a multiple
    of ``2 ** (levels - 1)`` and cropped back. ``forward(x (B, in_ch, H, W), c_noise (B,)) -> (B, out_ch, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int = 2, channels=(32, 64, 64), blocks: int = 1,
                 attention=(), dropout: float = 0.0, groups: int = 8, emb_dim: int | None = None):
        super().__init__()
        channels, attention = list(channels), set(attention)
        emb = emb_dim or 4 * channels[0]
        self.levels = len(channels)
        self.embed = NoiseEmbedding(emb)
        self.stem = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        skips, ch = [channels[0]], channels[0]
        self.enc = nn.ModuleList()
        for lvl, c in enumerate(channels):
            for _ in range(blocks):
                self.enc.append(self._block(ch, c, emb, groups, dropout, lvl in attention))
                ch = c
                skips.append(ch)
            if lvl < self.levels - 1:
                self.enc.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb, groups, dropout), ResBlock(ch, ch, emb, groups, dropout)])
        self.dec = nn.ModuleList()
        for lvl in reversed(range(self.levels)):
            c = channels[lvl]
            for _ in range(blocks + 1):
                self.dec.append(self._block(ch + skips.pop(), c, emb, groups, dropout, lvl in attention))
                ch = c
            if lvl > 0:
                self.dec.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(ch, ch, 3, padding=1)))
        self.out_norm = nn.GroupNorm(min(groups, ch), ch)
        self.out = nn.Conv2d(ch, out_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @staticmethod
    def _block(cin, cout, emb, groups, dropout, attend):
        res = ResBlock(cin, cout, emb, groups, dropout)
        return nn.ModuleList([res, SelfAttention(cout, groups)]) if attend else nn.ModuleList([res])

    @staticmethod
    def _run(block, h, emb):
        h = block[0](h, emb)
        return block[1](h) if len(block) > 1 else h

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        k = 2 ** (self.levels - 1)
        ph, pw = (-H) % k, (-W) % k
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        emb = self.embed(c_noise)
        h = self.stem(x)
        skips = [h]
        for layer in self.enc:
            h = self._run(layer, h, emb) if isinstance(layer, nn.ModuleList) else layer(h)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        for layer in self.dec:
            if isinstance(layer, nn.ModuleList):
                h = self._run(layer, torch.cat((h, skips.pop()), dim=1), emb)
            else:
                h = layer(h)
        h = self.out(F.silu(self.out_norm(h)))
        if ph or pw:
            h = h[..., ph // 2 : ph // 2 + H, pw // 2 : pw // 2 + W]
        return h


class EDMDenoiser(nn.Module):
    """EDM-preconditioned complex-image denoiser ``D(x_in; sigma, mask)``.

    ``forward(x_in (B, H, W) complex, sigma (B,) or float, mask (B, H|1, W) or None) -> (B, H, W) complex``.
    ``cond``: which extra input channels the network gets, a subset of ``("mask", "ones")``; a missing
    mask counts as fully observed (ones).
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, cond=("mask",), sigma_view: float = 0.0):
        super().__init__()
        unknown = set(cond) - set(COND_CHANNELS)
        if unknown:
            raise ValueError(f"unknown conditioning channels {sorted(unknown)}")
        self.net = net
        self.sigma_data = float(sigma_data)
        self.sigma_view = float(sigma_view)
        self.cond = tuple(cond)

    def sigma_eff(self, sigma: torch.Tensor) -> torch.Tensor:
        """``sqrt(sigma^2 + sigma_view^2)``: the noise level the preconditioning assumes."""
        return (sigma**2 + self.sigma_view**2).sqrt() if self.sigma_view else sigma

    def forward(self, x_in: torch.Tensor, sigma, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, H, W = x_in.shape
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x_in.device).reshape(-1).expand(B)
        sd, se = self.sigma_data, self.sigma_eff(sigma)
        c_skip = sd**2 / (se**2 + sd**2)
        c_out = se * sd / (se**2 + sd**2).sqrt()
        c_in = 1 / (se**2 + sd**2).sqrt()
        c_noise = sigma.log() / 4
        chans = [to_channels(x_in) * c_in[:, None, None, None]]
        for name in self.cond:
            if name == "mask" and mask is not None:
                m = torch.as_tensor(mask, device=x_in.device).float()
                chans.append(m.reshape(-1, 1, *m.shape[-2:]).expand(B, 1, H, W))
            else:
                chans.append(x_in.real.new_ones(B, 1, H, W))
        F_x = self.net(torch.cat(chans, dim=1), c_noise)
        return c_skip[:, None, None] * x_in + c_out[:, None, None] * to_complex(F_x)


def preferred_layout(module: nn.Module, device) -> nn.Module:
    """``module`` in the memory layout its fp32 convolutions run fastest in on ``device``: channels-last (NHWC)
    on CPU, where oneDNN's convolutions are 10-20 % faster for these UNets (docs/training.md); unchanged on other
    devices. The function is the same (fp32 rounding aside); checkpoints load into either layout."""
    return module.to(memory_format=torch.channels_last) if torch.device(device).type == "cpu" else module


def build_denoiser(cfg: dict) -> EDMDenoiser:
    """Build from a config's ``model`` section: ``channels``, ``blocks``, ``attention``, ``dropout``,
    ``groups``, ``sigma_data``, ``cond``, ``sigma_view``."""
    if cfg.get("sigma_view", 0.0) is None:
        raise ConfigError("model.sigma_view is null (estimate it from the training data first, as "
                          "`ambient-mri train` does, or give a number)")
    cond = tuple(cfg.get("cond", ("mask",)))
    net = UNet(in_channels=2 + len(cond), out_channels=2, channels=tuple(cfg.get("channels", (32, 64, 64))),
               blocks=int(cfg.get("blocks", 1)), attention=tuple(cfg.get("attention", ())),
               dropout=float(cfg.get("dropout", 0.0)), groups=int(cfg.get("groups", 8)))
    return EDMDenoiser(net, sigma_data=float(cfg.get("sigma_data", 0.5)), cond=cond,
                       sigma_view=float(cfg.get("sigma_view", 0.0)))
