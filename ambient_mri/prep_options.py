"""The options of ``ambient-mri prep`` (:class:`PrepOptions`) and what they resolve to before any data are
read: the slice selection, each slice's mask seed, and the side of the calibration block.

Every field of :class:`PrepOptions` changes the prepared data; it is stored as JSON in every prepared file
(attribute ``options``) and in ``manifest.json``, and a resumed run must match it (``docs/prep.md``).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from dataclasses import asdict, dataclass

from .coils import DEFAULT_MAPS, MAPS_REVISION, maps_methods
from .errors import ConfigError, DataError
from .masks import KSPACE_KINDS, kspace_mask
from .prepared import DOMAINS, SPLITS

REFERENCE_KINDS = ("cg-sense", "rss")
CORRUPTIONS = ("box", "pixels")
MASK_TYPES = KSPACE_KINDS  # what --mask-type accepts: every kind masks.kspace_mask draws
IMAGE_DOMAIN_CALIB = 24  # A-DPS's 24 x 24 training calibration block
_MAX_SEED = 2**31 - 2**20  # room for sigpy-poisson's seed + 1000 k retries below 2**31


@dataclass(frozen=True)
class PrepOptions:
    """Everything that changes the prepared data (``workers`` and ``nifti`` do not, so they are not here).

    ``whiten``: ``None`` = automatic (tried when the header's readout is 2x oversampled, :func:`~ambient_mri.whitening.whitening_mode`);
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
        """The options as recorded in every prepared file, plus ``maps_revision`` (:data:`coils.MAPS_REVISION`)."""
        d = asdict(self)
        d["maps_revision"] = MAPS_REVISION.get(self.maps, 1)
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


def mask_acs(options: PrepOptions, shape: tuple[int, int]) -> tuple[int, int]:
    """Fully sampled centre of the masks ``options`` draws on ``shape``: ``(1, n)`` lines or ``(n, n)``
    (the same for every seed and acceleration)."""
    return _mask_acs_cached(options.mask_type, tuple(shape), float(options.accel[0]), options.center_lines)


@functools.lru_cache(maxsize=64)
def _mask_acs_cached(kind, shape, accel, center):
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
