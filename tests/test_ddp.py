"""Two-process DDP training on CPU (gloo) under torchrun: it trains, and both ranks end with identical weights."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from ambient_mri.checkpoint import load_checkpoint, params_sha256
from ambient_mri.networks import build_denoiser
from tests.test_datasets import write_prepared

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_two_process_ddp_on_cpu_trains_with_identical_weights(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    data = write_prepared(tmp_path / "train", files=2, slices=4)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ambient_mri.cli", "train", "--config", "tiny", "--data", str(data), "--out", str(out), "-q",
           "train.steps=6", "train.batch=2", "train.ckpt_every=3", "train.log_every=3"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
    # trust rank 0's done marker, not only torchrun's exit code (docs/ecosystem.md section 7)
    assert (out / "done.json").is_file(), res.stderr[-3000:]
    done = json.loads((out / "done.json").read_text())
    assert done["world_size"] == 2 and done["step"] == 6
    hashes = done["params_sha256_per_rank"]  # each rank's own hash of its parameters, gathered by rank 0
    assert len(hashes) == 2 and hashes[0] == hashes[1] and done["ranks_in_sync"]
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["step"] == 6 and ck["training"]["world_size"] == 2 and ck["training"]["global_batch"] == 4
    den = build_denoiser(ck["config"]["model"])
    den.load_state_dict(ck["model"])
    assert params_sha256(den) == hashes[0]  # the saved weights are the ranks' weights
    torch.manual_seed(ck["config"]["train"]["seed"])  # the trainer's initial weights
    init = build_denoiser(ck["config"]["model"])
    assert params_sha256(init) != hashes[0]  # and they did train
    with open(out / "metrics.csv", newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == [3, 6]  # rank 0 alone writes the log
    assert res.returncode == 0, res.stderr[-3000:]
