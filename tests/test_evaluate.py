import csv
import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from ambient_mri.errors import DataError
from ambient_mri.commands.evaluate import command
from ambient_mri.evaluate import run_eval
from ambient_mri.fastmri_io import write_volume
from ambient_mri.fft import center_crop, fft2c, rss
from ambient_mri.metrics import psnr_adps, psnr_fastmri


def write_recon(path, x, *, method, accel, std=None, slice_index=None, units=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["reconstruction"] = np.abs(x).astype(np.float32)
        if std is not None:
            f["std"] = std.astype(np.float32)
        f["slice_index"] = np.arange(x.shape[0]) if slice_index is None else slice_index
        f.attrs.update(method=method, label=method, accel=accel, seconds_per_slice=0.5, nfe=10)
        if units is not None:
            f.attrs["units"] = units


@pytest.fixture
def prepared_reference(tmp_path):
    rng = np.random.default_rng(0)
    ref = tmp_path / "ref"
    ref.mkdir()
    gts = {}
    for v in ("vol_a", "vol_b"):
        gt = (rng.uniform(0.2, 1.0, (3, 24, 24)) * np.exp(1j * rng.uniform(0, 1, (3, 24, 24)))).astype(np.complex64)
        with h5py.File(ref / f"{v}.h5", "w") as f:
            f["reference"] = gt
            f["slice_index"] = np.arange(10, 13)
        gts[v] = gt
    return ref, gts


def test_eval_tables_match_metrics_and_figures(tmp_path, prepared_reference):
    ref, gts = prepared_reference
    rng = np.random.default_rng(1)
    good, bad = tmp_path / "good", tmp_path / "bad"
    for v, gt in gts.items():
        write_recon(good / f"{v}.h5", np.abs(gt) + 0.01 * rng.standard_normal(gt.shape), method="dc", accel=8,
                    std=0.02 * np.ones(gt.shape), slice_index=np.arange(10, 13))
        write_recon(bad / f"{v}.h5", np.abs(gt) + 0.1 * rng.standard_normal(gt.shape), method="zf", accel=8,
                    slice_index=np.arange(10, 13))
    res = run_eval([good, bad], ref, tmp_path / "report")
    rows = {r["label"]: r for r in res["summary"]}
    assert rows["dc"]["n_slices"] == 6 and rows["dc"]["n_volumes"] == 2
    assert rows["dc"]["psnr_adps"][0] > rows["zf"]["psnr_adps"][0] + 10
    with open(tmp_path / "report" / "metrics_slices.csv") as f:
        slices = list(csv.DictReader(f))
    first = [r for r in slices if r["label"] == "dc" and r["volume"] == "vol_a" and r["slice"] == "10"][0]
    with h5py.File(good / "vol_a.h5") as f:
        x0 = f["reconstruction"][0]
    assert float(first["psnr_adps"]) == pytest.approx(psnr_adps(gts["vol_a"][0], x0))
    with open(tmp_path / "report" / "metrics_volumes.csv") as f:
        vols = list(csv.DictReader(f))
    va = [r for r in vols if r["label"] == "dc" and r["volume"] == "vol_a"][0]
    with h5py.File(good / "vol_a.h5") as f:
        assert float(va["psnr_fastmri"]) == pytest.approx(psnr_fastmri(np.abs(gts["vol_a"]), f["reconstruction"][()]))
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert {r["label"] for r in summary["summary"]} == {"dc", "zf"}
    md = (tmp_path / "report" / "summary.md").read_text()
    assert "| dc | 8 | 6 |" in md and "±" in md
    assert res["figures"] and all(p.exists() and p.stat().st_size > 1000 for p in res["figures"])


def test_eval_against_fastmri_folder_crops_to_target(tmp_path):
    rng = np.random.default_rng(2)
    k = fft2c(rng.standard_normal((2, 4, 40, 32)) + 1j * rng.standard_normal((2, 4, 40, 32)))
    write_volume(tmp_path / "fm" / "v.h5", k, recon_size=(24, 24))
    full = rss(np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"), axes=(-2, -1)), dim=1)
    write_recon(tmp_path / "rec" / "v.h5", full, method="sense", accel=4)
    res = run_eval([tmp_path / "rec"], tmp_path / "fm", tmp_path / "rep")
    assert res["summary"][0]["nmse_fastmri"][0] < 1e-10


def test_eval_errors_name_the_file(tmp_path, prepared_reference):
    ref, gts = prepared_reference
    write_recon(tmp_path / "rec" / "vol_c.h5", np.ones((3, 24, 24)), method="zf", accel=4)
    with pytest.raises(DataError, match="vol_c.h5"):
        run_eval([tmp_path / "rec"], ref, tmp_path / "rep")
    write_recon(tmp_path / "rec2" / "vol_a.h5", np.full((3, 24, 24), np.nan), method="zf", accel=4,
                slice_index=np.arange(10, 13))
    r = CliRunner().invoke(command, ["--recon", str(tmp_path / "rec2"), "--reference", str(ref), "--out",
                                     str(tmp_path / "rep")])
    assert r.exit_code != 0 and "NaN" in str(r.exception)


def test_eval_refuses_a_units_mismatch_in_one_line_naming_the_file(tmp_path, prepared_reference, capsys):
    """recon writes units = prepared (prepared input) or raw (raw fastMRI input); a prepared 'reference' is in
    prepared units, fastMRI's reconstruction_rss in raw units. PSNR (A-DPS) = 20 log10(max|gt| / RMSE) is
    meaningless when only one of the two images is rescaled, so a mismatch must never be scored."""
    from ambient_mri.cli import main as cli_main

    ref, gts = prepared_reference
    for units in ("prepared", None):  # matching units, or a file from another tool: scored
        write_recon(tmp_path / f"ok_{units}" / "vol_a.h5", 1.01 * np.abs(gts["vol_a"]), method="dc", accel=4,
                    slice_index=np.arange(10, 13), units=units)
        res = run_eval([tmp_path / f"ok_{units}"], ref, tmp_path / f"rep_{units}")
        assert res["summary"][0]["nrmse_adps"][0] == pytest.approx(0.01, rel=1e-3)
    # raw-unit reconstruction (norm 1000 per slice) against the prepared reference: refused, not scored
    write_recon(tmp_path / "raw" / "vol_a.h5", 1000 * np.abs(gts["vol_a"]), method="dc", accel=4,
                slice_index=np.arange(10, 13), units="raw")
    with pytest.raises(DataError, match=r"vol_a\.h5.*raw units.*prepared units"):
        run_eval([tmp_path / "raw"], ref, tmp_path / "rep_raw")
    assert not (tmp_path / "rep_raw" / "summary.json").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli_main(["eval", "--recon", str(tmp_path / "raw"), "--reference", str(ref), "--out", str(tmp_path / "r2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and str(tmp_path / "raw" / "vol_a.h5") in err[0], err
    assert "raw units" in err[0] and "Traceback" not in err[0]
    # the reverse: a prepared-unit reconstruction against a fastMRI file (raw units)
    rng = np.random.default_rng(2)
    k = fft2c(rng.standard_normal((2, 4, 24, 24)) + 1j * rng.standard_normal((2, 4, 24, 24)))
    write_volume(tmp_path / "fm" / "v.h5", k, recon_size=(24, 24))
    write_recon(tmp_path / "prep_rec" / "v.h5", np.ones((2, 24, 24)), method="zf", accel=4, units="prepared")
    with pytest.raises(DataError, match=r"v\.h5.*prepared units.*raw units"):
        run_eval([tmp_path / "prep_rec"], tmp_path / "fm", tmp_path / "rep_fm")
    write_recon(tmp_path / "raw_rec" / "v.h5", rng.uniform(1, 2, (2, 24, 24)), method="zf", accel=4, units="raw")
    assert run_eval([tmp_path / "raw_rec"], tmp_path / "fm", tmp_path / "rep_fm")["summary"]
    write_recon(tmp_path / "odd" / "v.h5", np.ones((2, 24, 24)), method="zf", accel=4, units="furlongs")
    with pytest.raises(DataError, match="unknown units"):
        run_eval([tmp_path / "odd"], tmp_path / "fm", tmp_path / "rep_odd")
