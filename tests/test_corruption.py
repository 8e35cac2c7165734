"""``corruption``: the training corruption (M, M~) as one typed object, recorded in checkpoints as plain data,
and models trained on scans that came with their own masks (``mask_kind = "input"``) end to end."""

import hashlib
import json

import h5py
import numpy as np
import pytest
import sigpy
import sigpy.mri
import torch
from click.testing import CliRunner

from ambient_mri import masks as M
from ambient_mri.checkpoint import LATEST, load_checkpoint, load_denoiser
from ambient_mri.commands.sample import command as sample_command
from ambient_mri.config import load_config
from ambient_mri.corruption import (Clean, Corruption, ImageCorruption, KspaceCorruption, MaskBank, from_data,
                                    from_dict)
from ambient_mri.errors import ConfigError
from ambient_mri.fastmri_io import write_volume
from ambient_mri.fft import fft2c
from ambient_mri.prep import PrepOptions, run_prep
from ambient_mri.recon import run_recon
from ambient_mri.sampling import model_view
from ambient_mri.train import train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

LINES = {"domain": "kspace", "mask_kind": "adps", "accel": 4, "center": 20, "acs": [384, 20], "shape": [384, 320],
         "further_accel": 5}
POISSON = {"domain": "kspace", "mask_kind": "poisson", "accel": 4.0, "center": 8, "acs": [8, 8], "shape": [64, 64],
           "delta": 0.3}
BOX = {"domain": "image", "kind": "box", "level": 0.25, "further_level": 0.1, "shape": [32, 32]}


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


def test_draws_follow_the_recorded_distribution():
    lines = from_dict(LINES)
    m = lines.draw(3, seed=1)
    assert m.shape == (3, 1, 320) and torch.all(m.sum((1, 2)) == 64)  # floor(320 / 5) lines kept
    assert torch.equal(m, lines.draw(3, seed=1)) and not torch.equal(m, lines.draw(3, seed=2))
    pd = from_dict(dict(LINES, mask_kind="poisson", accel=8, center=8, acs=[8, 8], shape=[64, 64], further_accel=9))
    m = pd.draw(2, seed=0)
    assert m.shape == (2, 64, 64) and torch.all(m.sum((1, 2)) == 455) and m[:, 28:36, 28:36].all()
    m = from_dict(BOX).draw(2, seed=0)
    assert m.shape == (2, 32, 32) and torch.all((~m).sum((1, 2)) >= 256)
    assert from_dict({"domain": "clean", "shape": [8, 8]}).draw(2).all()


@pytest.mark.parametrize("name,record,draw_sha,within_sha", [
    ("lines R~", LINES, "303dcae554598d28", "96bc31f6c2867add"),
    ("poisson delta", POISSON, "77584c565260c970", "cec5c5c14dd6b44a"),
    ("box", BOX, "e67e98b77aa3f25a", "7077654e07932ba1"),
])
def test_draws_are_bit_identical_to_the_dict_interpreters_they_replace(name, record, draw_sha, within_sha):
    """Hashes computed with ``masks.draw_training_further_masks`` / ``masks.further_masks_within`` as of
    commit 35cf782 (before this module): checkpoints written then give the same ``M~`` now."""
    c = from_dict(record)
    if c.domain == "kspace":
        test = torch.from_numpy(M.kspace_mask("random", (64, 64), 3, center=6, seed=1).mask)
    else:
        test = torch.from_numpy(M.image_mask("pixels", (32, 32), 0.3, seed=1))
    assert sha(c.draw(4, seed=3)) == draw_sha
    assert sha(c.within(test, 3, seed=2)) == within_sha


def test_records_round_trip_as_plain_data_and_the_demo_checkpoint_reads():
    for record in (LINES, POISSON, BOX, {"domain": "clean", "shape": [8, 8]}):
        c = from_dict(record)
        assert from_dict(c.to_dict()) == c and from_dict(c) is c
        assert c.to_dict() == {**record, **({"accel": float(record["accel"])} if "accel" in record else {})}
    assert type(from_dict({"domain": "clean"})) is Clean and isinstance(from_dict(BOX), ImageCorruption)
    assert isinstance(Corruption.from_dict(LINES), Corruption) and Corruption.from_dict(LINES) == from_dict(LINES)
    from ambient_mri.demo import DEMO_CHECKPOINT

    rec = load_checkpoint(DEMO_CHECKPOINT)["training"]["corruption"]
    c = from_dict(rec)
    assert isinstance(c, KspaceCorruption) and c.to_dict() == rec and c.draw(2).shape == (2, 64, 64)
    with pytest.raises(ConfigError, match="corruption"):
        from_dict({"domain": "kspace", "mask_kind": "adps"})  # no acs
    with pytest.raises(ConfigError, match="further_accel or delta"):
        from_dict(dict(LINES, further_accel=None))
    # further_accel or delta: the first wins, decided in one place
    both = from_dict(dict(POISSON, further_accel=5.0))
    assert both.rule == {"further_accel": 5.0} and "delta" not in both.to_dict()


def test_from_data_builds_what_the_trainer_records():
    info = {"shape": (32, 32), "acs": [32, 4], "mask_shape": (1, 32), "mask_kind": "adps", "accel": 4.0}
    cfg = load_config("tiny")
    assert from_data(cfg, info).to_dict() == {"domain": "kspace", "mask_kind": "adps", "accel": 4.0, "center": 4,
                                              "acs": [32, 4], "shape": [32, 32], "delta": 0.3}
    assert from_data(load_config("tiny", ["loss.kind=oracle"]), info) == Clean((32, 32))
    img = from_data(load_config("tiny", ["loss.kind=ambient_image", "loss.delta=0.1"]),
                    {"shape": (32, 32), "corruption": "box", "level": 0.25})
    assert img.to_dict() == BOX
    with pytest.raises(ConfigError, match="training masks"):
        from_data(cfg, dict(info, mask_kind="input"))


def test_mask_bank_keeps_the_most_frequent_masks_compactly_and_loads_with_weights_only(tmp_path):
    lines = [M.kspace_mask("random", (1, 40), 4, center=4, seed=s).mask for s in range(5)]
    seen = [lines[0]] * 3 + lines[1:] + [lines[1]]  # mask 0 three times, mask 1 twice
    bank = MaskBank.collect(seen, cap=3)
    assert len(bank) == 3 and bank.seen == 8 and bank.distinct == 5 and bank.counts.tolist() == [3, 2, 1]
    assert np.array_equal(bank.masks[0].numpy(), lines[0]) and np.array_equal(bank.masks[2].numpy(), lines[2])
    d = bank.to_dict()
    assert d["lines"].shape == (3, 40) and d["lines"].dtype == torch.bool
    # draws follow the counts: mask 0 about half the time
    picks = bank.pick(600, seed=0)
    share = float((picks == bank.masks[0]).all(-1).all(-1).float().mean())
    assert 0.42 < share < 0.58, share
    two_d = MaskBank.collect(np.stack([M.kspace_mask("poisson", (24, 20), 3, center=6, seed=s).mask for s in range(4)]))
    d2 = two_d.to_dict()
    assert d2["bits"].dtype == torch.uint8 and d2["bits"].shape == (4, 24 * 20 // 8)
    path = tmp_path / "bank.pt"
    torch.save({"a": d, "b": d2}, path)
    back = torch.load(path, weights_only=True)
    assert MaskBank.from_dict(back["a"]) == bank and MaskBank.from_dict(back["b"]) == two_d


def test_input_mask_corruption_draws_from_its_bank_and_needs_it_for_independent_draws():
    bank = MaskBank.collect([M.kspace_mask("random", (1, 32), 3, center=6, seed=s).mask for s in range(4)])
    c = KspaceCorruption((32, 32), mask_kind="input", accel=3.0, center=6, acs=(32, 6), delta=0.3, bank=bank)
    fm = c.draw(16, seed=0)
    assert fm.shape == (16, 1, 32)
    inside = (fm[:, None] & ~bank.masks[None]).flatten(2).any(-1)  # (16, 4): M~ leaves bank mask j
    assert (~inside).any(1).all()  # every M~ lies inside some bank mask
    assert not (fm[:, None] == bank.masks[None]).flatten(2).all(-1).any()  # and strictly inside
    assert from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="matrix"):
        c.at((32, 40)).draw(1)
    old = from_dict({k: v for k, v in c.to_dict().items() if k != "bank"})  # recorded before banks existed
    with pytest.raises(ConfigError, match="within"):
        old.draw(1)
    test = bank.masks[1]
    assert not (old.within(test, 2) & ~test).any()


# ----------------------------------------------------------------------------------------------
# End to end: scans with their own masks -> prep (train split keeps them) -> train -> recon dc/adps, sample

N, C = 32, 2


def own_mask_volume(path, seed, slices=2):
    """A test-style volume: Shepp-Logan x birdcage maps, undersampled by its own random line mask."""
    rng = np.random.default_rng(seed)
    maps = sigpy.mri.birdcage_maps((C, N, N), r=1.2).astype(np.complex64)
    maps /= np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True))
    base = np.abs(sigpy.shepp_logan((N, N))).astype(np.float32)
    k = np.stack([fft2c(maps * base * (0.6 + 0.4 * rng.uniform()) * np.exp(1j * rng.uniform(0, 1)))
                  for _ in range(slices)])
    k = k + 1e-3 * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))
    line = M.kspace_mask("random", (N, N), 3, center=6, seed=seed).mask[0]
    write_volume(path, k.astype(np.complex64), recon_size=(N, N), mask=line, acceleration=3.0, num_low_frequency=6)
    return line


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("own_masks")
    lines = [own_mask_volume(root / "raw_train" / f"t{i}.h5", seed=20 + i) for i in range(4)]
    own_mask_volume(root / "raw_test" / "scan.h5", seed=99)
    quiet = dict(progress=False, echo=lambda m: None)
    run_prep(root / "raw_train", root / "train", PrepOptions(split="train", maps="lowres"), **quiet)
    run_prep(root / "raw_test", root / "test", PrepOptions(split="test", maps="lowres"), **quiet)
    train("tiny", root / "train", root / "run", overrides=["train.steps=20", "train.sample_every=10",
                                                           "train.sample_n=2", "train.sample_steps=3"], **quiet)
    return root, lines


@pytest.mark.slow
def test_trained_on_own_masks_records_the_bank_and_samples_and_reconstructs(run, tmp_path):
    root, lines = run
    with h5py.File(root / "train" / "t0.h5") as f:
        assert f.attrs["mask_kind"] == "input"
    ck = load_checkpoint(root / "run" / LATEST)  # torch.load(weights_only=True)
    rec = ck["training"]["corruption"]
    c = from_dict(rec)
    assert rec["mask_kind"] == "input" and rec["bank"]["seen"] == 8 and rec["bank"]["distinct"] == 4
    assert from_dict(c.to_dict()) == c
    bank = {m.numpy().tobytes() for m in c.bank.masks[:, 0]}
    assert bank == {np.asarray(m, bool).tobytes() for m in lines}  # exactly the training files' own masks
    # sample grids ran during training (they were disabled for such data before)
    assert sorted(p.name for p in (root / "run" / "samples").glob("*.png")) == ["step_0000010.png", "step_0000020.png"]
    assert "sample grids disabled" not in (root / "run" / "train.log").read_text()

    # the samplers' independent M~: inside a bank mask, strictly
    _, meta = load_denoiser(root / "run")
    view = model_view(meta["training"], 6, shape=(N, N), seed=4)
    fm = view.mask.bool()
    assert fm.shape == (6, 1, N)
    assert (~(fm[:, None] & ~c.bank.masks[None]).flatten(2).any(-1)).any(1).all()  # each inside a bank mask
    assert not (fm[:, None] == c.bank.masks[None]).flatten(2).all(-1).any()  # and none equal to one

    # sample
    res = CliRunner().invoke(sample_command, ["--checkpoint", str(root / "run"), "--n", "3", "--out",
                                              str(tmp_path / "s"), "--steps", "3", "-q"])
    assert res.exit_code == 0, res.output
    with h5py.File(tmp_path / "s" / "samples.h5") as f:
        x, sfm = f["samples"][()], torch.from_numpy(f["further_mask"][()])
    assert x.shape == (3, N, N) and np.isfinite(x).all() and np.abs(x).max() > 0
    assert torch.equal(sfm, c.draw(3, seed=0))
    info = json.loads((tmp_path / "s" / "sample.json").read_text())
    assert info["corruption"]["bank"] == {"masks": 4, "seen": 8, "distinct": 4}

    # recon: zero-filled, dc (M~ inside the test mask, and from the bank), adps (from the bank)
    run_recon(root / "test", tmp_path / "zf", "zf", quiet=True)
    ck_path = root / "run" / "checkpoint.pt"
    runs = {"dc": dict(steps=4, noise_std=0.0), "dc-bank": dict(steps=4, noise_std=0.0, further="independent"),
            "adps": dict(steps=6, step_size=0.2)}
    out = {}
    for name, kw in runs.items():
        run_recon(root / "test", tmp_path / name, name.split("-")[0], checkpoint=ck_path, quiet=True, **kw)
        with h5py.File(tmp_path / name / "scan.h5") as f:
            out[name] = {"x": f["reconstruction"][()], "dc": f["data_consistency"][()],
                         "further": f.attrs["further_mask"]}
        assert out[name]["x"].shape == (2, N, N) and np.isfinite(out[name]["x"]).all(), name
    with h5py.File(tmp_path / "zf" / "scan.h5") as f:
        zf_dc = f["data_consistency"][()]
    assert out["dc"]["further"] == "within" and out["dc-bank"]["further"] == out["adps"]["further"] == "independent"
    # with the data declared exact, the CG data-consistency step fits the measured lines better than the
    # zero-filled image (the image itself is not better than zero-filled after 20 steps of a tiny model)
    assert np.all(out["dc"]["dc"] < zf_dc) and np.all(out["dc-bank"]["dc"] < zf_dc)
