"""The benchmark's --quick mode end to end on ../shared/data (skipped when the data are absent)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_siat_benchmark_quick(shared_data, tmp_path):
    out = tmp_path / "bench"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "siat_benchmark.py"), "--out", str(out), "--quick",
                        "--shared", str(shared_data), "--em-rounds", "1", "--precision", "bf16"], capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = (out / "benchmarks.md").read_text()
    for needle in ("QUICK", "## Test R8\n", "## Test R12\n", "## Test R8, true coil maps", "| adps | 8 |",
                   "| fsdps | 12 |", "| naive-dps | 8 |", "| oracle-dc | 12 |", "| dc+true maps | 8 |", "| l1 | 8 |",
                   "## Paired differences", "## Prior samples", "| oracle |",
                   "| em1-dc | 8 |", "| em1-fsdps | 12 |", "| em1-mmps | 8 |", "| oracle-mmps | 12 |", "| naive-mmps | 8 |", "## EM from the ambient prior", "| em1 |"):
        assert needle in report, needle
    # every method scored on the same slices, and a paired row for the best ambient sampler against L1
    rows = [line.split("|") for line in report.splitlines() if line.startswith("| ") and "true maps" not in line]
    counts = {r[3].strip() for r in rows if len(r) > 10 and r[2].strip() == "8"}  # method | R | slices | ...
    assert len(counts) == 1, counts
    assert any(line.startswith("| R8 |") and "| l1 |" in line for line in report.splitlines())
    assert (out / "report" / "prior_samples.png").stat().st_size > 0
    commands = (out / "commands.log").read_text()
    assert "ambient-mri train --config cpu64" in commands and "train.precision=bf16" in commands
    # benchmarks/pilot.py on the same validation split and ambient run: one row, every method scored, with an
    # extra A-DPS column (--sampler)
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pilot.py"), "--out", str(tmp_path / "pilot"),
                        "--dc-steps", "2", "--threads", "1", "--sampler", "adps3=adps:steps=3,step_size=10",
                        f"quick={out / 'prep' / 'val' / 'R8'}:{out / 'runs' / 'ambient'}"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    row = [line for line in r.stdout.splitlines() if line.startswith("| quick |")]
    assert len(row) == 1 and "[" in row[0], r.stdout
    cells = [c.strip() for c in row[0].split("|")[1:-1]]
    assert len(cells) == 10 and int(cells[1]) > 0 and all(np.isfinite(float(c)) for c in cells[2:6] + [cells[7]])
    assert "adps3 - L1" in r.stdout and "[" in cells[8]


def test_train_throughput_runs(tmp_path):
    """benchmarks/train_throughput.py on its synthetic data with a config whose ``sigma_view`` is estimated (null):
    it measured nothing when that broke, and no other test runs it."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--steps", "2", "--warmup", "1",
                        "--slices", "8", "--size", "32", "--threads", "1"], capture_output=True, text=True, env=env,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "trainer:" in r.stdout and "images/s" in r.stdout


def test_pilot_sampler_options_and_slice_psnr(tmp_path):
    """benchmarks/pilot.py's ``--sampler`` values keep their types (``ema=false`` is False, not the truthy text
    "false"), and ``slice_psnr`` (shared with siat_benchmark.py) reads an eval report per label and slice."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import pilot

    name, method, kw = pilot.parse_sampler("raw=dc:ema=false,steps=25,step_size=0.5,further=within,x=True")
    assert (name, method) == ("raw", "dc")
    assert kw == {"ema": False, "steps": 25, "step_size": 0.5, "further": "within", "x": True}
    assert kw["ema"] is False and type(kw["steps"]) is int
    (tmp_path / "metrics_slices.csv").write_text("label,volume,slice,psnr_adps\nl1,v,1,20.5\nl1,v,10,21\ndc,v,1,22\n")
    assert pilot.slice_psnr(tmp_path) == {"l1": {("v", 1): 20.5, ("v", 10): 21.0}, "dc": {("v", 1): 22.0}}


def _two_step_priors(tmp_path):
    """A prepared train and val split, an ambient prior ``tmp_path/amb`` (train) and an oracle ``tmp_path/ora``
    (val references), 2 steps each: ``(train, val)``."""
    from ambient_mri.train import train
    from tests.test_datasets import write_prepared

    tr = write_prepared(tmp_path / "train", files=1, slices=4, coils=2)
    va = write_prepared(tmp_path / "val", files=1, slices=4, coils=2, split="val", seed=1)
    quiet = dict(progress=False, echo=lambda m: None)
    train("tiny", tr, tmp_path / "amb", overrides=["train.steps=2"], **quiet)
    train("tiny", va, tmp_path / "ora", overrides=["train.steps=2", "loss.kind=oracle"], **quiet)
    return tr, va


def test_heldout_loss_scores_ambient_and_clean_priors_with_fixed_draws(tmp_path, capsys):
    """benchmarks/heldout_loss.py: an ambient checkpoint on k-space splits, a clean one on references; the same
    split named twice gives the same errors (the draws are fixed), so a train/held-out ratio means the data."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import heldout_loss

    tr, va = _two_step_priors(tmp_path)
    csv_path = tmp_path / "rows.csv"
    assert heldout_loss.main(["--split", f"a={tr}", "--split", f"b={tr}", "--split", f"val={va}",
                              "--ref-split", f"ref={va}", "--sigmas", "0.01", "1", "--slices", "3",
                              "--checkpoint", f"amb={tmp_path / 'amb'}", "--checkpoint", f"ora={tmp_path / 'ora'}",
                              "--out", str(csv_path)]) == 0
    out = capsys.readouterr().out
    assert "amb (b / a): sigma 0.01: 1.000, sigma 1: 1.000" in out
    import csv

    rows = list(csv.DictReader(csv_path.open()))
    assert [(r["checkpoint"], r["split"]) for r in rows] == [("amb", "a"), ("amb", "b"), ("amb", "val"), ("ora", "ref")]
    errs = [float(r[k]) for r in rows for k in ("e(0.01)", "e(1)")]
    assert all(np.isfinite(errs)) and all(e > 0 for e in errs)
    assert float(rows[0]["e(1)"]) > float(rows[0]["e(0.01)"])  # more noise, larger error, even for a 2-step model


def test_prior_sampler_variants_runs_and_its_schedules_and_scores(tmp_path, capsys):
    """benchmarks/prior_sampler_variants.py on a 2-step ambient prior: one row per schedule plus the oracle's, a
    figure; the fresh-mask schedule draws one mask set per noise level (the same for both evaluations at a level,
    new at the next); the spectral scores of a set against itself are 0 dB and a high-frequency ratio of 1."""
    import torch

    from ambient_mri.corruption import from_dict

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import prior_sampler_variants as psv

    tr, va = _two_step_priors(tmp_path)
    png = tmp_path / "v.png"
    psv.main(["--ambient", str(tmp_path / "amb"), "--oracle", str(tmp_path / "ora"), "--maps-from", str(tr),
              "--reference", str(va), "--n", "3", "--steps", "3", "--K", "2", "--threads", "1", "--out", str(png)])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ambient") or line.startswith("| oracle")]
    assert [r.split(" | ")[0] for r in rows] == ["| ambient, fixed", "| ambient, fresh", "| ambient, mean-2",
                                                "| oracle (clean-trained), fixed"]
    assert all(np.isfinite(float(v)) for r in rows for v in r.strip("| ").split(" | ")[1:4])
    assert png.stat().st_size > 0

    ref = psv.references(va, 4)
    sc = psv.spectral_scores(ref, ref)
    assert sc["lsd_db"] == 0 and sc["pe_lsd_db"] == 0 and abs(sc["hf_ratio"] - 1) < 1e-6

    seen = []

    def stub(view, sigma, mask):
        seen.append(mask.clone())
        return view

    from ambient_mri.checkpoint import load_denoiser

    corruption = from_dict(load_denoiser(tmp_path / "amb")[1]["training"]["corruption"])
    H, W = corruption.shape
    sched = psv.MaskSchedule(stub, corruption, torch.ones(2, 1, H, W, dtype=torch.complex64), K=1, seed=0)
    x = torch.randn(2, H, W, dtype=torch.complex64)
    for s in (2.0, 2.0, 1.0):
        sched(x, torch.full((2,), s))
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], seen[2])
