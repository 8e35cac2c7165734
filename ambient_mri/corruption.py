"""The training corruption of an ambient model: the mask distribution ``M`` and the further-mask rule ``M~ <= M``.

One typed object says what a model was trained on, and everyone draws from it: the training loss (``M~``
given the batch's ``M``), ``datasets.estimate_sigma_view``, the samplers (a fixed ``M~`` from the training
distribution, or ``M~`` inside a test mask) and the sample grids. Checkpoints record it as plain data
(:meth:`Corruption.to_dict`, read back by :func:`from_dict`, loadable with ``torch.load(weights_only=True)``).

* :class:`Clean` (``domain = "clean"``): oracle and naive models; ``M~ = 1``.
* :class:`ImageCorruption` (``domain = "image"``): pixel/box erasure ``M`` of level ``level``, further
  erasure ``M~`` of level ``further_level`` (``masks.further_image_mask``).
* :class:`KspaceCorruption` (``domain = "kspace"``): ``M`` drawn as prep draws it (``mask_kind``, ``accel``,
  ``center``), or, for data whose masks came with the input files (``mask_kind = "input"``), drawn from a
  :class:`MaskBank` of the training masks actually seen; ``M~`` by ``masks.further_kspace_mask`` with
  ``further_accel = R~`` or ``delta``, the ACS block ``acs`` kept.

Seeding (unchanged from the dict the trainer wrote before this module): ``draw(n, seed)`` draws the ``b``-th
``M`` with numpy seed ``(seed * 7919 + b) mod 2^32`` (bank: indices from ``numpy.random.default_rng([seed,
7919])``), then all ``M~`` from one ``torch.Generator().manual_seed(seed)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from .config import CLEAN_KINDS
from .errors import ConfigError
from .masks import further_image_mask, further_kspace_mask, image_mask, kspace_mask

INPUT = "input"  # mask_kind of prepared data whose masks came with the input files
BANK_SIZE = 256  # distinct training masks kept in a checkpoint (the most frequent)


def _mask_seed(seed: int, b: int) -> int:
    """The numpy seed of the ``b``-th training mask ``M`` of ``draw(n, seed)``."""
    return (int(seed) * 7919 + b) % 2**32


def _as_batch(mask, n: int) -> torch.Tensor:
    """A test mask of any shape ``operators.as_mask`` accepts -> bool ``(n, h, W)`` on the CPU."""
    m = torch.as_tensor(np.asarray(mask) if not torch.is_tensor(mask) else mask).cpu()
    while m.dim() < 3:
        m = m[None]
    if m.shape[0] not in (1, n):
        raise ConfigError(f"test mask batch {m.shape[0]} does not fit {n} further masks")
    return (m > 0).expand(n, *m.shape[1:]).clone()


# ----------------------------------------------------------------------------------------------
# The bank of training masks (data with their own masks)


@dataclass(frozen=True, eq=False)
class MaskBank:
    """Distinct training masks ``(n, h, W)`` bool (``h = 1``: line masks) and how often each was seen.

    ``counts (n,)``: slices per mask (``M`` is drawn with probability ``counts / sum``); ``seen``: training
    slices read; ``distinct``: distinct masks among them (``> n`` when the bank was capped to the most
    frequent ``n``). Stored compactly: line masks as ``(n, W)`` bools, 2-D masks as packed bits."""

    masks: torch.Tensor
    counts: torch.Tensor
    seen: int
    distinct: int

    @classmethod
    def collect(cls, masks, cap: int = BANK_SIZE) -> "MaskBank":
        """The bank of an iterable of masks ``(h, W)`` (or batches ``(S, h, W)``), keeping the ``cap`` most
        frequent (ties: first seen first)."""
        found: dict[bytes, list] = {}
        shape, seen = None, 0
        for m in masks:
            m = np.asarray(m, dtype=bool)
            for one in m.reshape(-1, *m.shape[-2:]):
                if shape is None:
                    shape = one.shape
                elif one.shape != shape:
                    raise ConfigError(f"training masks of shapes {shape} and {one.shape}: one bank needs one shape")
                key = np.packbits(one).tobytes()
                found.setdefault(key, [one, 0])[1] += 1
                seen += 1
        if not found:
            raise ConfigError("no training masks to put in the bank")
        keep = sorted(found.values(), key=lambda e: -e[1])[:cap]  # stable: ties keep their first-seen order
        return cls(torch.from_numpy(np.stack([e[0] for e in keep])), torch.tensor([e[1] for e in keep]),
                   seen, len(found))

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    def __eq__(self, other) -> bool:
        return (isinstance(other, MaskBank) and torch.equal(self.masks, other.masks)
                and torch.equal(self.counts, other.counts)
                and (self.seen, self.distinct) == (other.seen, other.distinct))

    def pick(self, n: int, seed: int) -> torch.Tensor:
        """``n`` masks ``(n, h, W)`` drawn with replacement, probability ``counts / sum``."""
        p = self.counts.double().numpy()
        idx = np.random.default_rng([int(seed), 7919]).choice(len(self), size=n, p=p / p.sum())
        return self.masks[torch.from_numpy(idx)]

    def to_dict(self) -> dict:
        n, h, W = self.masks.shape
        d = {"shape": [h, W], "counts": self.counts.clone(), "seen": int(self.seen), "distinct": int(self.distinct)}
        if h == 1:
            d["lines"] = self.masks[:, 0].clone()
        else:
            d["bits"] = torch.from_numpy(np.packbits(self.masks.numpy().reshape(n, -1), axis=1))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MaskBank":
        h, W = (int(v) for v in d["shape"])
        if "lines" in d:
            m = torch.as_tensor(d["lines"]).bool()[:, None]
        else:
            bits = np.asarray(torch.as_tensor(d["bits"]), dtype=np.uint8)
            m = torch.from_numpy(np.unpackbits(bits, axis=1, count=h * W).astype(bool).reshape(-1, h, W))
        return cls(m, torch.as_tensor(d["counts"]).long(), int(d["seen"]), int(d["distinct"]))


# ----------------------------------------------------------------------------------------------
# The corruption of each domain


@dataclass(frozen=True)
class Corruption:
    """Base class: the matrix ``shape = (H, W)`` (None: not recorded, e.g. a clean model's ``{"domain": "clean"}``)."""

    shape: tuple | None

    domain = "clean"

    def at(self, shape) -> "Corruption":
        """The same corruption at another matrix (the samplers draw at the test matrix)."""
        return dataclasses.replace(self, shape=tuple(int(v) for v in shape))

    def _hw(self) -> tuple[int, int]:
        if self.shape is None:
            raise ConfigError(f"the {self.domain} corruption records no matrix shape")
        return self.shape

    def draw(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` further masks ``M~`` of the training distribution: a fresh ``M``, then ``M~ <= M``."""
        H, W = self._hw()
        return torch.ones(n, H, W, dtype=torch.bool)

    def further(self, mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``M~ <= M`` for a batch of training masks ``mask`` (the training rule; same shape and dtype)."""
        return torch.ones_like(mask)

    def within(self, mask, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` further masks inside a given (test) mask, bool ``(n, h, W)``; see :meth:`KspaceCorruption.within`."""
        return self.draw(n, seed)

    def to_dict(self) -> dict:
        d = {"domain": self.domain}
        if self.shape is not None:
            d["shape"] = list(self.shape)
        return d


@dataclass(frozen=True)
class Clean(Corruption):
    """Oracle and naive models: they see clean images, ``M~ = 1``."""

    domain = "clean"


@dataclass(frozen=True)
class ImageCorruption(Corruption):
    """Pixel (``level`` = erasure probability) or box (``level`` = erased area fraction) corruption ``M``,
    further erasure of ``further_level`` (``masks.further_image_mask``)."""

    kind: str = "pixels"
    level: float = 0.0
    further_level: float = 0.0

    domain = "image"

    def draw(self, n: int, seed: int = 0) -> torch.Tensor:
        m = np.stack([image_mask(self.kind, self._hw(), self.level, seed=_mask_seed(seed, b)) for b in range(n)])
        return self.further(torch.from_numpy(m), torch.Generator().manual_seed(int(seed)))

    def further(self, mask, generator=None):
        return further_image_mask(mask, self.kind, self.further_level, generator=generator)

    def within(self, mask, n, seed=0):
        """``further_image_mask(M_test, kind, further_level)``, ``(n, H, W)``."""
        return self.further(_as_batch(mask, n), torch.Generator().manual_seed(int(seed)))

    def to_dict(self):
        return {"domain": "image", "kind": self.kind, "level": float(self.level),
                "further_level": float(self.further_level), "shape": list(self._hw())}


@dataclass(frozen=True)
class KspaceCorruption(Corruption):
    """k-space training masks ``M`` (``mask_kind``, nominal ``accel``, ``center`` ACS lines or calibration
    side, ``acs = (h, w)`` block) or, for ``mask_kind = "input"``, a :class:`MaskBank`; further rule
    ``further_accel = R~`` or ``delta`` (exactly one; given both, ``further_accel`` wins)."""

    mask_kind: str | None = None
    accel: float = 0.0
    center: int | None = None
    acs: tuple = (0, 0)
    further_accel: float | None = None
    delta: float | None = None
    bank: MaskBank | None = None

    domain = "kspace"

    def __post_init__(self):
        # the one place where "further_accel or delta" is decided
        if self.further_accel is not None:
            object.__setattr__(self, "further_accel", float(self.further_accel))
            object.__setattr__(self, "delta", None)
        elif self.delta is not None:
            object.__setattr__(self, "delta", float(self.delta))
        else:
            raise ConfigError("a k-space corruption needs further_accel or delta")
        object.__setattr__(self, "acs", tuple(int(v) for v in self.acs))

    @property
    def rule(self) -> dict:
        """The keyword of ``masks.further_kspace_mask``: ``{"further_accel": R~}`` or ``{"delta": delta}``."""
        return {"further_accel": self.further_accel} if self.further_accel is not None else {"delta": self.delta}

    def training_masks(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` training masks ``M``, bool ``(n, h, W)``: drawn as prep draws them, or from the bank."""
        H, W = self._hw()
        if self.bank is not None:
            bh, bW = self.bank.masks.shape[1:]
            if bW != W or bh not in (1, H):
                raise ConfigError(f"the model's training masks are {bh}x{bW} (the bank of masks it was trained on), "
                                  f"the matrix here is {H}x{W}: use the model's matrix (recon --matrix crop) or draw "
                                  "M~ inside the test mask (--further-mask within)")
            return self.bank.pick(n, seed)
        if self.mask_kind == INPUT:
            raise ConfigError("this model was trained on masks that came with its data, and its checkpoint records "
                              "no bank of them (written before the bank existed): use --further-mask within")
        return torch.from_numpy(np.stack([kspace_mask(self.mask_kind, (H, W), self.accel, center=self.center,
                                                      seed=_mask_seed(seed, b)).mask for b in range(n)]))

    def draw(self, n, seed=0):
        m = self.training_masks(n, seed)
        return self.further(m, torch.Generator().manual_seed(int(seed)))

    def further(self, mask, generator=None):
        return further_kspace_mask(mask, self.acs, generator=generator, **self.rule)

    def within(self, mask, n, seed=0):
        """``n`` further masks ``M~ <= M_test`` by the training rule applied to the test mask, bool ``(n, h, W)``:

        * ``delta``: switch off ``round(delta n_outer)`` of the sampled non-ACS samples (as in training);
        * ``further_accel = R~`` with training acceleration ``R``: keep the same *fraction* of the measured
          samples as training keeps, ``count(M~) = floor(count(M_test) R / R~)`` (at least one removed while
          any non-ACS sample remains): ``further_kspace_mask`` with ``R~_test = N / (floor(count R / R~) + 1/2)``
          (the half keeps ``floor`` exact). The ACS block ``acs`` is never touched."""
        m = _as_batch(mask, n)
        g = torch.Generator().manual_seed(int(seed))
        if self.further_accel is None:
            return self.further(m, g)
        ratio = float(self.accel) / self.further_accel
        n_grid = m.shape[1] * m.shape[2]
        out = []
        for b in range(n):
            keep = max(int(math.floor(float(m[b].sum()) * ratio)), 1)
            out.append(further_kspace_mask(m[b : b + 1], self.acs, further_accel=n_grid / (keep + 0.5), generator=g))
        return torch.cat(out)

    def to_dict(self):
        d = {"domain": "kspace", "mask_kind": self.mask_kind, "accel": float(self.accel), "center": self.center,
             "acs": list(self.acs), "shape": list(self._hw()), **self.rule}
        if self.bank is not None:
            d["bank"] = self.bank.to_dict()
        return d


# ----------------------------------------------------------------------------------------------
# Reading and building


def from_dict(d) -> Corruption:
    """The corruption recorded in a checkpoint (every form written so far; a :class:`Corruption` is returned
    as is). A malformed record is a one-line :class:`ConfigError`."""
    if isinstance(d, Corruption):
        return d
    try:
        domain = d.get("domain", "kspace")
        shape = None if d.get("shape") is None else tuple(int(v) for v in d["shape"])
        if domain == "clean":
            return Clean(shape)
        if domain == "image":
            return ImageCorruption(shape, kind=d["kind"], level=float(d["level"]),
                                   further_level=float(d["further_level"]))
        if domain != "kspace":
            raise ValueError(f"unknown domain {domain!r}")
        center = d.get("center")
        return KspaceCorruption(shape, mask_kind=d.get("mask_kind"), accel=float(d.get("accel") or 0.0),
                                center=None if center is None else int(center), acs=tuple(d["acs"]),
                                further_accel=d.get("further_accel"), delta=d.get("delta"),
                                bank=MaskBank.from_dict(d["bank"]) if d.get("bank") is not None else None)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"cannot read the recorded training corruption ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:120]})") from None


def from_data(cfg, info: dict, masks=None) -> Corruption:
    """The corruption a run of config ``cfg`` (a ``Config`` or its ``loss`` section) trains with on prepared
    data described by ``info`` (``dataset.info``). ``masks``: for ``mask_kind = "input"`` data, a function
    returning an iterable of the training masks (``dataset.masks``; called only for such data), kept as the
    :class:`MaskBank`."""
    loss = getattr(cfg, "loss", cfg)
    shape = tuple(int(v) for v in info["shape"])
    if loss.kind in CLEAN_KINDS:
        return Clean(shape)
    if loss.kind == "ambient_image":
        return ImageCorruption(shape, kind=info.get("corruption"), level=float(info.get("level", 0.0)),
                               further_level=float(loss.delta))
    acs = tuple(int(v) for v in info["acs"])
    line = info["mask_shape"][0] == 1
    bank = None
    if info.get("mask_kind") == INPUT:
        if masks is None:
            raise ConfigError("data with their own masks (mask_kind input): give the training masks for the bank")
        bank = MaskBank.collect(masks())
    return KspaceCorruption(shape, mask_kind=info.get("mask_kind"), accel=float(info.get("accel", 0.0)),
                            center=acs[1] if line else acs[0], acs=acs, further_accel=loss.further_accel,
                            delta=loss.delta, bank=bank)


Corruption.from_dict = staticmethod(from_dict)
Corruption.from_data = staticmethod(from_data)
