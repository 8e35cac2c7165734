"""Property-based tests (hypothesis) over the mask functions and the fastMRI reader.

The property everywhere: for arbitrary arguments (absurd ones included: R < 1, NaN, inf, R larger than
the matrix, calibration larger than the matrix, zero and negative sizes) a call either returns a valid
result or raises the project's own :class:`~ambient_mri.errors.AmbientMRIError` with a one-line message;
no other exception escapes. "Valid" is what each function documents (shape, dtype, non-empty, the
calibration block sampled, reported acceleration = size / count, same output for the same seed,
``M~ <= M``). For the reader, hypothesis writes HDF5 files with chosen datasets, shapes, dtypes and values
(NaN/Inf, wrong rank, zero coils, random header text, random bytes, truncation and byte damage of a valid
file): opening and reading every slice either works (finite complex64 of the declared shape) or raises a
one-line ``DataError`` naming the file.

Inputs the fuzzing once found breaking a property are kept as plain regression cases (``FOUND``). Example counts keep the file to well under a minute on
one thread; ``AMBIENT_FUZZ_SCALE=50 pytest tests/test_fuzz.py --hypothesis-show-statistics`` hunts longer.
"""

import math
import os
import re
import tempfile
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from ambient_mri import masks as M
from ambient_mri.errors import AmbientMRIError, ConfigError, DataError
from ambient_mri.fastmri_io import MAX_DIM, FastMRIVolume, iter_volumes, make_header, parse_header, write_volume
from tests.test_fastmri_io import BAD_CASES, _bad_files, kspace, raw_file


def fuzz(n):
    """Hypothesis settings: ``n`` examples (times ``$AMBIENT_FUZZ_SCALE``, default 1: hunt with e.g. 50)."""
    scale = float(os.environ.get("AMBIENT_FUZZ_SCALE", "1"))
    # the default run (CI) draws a fixed set of examples, so a pass or fail is reproducible; a hunt with a
    # scale draws new ones every run
    return settings(max_examples=max(1, int(n * scale)), deadline=None, print_blob=True, derandomize=scale == 1,
                    database=None if scale == 1 else settings.default.database,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.filter_too_much])


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def outcome(fn, *args, **kw):
    """``fn(*args, **kw)``, or the project error it raised (checked to be one line); any other exception
    propagates and fails the property."""
    try:
        return fn(*args, **kw)
    except AmbientMRIError as e:
        assert "\n" not in str(e) and str(e).strip(), repr(e)
        return e


# ----------------------------------------------------------------------------------------------
# Strategies

NAN, INF = float("nan"), float("inf")
# accelerations: plausible ones, absurd ones (< 1, 0, negative, NaN, +-inf, huge) and integers
accels = st.one_of(st.floats(1.0, 16.0), st.sampled_from([0.0, -1.0, 0.5, 0.999, NAN, INF, -INF, 1e308]),
                   st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 5000))
# seeds: valid ones [0, 2^32) and invalid ones (negative, too large): the latter must be a ConfigError
seeds = st.one_of(st.integers(0, 2**32 - 1), st.integers(-5, -1), st.integers(2**32, 2**33))
sizes = st.integers(-3, 80)
center_lines = st.one_of(st.none(), st.integers(-4, 100))
center_fractions = st.one_of(st.none(), st.floats(-1.0, 2.0), st.floats(allow_nan=False, allow_infinity=False))


def assert_valid_sampling_mask(sm, shape2d):
    """A :class:`SamplingMask` as documented: bool, right shape, non-empty, the centred ACS/calibration
    block (inside the matrix) fully sampled, acceleration = size / count."""
    assert isinstance(sm, M.SamplingMask)
    m = sm.mask
    assert m.dtype == bool and m.shape == shape2d, (m.dtype, m.shape, shape2d)
    assert m.any()
    assert all(0 <= a <= s for a, s in zip(sm.acs, m.shape)), (sm.acs, m.shape)
    assert m[M.acs_region(m.shape, sm.acs)].all()
    assert sm.acceleration == pytest.approx(m.size / m.sum()) and sm.acceleration >= 1


def same_mask(a, b):
    if isinstance(a, AmbientMRIError):
        return type(a) is type(b) and str(a) == str(b)
    return np.array_equal(a.mask, b.mask) and a.acs == b.acs and a.seed == b.seed


# ----------------------------------------------------------------------------------------------
# 1-D line masks


@fuzz(150)
@given(kind=st.sampled_from(["random", "equispaced", "adps", "gaussian"]), W=st.one_of(sizes, st.integers(81, 1024)),
       accel=accels, n=center_lines, cf=center_fractions, seed=seeds)
def test_line_masks_are_valid_or_a_config_error(kind, W, accel, n, cf, seed):
    if kind in ("random", "equispaced"):
        fn = M.random_lines if kind == "random" else M.equispaced_lines
        call = lambda: fn(W, accel, center_fraction=cf, center_lines=n, seed=seed)  # noqa: E731
        frac = 0.08 if cf is None else cf
        # (a fraction outside [0, 1] or a NaN must be refused; -1 stands for "no valid ACS size")
        n_acs = n if n is not None else (int(round(W * frac)) if 0 <= frac <= 1 else -1)
    else:
        fn = M.adps_lines if kind == "adps" else M.gaussian_lines
        n_acs = 20 if n is None else n
        call = lambda: fn(W, accel, center_lines=n_acs, seed=seed)  # noqa: E731
    sm = outcome(call)
    event(f"{kind}: {type(sm).__name__}")
    assert same_mask(sm, outcome(call))  # a pure function of its arguments
    if isinstance(sm, AmbientMRIError):
        assert isinstance(sm, ConfigError)
        return
    assert 1 <= accel <= W and 0 <= n_acs <= W  # anything else must have been refused
    assert_valid_sampling_mask(sm, (1, W))
    assert sm.acs == (1, n_acs) and sm.kind == kind
    if kind in ("adps", "gaussian"):  # exactly floor(W / R) lines (or the ACS block if it is larger)
        assert sm.mask.sum() == max(n_acs, math.floor(W / accel))


# ----------------------------------------------------------------------------------------------
# 2-D masks


@fuzz(60)
@given(H=sizes, W=sizes, accel=accels, calib=st.tuples(st.integers(-3, 90), st.integers(-3, 90)), seed=seeds)
def test_poisson_disc_is_valid_or_a_config_error(H, W, accel, calib, seed):
    sm = outcome(M.poisson_disc, (H, W), accel, calib=calib, seed=seed)
    assert same_mask(sm, outcome(M.poisson_disc, (H, W), accel, calib=calib, seed=seed))
    if isinstance(sm, AmbientMRIError):
        assert isinstance(sm, ConfigError)
        return
    assert 1 <= accel <= H * W
    assert_valid_sampling_mask(sm, (H, W))
    n_cal = int(M.acs_region((H, W), calib).sum())
    assert sm.mask.sum() == max(n_cal, math.floor(H * W / accel))  # exactly floor(H W / R) samples


@fuzz(20)
@given(H=st.integers(-2, 48), W=st.integers(-2, 48), accel=accels,
       calib=st.tuples(st.integers(0, 50), st.integers(0, 50)), seed=st.integers(0, 2**31 - 2**20))
def test_sigpy_poisson_is_valid_or_a_config_error(H, W, accel, calib, seed):
    sm = outcome(M.sigpy_poisson, (H, W), accel, calib=calib, seed=seed, attempts=3)
    if isinstance(sm, AmbientMRIError):
        assert isinstance(sm, ConfigError)
        return
    assert 1 <= accel <= H * W
    assert_valid_sampling_mask(sm, (H, W))
    assert (sm.seed - seed) % 1000 == 0  # the seed that worked is recorded...
    assert same_mask(sm, M.sigpy_poisson((H, W), accel, calib=calib, seed=sm.seed, attempts=1))  # ...and reproduces


@fuzz(60)
@given(kind=st.sampled_from(M.KSPACE_KINDS + ("nonsense", "")), shape=st.tuples(st.integers(0, 48), st.integers(0, 48)),
       accel=accels, center=st.one_of(st.none(), st.integers(0, 60)), cf=st.one_of(st.none(), st.floats(0, 1)),
       seed=st.integers(0, 2**31 - 2**20))
def test_kspace_mask_dispatch_is_valid_or_a_config_error(kind, shape, accel, center, cf, seed):
    sm = outcome(M.kspace_mask, kind, shape, accel, center=center, center_fraction=cf, seed=seed)
    if isinstance(sm, AmbientMRIError):
        assert isinstance(sm, ConfigError)
        return
    assert kind in M.KSPACE_KINDS
    assert_valid_sampling_mask(sm, (1, shape[1]) if kind in M.LINE_KINDS else shape)
    assert same_mask(sm, M.kspace_mask(kind, shape, accel, center=center, center_fraction=cf, seed=seed))


# ----------------------------------------------------------------------------------------------
# Image-domain masks


@fuzz(80)
@given(kind=st.sampled_from(M.IMAGE_KINDS + ("nonsense",)), shape=st.tuples(st.integers(1, 64), st.integers(1, 64)),
       level=st.one_of(st.floats(0, 1), st.floats(allow_nan=True, allow_infinity=True)), seed=seeds)
def test_image_masks_are_valid_or_a_config_error(kind, shape, level, seed):
    m = outcome(M.image_mask, kind, shape, level, seed=seed)
    if isinstance(m, AmbientMRIError):
        assert isinstance(m, ConfigError)
        return
    assert kind in M.IMAGE_KINDS and 0 <= level < 1
    assert m.dtype == bool and m.shape == shape
    np.testing.assert_array_equal(m, M.image_mask(kind, shape, level, seed=seed))
    if kind == "box":  # one square box of side round(sqrt(level H W)) (clipped to the image) is erased
        side = int(round(math.sqrt(level * shape[0] * shape[1])))
        assert (~m).sum() == min(side, shape[0]) * min(side, shape[1])
        rows, cols = np.flatnonzero((~m).any(1)), np.flatnonzero((~m).any(0))
        if rows.size:
            assert (~m)[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()  # a single rectangle


# ----------------------------------------------------------------------------------------------
# Further corruption M~ <= M


@st.composite
def base_masks(draw):
    """A batch of valid k-space masks (line or 2-D), its recorded ACS block, and a dtype."""
    B = draw(st.integers(1, 3))
    two_d = draw(st.booleans())
    seed = draw(st.integers(0, 1000))
    if two_d:
        H, W = draw(st.integers(4, 32)), draw(st.integers(4, 32))
        c = draw(st.integers(0, min(H, W)))
        sms = [M.poisson_disc((H, W), draw(st.floats(1, 8)), calib=(c, c), seed=seed + b) for b in range(B)]
    else:
        W = draw(st.integers(2, 96))
        c = draw(st.integers(0, W))
        sms = [M.adps_lines(W, draw(st.floats(1, W)), center_lines=c, seed=seed + b) for b in range(B)]
    acs = draw(st.one_of(st.just(sms[0].acs), st.tuples(st.integers(-2, 40), st.integers(-2, 40))))
    dtype = draw(st.sampled_from([torch.bool, torch.uint8, torch.float32]))
    return torch.from_numpy(np.stack([sm.mask for sm in sms])).to(dtype), tuple(acs)


further_accels = st.one_of(st.floats(1, 40), st.sampled_from([1.0, 0.5, INF, 1e308, -2.0]), st.integers(1, 500))


@fuzz(80)
@given(base=base_masks(), use_accel=st.booleans(), further_accel=further_accels,
       delta=st.one_of(st.floats(0, 1), st.sampled_from([-0.5, 1.5, 0.0, 1.0])), gseed=st.integers(0, 2**40))
def test_further_kspace_mask_is_a_sub_mask_that_keeps_the_acs_block(base, use_accel, further_accel, delta, gseed):
    mask, acs = base
    kw = {"further_accel": further_accel} if use_accel else {"delta": delta}
    f = outcome(M.further_kspace_mask, mask, acs, generator=torch.Generator().manual_seed(gseed), **kw)
    if isinstance(f, AmbientMRIError):
        assert isinstance(f, ConfigError)
        return
    again = M.further_kspace_mask(mask, acs, generator=torch.Generator().manual_seed(gseed), **kw)
    assert torch.equal(f, again)
    assert f.shape == mask.shape and f.dtype == mask.dtype
    B, h, W = mask.shape
    m, fm = mask.numpy() > 0, f.numpy() > 0
    assert np.all(fm <= m)  # M~ <= M
    acs_block = M.acs_region((h, W), acs)
    assert np.all(fm[:, acs_block] == m[:, acs_block])  # the ACS block is never touched
    n_outer = (m & ~acs_block).reshape(B, -1).sum(1)
    removed = m.reshape(B, -1).sum(1) - fm.reshape(B, -1).sum(1)
    clamp = lambda r, n: min(max(r, 1), n)  # noqa: E731  (at least one while any is left, at most all)
    for b in range(B):
        if use_accel:  # keep floor(N / R~)
            want = {m[b].sum() - M.further_count(h * W, further_accel)}
        else:  # remove round(delta n_outer); a tie may round either way (the package rounds in float32)
            x = delta * n_outer[b]
            want = {round(x)} | ({math.floor(x), math.ceil(x)} if abs(x - math.floor(x) - 0.5) < 1e-4 else set())
        assert removed[b] in {clamp(r, n_outer[b]) for r in want}, (removed[b], want, n_outer[b])


@fuzz(60)
@given(kind=st.sampled_from(M.IMAGE_KINDS + ("nonsense",)), B=st.integers(1, 3), H=st.integers(1, 40),
       W=st.integers(1, 40), base_level=st.floats(0, 0.9),
       level=st.one_of(st.floats(0, 1), st.sampled_from([1.0, 2.0])),
       seed=st.integers(0, 1000))
def test_further_image_mask_is_a_sub_mask(kind, B, H, W, base_level, level, seed):
    base = np.stack([M.image_mask("pixels", (H, W), base_level, seed=seed + b) for b in range(B)])
    mask = torch.from_numpy(base)
    f = outcome(M.further_image_mask, mask, kind, level, generator=torch.Generator().manual_seed(seed))
    if isinstance(f, AmbientMRIError):
        assert isinstance(f, ConfigError) and (kind not in M.IMAGE_KINDS or not 0 <= level < 1)
        return
    assert 0 <= level < 1  # erasing everything (level >= 1) is refused
    assert f.shape == mask.shape and f.dtype == mask.dtype and torch.all(f <= mask)
    assert torch.equal(f, M.further_image_mask(mask, kind, level, generator=torch.Generator().manual_seed(seed)))
    if kind == "box":  # at most one box of the documented size is erased from each item
        side = int(round(math.sqrt(level * H * W)))
        assert torch.all((mask & ~f).sum((1, 2)) <= min(side, H) * min(side, W))
        full = M.further_image_mask(torch.ones(B, H, W, dtype=torch.bool), kind, level)
        assert torch.all((~full).sum((1, 2)) == min(side, H) * min(side, W))


# ----------------------------------------------------------------------------------------------
# The header parser


def header_texts():
    """Valid headers with absurd numbers, edited headers, XML declarations, and arbitrary text/bytes."""
    good = make_header((32, 16), (16, 16)).decode()
    numbers = st.one_of(st.integers(-10**20, 10**20).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                        st.sampled_from(["", " ", "nan", "inf", "-inf", "1e999", "0x10", "1_000", "٣٢", "\x00"]),
                        st.text(max_size=8))
    tags = st.sampled_from(["x", "y", "z", "center", "maximum", "minimum"])
    edited = st.builds(lambda tag, v, count: re.sub(rf"<{tag}>[^<]*</{tag}>", lambda _: f"<{tag}>{v}</{tag}>", good,
                                                    count), tags, numbers, st.integers(0, 6))
    removed = st.builds(lambda tag: good.replace(f"<{tag}>", "<gone>").replace(f"</{tag}>", "</gone>"),
                        st.sampled_from(["encodedSpace", "reconSpace", "matrixSize", "fieldOfView_mm", "x", "center"]))
    decl = st.builds(lambda enc, body: f'<?xml version="1.0" encoding="{enc}"?>' + body,
                     st.sampled_from(["utf-8", "UTF-16", "latin-1", "ascii", "us-ascii"]),
                     st.sampled_from(["<a/>", good[38:]]))
    return st.one_of(st.just(good), edited, removed, decl, st.text(max_size=300), st.binary(max_size=300),
                     edited.map(lambda s: s.encode()), decl.map(lambda s: s.encode("utf-8")))


@fuzz(200)
@given(text=header_texts())
def test_parse_header_returns_sizes_or_raises_value_or_parse_error(text):
    """``parse_header`` documents ``ValueError``, ``ET.ParseError`` (XML that does not parse) and ``LookupError``
    (a declaration naming an unknown encoding); the reader catches all three. Nothing else may escape."""
    try:
        h = parse_header(text)
    except (ValueError, ET.ParseError, LookupError):
        return
    assert set(h) == {"encoding_size", "recon_size", "encoding_fov_mm", "padding_left", "padding_right"}
    for key in ("encoding_size", "recon_size"):
        assert len(h[key]) == 3 and all(isinstance(v, int) for v in h[key])
    assert len(h["encoding_fov_mm"]) == 3 and all(math.isfinite(v) for v in h["encoding_fov_mm"])
    assert isinstance(h["padding_left"], int) and isinstance(h["padding_right"], int)


# ----------------------------------------------------------------------------------------------
# The reader


def check_volume(path: Path):
    """Open and read every slice (and reference) of ``path``: each step either works as documented or
    raises a one-line ``DataError`` naming the file. Returns ``None`` when the file opens and every slice
    reads, else the first error message (errors reading the reference are checked, not returned)."""
    name = path.name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # header fallbacks and numpy casts warn; not the subject here
        try:
            vol = FastMRIVolume(path)
        except DataError as e:
            event("reader: refused on open")
            return assert_one_line(e, name)
        with vol:
            S, C, H, W = vol.shape
            assert min(vol.shape) >= 1 and max(H, W) <= MAX_DIM and vol.num_slices == S and vol.num_coils == C
            assert vol.header["source"] in ("header", "array")
            assert all(1 <= s <= MAX_DIM for s in vol.header["encoding_size"][:2] + vol.header["recon_size"][:2])
            if vol.mask is not None:
                assert vol.mask.dtype == bool and vol.mask.any() and vol.mask.shape in ((W,), (H, W))
                assert vol.acceleration >= 1 and math.isfinite(vol.acceleration)
            else:
                assert vol.acceleration is None
            repr(vol)
            errors = []
            for i in range(S):
                try:
                    k = vol.slice(i)
                except DataError as e:
                    errors.append(assert_one_line(e, name))
                    continue
                assert k.dtype == np.complex64 and k.shape == (C, H, W) and np.isfinite(k).all()
                if vol.mask is not None:
                    assert not k[..., ~vol.mask].any()  # zero outside the mask
                try:
                    ref = vol.reference(i)
                except DataError as e:
                    assert_one_line(e, name)
                    continue
                assert ref is None or (isinstance(ref, np.ndarray) and ref.dtype == np.float32)
            with pytest.raises(DataError):
                vol.slice(S)
    event("reader: a slice refused" if errors else "reader: every slice read")
    return errors[0] if errors else None


def assert_one_line(err: DataError, name: str) -> str:
    msg = str(err)
    assert isinstance(err, DataError) and "\n" not in msg and name in msg and len(msg) < 600, msg
    return msg


rarely = st.integers(0, 7).map(lambda x: x == 0)  # True one time in eight (hypothesis has no weighted booleans)
DTYPES = ["complex64", "complex128", "float32", "float64", "int16", "uint8", "bool", "S3"]


@st.composite
def arrays(draw, rank=None, max_side=6, dtypes=DTYPES):
    """A small array of a chosen rank/shape/dtype, with NaN/Inf poked in at chosen places."""
    rank = draw(st.integers(0, 5)) if rank is None else rank
    shape = tuple(draw(st.lists(st.integers(0, max_side), min_size=rank, max_size=rank)))
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    if dtype.kind == "c":
        a = x.astype(dtype)
    elif dtype.kind == "f":
        a = x.real.astype(dtype)
    elif dtype.kind in "iub":
        a = (x.real > draw(st.floats(-3, 3))).astype(dtype)
    else:
        a = np.full(shape, b"abc", dtype)
    if a.size and dtype.kind in "cf" and draw(st.booleans()):
        for _ in range(draw(st.integers(1, 3))):
            a.flat[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from([NAN, INF, -INF]))
    return a


@st.composite
def h5_specs(draw):
    """What goes into a fastMRI-layout file: datasets (some of the wrong kind), attributes, storage."""
    S, C, H, W = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 8)), draw(st.integers(1, 8))
    if draw(rarely):  # an empty axis
        S, C, H, W = [0 if i == draw(st.integers(0, 3)) else n for i, n in enumerate((S, C, H, W))]
    spec = {}
    ks = draw(st.sampled_from(["multi", "multi", "multi", "single", "single", "array", "group", "absent"]))
    if ks in ("multi", "single"):
        shape = (S, C, H, W) if ks == "multi" else (S, H, W)
        rng = np.random.default_rng(draw(st.integers(0, 1000)))
        k = kspace(rng, *shape) if ks == "multi" else kspace(rng, S, 1, H, W)[:, 0]
        k = k.astype(draw(st.sampled_from(["complex64", "complex128"])))
        if k.size and draw(rarely):
            k.flat[draw(st.integers(0, k.size - 1))] = draw(st.sampled_from([NAN, INF, complex(0, NAN)]))
        spec["kspace"] = k
    elif ks == "array":
        spec["kspace"] = draw(arrays())
    elif ks == "group":
        spec["kspace"] = "group"
    m = draw(st.sampled_from(["absent", "absent", "absent", "lines", "lines", "lines2d", "2d", "array"]))
    if m != "absent":
        shape = {"lines": (W,), "lines2d": (1, W), "2d": (H, W), "array": None}[m]
        spec["mask"] = draw(arrays(dtypes=["bool", "uint8", "float32", "float64", "int64", "S3"])) if shape is None \
            else (np.random.default_rng(draw(st.integers(0, 99))).uniform(size=shape) < draw(st.floats(0.05, 1))).astype(
                draw(st.sampled_from(["bool", "uint8", "float32"])))
    hdr = draw(st.sampled_from(["absent", "good", "sizes", "text", "ints"]))
    if hdr == "good":
        spec["ismrmrd_header"] = np.bytes_(make_header((max(H, 1), max(W, 1)), (max(min(H, W), 1),) * 2))
    elif hdr == "sizes":  # matrix sizes from -5 to twice the reader's limit (make_header divides by them: edit)
        sizes = iter(str(draw(st.integers(-5, 2 * MAX_DIM))) for _ in range(4))
        xml = re.sub(r"<matrixSize><x>\d+</x><y>\d+</y>",
                     lambda _: f"<matrixSize><x>{next(sizes)}</x><y>{next(sizes)}</y>",
                     make_header((32, 16), (16, 16)).decode())
        spec["ismrmrd_header"] = np.bytes_(xml.encode())
    elif hdr == "text":
        t = draw(header_texts())
        t = (t if isinstance(t, bytes) else t.encode("utf-8")).rstrip(b"\0") or b"<"
        spec["ismrmrd_header"] = np.void(t) if draw(st.booleans()) else np.bytes_(t)  # opaque or a string
    elif hdr == "ints":
        spec["ismrmrd_header"] = draw(arrays(rank=1, dtypes=["int16", "float32"]))
    if draw(st.booleans()):  # a reference: the right shape or anything
        spec["reconstruction_rss"] = np.zeros((S, H, W), np.float32) if draw(st.booleans()) else draw(
            arrays(dtypes=["float32", "complex64", "S3", "int16"]))
    attrs = {}
    acc = draw(st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.just("fast"),
                         st.just(np.arange(3.0))))
    if acc is not None:
        attrs["acceleration"] = acc
    spec["attrs"] = attrs
    spec["compress"] = draw(st.sampled_from([None, "gzip", "lzf"]))
    return spec


def write_spec(path: Path, spec: dict) -> Path:
    """Write ``spec`` (from :func:`h5_specs`) with ``raw_file``; a group or compressed ``kspace`` after."""
    spec = dict(spec)
    compress = spec.pop("compress")
    k = spec.pop("kspace", None)
    raw_file(path, **spec)
    if k is None:
        return path
    with h5py.File(path, "a") as f:
        if isinstance(k, str):
            f.create_group("kspace").create_dataset("data", data=np.zeros(3))
        elif compress and k.ndim and k.size and k.dtype.kind != "S":
            f.create_dataset("kspace", data=k, compression=compress, shuffle=True, chunks=True)
        else:
            f.create_dataset("kspace", data=k)
    return path


@fuzz(120)
@given(spec=h5_specs())
def test_reader_on_generated_files_reads_valid_slices_or_raises_one_line_data_error(spec):
    """Files with hypothesis-chosen ``kspace`` (multi/single-coil, any rank/dtype, a group, absent; NaN/Inf;
    empty axes; compressed or not), ``mask``, ``ismrmrd_header`` (good, absurd sizes, arbitrary text or
    bytes, numbers), ``reconstruction_rss`` and ``acceleration`` attribute."""
    with tempfile.TemporaryDirectory() as tmp:
        path = write_spec(Path(tmp) / "gen.h5", spec)
        result = check_volume(path)
        k, mk = spec.get("kspace"), spec.get("mask")
        well_formed = (isinstance(k, np.ndarray) and k.dtype.kind == "c" and k.ndim in (3, 4) and k.size
                       and np.isfinite(k).all())
        mask_ok = mk is None or (well_formed and mk.dtype.kind in "biuf" and np.isfinite(mk).all() and mk.any()
                                 and mk.shape in (k.shape[-1:], (1, k.shape[-1]), k.shape[-2:]))
        if well_formed and mask_ok:  # finite, non-empty complex k-space (and a usable mask, if any) must read,
            # whatever the header, reference and attributes hold
            assert result is None, result
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with FastMRIVolume(path) as v:
                    want = (k if k.ndim == 4 else k[:, None])[0].astype(np.complex64)
                    np.testing.assert_array_equal(v.slice(0, apply_mask=False), want)
                    np.testing.assert_array_equal(v.slice(0), want * (1 if mk is None else v.mask))
        # the batch helper reports the same file through on_error instead of raising
        bad = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opened = [v.path.name for v in iter_volumes(tmp, on_error=lambda p, e: bad.append(str(e)))]
        assert len(opened) + len(bad) == 1 and all("gen.h5" in b and "\n" not in b for b in bad)


@fuzz(80)
@given(case=st.sampled_from(["good", "good_masked", "good_single"] * 4 + [c for c in BAD_CASES if c != "folder"]),
       how=st.sampled_from(["truncate", "damage"]),
       where=st.floats(0, 1), junk=st.binary(min_size=1, max_size=16), seed=st.integers(0, 1000))
def test_truncated_or_damaged_files_read_valid_slices_or_raise_one_line_data_error(case, how, where, junk, seed):
    """A valid file or one of the malformed corpus of tests/test_fastmri_io.py, cut at a chosen offset or
    overwritten with chosen bytes at a chosen offset (HDF5 superblock, B-trees, heaps, data alike)."""
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / "fuzzed.h5"
        if case.startswith("good"):
            k = kspace(rng, S=2, C=2, H=8, W=8)
            if case == "good_masked":
                write_volume(path, k, mask=rng.uniform(size=8) < 0.5, acceleration=2.0)
            else:
                write_volume(path, k[:, 0] if case == "good_single" else k)
        else:
            _bad_files(tmp, rng)[case][0](path)
        data = bytearray(path.read_bytes())
        size = len(data)
        at = int(where * size)
        if how == "truncate":
            data = data[:at]
        else:
            data[at : at + len(junk)] = junk
        path.write_bytes(bytes(data))
        result = check_volume(path)
        if case.startswith("good") and how == "truncate" and at == size:
            assert result is None, result  # nothing was cut


@fuzz(40)
@given(data=st.binary(max_size=2048), signature=st.booleans())
def test_random_bytes_are_a_one_line_data_error(data, signature):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "noise.h5"
        path.write_bytes((b"\x89HDF\r\n\x1a\n" if signature else b"") + data)
        assert check_volume(path) is not None  # noise is never a readable volume


# ----------------------------------------------------------------------------------------------
# Inputs the fuzzing found breaking a property (all fixed), kept as regression cases


def _ones(*shape):
    return torch.ones(*shape, dtype=torch.bool)


# name -> (call, the exception it raised before the fix, where). Locations are ambient_mri/masks.py unless named.
FOUND = {
    # parse_header: ET.fromstring raises LookupError for an XML declaration naming an unknown encoding
    # (fastmri_io.py:55); it is neither the documented ValueError nor ET.ParseError, and
    # FastMRIVolume._read_header (fastmri_io.py:253) catches only those and the h5py errors: see the reader test.
    "parse_header_unknown_encoding": (lambda: parse_header(b'<?xml version="1.0" encoding="bogus"?><a/>'), LookupError,
                                      "fastmri_io.py:55"),
    # _n_center: int(round(W * center_fraction)) on NaN / inf
    "random_lines_nan_center_fraction": (lambda: M.random_lines(64, 4, center_fraction=NAN), ValueError, "86"),
    "equispaced_lines_inf_center_fraction": (lambda: M.equispaced_lines(64, 4, center_fraction=INF), OverflowError,
                                             "86"),
    # seeds are not checked: np.random.RandomState needs [0, 2^32), default_rng a non-negative integer
    "random_lines_negative_seed": (lambda: M.random_lines(64, 4, seed=-1), ValueError, "102"),
    "equispaced_lines_seed_2_32": (lambda: M.equispaced_lines(64, 4, seed=2**32), ValueError, "128"),
    "adps_lines_negative_seed": (lambda: M.adps_lines(64, 4, center_lines=4, seed=-1), ValueError, "118"),
    "image_mask_negative_seed": (lambda: M.image_mask("pixels", (8, 8), 0.5, seed=-1), ValueError, "351"),
    # _check sees only the product H * W, so two negative sides pass; numpy then refuses the shape
    "poisson_disc_negative_shape": (lambda: M.poisson_disc((-4, -4), 2, calib=(2, 2)), ValueError, "170/174"),
    "kspace_mask_poisson_negative_shape": (lambda: M.kspace_mask("poisson", (-4, -4), 2), ValueError, "339"),
    # the image masks check only the level, not the shape
    "random_pixels_negative_shape": (lambda: M.random_pixels((-4, 4), 0.5), ValueError, "351"),
    "random_box_negative_shape": (lambda: M.random_box((-4, -4), 0.5), ValueError, "363"),
    "random_pixels_zero_shape": (lambda: M.random_pixels((0, 8), 0.5), AssertionError, "351 (an empty mask returned)"),
    # gaussian_lines: a small std_fraction underflows p to 0: numpy's choice refuses p (not reachable through
    # kspace_mask, which always uses the default 0.25)
    "gaussian_lines_std_fraction_0": (lambda: M.gaussian_lines(64, 2, center_lines=4, std_fraction=0.0), ValueError,
                                      "148/151"),
    "gaussian_lines_std_fraction_0.001": (lambda: M.gaussian_lines(64, 2, center_lines=4, std_fraction=0.001),
                                          ValueError, "151"),
    # further_kspace_mask checks neither R~ (config.py does, for the trainer) nor the mask's rank
    "further_kspace_mask_further_accel_0": (lambda: M.further_kspace_mask(_lines(), (1, 4), further_accel=0),
                                            ZeroDivisionError, "383"),
    "further_kspace_mask_further_accel_nan": (lambda: M.further_kspace_mask(_lines(), (1, 4), further_accel=NAN),
                                              ValueError, "383"),
    "further_kspace_mask_wrong_rank": (lambda: M.further_kspace_mask(_lines()[None], (1, 4), delta=0.3), ValueError,
                                       "401"),
    # further_image_mask box: math.sqrt of a negative level / round(NaN)
    "further_image_mask_box_negative_level": (lambda: M.further_image_mask(_ones(1, 8, 8), "box", -0.1), ValueError,
                                              "428"),
    "further_image_mask_box_nan_level": (lambda: M.further_image_mask(_ones(1, 8, 8), "box", NAN), ValueError, "428"),
    # poisson_disc accepts a calibration block outside the matrix (both sides negative, or one side larger than
    # the matrix while the product fits: _check sees only the product) and records it as the ACS block
    "poisson_disc_negative_calib": (lambda: M.poisson_disc((8, 8), 2, calib=(-2, -2)), AssertionError, "170/194"),
    "poisson_disc_calib_taller_than_matrix": (lambda: M.poisson_disc((8, 8), 2, calib=(12, 1)), AssertionError,
                                              "170/194"),
}


def _lines():
    return torch.from_numpy(M.adps_lines(32, 2, center_lines=4).mask[None])


def _property_holds(fn) -> bool:
    """The property for one call: a valid result or an AmbientMRIError (no other exception)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = outcome(fn)
    if isinstance(r, AmbientMRIError):
        return True
    if isinstance(r, M.SamplingMask):
        assert_valid_sampling_mask(r, r.mask.shape)
    elif isinstance(r, np.ndarray):
        assert r.size > 0
    return True


@pytest.mark.parametrize("name", [n for n in FOUND if n != "parse_header_unknown_encoding"])
def test_former_fuzz_finding_now_gives_a_valid_mask_or_a_config_error(name):
    assert _property_holds(FOUND[name][0])


def test_reader_falls_back_on_a_header_naming_an_unknown_xml_encoding(tmp_path):
    with pytest.raises(LookupError):  # parse_header documents it ...
        FOUND["parse_header_unknown_encoding"][0]()
    p = raw_file(tmp_path / "enc.h5", kspace=kspace(np.random.default_rng(0), S=1, C=1, H=8, W=8),
                 ismrmrd_header=np.bytes_(b'<?xml version="1.0" encoding="bogus"?><ismrmrdHeader/>'))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with FastMRIVolume(p) as vol:  # ... and the reader falls back to the array sizes
            assert vol.header["source"] == "array" and vol.shape == (1, 1, 8, 8)
            assert np.isfinite(vol.slice(0)).all()
