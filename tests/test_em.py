"""EM from an ambient start (ambient_mri.em): a tiny run end to end, bit-exact resume of a killed E-step and
a killed M-step, and no path from the E-step to reference images."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import ambient_mri.em as em_mod
import ambient_mri.train as train_mod
from ambient_mri.checkpoint import load_checkpoint, load_denoiser, params_sha256
from ambient_mri.cli import cli
from ambient_mri.config import load_config
from ambient_mri.datasets import SAMPLES_FILE
from ambient_mri.em import e_step, run_em
from ambient_mri.errors import ConfigError, DataError
from ambient_mri.recon import run_recon
from ambient_mri.train import train
from tests.test_datasets import write_prepared

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
QUIET = dict(progress=False, echo=lambda m: None)
EM = ["em.rounds=2", "em.steps_per_round=6", "em.sampler_steps=3", "em.batch=3", "em.samples_per_scan=2",
      "train.ckpt_every=2", "train.log_every=2"]


@pytest.fixture(scope="module")
def ambient(tmp_path_factory):
    """A train split (2 files x 3 slices, 32 x 32, 2 coils, random lines R=4) and a 20-step ambient model."""
    root = tmp_path_factory.mktemp("em")
    write_prepared(root / "train", files=2, slices=3, coils=2, accel=4.0, center=6, mask_kind="random")
    write_prepared(root / "test", files=1, slices=2, coils=2, accel=4.0, center=6, mask_kind="random", split="test",
                   seed=5)
    train("tiny", root / "train", root / "ambient", overrides=["train.steps=20"], **QUIET)
    return root


def test_em_rounds_train_clean_priors_that_record_their_lineage_and_reconstruct(ambient, tmp_path):
    root = ambient
    res = CliRunner().invoke(cli, ["train", "--em-from", str(root / "ambient"), "--data", str(root / "train"),
                                   "--out", str(tmp_path / "em"), "-q", *EM])
    assert res.exit_code == 0, res.output
    assert "EM done: 2 round(s)" in res.output
    amb_sha = em_mod.sha256_file(root / "ambient" / "checkpoint.pt")
    for r in (1, 2):
        with h5py.File(tmp_path / "em" / f"round_{r}" / SAMPLES_FILE) as f:
            x, lineage = f["images"][()], json.loads(f.attrs["lineage"])
        assert x.shape == (6 * 2, 32, 32) and x.dtype == np.complex64 and np.isfinite(x).all()
        assert lineage["round"] == r and lineage["ambient"]["sha256"] == amb_sha
        assert [q["round"] for q in lineage["rounds"]] == list(range(1, r + 1))
        assert not (tmp_path / "em" / f"round_{r}" / ".estep").exists()  # the E-step's partial files are gone
    # round 2's prior is round 1's model, which started from the ambient weights (same architecture)
    ck1 = load_checkpoint(tmp_path / "em" / "round_1" / "checkpoint.pt")
    assert ck1["training"]["init"]["sha256"] == amb_sha and ck1["training"]["kind"] == "em"
    assert ck1["config"]["model"]["sigma_view"] == 0.0 and ck1["training"]["corruption"]["domain"] == "clean"
    assert lineage["rounds"][1]["sha256"] == em_mod.sha256_file(tmp_path / "em" / "round_1" / "checkpoint.pt")
    assert lineage["rounds"][0]["sampler"] == "dc" and lineage["rounds"][0]["further"] == "within"
    ck = load_checkpoint(tmp_path / "em" / "checkpoint.pt")
    assert ck["training"]["em"]["round"] == 2 and ck["step"] == 6
    state = json.loads((tmp_path / "em" / "em.json").read_text())
    assert [x["round"] for x in state["rounds"]] == [1, 2] and state["done"]["wall_s"] > 0
    # two different samples per scan (independent chains)
    assert not np.allclose(x[0::2], x[1::2])

    # the EM prior reconstructs with the clean-prior samplers
    for method, kw in {"fsdps": dict(steps=4, step_size=0.2), "dc": dict(steps=3, noise_std=0.01),
                       "mmps": dict(steps=3, noise_std=0.01, cg_iters=2)}.items():
        run_recon(root / "test", tmp_path / method, method, checkpoint=tmp_path / "em", quiet=True, **kw)
        with h5py.File(tmp_path / method / "vol_0.h5") as f:
            assert np.isfinite(f["reconstruction"][()]).all(), method
    # and draws prior samples
    res = CliRunner().invoke(cli, ["sample", "--checkpoint", str(tmp_path / "em"), "--n", "2", "--steps", "3",
                                        "--out", str(tmp_path / "s"), "-q"])
    assert res.exit_code == 0, res.output
    # a finished run resumes with more rounds only when asked, and refuses to start over
    with pytest.raises(ConfigError, match="--resume"):
        run_em(None, root / "train", tmp_path / "em", em_from=root / "ambient", overrides=EM, **QUIET)
    with pytest.raises(ConfigError, match="em.steps_per_round"):
        run_em(None, None, tmp_path / "em", resume=True, overrides=["em.steps_per_round=7"], **QUIET)


class Killed(Exception):
    pass


def test_a_killed_em_run_resumes_bit_exactly(ambient, tmp_path, monkeypatch):
    root = ambient
    ref = run_em(None, root / "train", tmp_path / "ref", em_from=root / "ambient", overrides=EM, **QUIET)

    # kill the first E-step after its first file, then round 1's M-step after step 3 (checkpoint at step 2)
    real_posterior, calls = em_mod.posterior, {"n": 0}

    def dying_posterior(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # file 0 is one batch of 3 slices; file 1's batch dies
            raise Killed
        return real_posterior(*a, **k)

    monkeypatch.setattr(em_mod, "posterior", dying_posterior)
    with pytest.raises(Killed):
        run_em(None, root / "train", tmp_path / "run", em_from=root / "ambient", overrides=EM, **QUIET)
    assert sorted(p.name for p in (tmp_path / "run" / "round_1" / ".estep").iterdir()) == ["00000.npz", "key.json"]
    monkeypatch.setattr(em_mod, "posterior", real_posterior)

    real_step, steps = train_mod.optimizer_step, {"n": 0}

    def dying_step(*a, **k):
        steps["n"] += 1
        if steps["n"] == 4:
            raise Killed
        return real_step(*a, **k)

    monkeypatch.setattr(train_mod, "optimizer_step", dying_step)
    with pytest.raises(Killed):
        run_em(None, None, tmp_path / "run", resume=True, **QUIET)
    monkeypatch.setattr(train_mod, "optimizer_step", real_step)
    assert load_checkpoint(tmp_path / "run" / "round_1" / "checkpoint.pt")["step"] == 2

    res = run_em(None, None, tmp_path / "run", resume=True, **QUIET)
    assert res["interrupted"] is None and res["rounds"] == 2
    for r in (1, 2):
        with h5py.File(tmp_path / "ref" / f"round_{r}" / SAMPLES_FILE) as a, \
                h5py.File(tmp_path / "run" / f"round_{r}" / SAMPLES_FILE) as b:
            assert np.array_equal(a["images"][()], b["images"][()]), r
    d_ref, _ = load_denoiser(ref["checkpoint"])
    d_run, _ = load_denoiser(res["checkpoint"])
    assert params_sha256(d_ref) == params_sha256(d_run)
    assert load_checkpoint(ref["checkpoint"])["training"]["em"]["round"] == 2


def test_the_e_step_never_reads_a_reference(ambient, tmp_path, monkeypatch):
    """Run on a val-style split that holds references: every HDF5 dataset the E-step and the M-step open is
    recorded, and ``reference`` is not among them."""
    root = ambient
    write_prepared(tmp_path / "val", files=2, slices=3, coils=2, accel=4.0, center=6, mask_kind="random",
                   split="val", seed=3)
    with h5py.File(tmp_path / "val" / "vol_0.h5") as f:
        assert "reference" in f
    read = []
    real_getitem = h5py.Dataset.__getitem__

    def recording(self, key):
        read.append(self.name)
        return real_getitem(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", recording)
    run_em(None, tmp_path / "val", tmp_path / "em", em_from=root / "ambient",
           overrides=["em.rounds=1", "em.steps_per_round=2", "em.sampler_steps=2", "em.batch=3"], **QUIET)
    assert read and "/kspace" in read and "/images" in read
    assert not any("reference" in name for name in read), sorted(set(read))


def test_em_refuses_what_it_cannot_start_from(ambient, tmp_path):
    root = ambient
    train("tiny", root / "train", tmp_path / "naive", overrides=["train.steps=2", "loss.kind=naive_zf"], **QUIET)
    with pytest.raises(ConfigError, match="ambient k-space checkpoint"):
        run_em(None, root / "train", tmp_path / "em", em_from=tmp_path / "naive", **QUIET)
    with pytest.raises(ConfigError, match="mmps"):
        load_config("tiny", ["em.first_sampler=mmps"])
    with pytest.raises(ConfigError, match="loss.kind=em"):
        run_em("tiny", root / "train", tmp_path / "em2", em_from=root / "ambient", **QUIET)
    with pytest.raises(ConfigError, match="--em-from"):
        run_em(None, root / "train", tmp_path / "em3", **QUIET)
    # the M-step on its own needs the E-step's samples
    with pytest.raises(DataError, match="E-step"):
        train("tiny", root / "train", tmp_path / "m", overrides=["loss.kind=em"], **QUIET)
