"""Training configuration: typed sections ``model``, ``loss``, ``train``, ``data``, loaded from YAML plus
``key=value`` command-line overrides with dotted keys (``train.steps=200 model.channels=[16,32]``).

Every key is checked before any work starts: unknown keys, wrong types and impossible values raise a
one-line :class:`~ambient_mri.errors.ConfigError` naming the key (and the file it came from).

``load_config(path_or_name, overrides) -> Config``; ``Config.to_dict()`` is the resolved config (plain
YAML/JSON types) that a run writes to ``RUN/config.yaml`` and into every checkpoint;
``Config.from_dict(d)`` reads it back (same checks).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from .errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
LOSS_KINDS = ("ambient", "ambient_image", "oracle", "naive_zf", "naive_l1", "em")
AMBIENT_KINDS = ("ambient", "ambient_image")
CLEAN_KINDS = ("oracle", "naive_zf", "naive_l1", "em")  # trained with plain EDM on images (no further mask)
AUGMENTS = ("none", "readout-flip")  # train.augment (augment.py)
EM_SAMPLERS = ("dc", "adps", "mmps")  # E-step posterior samplers (adps with a clean prior is FS-DPS)
# Keys a resumed run may change (everything else must match the checkpoint's config).
RESUMABLE_KEYS = {"train.steps", "train.log_every", "train.ckpt_every", "train.sample_every", "train.sample_n",
                  "train.sample_steps", "train.num_workers", "train.device", "train.keep", "data.cache_mb", "em.rounds"}


@dataclass
class ModelConfig:
    """The denoiser (``networks.build_denoiser``): UNet widths per level, residual blocks per level,
    levels with self-attention (0 = full resolution), dropout, GroupNorm groups, EDM ``sigma_data`` and
    the conditioning channels (``mask``: the further mask ``M~``; ``ones``: a constant channel);
    ``sigma_view``: extra noise level the preconditioning assumes for an ambient model's view (0 = EDM;
    ``null`` = estimated from the measured training data at the start of a run and recorded)."""

    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    blocks: int = 1
    attention: list[int] = field(default_factory=list)
    dropout: float = 0.0
    groups: int = 8
    sigma_data: float = 0.5
    cond: list[str] = field(default_factory=lambda: ["mask"])
    sigma_view: Optional[float] = 0.0

    def check(self):
        if not self.channels or any(c < 1 for c in self.channels):
            raise ConfigError(f"model.channels must be a non-empty list of positive widths (got {self.channels})")
        if self.blocks < 1:
            raise ConfigError(f"model.blocks must be >= 1 (got {self.blocks})")
        bad = [a for a in self.attention if not 0 <= a < len(self.channels)]
        if bad or len(set(self.attention)) != len(self.attention):
            raise ConfigError(f"model.attention lists levels 0..{len(self.channels) - 1} at most once (got {self.attention})")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout must be in [0, 1) (got {self.dropout})")
        if self.groups < 1:
            raise ConfigError(f"model.groups must be >= 1 (got {self.groups})")
        for c in self.channels:
            if c % min(self.groups, c):
                raise ConfigError(f"model.groups={self.groups} does not divide the width {c} of model.channels")
        if not (math.isfinite(self.sigma_data) and self.sigma_data > 0):
            raise ConfigError(f"model.sigma_data must be > 0 (got {self.sigma_data})")
        if self.sigma_view is not None and not (math.isfinite(self.sigma_view) and self.sigma_view >= 0):
            raise ConfigError(f"model.sigma_view must be >= 0, or null to estimate it from the data (got {self.sigma_view})")
        if len(set(self.cond)) != len(self.cond) or set(self.cond) - {"mask", "ones"}:
            raise ConfigError(f"model.cond must be a subset of [mask, ones] (got {self.cond})")


@dataclass
class LossConfig:
    """Which loss trains the model.

    ``kind``: ``ambient`` (k-space ambient loss on undersampled multi-coil data), ``ambient_image``
    (pixel/box corruption, seed paper), ``oracle`` (FS-EDM: plain EDM on fully sampled references),
    ``naive_zf`` / ``naive_l1`` (plain EDM on zero-filled / L1-wavelet reconstructions), ``em`` (plain EDM
    on posterior samples of the training scans: the M-step of ``em``, see :class:`EMConfig`).
    Further corruption (ambient kinds): ``further_accel`` = R~ (keep ``floor(N / R~)`` samples) or
    ``delta`` (remove that fraction of the sampled non-ACS lines; for ``ambient_image`` the further
    erased fraction or second-box area). ``redraw``: draw a new ``M~`` every step (default) or keep one
    per slice for the whole run (seeded by the slice index). ``domain``: compare in k-space
    (``||M F S D - y||^2``) or in the image domain (``||A^H (A D - y)||^2``, the reference code's form).
    ``P_mean``/``P_std``: EDM's log-normal noise levels. ``lam``/``l1_iters``: L1-wavelet settings for
    ``naive_l1``. ``weight``: ``edm`` (EDM's ``lambda(sigma)``, default) or ``effective``
    (``lambda(sigma_eff)``); see ``losses.loss_weight`` and docs/training.md.
    """

    kind: str = "ambient"
    further_accel: Optional[float] = None
    delta: Optional[float] = None
    redraw: bool = True
    domain: str = "kspace"
    P_mean: float = -1.2
    P_std: float = 1.2
    lam: float = 1e-3
    l1_iters: int = 100
    weight: str = "edm"

    def check(self):
        if self.weight not in ("edm", "effective"):
            raise ConfigError(f"loss.weight must be edm or effective (got {self.weight!r})")
        if self.kind not in LOSS_KINDS:
            raise ConfigError(f"loss.kind must be one of {', '.join(LOSS_KINDS)} (got {self.kind!r})")
        if self.domain not in ("kspace", "image"):
            raise ConfigError(f"loss.domain must be kspace or image (got {self.domain!r})")
        if self.further_accel is not None and not (math.isfinite(self.further_accel) and self.further_accel >= 1):
            raise ConfigError(f"loss.further_accel (R~) must be >= 1 (got {self.further_accel})")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"loss.delta must be in (0, 1) (got {self.delta})")
        if self.kind == "ambient" and (self.further_accel is None) == (self.delta is None):
            raise ConfigError("loss.kind=ambient needs exactly one of loss.further_accel and loss.delta")
        if self.kind == "ambient_image":
            if self.delta is None:
                raise ConfigError("loss.kind=ambient_image needs loss.delta (the further corruption level)")
            if self.further_accel is not None:
                raise ConfigError("loss.further_accel applies to k-space data; ambient_image uses loss.delta")
        if not math.isfinite(self.P_mean):
            raise ConfigError(f"loss.P_mean must be finite (got {self.P_mean})")
        if not (math.isfinite(self.P_std) and self.P_std > 0):
            raise ConfigError(f"loss.P_std must be > 0 (got {self.P_std})")
        if not (math.isfinite(self.lam) and self.lam > 0):
            raise ConfigError(f"loss.lam must be > 0 (got {self.lam})")
        if self.l1_iters < 1:
            raise ConfigError(f"loss.l1_iters must be >= 1 (got {self.l1_iters})")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping.

    ``steps`` optimiser steps of ``batch`` slices per process; ``lr`` after a linear warm-up over
    ``warmup`` steps; ``optimizer`` adam or adamw (``weight_decay``); ``grad_clip`` (0 = off);
    EMA of the weights with an EDM-style half-life of ``ema_halflife`` images (ramped up as
    ``min(ema_halflife, ema_rampup * images_seen)``; ``ema_rampup: null`` = no ramp) or, if
    ``ema_decay`` is set, a constant per-step decay; ``precision`` fp32|bf16|fp16 (autocast on GPU; bf16 also on
    CPUs with native bf16, fp32 on other CPUs);
    ``seed``; logging/checkpoint/sample-grid periods in steps (``sample_every: 0`` = never), ``keep``
    numbered snapshots; ``num_workers`` data-loader processes; ``device`` auto|cpu|cuda; ``augment``
    none|readout-flip (``augment.readout_flip``: each slice reflected along its rows with probability 1/2,
    exact for measured k-space).
    """

    steps: int = 1000
    batch: int = 8
    lr: float = 2e-4
    optimizer: str = "adam"
    weight_decay: float = 0.0
    warmup: int = 0
    grad_clip: float = 0.0
    ema_halflife: float = 500_000.0
    ema_rampup: Optional[float] = 0.05
    ema_decay: Optional[float] = None
    precision: str = "fp32"
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 1000
    sample_every: int = 0
    sample_n: int = 16
    sample_steps: int = 18
    keep: int = 3
    num_workers: int = 0
    device: str = "auto"
    augment: str = "none"

    def check(self):
        for k in ("steps", "batch", "log_every", "ckpt_every", "sample_n", "sample_steps", "keep"):
            if getattr(self, k) < 1:
                raise ConfigError(f"train.{k} must be >= 1 (got {getattr(self, k)})")
        for k in ("warmup", "sample_every", "num_workers", "seed"):
            if getattr(self, k) < 0:
                raise ConfigError(f"train.{k} must be >= 0 (got {getattr(self, k)})")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"train.lr must be > 0 (got {self.lr})")
        if self.optimizer not in ("adam", "adamw"):
            raise ConfigError(f"train.optimizer must be adam or adamw (got {self.optimizer!r})")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"train.weight_decay must be >= 0 (got {self.weight_decay})")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ConfigError(f"train.grad_clip must be >= 0 (0 = off) (got {self.grad_clip})")
        if not (math.isfinite(self.ema_halflife) and self.ema_halflife > 0):
            raise ConfigError(f"train.ema_halflife (images) must be > 0 (got {self.ema_halflife})")
        if self.ema_rampup is not None and not (math.isfinite(self.ema_rampup) and self.ema_rampup > 0):
            raise ConfigError(f"train.ema_rampup must be > 0 or null (got {self.ema_rampup})")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1) (got {self.ema_decay})")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"train.precision must be fp32, bf16 or fp16 (got {self.precision!r})")
        if self.seed >= 2**31:
            raise ConfigError(f"train.seed must be < 2**31 (got {self.seed})")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device must be auto, cpu or cuda (got {self.device!r})")
        if self.augment not in AUGMENTS:
            raise ConfigError(f"train.augment must be one of {', '.join(AUGMENTS)} (got {self.augment!r})")


@dataclass
class DataConfig:
    """Data loading: datasets whose arrays total less than ``cache_mb`` MiB are read into memory once."""

    cache_mb: float = 512.0

    def check(self):
        if not (math.isfinite(self.cache_mb) and self.cache_mb >= 0):
            raise ConfigError(f"data.cache_mb must be >= 0 (got {self.cache_mb})")


@dataclass
class EMConfig:
    """Expectation-maximisation from an ambient start (``loss.kind: em``, ``ambient-mri train --em-from``;
    ``ambient_mri.em``). Each of ``rounds`` rounds draws ``samples_per_scan`` posterior samples of every
    training slice from its own measurements with the current prior (E-step: ``sampler`` with
    ``sampler_steps`` steps, default the sampler's own; round 1 uses ``first_sampler`` with the ambient
    prior, ``batch`` slices at a time), then trains a plain EDM prior on them for ``steps_per_round``
    optimiser steps, warm-started from the previous round's weights (M-step)."""

    rounds: int = 3
    samples_per_scan: int = 1
    sampler: str = "dc"
    first_sampler: str = "dc"
    sampler_steps: Optional[int] = None
    steps_per_round: int = 1000
    batch: int = 8

    def check(self):
        for k in ("rounds", "samples_per_scan", "steps_per_round", "batch"):
            if getattr(self, k) < 1:
                raise ConfigError(f"em.{k} must be >= 1 (got {getattr(self, k)})")
        if self.sampler_steps is not None and self.sampler_steps < 1:
            raise ConfigError(f"em.sampler_steps must be >= 1 or null (got {self.sampler_steps})")
        for k in ("sampler", "first_sampler"):
            if getattr(self, k) not in EM_SAMPLERS:
                raise ConfigError(f"em.{k} must be one of {', '.join(EM_SAMPLERS)} (got {getattr(self, k)!r})")
        if self.first_sampler == "mmps":
            raise ConfigError("em.first_sampler cannot be mmps: the ambient prior's Jacobian does not give a "
                              "positive-definite MMPS system (docs/theory.md); use dc or adps")


@dataclass
class Config:
    """A whole training configuration. ``name`` labels the run (baselines get their kind appended, so an
    oracle run is always called ``...-oracle``)."""

    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    em: EMConfig = field(default_factory=EMConfig)

    def check(self) -> "Config":
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_.+-]+", self.name):
            raise ConfigError(f"name must be letters, digits and _.+- only (got {self.name!r})")
        self.model.check()
        self.loss.check()
        self.train.check()
        self.data.check()
        self.em.check()
        if self.loss.kind in CLEAN_KINDS and self.loss.kind not in self.name:
            self.name = f"{self.name}-{self.loss.kind}"
        return self

    @property
    def is_oracle(self) -> bool:
        return self.loss.kind == "oracle"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where=None) -> "Config":
        return _build(cls, d, "", where).check()


# ----------------------------------------------------------------------------------------------
# Strict typing


def _type_name(tp) -> str:
    origin = get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _where(where, key):
    return where(key) if callable(where) else where


def _coerce(value, tp, key: str, where):
    """Return ``value`` as type ``tp`` or raise ConfigError (ints are accepted as floats, nothing else is)."""
    origin = get_origin(tp)
    if origin is Union:
        if value is None:
            return None
        (inner,) = [a for a in get_args(tp) if a is not type(None)]
        return _coerce(value, inner, key, where)
    if origin is list:
        inner = get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be {_type_name(tp)} (got {value!r})", _where(where, key))
        try:
            return [_coerce(v, inner, key, where) for v in value]
        except ConfigError:
            raise ConfigError(f"{key} must be a list of {_type_name(inner).split(' ', 1)[1]}s (got {value!r})",
                              _where(where, key)) from None
    ok = (tp is bool and isinstance(value, bool)) or \
         (tp is int and isinstance(value, int) and not isinstance(value, bool)) or \
         (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool)) or \
         (tp is str and isinstance(value, str))
    if not ok:
        raise ConfigError(f"{key} must be {_type_name(tp)} (got {value!r})", _where(where, key))
    return float(value) if tp is float else value


def _build(cls, d, prefix: str, where):
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping (got {d!r})",
                          _where(where, prefix.rstrip(".")))
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})",
                          _where(where, f"{prefix}{unknown[0]}"))
    kwargs = {}
    for k, v in d.items():
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v, f"{prefix}{k}.", where)
        else:
            kwargs[k] = _coerce(v, tp, f"{prefix}{k}", where)
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------
# YAML (PyYAML's safe loader reads 1e-4 as a string; this one reads it as a number)


def _loader():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
        list("-+0123456789."))
    return Loader


def parse_yaml(text: str, where=None):
    import yaml

    try:
        return yaml.load(text, Loader=_loader())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"not valid YAML{at} ({getattr(e, 'problem', None) or e})", where) from None


def dump_yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False, default_flow_style=None)


def resolve_config_path(spec: str | os.PathLike) -> Path:
    """A config file path, or the name of a packaged config (``tiny``, ``cpu64``, ``tiny.yaml``...)."""
    p = Path(spec)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / p.name, CONFIG_DIR / f"{p.name}.yaml"):
        if cand.is_file() and p.parent == Path("."):
            return cand
    known = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"no such config file or packaged config (packaged: {known})", spec)


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.steps=200"`` -> ``("train.steps", 200)``; the value is read as YAML (``[16,32]``, ``true``, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. train.steps=200)")
    key, value = text.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ConfigError(f"override key {key!r} is not a dotted name (e.g. train.steps)")
    return key, parse_yaml(value, where=f"override {key}") if value.strip() else ""


def apply_overrides(d: dict, overrides) -> dict:
    """Set dotted keys in a nested dict (a copy); unknown sections are caught later by :func:`Config.from_dict`."""
    import copy

    d = copy.deepcopy(d or {})
    for item in overrides or ():
        key, value = item if isinstance(item, tuple) else parse_override(item)
        node = d
        parts = key.split(".")
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"cannot set {key}: {p} is not a section")
            node = node[p]
        node[parts[-1]] = value
    return d


def load_config(spec: str | os.PathLike | None = None, overrides=()) -> Config:
    """Read a YAML config (a path or a packaged name; ``None`` = defaults), apply overrides, check it all."""
    if spec is None:
        d, where, stem = {}, None, "run"
    else:
        path = resolve_config_path(spec)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read ({e.strerror})", path) from None
        d, where, stem = parse_yaml(text, where=path), str(path), path.stem
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise ConfigError("a config must be a mapping of sections (model, loss, train, data)", path)
        d.setdefault("name", stem)
    d = apply_overrides(d, overrides)
    keys = {(o if isinstance(o, tuple) else parse_override(o))[0] for o in overrides or ()}

    def where_for(key):  # blame the command line for values it set, the file for the rest
        return "command line" if any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in keys) else where

    cfg = _build(Config, d, "", where_for)
    try:
        return cfg.check()
    except ConfigError as e:
        named = re.findall(r"\b(?:model|loss|train|data)\.[A-Za-z_]+", e.problem)
        w = "command line" if any(where_for(k) == "command line" for k in named) else where
        if e.path or w is None:
            raise
        raise ConfigError(e.problem, w) from None


def changed_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved config dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += changed_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out
