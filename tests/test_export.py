"""checkpoint.export_weights: a release copy carries the EMA weights and no absolute path of the machine
that trained it; the packaged demo checkpoint is such a copy."""

import re

import pytest
import torch

from ambient_mri.checkpoint import ASSETS, FORMAT, PACKAGED, export_weights, load_checkpoint, save_checkpoint
from ambient_mri.networks import build_denoiser

MODEL = {"channels": [8, 8], "groups": 4}
# a string that starts at a file-system root of a usual machine (POSIX home, scratch and temp folders); not
# preceded by a name character, so that the archive's own member names (archive/data/0) do not count
MACHINE_PATH = re.compile(rb"(?<![\w.-])/(?:work|home|tmp|root|Users|mnt|scratch|data|var|private|srv|opt)/")


def strings(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from strings(v)
    elif isinstance(obj, str):
        yield obj


def test_export_keeps_the_ema_weights_and_drops_absolute_paths(tmp_path):
    torch.manual_seed(0)
    model, ema = build_denoiser(MODEL), build_denoiser(MODEL)
    data_root = tmp_path / "prep" / "train"
    init = tmp_path / "runs" / "base" / "checkpoint.pt"
    training = {"kind": "ambient", "data": {"root": str(data_root), "split": "train"},
                "init": {"path": str(init), "step": 3}, "resumed_from": str(tmp_path / "run" / "checkpoint.pt"),
                "label": "ambient (k-space): trained on undersampled measurements only", "notes": ["rel/path", 1]}
    run = tmp_path / "run"
    save_checkpoint(run, {"step": 5, "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": {},
                          "config": {"model": MODEL, "name": "t"}, "training": training, "version": "x"})
    dst = export_weights(run, tmp_path / "release" / "r.pt")
    ck = load_checkpoint(dst)
    assert ck["format"] == FORMAT and ck["step"] == 5 and ck["ema"] is None and ck["exported_from_ema"]
    for k, v in ema.state_dict().items():
        assert torch.equal(ck["model"][k], v)
    t = ck["training"]
    assert t["data"] == {"root": "train", "split": "train"} and t["init"] == {"path": "checkpoint.pt", "step": 3}
    assert t["resumed_from"] == "checkpoint.pt" and t["label"] == training["label"] and t["notes"] == ["rel/path", 1]
    assert not [s for s in strings({k: v for k, v in ck.items() if k != "model"}) if s.startswith("/")]
    assert str(tmp_path).encode() not in dst.read_bytes()
    # exporting the release again changes nothing (the weights stay the EMA weights, and say so)
    again = load_checkpoint(export_weights(dst, tmp_path / "again.pt"))
    assert again["exported_from_ema"] and again["training"] == t and again["config"] == ck["config"]
    assert all(torch.equal(again["model"][k], v) for k, v in ck["model"].items())


@pytest.mark.parametrize("name", sorted(PACKAGED))
def test_packaged_checkpoints_name_no_folder_of_the_training_machine(name):
    path = ASSETS / PACKAGED[name]
    raw = path.read_bytes()
    assert not MACHINE_PATH.search(raw), MACHINE_PATH.search(raw)
    ck = load_checkpoint(name)  # by name, as recon --checkpoint NAME reads it
    assert not [s for s in strings({k: v for k, v in ck.items() if k != "model"}) if s.startswith("/")]
    assert ck["exported_from_ema"] and ck["ema"] is None
    # small, an ambient model trained on an undersampled train split only, finished (not a snapshot)
    assert path.stat().st_size < 8 * 2**20
    assert ck["config"]["loss"]["kind"] == "ambient" and ck["training"]["data"]["split"] == "train"
    assert ck["step"] == ck["config"]["train"]["steps"]
