"""fastMRI-layout reader: round trips with ``write_volume``, lazy slice reads, one-line errors on bad input."""

import h5py
import numpy as np
import pytest

from ambient_mri.errors import DataError
from ambient_mri.fastmri_io import FastMRIVolume, iter_volumes, list_volumes, make_header, write_volume
from ambient_mri.fft import center_crop, ifft2c, rss


def kspace(rng, S=3, C=4, H=32, W=16):
    k = rng.standard_normal((S, C, H, W)) + 1j * rng.standard_normal((S, C, H, W))
    return k.astype(np.complex64)


def raw_file(path, **datasets):
    """An .h5 written key by key (for broken files); ``attrs`` is a dict of file attributes."""
    attrs = datasets.pop("attrs", {})
    with h5py.File(path, "w") as f:
        for key, val in datasets.items():
            f.create_dataset(key, data=val)
        for key, val in attrs.items():
            f.attrs[key] = val
    return path


def test_multicoil_train_round_trip_and_fastmri_conventions(tmp_path, rng):
    k = kspace(rng, H=40, W=24)
    p = write_volume(tmp_path / "vol.h5", k, recon_size=(20, 20), acquisition="CORPD_FBK")
    with FastMRIVolume(p) as v:
        assert v.shape == (3, 4, 40, 24) and v.num_slices == 3 and v.num_coils == 4 and not v.single_coil
        assert not v.is_undersampled and v.mask is None and v.acceleration is None
        assert v.header["encoding_size"][:2] == (40, 24) and v.header["recon_size"][:2] == (20, 20)
        assert v.header["source"] == "header" and v.readout_oversampled and v.warnings == []
        assert v.attrs["acquisition"] == "CORPD_FBK" and v.attrs["patient_id"] == "vol"
        for i in range(3):
            s = v.slice(i)
            assert s.dtype == np.complex64 and s.shape == (4, 40, 24)
            np.testing.assert_array_equal(s, k[i])
            # design.md section 2: reconstruction_rss = centre crop of RSS(|ifft2c(kspace)|)
            np.testing.assert_allclose(v.reference(i), center_crop(rss(ifft2c(s), dim=0), (20, 20)), atol=1e-5)
        assert v.reference_key == "reconstruction_rss"
        np.testing.assert_array_equal(v.slice(-1), k[2])
        with pytest.raises(DataError, match="out of range"):
            v.slice(3)


def test_singlecoil_round_trip_reads_as_one_coil(tmp_path, rng):
    k = kspace(rng, C=1)[:, 0]
    p = write_volume(tmp_path / "single.h5", k)
    with FastMRIVolume(p) as v:
        assert v.single_coil and v.shape == (3, 1, 32, 16) and v.num_coils == 1
        np.testing.assert_array_equal(v.slice(1), k[1][None])
        assert v.reference_key == "reconstruction_esc"
        np.testing.assert_allclose(v.reference(1), center_crop(np.abs(ifft2c(k[1])), (16, 16)), atol=1e-5)
        assert v.readout_oversampled  # write_volume's default recon is min(H, W) square: 16 < 32


def test_header_oversampling_rule(tmp_path, rng):
    p = write_volume(tmp_path / "a.h5", kspace(rng, H=16, W=16))
    with FastMRIVolume(p) as v:
        assert not v.readout_oversampled  # encoded 16 == recon 16
    p = write_volume(tmp_path / "b.h5", kspace(rng, H=32, W=16), recon_size=(16, 16))
    with FastMRIVolume(p) as v:
        assert v.readout_oversampled


@pytest.mark.parametrize("two_d", [False, True])
def test_test_style_files_carry_and_apply_their_mask(tmp_path, rng, two_d):
    k = kspace(rng)
    mask = rng.uniform(size=(32, 16) if two_d else 16) < 0.4
    mask[..., 6:10] = True
    p = write_volume(tmp_path / "t.h5", k, mask=mask, acceleration=4.0, num_low_frequency=4)
    with FastMRIVolume(p) as v:
        assert v.is_undersampled and v.mask.shape == mask.shape and v.mask.dtype == bool
        np.testing.assert_array_equal(v.mask, mask)
        assert v.acceleration == 4.0 and v.attrs["num_low_frequency"] == 4 and v.reference_key is None
        s = v.slice(0)
        np.testing.assert_array_equal(s, k[0] * mask)
        assert (s[..., ~mask] == 0).all() and (s[..., mask] != 0).all()


def test_kspace_nonzero_outside_the_mask_is_masked_not_rejected(tmp_path, rng):
    k = kspace(rng, S=2)
    mask = np.zeros(16, bool)
    mask[[1, 5, 7, 8, 9, 12]] = True
    p = raw_file(tmp_path / "m.h5", kspace=k, mask=mask, ismrmrd_header=np.bytes_(make_header((32, 16), (16, 16))))
    with FastMRIVolume(p) as v:
        s = v.slice(1)
        assert (s[..., ~mask] == 0).all()
        np.testing.assert_array_equal(s[..., mask], k[1][..., mask])
        np.testing.assert_array_equal(v.slice(1, apply_mask=False), k[1])


def test_slices_are_read_lazily(tmp_path, rng, monkeypatch):
    S, C, H, W = 6, 4, 32, 16
    p = write_volume(tmp_path / "lazy.h5", kspace(rng, S=S, C=C, H=H, W=W))
    reads = []
    original = h5py.Dataset.__getitem__

    def recording(self, sel):
        out = original(self, sel)
        if self.name == "/kspace":
            reads.append(np.asarray(out).size)
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", recording)
    with FastMRIVolume(p) as v:
        assert max(reads) <= S * C * W  # on open: at most the central k-space row of each slice
        reads.clear()
        v.slice(4)
        assert reads == [C * H * W]  # one slice, not the volume


def test_list_and_iter_volumes_sorted_skip_hidden_and_report_bad(tmp_path, rng):
    for name in ("b.h5", "a.h5", "c.h5"):
        write_volume(tmp_path / name, kspace(rng, S=1))
    (tmp_path / ".a.h5.123.h5.tmp").write_bytes(b"partial")
    (tmp_path / ".hidden.h5").write_bytes(b"partial")
    (tmp_path / "zz.h5").write_text("not hdf5")
    assert [p.name for p in list_volumes(tmp_path)] == ["a.h5", "b.h5", "c.h5", "zz.h5"]
    assert list_volumes(tmp_path / "b.h5") == [tmp_path / "b.h5"]
    bad = []
    names = [v.path.name for v in iter_volumes(tmp_path, on_error=lambda p, e: bad.append((p.name, str(e))))]
    assert names == ["a.h5", "b.h5", "c.h5"]
    assert bad[0][0] == "zz.h5" and "not an HDF5 file" in bad[0][1]
    with pytest.raises(DataError, match="zz.h5"):
        list(iter_volumes(tmp_path))


def _bad_files(tmp_path, rng):
    """name -> (builder, expected words in the error)."""
    k = kspace(rng, S=3)
    hdr = np.bytes_(make_header((32, 16), (16, 16)))

    def truncated(p):
        good = write_volume(tmp_path / "good_for_truncation.h5", k)
        p.write_bytes(good.read_bytes()[: good.stat().st_size // 2])

    def nan_centre(p):
        kk = k.copy()
        kk[1, 2, 16, 3] = np.nan
        raw_file(p, kspace=kk, ismrmrd_header=hdr)

    def inf_centre_single(p):
        kk = k[:, 0].copy()
        kk[2, 16, 0] = np.inf
        raw_file(p, kspace=kk, ismrmrd_header=hdr)

    def mask(m):
        return lambda p: raw_file(p, kspace=k, mask=m, ismrmrd_header=hdr)

    return {
        "not_hdf5": (lambda p: p.write_text("just text\n"), "not an HDF5 file"),
        "empty_file": (lambda p: p.write_bytes(b""), "not an HDF5 file"),
        "truncated": (truncated, "truncated"),
        "folder": (lambda p: p.mkdir(), "not a regular file"),
        "no_kspace": (lambda p: raw_file(p, reconstruction_rss=np.zeros((3, 16, 16), np.float32)), "no 'kspace'"),
        "rank2": (lambda p: raw_file(p, kspace=k[0, 0]), "must be (slices, coils, H, W)"),
        "rank5": (lambda p: raw_file(p, kspace=k[None]), "must be (slices, coils, H, W)"),
        "real_dtype": (lambda p: raw_file(p, kspace=np.abs(k)), "must be complex"),
        "int_dtype": (lambda p: raw_file(p, kspace=np.ones((3, 4, 32, 16), np.int16)), "must be complex"),
        "zero_coils": (lambda p: raw_file(p, kspace=np.zeros((3, 0, 32, 16), np.complex64)), "empty axis"),
        "zero_slices": (lambda p: raw_file(p, kspace=np.zeros((0, 4, 32, 16), np.complex64)), "empty axis"),
        "absurd_shape": (lambda p: raw_file(p, kspace=np.zeros((1, 1, 20000, 1), np.complex64)), "absurd shape"),
        "nan_on_open": (nan_centre, "NaN or Inf (slice 1)"),
        "inf_single_coil": (inf_centre_single, "NaN or Inf (slice 2)"),
        "mask_wrong_length": (mask(np.ones(15, bool)), "'mask' has shape (15,)"),
        "mask_wrong_2d": (mask(np.ones((16, 16), bool)), "'mask' has shape (16, 16)"),
        "mask_3d": (mask(np.ones((3, 32, 16), bool)), "'mask' has shape"),
        "mask_empty": (mask(np.zeros(0, bool)), "'mask' is empty"),
        "mask_all_zero": (mask(np.zeros(16, bool)), "all zero"),
        "mask_nan": (mask(np.full(16, np.nan)), "NaN"),
        "mask_string": (mask(np.array([b"x"] * 16)), "boolean or numeric"),
    }


BAD_CASES = ["not_hdf5", "empty_file", "truncated", "folder", "no_kspace", "rank2", "rank5", "real_dtype",
             "int_dtype", "zero_coils", "zero_slices", "absurd_shape", "nan_on_open", "inf_single_coil",
             "mask_wrong_length", "mask_wrong_2d", "mask_3d", "mask_empty", "mask_all_zero", "mask_nan", "mask_string"]


def test_every_bad_case_is_listed(tmp_path, rng):
    assert sorted(_bad_files(tmp_path, rng)) == sorted(BAD_CASES)


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_data_error_naming_the_file(tmp_path, rng, case):
    build, words = _bad_files(tmp_path, rng)[case]
    p = tmp_path / f"bad_{case}.h5"
    build(p)
    with pytest.raises(DataError) as err:
        FastMRIVolume(p)
    msg = str(err.value)
    assert "\n" not in msg and p.name in msg and words in msg, msg
    assert len(msg) < 400


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        FastMRIVolume(tmp_path / "nope.h5")


def test_nan_outside_the_checked_row_is_caught_when_that_slice_is_read(tmp_path, rng):
    k = kspace(rng)
    k[2, 1, 3, 5] = np.nan  # not on the central row: open succeeds
    p = raw_file(tmp_path / "late_nan.h5", kspace=k, ismrmrd_header=np.bytes_(make_header((32, 16), (16, 16))))
    with FastMRIVolume(p) as v:
        v.slice(0)
        v.slice(1)
        with pytest.raises(DataError) as err:
            v.slice(2)
    assert "late_nan.h5" in str(err.value) and "slice 2" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("header,reason", [
    (None, "no 'ismrmrd_header'"),
    (b"<ismrmrdHeader><unclosed>", "does not parse"),
    (b"<?xml version='1.0'?><ismrmrdHeader xmlns='http://www.ismrm.org/ISMRMRD'/>", "does not parse"),
    (make_header((32, 16), (16, 16)).replace(b"<x>32</x>", b"<x>0</x>"), "absurd sizes"),
    (make_header((32, 16), (99999, 16)), "absurd sizes"),
])
def test_bad_header_falls_back_to_array_shape_with_a_recorded_warning(tmp_path, rng, header, reason):
    k = kspace(rng, S=1)
    data = {"kspace": k} if header is None else {"kspace": k, "ismrmrd_header": np.bytes_(header)}
    p = raw_file(tmp_path / "hdr.h5", **data)
    with pytest.warns(UserWarning, match="hdr.h5"):
        v = FastMRIVolume(p)
    with v:
        assert v.header["source"] == "array" and v.header["encoding_size"][:2] == (32, 16)
        assert v.header["recon_size"][:2] == (32, 16) and not v.readout_oversampled
        assert len(v.warnings) == 1 and reason in v.warnings[0]
        np.testing.assert_array_equal(v.slice(0), k[0])


def test_inputs_are_opened_read_only(tmp_path, rng):
    p = write_volume(tmp_path / "ro.h5", kspace(rng))
    before = p.read_bytes()
    with FastMRIVolume(p) as v:
        assert v._file.mode == "r"
        list(v.slices())
    assert p.read_bytes() == before
