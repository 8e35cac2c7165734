"""``ambient-mri info``: fastMRI files, prepared files and folders, checkpoints and run folders."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ambient_mri.errors import DataError
from ambient_mri.fastmri_io import write_volume
from ambient_mri.fft import fft2c
from ambient_mri.commands.info import command
from ambient_mri.info import describe, kind_of
from ambient_mri.prep import PrepOptions, run_prep


def phantom(rng, S=2, C=4, H=64, W=32):
    yy, xx = np.mgrid[:H, :W]
    img = ((yy - H / 2) ** 2 / (H / 3) ** 2 + (xx - W / 2) ** 2 / (W / 3) ** 2 < 1).astype(np.complex64)
    maps = np.exp(1j * (np.arange(C)[:, None, None] * (xx + yy) / 20.0)) * (1 + 0.2 * np.arange(C)[:, None, None])
    k = fft2c(np.stack([maps * img * (1 + 0.1 * s) for s in range(S)]))
    return (k + 1e-2 * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))).astype(np.complex64)


def run(*args):
    return CliRunner().invoke(command, [str(a) for a in args])


def test_fastmri_files_multi_single_and_test_style(tmp_path, rng):
    k = phantom(rng)
    write_volume(tmp_path / "multi.h5", k, recon_size=(32, 32), acquisition="AXT2")
    write_volume(tmp_path / "single.h5", k[:, 0])
    mask = np.zeros(32, bool)
    mask[::4] = True
    mask[14:18] = True
    write_volume(tmp_path / "test.h5", k, mask=mask, acceleration=4.0, num_low_frequency=4)
    d = describe(tmp_path / "multi.h5")
    assert d["kind"] == "fastmri" and d["slices"] == 2 and d["coils"] == 4 and d["matrix"] == [64, 32]
    assert d["encoding_size"][:2] == [64, 32] and d["recon_size"][:2] == [32, 32] and d["readout_oversampled"]
    assert d["reference_key"] == "reconstruction_rss" and not d["undersampled"] and d["acquisition"] == "AXT2"
    s = describe(tmp_path / "single.h5")
    assert s["single_coil"] and s["coils"] == 1 and s["reference_key"] == "reconstruction_esc"
    t = describe(tmp_path / "test.h5")
    assert t["undersampled"] and t["mask_shape"] == [32] and t["mask_samples"] == int(mask.sum())
    assert t["accel_actual"] == pytest.approx(32 / mask.sum()) and t["acceleration_attr"] == 4.0
    assert t["num_low_frequency"] == 4
    res = run(tmp_path / "test.h5")
    assert res.exit_code == 0 and "undersampled" in res.output and "4-coil" in res.output
    assert f"actual R {32 / mask.sum():.4g}" in res.output
    res = run(tmp_path / "single.h5", "--json")
    assert res.exit_code == 0 and json.loads(res.output)["single_coil"] is True


def test_folder_of_fastmri_files_with_a_bad_one_exits_1(tmp_path, rng):
    write_volume(tmp_path / "a.h5", phantom(rng, S=1))
    (tmp_path / "b.h5").write_text("nope")
    res = run(tmp_path)
    assert res.exit_code == 1
    assert "a.h5: fastMRI-layout, 1 slices, 4-coil" in res.output
    assert "error: " in res.output and "b.h5: not an HDF5 file" in res.output


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("info")
    write_volume(root / "raw" / "v1.h5", phantom(rng), recon_size=(32, 32))
    write_volume(root / "raw" / "v2.h5", phantom(rng, S=3), recon_size=(32, 32))
    opts = PrepOptions(split="val", accel=(2.0, 4.0), maps="lowres", center_lines=6, crop=(32, 32), whiten=False)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_prep(root / "raw", root / "prep", opts, progress=False, echo=lambda m: None)
    finally:
        torch.set_num_threads(n)
    return root / "prep"


def test_prepared_file(prepared):
    p = prepared / "R4" / "v2.h5"
    assert kind_of(p) == "prepared"
    d = describe(p)
    assert d["split"] == "val" and d["domain"] == "kspace" and d["slices"] == 3 and d["mask_kind"] == "adps"
    assert d["shapes"] == {"kspace": [3, 4, 32, 32], "mask": [3, 1, 32], "maps": [3, 4, 32, 32],
                           "reference": [3, 32, 32]}
    assert d["accel"] == 4.0 and d["accel_actual"] == pytest.approx(4.0) and d["reference"] == "cg-sense"
    assert d["acs"] == [32, 6] and d["calib"] == 6 and d["norm"]["min"] <= d["norm"]["median"] <= d["norm"]["max"]
    res = run(p)
    assert res.exit_code == 0
    assert "prepared val (kspace), 3 slices" in res.output and "R 4 nominal / 4 actual" in res.output


def test_prepared_folder_with_one_dataset_per_acceleration(prepared):
    assert kind_of(prepared) == "prepared-folder"
    d = describe(prepared)
    assert [ds["path"].split("/")[-1] for ds in d["datasets"]] == ["R2", "R4"]
    for ds, R in zip(d["datasets"], (2, 4)):
        assert ds["split"] == "val" and ds["slices"] == 5 and ds["manifest_files"] == 2 and ds["errors"] == []
        assert all(f["accel_actual"] == pytest.approx(R) for f in ds["files"])
    res = run(prepared)
    assert res.exit_code == 0 and res.output.count("prepared dataset, split val") == 2
    assert "v1.h5: 2 slices" in res.output and "actual R 2" in res.output
    res = run(prepared / "R2")
    assert res.exit_code == 0 and res.output.count("prepared dataset") == 1


def test_checkpoint_and_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ck = {"model": {"w": torch.zeros(3, 4), "b": torch.zeros(4)}, "config": {"lr": 2e-4, "net": {"channels": 32}},
          "step": 1500, "ema_beta": 0.999}
    torch.save(ck, run_dir / "checkpoint.pt")
    (run_dir / "config.yaml").write_text("lr: 2e-4\n")
    d = describe(run_dir / "checkpoint.pt")
    assert d["kind"] == "checkpoint" and d["keys"] == ["model", "config", "step", "ema_beta"]
    assert d["step"] == 1500 and d["config"] == {"lr": 2e-4, "net": {"channels": 32}}
    assert d["entries"]["model"] == "dict(2 keys, 2 tensors, 16 values)" and d["entries"]["ema_beta"] == 0.999
    res = run(run_dir / "checkpoint.pt")
    assert res.exit_code == 0 and "step: 1500" in res.output and '"channels": 32' in res.output
    assert kind_of(run_dir) == "run-folder"
    res = run(run_dir)
    assert res.exit_code == 0 and "run folder: checkpoint.pt, config.yaml" in res.output and "step: 1500" in res.output
    torch.save(torch.arange(5), tmp_path / "tensor.pt")
    assert describe(tmp_path / "tensor.pt")["value"] == "Tensor(int64, [5])"


def test_unloadable_checkpoint_is_one_line(tmp_path, capsys):
    from ambient_mri.cli import main

    (tmp_path / "bad.pt").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError) as err:
        describe(tmp_path / "bad.pt")
    assert "bad.pt" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SystemExit) as ex:
        main(["info", str(tmp_path / "bad.pt")])
    assert ex.value.code == 2 and capsys.readouterr().err.strip().count("\n") == 0


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        describe(tmp_path / "missing.h5")
    with pytest.raises(DataError, match="no .h5 files"):
        describe(tmp_path)
