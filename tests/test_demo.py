"""``ambient-mri demo`` end to end on a shrunken demo dataset (the full demo is timed by hand: docs/quickstart.md)."""

import json

import pytest

from ambient_mri import demo
from ambient_mri.checkpoint import load_checkpoint
from ambient_mri.cli import main as cli_main


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_packaged_demo_checkpoint_is_small_and_trained_on_undersampled_data_only():
    assert demo.DEMO_CHECKPOINT.exists(), "the demo checkpoint is part of the package"
    assert demo.DEMO_CHECKPOINT.stat().st_size < 8 * 2**20
    ck = load_checkpoint(demo.DEMO_CHECKPOINT)
    assert ck["config"]["loss"]["kind"] == "ambient"
    assert ck["training"]["data"]["split"] == "train"
    assert ck["step"] == ck["config"]["train"]["steps"]  # finished, not a snapshot of a longer run


def test_demo_runs_every_stage_and_reports_each_method(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "DATA_OPTIONS", dict(demo.DATA_OPTIONS, n_train_volumes=2, n_val_volumes=1,
                                                   n_test_volumes=1, slices_per_volume=4))
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--train-steps", "4", "--adps-steps", "2", "--dc-steps", "2", "--samples", "1"]
    try:
        cli_main(argv)
    except SystemExit as e:
        assert e.code == 0
    text = capsys.readouterr().out
    for label in ("zf", "sense", "l1", "aos", "dc", "adps"):
        assert f"| {label}" in text, label
    assert "Figures:" in text and text.count(".png") >= 2
    # the short run trained on the undersampled split (no reference in it) and logged 4 steps
    manifest = json.loads((out / "prep" / "train" / "manifest.json").read_text())
    assert manifest["options"]["split"] == "train"
    assert (out / "runs" / "short" / "checkpoint.pt").exists()
    for R in ("4", "8"):
        summary = json.loads((out / "report" / f"R{R}" / "summary.json").read_text())
        assert {row["label"].split()[0] for row in summary["summary"]} >= {"zf", "sense", "l1", "aos", "dc"}
