"""The trainer: ambient / oracle / naive runs, bit-exact resume, signals, checkpoints, --init, sampling CLI."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ambient_mri import losses
from ambient_mri.checkpoint import (LATEST, latest_checkpoint, list_snapshots, load_checkpoint, load_denoiser,
                                   params_sha256, save_checkpoint)
from ambient_mri.corruption import from_dict
from ambient_mri.errors import ConfigError, DataError
from ambient_mri.fft import fft2c, ifft2c
from ambient_mri.networks import EDMDenoiser
from ambient_mri.train import autocast_hooks, train
from tests.test_datasets import spy, write_prepared  # noqa: F401  (spy is a fixture)

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"train": write_prepared(root / "train", files=2, slices=4, coils=2),
            "val": write_prepared(root / "val", files=1, slices=4, coils=2, split="val", seed=1),
            "image": write_prepared(root / "image", files=1, slices=4, domain="image", level=0.25, seed=2)}


def run(out, data_dir, *overrides, config="tiny", **kw):
    return train(config, data_dir, out, overrides=list(overrides), progress=False, echo=lambda m: None, **kw)


def metrics(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def recording_prior_sampler(monkeypatch, calls):
    """Wrap ``sampling.prior_sample`` so that each call's view mask, shape and steps are recorded."""
    sampling = pytest.importorskip("ambient_mri.sampling")
    real = sampling.prior_sample

    def prior_sample(denoiser, view, shape, **kw):
        calls.append({"mask": None if view.mask is None else view.mask.clone(), "shape": tuple(shape),
                      "steps": kw.get("steps"), "domain": view.domain})
        return real(denoiser, view, shape, **kw)

    monkeypatch.setattr(sampling, "prior_sample", prior_sample)


# ----------------------------------------------------------------------------------------------


def test_ambient_run_learns_and_writes_its_run_folder(tmp_path, data, spy):
    out = tmp_path / "run"
    spy.clear()
    res = run(out, data["train"], "train.steps=60", "train.log_every=10", "train.ckpt_every=20", "train.keep=2")
    # the trainer touched only the whitelisted keys of the prepared files
    assert spy and set(spy) <= {"kspace", "mask", "maps", "norm"}
    assert res["step"] == 60 and res["interrupted"] is None
    rows = metrics(out)
    assert [int(r["step"]) for r in rows] == [10, 20, 30, 40, 50, 60]
    losses_ = [float(r["loss"]) for r in rows]
    assert all(np.isfinite(losses_)) and float(rows[0]["images_per_s"]) > 0
    assert np.mean(losses_[-2:]) < 0.8 * np.mean(losses_[:2]), losses_  # the loss falls (fixed seed)
    assert (out / "config.yaml").is_file() and "further_accel" in (out / "config.yaml").read_text()
    assert [s for s, _ in list_snapshots(out)] == [40, 60]  # keep=2
    ck = load_checkpoint(out / LATEST)
    assert ck["step"] == 60 and ck["config"]["train"]["steps"] == 60
    t = ck["training"]
    assert t["kind"] == "ambient" and t["further_mask"] == "redraw" and t["data"]["slices"] == 8
    assert t["corruption"] == {"domain": "kspace", "mask_kind": "adps", "accel": 4.0, "center": 4, "acs": [32, 4],
                               "shape": [32, 32], "delta": 0.3}
    assert len(t["data"]["manifest_sha256"]) == 64 and ck["version"]
    for key in ("torch", "numpy", "python"):
        assert key in ck["rng"]
    m = from_dict(t["corruption"]).draw(3, seed=1)  # what the samplers will do with it
    assert m.shape == (3, 1, 32)
    done = json.loads((out / "done.json").read_text())
    assert done["step"] == 60 and done["ranks_in_sync"] and done["params_sha256_per_rank"] == [res["params_sha256"]]
    # load_denoiser gives the EMA network in eval mode
    den, meta = load_denoiser(out / LATEST)
    assert isinstance(den, EDMDenoiser) and not den.training and meta["ema"] and meta["step"] == 60
    assert params_sha256(den) == res["ema_sha256"]
    den_raw, _ = load_denoiser(out, ema=False)  # a run folder works too
    assert params_sha256(den_raw) == res["params_sha256"]


@pytest.mark.parametrize("redraw", ["true", "false"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, data, redraw):
    common = ["train.ckpt_every=5", "train.log_every=5", "model.dropout=0.1", f"loss.redraw={redraw}", "train.warmup=4"]
    full = run(tmp_path / "full", data["train"], "train.steps=10", *common)
    half = run(tmp_path / "half", data["train"], "train.steps=5", *common)
    assert half["step"] == 5
    rest = train(None, None, tmp_path / "half", overrides=["train.steps=10"], resume=True, progress=False,
                 echo=lambda m: None)
    assert rest["step"] == 10
    a, b = load_checkpoint(tmp_path / "full" / LATEST), load_checkpoint(tmp_path / "half" / LATEST)
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert full["params_sha256"] == rest["params_sha256"]
    steps = [int(r["step"]) for r in metrics(tmp_path / "half")]
    assert steps == [5, 10]  # no duplicated rows after the resume
    assert [r["loss"] for r in metrics(tmp_path / "half")] == [r["loss"] for r in metrics(tmp_path / "full")]


def test_loader_workers_and_lazy_reading_do_not_change_the_result(tmp_path, data):
    a = run(tmp_path / "a", data["train"], "train.steps=6")
    b = run(tmp_path / "b", data["train"], "train.steps=6", "train.num_workers=2", "data.cache_mb=0")
    assert a["params_sha256"] == b["params_sha256"]


def test_further_mask_redrawn_every_step_or_fixed_per_slice(tmp_path, data, monkeypatch):
    seen = []
    orig = losses.ambient_kspace_loss

    def spy_loss(den, y, mask, maps, further_mask, sigma, **kw):
        seen.append((mask.clone(), further_mask.clone()))
        return orig(den, y, mask, maps, further_mask, sigma, **kw)

    monkeypatch.setattr(losses, "ambient_kspace_loss", spy_loss)
    per_slice = {}
    for redraw in ("true", "false"):
        seen.clear()
        run(tmp_path / redraw, data["train"], "train.steps=8", f"loss.redraw={redraw}")
        assert len(seen) == 8
        by_mask = {}
        for m, fm in seen:
            assert torch.all(fm <= m) and torch.all(fm.flatten(1).sum(1) < m.flatten(1).sum(1))  # M~ < M
            for i in range(len(m)):
                by_mask.setdefault(m[i].numpy().tobytes(), set()).add(fm[i].numpy().tobytes())
        per_slice[redraw] = by_mask
    # each training mask M belongs to one slice here: fixed -> one M~ per slice; redraw -> several
    assert all(len(v) == 1 for v in per_slice["false"].values())
    assert any(len(v) > 1 for v in per_slice["true"].values())


def _centred_fft2(a):
    """Orthonormal 2-D DFT with the zero frequency in the centre (docs/conventions), numpy only."""
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(a, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def _centred_ifft2(a):
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(a, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


@pytest.mark.parametrize("weight", ["edm", "effective"])
def test_training_step_loss_is_the_documented_weighted_error(tmp_path, data, monkeypatch, weight):
    """docs/training.md: loss = mean_b lambda(s) ||M F S D(A~^H A~ x_t) - y||^2 / (H W) with
    lambda(s) = (s^2 + sd^2) / (s sd)^2 at s = sigma (``loss.weight = edm``, the default) or at
    s = sigma_eff, sigma_eff^2 = sigma^2 + sigma_view^2 (``effective``), recomputed here with numpy
    from what the trainer passed to its loss (the denoiser it built, the data, the masks and noise levels)."""
    sigma_view, sd = 0.3, 0.5
    calls = []
    orig = losses.ambient_kspace_loss

    def spy_loss(den, y, mask, maps, further_mask, sigma, **kw):
        g = torch.Generator().manual_seed(len(calls))
        eta = torch.complex(torch.randn(y[:, 0].shape, generator=g), torch.randn(y[:, 0].shape, generator=g))
        per = orig(den, y, mask, maps, further_mask, sigma, **dict(kw, eta=eta))
        Y, Mk, S, Mt = (t.detach().numpy().astype(np.complex128) for t in (y, mask, maps, further_mask))
        Mk, Mt, s = Mk.real[:, None], Mt.real[:, None], sigma.detach().numpy().astype(np.float64)
        e = eta.numpy().astype(np.complex128)[:, None]
        # A~^H (M~ y + sigma M~ F S eta) = sum_c conj(S_c) F^-1 M~ (y_c + sigma F S_c eta)
        x_in = (S.conj() * _centred_ifft2(Mt * (Y + s[:, None, None, None] * _centred_fft2(S * e)))).sum(1)
        with torch.no_grad():
            D = den(torch.from_numpy(x_in).to(torch.complex64), sigma, further_mask).numpy()
        err = (np.abs(Mk * _centred_fft2(S * D[:, None]) - Y) ** 2).sum(axis=(1, 2, 3)) / (Y.shape[-2] * Y.shape[-1])
        s2 = s**2 + sigma_view**2
        expect = (s2 + sd**2) / (s2 * sd**2) * err
        calls.append((per.detach().numpy().astype(np.float64), expect, (s**2 + sd**2) / (s * sd) ** 2 * err))
        return per

    monkeypatch.setattr(losses, "ambient_kspace_loss", spy_loss)
    out = tmp_path / "w"
    extra = [] if weight == "edm" else [f"loss.weight={weight}"]  # edm is the default
    run(out, data["train"], "train.steps=3", "train.log_every=1", f"model.sigma_view={sigma_view}", *extra)
    assert len(calls) == 3
    logged = [float(r["loss"]) for r in metrics(out)]
    for (per, effective, plain), row in zip(calls, logged):
        want, other = (plain, effective) if weight == "edm" else (effective, plain)
        np.testing.assert_allclose(per, want, rtol=2e-4)
        np.testing.assert_allclose(row, per.mean(), rtol=1e-5)  # the logged loss is the batch mean
        assert not np.allclose(per, other, rtol=0.05)  # the other weight would be a different loss


def test_oracle_and_naive_runs_are_labelled(tmp_path, data):
    out = tmp_path / "oracle"
    run(out, data["val"], "train.steps=4", "loss.kind=oracle")
    ck = load_checkpoint(out / LATEST)
    assert ck["training"]["kind"] == "oracle" and "ORACLE" in ck["training"]["label"]
    assert ck["training"]["corruption"] == {"domain": "clean", "shape": [32, 32]}
    assert ck["config"]["name"] == "tiny-oracle" and "ORACLE" in (out / "train.log").read_text()
    assert from_dict(ck["training"]["corruption"]).draw(2).all()
    with pytest.raises(DataError, match="has no reference"):
        run(tmp_path / "oracle_on_train", data["train"], "train.steps=2", "loss.kind=oracle")
    out = tmp_path / "zf"
    run(out, data["train"], "train.steps=4", "loss.kind=naive_zf")
    ck = load_checkpoint(out / LATEST)
    assert ck["training"]["kind"] == "naive_zf" and ck["config"]["name"] == "tiny-naive_zf"
    assert (out / "naive_zf_cache.h5").is_file()
    with h5py.File(out / "naive_zf_cache.h5") as f:
        assert f["images"].shape == (8, 32, 32)


def test_image_domain_ambient_run(tmp_path, data):
    out = tmp_path / "img"
    run(out, data["image"], "train.steps=4", "loss.kind=ambient_image", "loss.delta=0.1")
    c = load_checkpoint(out / LATEST)["training"]["corruption"]
    assert c == {"domain": "image", "kind": "box", "level": 0.25, "further_level": 0.1, "shape": [32, 32]}
    assert from_dict(c).draw(2).shape == (2, 32, 32)
    with pytest.raises(DataError, match="domain"):
        run(tmp_path / "img2", data["train"], "train.steps=2", "loss.kind=ambient_image", "loss.delta=0.1")


def test_config_problems_found_before_any_training(tmp_path, data):
    out = tmp_path / "r"
    with pytest.raises(ConfigError, match="must exceed the data's acceleration"):
        run(out, data["train"], "loss.delta=null", "loss.further_accel=3")
    assert not (out / LATEST).exists()
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        run(out, data["train"], "train.batch=9")
    run(out, data["train"], "train.steps=2")
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        run(out, data["train"], "train.steps=2")
    with pytest.raises(ConfigError, match="cannot change model.channels"):
        train(None, None, out, overrides=["model.channels=[8, 8]"], resume=True, progress=False, echo=lambda m: None)
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(None, None, tmp_path / "empty", resume=True, progress=False, echo=lambda m: None)


def test_init_starts_from_another_checkpoints_ema_weights(tmp_path, data):
    src = tmp_path / "src"
    run(src, data["train"], "train.steps=6")
    out = tmp_path / "ft"
    run(out, data["train"], "train.steps=1", "train.lr=1e-12", "train.warmup=0", init=src / LATEST)
    a, b = load_checkpoint(src / LATEST), load_checkpoint(out / LATEST)
    for k, v in a["ema"].items():
        assert torch.allclose(b["model"][k], v, atol=1e-9), k
    assert not all(torch.equal(a["model"][k], a["ema"][k]) for k in a["model"])  # EMA, not the raw weights
    init = b["training"]["init"]
    assert init["path"] == str((src / LATEST).resolve()) and init["step"] == 6 and init["weights"] == "ema"
    assert len(init["sha256"]) == 64
    assert [int(s["step"]) for s in b["optimizer"]["state"].values()][0] == 1  # fresh optimiser
    with pytest.raises(ConfigError, match="--init: its weights do not fit"):
        run(tmp_path / "bad", data["train"], "train.steps=1", "model.channels=[8, 8]", init=src / LATEST)


class Payload:
    """Any non-allowlisted object makes a pickle that weights_only loading must refuse."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_checkpoint_with_pickled_object_is_refused(tmp_path, data):
    run(tmp_path / "ok", data["train"], "train.steps=2")
    ck = torch.load(tmp_path / "ok" / LATEST, weights_only=True)
    ck["extra"] = Payload()
    bad = tmp_path / "evil.pt"
    torch.save(ck, bad)
    for fn in (load_checkpoint, load_denoiser):
        with pytest.raises(DataError) as e:
            fn(bad)
        assert "pickled objects" in str(e.value) and "\n" not in str(e.value)
    res = subprocess.run([sys.executable, "-m", "ambient_mri.cli", "sample", "--checkpoint", str(bad), "--out",
                          str(tmp_path / "s")], capture_output=True, text=True, cwd=PROJECT, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "pickled" in res.stderr


def test_checkpoints_are_atomic_and_damaged_ones_are_skipped(tmp_path, data, monkeypatch):
    out = tmp_path / "run"
    run(out, data["train"], "train.steps=4", "train.ckpt_every=2")
    good = load_checkpoint(out / LATEST)
    # a crash in the middle of writing the next checkpoint leaves the old ones intact and no visible partial file
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk pulled out")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        save_checkpoint(out, dict(good, step=6))
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(out / LATEST)["step"] == 4
    assert [s for s, _ in list_snapshots(out)] == [2, 4] and not list(out.glob("checkpoints/.*"))
    # a damaged newer snapshot (e.g. copied in by hand) is skipped with a warning; resume uses the good one
    (out / "checkpoints" / "ckpt_0000009.pt").write_bytes(b"garbage")
    warnings = []
    path, ck = latest_checkpoint(out, warn=warnings.append)
    assert ck["step"] == 4 and warnings and "ckpt_0000009.pt" in warnings[0]
    res = train(None, None, out, overrides=["train.steps=6"], resume=True, progress=False, echo=lambda m: None)
    assert res["step"] == 6


def _wait_rows(path, n, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and len(path.read_text().strip().splitlines()) > n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early with {proc.returncode}")
        time.sleep(0.2)
    raise AssertionError("trainer did not start in time")


def test_sigint_and_sigterm_save_a_checkpoint_before_exiting(tmp_path, data):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "ambient_mri.cli", "train", "--out", str(out), "-q", "train.steps=100000"]
    steps = []
    for sig, code, extra in ((signal.SIGINT, 130, ["--config", "tiny", "--data", str(data["train"]),
                                                   "train.ckpt_every=100000", "train.log_every=1"]),
                             (signal.SIGTERM, 143, ["--resume"])):
        with open(tmp_path / "stderr.txt", "w") as err:
            p = subprocess.Popen(base + extra, cwd=PROJECT, env=env, stdout=subprocess.DEVNULL, stderr=err)
            try:
                _wait_rows(out / "metrics.csv", (steps[-1] if steps else 0) + 3, p)
                p.send_signal(sig)
                rc = p.wait(timeout=120)
            finally:
                if p.poll() is None:
                    p.kill()
        log = (tmp_path / "stderr.txt").read_text()
        assert rc == code, log
        ck = load_checkpoint(out / LATEST)
        assert 0 < ck["step"] < 100000 and f"{sig.name}: stopped at step {ck['step']}" in log
        steps.append(ck["step"])
    assert steps[1] > steps[0]  # the SIGTERM run resumed from the SIGINT checkpoint and went on


def test_sample_grids_during_training_and_the_sample_command(tmp_path, data, monkeypatch):
    calls = []
    recording_prior_sampler(monkeypatch, calls)
    out = tmp_path / "run"
    run(out, data["train"], "train.steps=4", "train.sample_every=2", "train.sample_n=4", "train.sample_steps=5")
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step_0000002.png", "step_0000004.png"]
    assert calls[0]["shape"] == (4, 32, 32) and calls[0]["mask"].shape == (4, 1, 32) and calls[0]["steps"] == 5
    assert calls[0]["domain"] == "kspace"
    calls.clear()
    from ambient_mri.commands.sample import command

    s = tmp_path / "samples"
    res = CliRunner().invoke(command, ["--checkpoint", str(out / LATEST), "--n", "5", "--out", str(s), "--steps", "7",
                                       "--seed", "3", "--batch", "2", "-q"])
    assert res.exit_code == 0, res.output
    assert [c["shape"] for c in calls] == [(2, 32, 32), (2, 32, 32), (1, 32, 32)] and calls[0]["steps"] == 7
    assert torch.equal(torch.cat([c["mask"] for c in calls]).bool(), expect_masks(out, 5, 3))
    x = np.load(s / "samples.npy")
    assert x.shape == (5, 32, 32) and x.dtype == np.complex64 and np.isfinite(x).all()
    from PIL import Image

    assert Image.open(s / "samples.png").size[0] > 3 * 32
    with h5py.File(s / "samples.h5") as f:
        assert np.array_equal(f["samples"][()], x) and f["further_mask"].shape == (5, 1, 32)
        assert np.array_equal(f["further_mask"][()], expect_masks(out, 5, 3).numpy())
    info = json.loads((s / "sample.json").read_text())
    assert info["seed"] == 3 and info["n"] == 5 and info["kind"] == "ambient" and len(info["checkpoint_sha256"]) == 64


def expect_masks(run_dir, n, seed):
    return from_dict(load_checkpoint(run_dir / LATEST)["training"]["corruption"]).draw(n, seed=seed)


@pytest.mark.parametrize("kind", ["oracle", "ambient_image"])
def test_sample_command_for_clean_and_image_domain_models(tmp_path, data, monkeypatch, kind):
    calls = []
    recording_prior_sampler(monkeypatch, calls)
    out = tmp_path / "run"
    if kind == "oracle":
        run(out, data["val"], "train.steps=2", "loss.kind=oracle")
    else:
        run(out, data["image"], "train.steps=2", "loss.kind=ambient_image", "loss.delta=0.1")
    from ambient_mri.commands.sample import command

    res = CliRunner().invoke(command, ["--checkpoint", str(out), "--n", "2", "--out", str(tmp_path / "s"),
                                       "--steps", "3", "-q"])
    assert res.exit_code == 0, res.output
    assert np.load(tmp_path / "s" / "samples.npy").shape == (2, 32, 32)
    if kind == "oracle":
        assert calls[0]["domain"] == "clean" and calls[0]["mask"] is None and "ORACLE" in res.output
    else:
        assert calls[0]["domain"] == "image" and calls[0]["mask"].shape == (2, 32, 32)
        assert torch.equal(calls[0]["mask"].bool(), expect_masks(out, 2, 0))


def test_autocast_hooks_keep_keys_and_return_fp32():
    from ambient_mri.networks import build_denoiser

    den = build_denoiser({"channels": [8, 16], "groups": 4})
    keys = list(den.state_dict())
    autocast_hooks(den.net, "cpu", torch.bfloat16)
    assert list(den.state_dict()) == keys
    x = torch.randn(2, 16, 16, dtype=torch.complex64)
    seen = []
    den.net.stem.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
    y = den(x, torch.tensor([0.5, 1.0]), torch.ones(2, 1, 16))
    assert seen == [torch.bfloat16] and y.dtype == torch.complex64
    y.abs().sum().backward()
    assert den.net.stem.weight.grad is not None and den.net.stem.weight.grad.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# The loop against a plain re-implementation of its steps (docs/training.md), bit for bit on CPU


def _seed_of(*parts):
    """docs/training.md: the seed of a step is the first 8 bytes (little-endian) of sha256("a:b:c"), >> 1."""
    import hashlib

    return int.from_bytes(hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()[:8], "little") >> 1


def _plain_training(cfg, root, steps):
    """What ``train`` is documented to do, written out step by step for one process: the initial weights of
    ``torch.manual_seed(seed)``, Adam, batches in ``DistributedSampler(shuffle, seed, drop_last)`` order,
    then per step ``t``: with ``train.augment: readout-flip``, each slice's rows reflected about row H // 2
    where a uniform draw from a generator seeded by ("augment", seed, 0, t) is below 1/2; a generator seeded
    by ("noise", seed, 0, t) drawing sigma, then M~ (redrawn), then eta; dropout seeded by ("dropout", seed,
    0, t); lr with linear warm-up; gradients clipped to grad_clip; EMA with EDM's half-life ramp-up. Returns
    the model and the EMA."""
    from torch.utils.data import DistributedSampler

    from ambient_mri.datasets import build_dataset, collate
    from ambient_mri.masks import further_kspace_mask
    from ambient_mri.networks import build_denoiser

    T, L, seed = cfg["train"], cfg["loss"], cfg["train"]["seed"]
    torch.manual_seed(seed)
    model, ema = build_denoiser(cfg["model"]), build_denoiser(cfg["model"])
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    model = model.to(memory_format=torch.channels_last)  # the trainer's layout for fp32 on CPU (same maths, other bits)
    try:
        opt = torch.optim.Adam(model.parameters(), lr=T["lr"], fused=True)
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.Adam(model.parameters(), lr=T["lr"], foreach=True)
    ds = build_dataset("ambient", root)
    order = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=True)
    per_epoch = len(ds) // T["batch"]
    for t in range(steps):
        epoch, k = divmod(t, per_epoch)
        order.set_epoch(epoch)  # reshuffled by seed + epoch
        b = collate([ds[i] for i in list(order)[k * T["batch"] : (k + 1) * T["batch"]]])
        if T["augment"] == "readout-flip":
            ga = torch.Generator().manual_seed(_seed_of("augment", seed, 0, t))
            flip = torch.rand(T["batch"], generator=ga) < 0.5
            H = b["kspace"].shape[-2]
            rows = (2 * (H // 2) - torch.arange(H)) % H
            for key in ("kspace", "maps"):  # the line masks (1, W) are their own reflection
                b[key] = torch.stack([v[..., rows, :] if f else v for v, f in zip(b[key], flip)])
        g = torch.Generator().manual_seed(_seed_of("noise", seed, 0, t))
        torch.manual_seed(_seed_of("dropout", seed, 0, t))
        for group in opt.param_groups:
            group["lr"] = T["lr"] * min(1.0, (t + 1) / T["warmup"])
        model.train()
        sigma = losses.sample_sigma(T["batch"], P_mean=L["P_mean"], P_std=L["P_std"], generator=g)
        acs = (1, int(ds.info["acs"][1]))  # line masks: the ACS block is the centre columns
        mt = further_kspace_mask(b["mask"], acs, delta=L["delta"], generator=g)
        loss = losses.ambient_kspace_loss(model, b["kspace"], b["mask"], b["maps"], mt, sigma, generator=g).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), T["grad_clip"])
        opt.step()
        images = (t + 1) * T["batch"]
        beta = 0.5 ** (T["batch"] / min(T["ema_halflife"], images * T["ema_rampup"]))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1.0 - beta)
    return model, ema


@pytest.mark.parametrize("augment", ["none", "readout-flip"])
def test_training_loop_equals_a_plain_reimplementation_of_its_steps(tmp_path, data, augment):
    """The loss objects, the loop's RNG order (sigma, M~, eta from one generator per step; dropout seeded per
    step), the readout flip, warm-up, clipping, EMA and the epoch change (8 slices, batch 4: step 3 starts
    epoch 1) give exactly the weights of the plain loop above (bit for bit, CPU)."""
    from ambient_mri.config import load_config

    steps = 3
    over = [f"train.steps={steps}", "model.dropout=0.1", "train.warmup=2", f"train.augment={augment}"]
    res = run(tmp_path / "run", data["train"], *over)
    cfg = load_config("tiny", over).to_dict()
    assert cfg["loss"]["kind"] == "ambient" and cfg["loss"]["redraw"] and cfg["train"]["optimizer"] == "adam"
    model, ema = _plain_training(cfg, data["train"], steps)
    assert params_sha256(model) == res["params_sha256"]
    ck = load_checkpoint(tmp_path / "run" / LATEST)
    for k, v in ema.state_dict().items():
        assert torch.equal(ck["ema"][k], v), k
    one_step_less, _ = _plain_training(cfg, data["train"], steps - 1)
    assert params_sha256(one_step_less) != res["params_sha256"]  # the comparison can fail
    assert ("augmentation: readout-flip" in (tmp_path / "run" / "train.log").read_text()) == (augment != "none")
    if augment != "none":  # and the flip changes what is learnt
        unflipped, _ = _plain_training(dict(cfg, train=dict(cfg["train"], augment="none")), data["train"], steps)
        assert params_sha256(unflipped) != res["params_sha256"]


def test_sample_grids_of_a_multicoil_model_use_training_coil_maps(tmp_path, data, monkeypatch):
    """Grids during training see S^H F^-1 M~ F S x with the maps of training slices (as ``sample`` does),
    not single-coil identity maps: the maps in the view are those ``sampling.training_maps`` picks."""
    from ambient_mri import sampling

    seen = []
    real = sampling.prior_sample
    monkeypatch.setattr(sampling, "prior_sample", lambda den, view, shape, **kw: (seen.append(view),
                                                                                  real(den, view, shape, **kw))[1])
    run(tmp_path / "run", data["train"], "train.steps=2", "train.sample_every=2", "train.sample_n=3",
        "train.sample_steps=2")
    assert (tmp_path / "run" / "samples" / "step_0000002.png").is_file() and len(seen) == 1
    maps, _ = sampling.training_maps(data["train"], 3, shape=(32, 32), seed=0)
    assert seen[0].op.maps.shape == (3, 2, 32, 32) and torch.equal(seen[0].op.maps, maps)
    with h5py.File(data["train"] / "vol_0.h5") as f:
        assert np.allclose(maps[0].numpy(), f["maps"][0])  # write_prepared's maps: every slice has the same


def test_cpu_precision_policy(monkeypatch):
    """``train.precision``: bf16 autocasts on a CPU only where it has native bf16; fp16 never on CPU; GPU as given."""
    from ambient_mri import train as tr

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert tr.autocast_dtype("bf16", cuda) is torch.bfloat16 and tr.autocast_dtype("fp16", cuda) is torch.float16
    assert tr.autocast_dtype("fp32", cuda) is None and tr.autocast_dtype("fp32", cpu) is None
    for native in (True, False):
        monkeypatch.setattr(tr, "cpu_has_native_bf16", lambda native=native: native)
        assert tr.autocast_dtype("bf16", cpu) is (torch.bfloat16 if native else None)
        assert tr.autocast_dtype("fp16", cpu) is None


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_cpu_trains_and_is_recorded(tmp_path, data, monkeypatch, native):
    """bf16 on a CPU with native bf16 runs the network under autocast (recorded as bf16 in the checkpoint and the
    log); without it the run says so in one line and trains fp32, channels-last."""
    from ambient_mri import train as tr

    monkeypatch.setattr(tr, "cpu_has_native_bf16", lambda: native)
    seen = []
    orig = tr.build_state

    def spy_state(*a, **k):
        state = orig(*a, **k)
        seen.append(state)
        return state

    monkeypatch.setattr(tr, "build_state", spy_state)
    out = tmp_path / "run"
    res = run(out, data["train"], "train.steps=2", "train.log_every=1", "train.precision=bf16")
    ck = load_checkpoint(out / LATEST)
    log = (out / "train.log").read_text()
    assert ck["training"]["precision"] == ("bf16" if native else "fp32")
    assert ("running fp32 on cpu" in log) is not native
    conv = seen[0].model.net.stem.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) is not native
    assert all(torch.isfinite(v).all() for v in ck["model"].values()) and res["step"] == 2
    den, _ = load_denoiser(out / LATEST)  # an fp32 network, channels-last on CPU, whatever the run's layout
    assert den.net.stem.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(1, 16, 16, dtype=torch.complex64)
    assert torch.isfinite(torch.view_as_real(den(x, 0.5, torch.ones(1, 1, 16)))).all()


def test_channels_last_is_the_same_maths(data):
    """The channels-last network (fp32 CPU training) gives the contiguous network's loss and gradients to fp32
    rounding: the layout changes the speed, not the function."""
    from ambient_mri.config import load_config
    from ambient_mri.networks import build_denoiser

    cfg = load_config("tiny", ["model.sigma_view=0.2"]).to_dict()["model"]
    torch.manual_seed(0)
    a = build_denoiser(cfg)
    for p in a.parameters():  # the output conv starts at zero: give every layer a non-trivial weight
        p.data.normal_(0, 0.2)
    b = build_denoiser(cfg)
    b.load_state_dict(a.state_dict())
    b = b.to(memory_format=torch.channels_last)
    assert b.net.stem.weight.is_contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(1)
    y = torch.randn(4, 2, 16, 16, dtype=torch.complex64, generator=g)
    maps = torch.randn(4, 2, 16, 16, dtype=torch.complex64, generator=g)
    mask = (torch.rand(4, 1, 16, generator=g) < 0.5).float()
    y = y * mask[:, :, None]
    fm = mask * (torch.rand(4, 1, 16, generator=g) < 0.7).float()
    sigma = torch.tensor([0.01, 0.1, 1.0, 5.0])
    eta = torch.randn(4, 16, 16, dtype=torch.complex64, generator=g)
    la = losses.ambient_kspace_loss(a, y, mask, maps, fm, sigma, eta=eta).sum()
    lb = losses.ambient_kspace_loss(b, y, mask, maps, fm, sigma, eta=eta).sum()
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb, rtol=1e-5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        scale = pa.grad.abs().max() + 1e-12
        assert (pa.grad - pb.grad).abs().max() / scale < 1e-4, name
