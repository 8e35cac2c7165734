"""Bad input through the real commands: a corpus of malformed fastMRI-layout files in one batch with good
ones (``prep`` and ``recon``), damaged prepared files, impossible configs and command-line values, paths
that try to leave the dataset root, checkpoints that carry pickled code, and no network use at run time.

The reader-level corpus (each malformed file -> one ``DataError``) is ``tests/test_fastmri_io.py``; the
config-key corpus is ``tests/test_config.py``; prep's option corpus is ``tests/test_prep.py``. Here the
same kinds of files and values go through the commands, in a batch with good inputs.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ambient_mri.checkpoint import FORMAT as CKPT_FORMAT
from ambient_mri.checkpoint import load_checkpoint, load_denoiser
from ambient_mri.cli import main as cli_main
from ambient_mri.config import resolve_config_path
from ambient_mri.datasets import AmbientKspaceDataset, read_manifest
from ambient_mri.errors import ConfigError, DataError
from ambient_mri.fastmri_io import make_header, write_volume
from ambient_mri.prep import PrepOptions, run_prep
from ambient_mri.train import train
from tests.test_datasets import write_prepared
from tests.test_fastmri_io import _bad_files, kspace, raw_file
from tests.test_recon import raw_volume

PROJECT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
QUIET = dict(progress=False, echo=lambda m: None)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def run_cli(capsys, argv) -> tuple[int, list[str]]:
    """``ambient-mri ARGV`` in this process: (exit status, stderr lines)."""
    capsys.readouterr()
    try:
        cli_main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip().splitlines()


def damage(path: Path, signature: bytes) -> Path:
    """Overwrite the first HDF5 structure marked ``signature`` (``TREE``, ``HEAP``, ``SNOD``) with junk."""
    b = bytearray(path.read_bytes())
    i = b.find(signature)
    assert i > 0, signature
    b[i : i + 4] = b"JUNK"
    path.write_bytes(bytes(b))
    return path


# name -> (builder, words of its one-line error); the reader-level cases of test_fastmri_io plus a few more
def corpus(folder: Path, scratch: Path) -> dict:
    rng = np.random.default_rng(5)
    cases = {name: spec for name, spec in _bad_files(scratch, rng).items() if name != "folder"}
    hdr = np.bytes_(make_header((32, 16), (16, 16)))
    k = kspace(rng, S=3)

    def late_nan(p):
        kk = k.copy()
        kk[1, 0, 3, 5] = np.nan  # not on the central row: found when slice 1 is read
        raw_file(p, kspace=kk, ismrmrd_header=hdr)

    def group(p):
        with h5py.File(p, "w") as f:
            f.create_group("kspace")

    cases.update({
        "late_nan": (late_nan, "NaN or Inf (slice 1)"),
        "kspace_is_a_group": (group, "'kspace' is not a dataset"),
        "damaged_btree": (lambda p: damage(write_volume(p, k), b"TREE"), "damaged HDF5 file"),
        "damaged_heap": (lambda p: damage(write_volume(p, k), b"HEAP"), "HDF5"),
    })
    for name, (build, _) in cases.items():
        build(folder / f"bad_{name}.h5")
    return {f"bad_{name}.h5": words for name, (_, words) in cases.items()}


# headers that do not parse or hold absurd sizes: not fatal, the array shape is used and the reason echoed once
HEADERS = {
    "hdr_not_xml.h5": (b"<ismrmrdHeader><unclosed>", "does not parse"),
    "hdr_absurd.h5": (make_header((32, 32), (99999, 32)), "absurd sizes"),
    "hdr_infinite.h5": (make_header((32, 32), (32, 32)).replace(b"<x>32</x>", b"<x>1e400</x>"), "does not parse"),
}


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    src = root / "in"
    src.mkdir()
    for i in range(2):
        raw_volume(src / f"good{i}.h5", slices=2, seed=i)
    (src / "a_folder.h5").mkdir()  # not a file: not an input at all
    rng = np.random.default_rng(9)
    for name, (header, _) in HEADERS.items():
        raw_file(src / name, kspace=kspace(rng, S=2, W=32), ismrmrd_header=np.bytes_(header))
    (root / "scratch").mkdir()
    return src, corpus(src, root / "scratch")


def sha_tree(folder: Path) -> dict:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# the malformed corpus in one batch


def test_prep_batch_reports_every_bad_file_in_one_line_and_prepares_the_rest(batch, tmp_path, capsys):
    src, expected = batch
    before = sha_tree(src)
    out = tmp_path / "out"
    code, err = run_cli(capsys, ["prep", src, out, "--split", "train", "--accel", "4", "--maps", "lowres",
                                 "--center-lines", "8", "-q"])
    assert code == 1, err
    m = json.loads((out / "manifest.json").read_text())
    assert sorted(f["file"] for f in m["files"]) == sorted(["good0.h5", "good1.h5", *HEADERS])
    failed = {Path(f["source"]).name: f["error"] for f in m["failed"]}
    assert sorted(failed) == sorted(expected)
    for name, words in expected.items():
        msg = failed[name]
        assert "\n" not in msg and name in msg and words in msg and len(msg) < 400, (name, msg)
        assert f"skipped: {msg}" in err or f"failed: {msg}" in err, (name, err)  # echoed once, as one line
    for name, (_, reason) in HEADERS.items():
        assert any(line.startswith(f"warning: {src / name}: ") and reason in line for line in err), (name, err)
    assert f"{len(expected)} input file(s) failed:" in err
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", "good0.h5", "good1.h5", *HEADERS])
    assert sha_tree(src) == before  # inputs never modified
    AmbientKspaceDataset(out)  # what was written is a valid dataset


def test_recon_batch_reports_every_bad_file_in_one_line_and_reconstructs_the_rest(batch, tmp_path, capsys):
    src, expected = batch
    out = tmp_path / "rec"
    code, err = run_cli(capsys, ["recon", "--input", src, "--out", out, "--method", "zf", "--accel", "4",
                                 "--center-lines", "8", "--maps", "lowres", "--no-nifti", "--no-png", "-q"])
    assert code == 2 and err[-1].startswith(f"error: {len(expected)} of {len(expected) + 2 + len(HEADERS)} input")
    fails = [line for line in err if line.startswith("failed: ")]
    assert len(fails) == len(expected)
    for name, words in expected.items():
        (line,) = [f for f in fails if f"{name}: " in f]
        assert words in line or "not a readable HDF5 file" in line, line
    assert sorted(p.name for p in out.glob("*.h5")) == sorted(["good0.h5", "good1.h5", *HEADERS])
    with h5py.File(out / "good1.h5") as f:
        assert f["reconstruction"].shape == (2, 32, 32) and np.isfinite(f["reconstruction"][()]).all()


def test_recon_refuses_damaged_prepared_files_one_by_one(tmp_path, capsys):
    raw_volume(tmp_path / "raw" / "scan.h5", slices=2, seed=3)
    run_prep(tmp_path / "raw", tmp_path / "prep", PrepOptions(split="val", accel=(4.0,), mask_type="poisson",
                                                               maps="lowres", calib=8), **QUIET)
    good = tmp_path / "prep" / "scan.h5"
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(good, folder / "good.h5")

    def variant(name, edit):
        p = folder / name
        shutil.copy(good, p)
        with h5py.File(p, "r+") as f:
            edit(f)

    def replace(key, value):
        def edit(f):
            del f[key]
            f[key] = value(f) if callable(value) else value
        return edit

    with h5py.File(good) as f:
        k, mask, maps = f["kspace"][()], f["mask"][()], f["maps"][()]
    k_nan = k.copy()
    k_nan[1, 0, 0, 0] = np.inf
    empty = mask.copy()
    empty[1] = False
    cases = {
        "no_kspace.h5": (lambda f: f.__delitem__("kspace"), "has no 'kspace'"),
        "real_kspace.h5": (replace("kspace", np.abs(k)), "must be complex"),
        "maps_shape.h5": (replace("maps", maps[:, :2]), "'maps' shape"),
        "mask_shape.h5": (replace("mask", mask[:, :, :16]), "'mask' shape"),
        "mask_empty.h5": (replace("mask", empty), "sampling mask is empty"),
        "inf_kspace.h5": (replace("kspace", k_nan), "NaN or Inf"),
    }
    for name, (edit, _) in cases.items():
        variant(name, edit)
    code, err = run_cli(capsys, ["recon", "--input", folder, "--out", tmp_path / "rec", "--method", "zf",
                                 "--no-nifti", "--no-png", "-q"])
    assert code == 2 and err[-1].startswith(f"error: {len(cases)} of {len(cases) + 1} input file(s) failed")
    for name, (_, words) in cases.items():
        (line,) = [e for e in err if e.startswith(f"failed: {folder / name}: ")]
        assert words in line, line
    assert [p.name for p in (tmp_path / "rec").glob("*.h5")] == ["good.h5"]


# ----------------------------------------------------------------------------------------------
# configs and command-line values: rejected before any work starts


@pytest.mark.parametrize("extra,words", [
    (["train.stpes=3"], "unknown key train.stpes"),
    (["train.lr=fast"], "train.lr must be a number"),
    (["train.batch=0"], "train.batch must be >= 1"),
    (["loss.delta=2"], "loss.delta must be in (0, 1)"),
    (["model.channels=[8, x]"], "model.channels must be a list of integers"),
    (["--config", "no_such_config"], "no such config file"),
    (["--config", "{yaml}"], "unknown key model.chanels"),
])
def test_train_rejects_bad_configs_in_one_line_before_any_work(tmp_path, capsys, extra, words):
    data = write_prepared(tmp_path / "data", files=1, slices=4)
    yaml = tmp_path / "bad.yaml"
    yaml.write_text("model:\n  chanels: [8, 16]\n")
    extra = [str(yaml) if e == "{yaml}" else e for e in extra]
    config = [] if "--config" in extra else ["--config", "tiny"]
    out = tmp_path / "run"
    code, err = run_cli(capsys, ["train", *config, "--data", data, "--out", out, "-q", *extra])
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("extra,words", [
    (["--accel", "0.5"], "--accel must be >= 1"),
    (["--shard", "2/2"], "need 0 <= i < n"),
    (["--shard", "one/two"], "--shard must look like i/n"),
    (["--batch", "0"], "must be >= 1"),
    (["--samples", "0"], "must be >= 1"),
    (["--method", "l1"], "--lam or --tune-on"),
    (["--method", "dc"], "needs --checkpoint"),
    (["--method", "zf", "--step-size", "0.5"], "not used by --method zf"),
    (["--method", "l1", "--lam", "0.001", "--error-var", "local"], "--error-var not used by --method l1"),
])
def test_recon_rejects_impossible_values_in_one_line_before_any_work(tmp_path, capsys, extra, words):
    raw_volume(tmp_path / "in" / "scan.h5", slices=1)
    out = tmp_path / "rec"
    method = [] if "--method" in extra else ["--method", "zf"]
    code, err = run_cli(capsys, ["recon", "--input", tmp_path / "in", "--out", out, *method, "-q", *extra])
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert not out.exists()


def test_recon_and_prep_never_write_into_their_input_folder(tmp_path, capsys):
    raw_volume(tmp_path / "in" / "scan.h5", slices=1)
    before = sha_tree(tmp_path / "in")
    code, err = run_cli(capsys, ["recon", "--input", tmp_path / "in", "--out", tmp_path / "in", "--method", "zf",
                                 "--accel", "4", "-q"])
    assert code == 2 and "input folder" in err[-1]
    code, err = run_cli(capsys, ["prep", tmp_path / "in", tmp_path / "in", "--split", "train", "-q"])
    assert code == 2 and "input folder" in err[-1]
    assert sha_tree(tmp_path / "in") == before


@pytest.mark.parametrize("extra,words", [
    (["--workers", "0"], "--workers must be >= 1"),
    (["--center-lines", "0"], "--center-lines must be >= 1"),
    (["--calib", "2"], "--calib must be >= 4"),
    (["--seed", "-1"], "--seed must be a non-negative integer"),
    (["--cg-iters", "0"], "CG iterations must be >= 1"),
    (["--accel", "inf"], "--accel must be >= 1"),
])
def test_prep_rejects_more_impossible_values_before_any_work(tmp_path, capsys, extra, words):
    """(--accel < 1, --crop larger than the matrix, --coils above the input's: tests/test_prep.py)"""
    raw_volume(tmp_path / "in" / "scan.h5", slices=1)
    out = tmp_path / "out"
    code, err = run_cli(capsys, ["prep", tmp_path / "in", out, "--split", "train", "-q", *extra])
    assert code == 2 and len(err) == 1 and words in err[0], err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# paths that try to leave the dataset root


@pytest.mark.parametrize("entry", ["../secret.h5", "../../etc/passwd", "/etc/passwd", "sub/../../secret.h5",
                                   "..", ".", ".hidden.h5", "..\\secret.h5", "C:\\secret.h5", "vol_0.h5/../../x"])
def test_manifest_entries_cannot_leave_the_dataset_root(tmp_path, capsys, entry):
    root = write_prepared(tmp_path / "data", files=1, slices=4)
    shutil.copy(root / "vol_0.h5", tmp_path / "secret.h5")  # a readable decoy just outside the root
    m = json.loads((root / "manifest.json").read_text())
    m["files"][0]["file"] = entry
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError) as e:
        read_manifest(root)
    assert "not a plain file name" in str(e.value) and "\n" not in str(e.value)
    out = tmp_path / "run"
    code, err = run_cli(capsys, ["train", "--config", "tiny", "--data", root, "--out", out, "-q"])
    assert code == 2 and len(err) == 1 and "not a plain file name" in err[0]
    assert not out.exists()


def test_config_names_are_looked_up_only_among_the_packaged_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("tiny").parent.name == "configs"
    for spec in ("../tiny", "configs/../tiny", "sub/tiny.yaml", "/tiny"):
        with pytest.raises(ConfigError, match="no such config file"):
            resolve_config_path(spec)


# ----------------------------------------------------------------------------------------------
# checkpoints with pickled code


class Payload:
    """Unpickling this would create a marker folder: proof of code execution."""

    marker = None

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_checkpoints_with_pickled_code_are_refused_everywhere_and_never_run(tmp_path, capsys):
    marker = tmp_path / "PAYLOAD_RAN"
    Payload.marker = str(marker)
    evil = tmp_path / "evil.pt"
    torch.save({"format": CKPT_FORMAT, "step": 1, "model": {}, "config": {}, "training": {}, "x": Payload()}, evil)
    for fn in (load_checkpoint, load_denoiser):
        with pytest.raises(DataError, match="pickled objects"):
            fn(evil)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(evil, run_dir / "checkpoint.pt")
    raw_volume(tmp_path / "in" / "scan.h5", slices=1)
    data = write_prepared(tmp_path / "data", files=1, slices=4)
    for argv in (["recon", "--input", tmp_path / "in", "--out", tmp_path / "rec", "--method", "dc", "--checkpoint",
                  evil, "--accel", "4", "-q"],
                 ["train", "--config", "tiny", "--data", data, "--out", tmp_path / "ft", "--init", evil, "-q"],
                 ["sample", "--checkpoint", evil, "--out", tmp_path / "s", "-q"],
                 ["info", evil],
                 ["train", "--out", run_dir, "--resume", "-q"]):
        code, err = run_cli(capsys, argv)
        assert code == 2 and err[-1].startswith("error: "), (argv[0], err)
        assert "pickled" in err[-1] or "no checkpoint" in err[-1] or "not a weights-only" in err[-1], err
        assert not any("Traceback" in e for e in err)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is live: unrestricted loading would have run it
    assert marker.is_dir()


def test_a_run_folder_whose_checkpoints_are_all_refused_says_which_file_and_why(tmp_path, capsys):
    """recon / sample --checkpoint RUN and train --resume on a run folder that holds checkpoint files, none of
    them loadable: the error names the refused file and the reason, not 'no checkpoint in this run folder',
    and --resume never announces a new run."""
    evil = tmp_path / "evil.pt"
    torch.save({"format": CKPT_FORMAT, "step": 1, "model": {}, "config": {}, "training": {}, "x": Payload()}, evil)
    Payload.marker = str(tmp_path / "PAYLOAD_RAN")
    raw_volume(tmp_path / "in" / "scan.h5", slices=1)
    data = write_prepared(tmp_path / "data", files=1, slices=4)
    pickled, damaged, empty = tmp_path / "pickled", tmp_path / "damaged", tmp_path / "empty"
    pickled.mkdir()
    shutil.copy(evil, pickled / "checkpoint.pt")
    (damaged / "checkpoints").mkdir(parents=True)
    (damaged / "checkpoint.pt").write_bytes(b"not a checkpoint")
    (damaged / "checkpoints" / "ckpt_0000004.pt").write_bytes(b"not one either")
    empty.mkdir()
    cases = {pickled: (str(pickled / "checkpoint.pt"), "pickled objects", "the only checkpoint file"),
             damaged: (str(damaged / "checkpoint.pt"), "cannot load", "the newest of 2 checkpoint files")}
    for run_dir, words in cases.items():
        for argv in (["recon", "--input", tmp_path / "in", "--out", tmp_path / "rec", "--method", "dc",
                      "--checkpoint", run_dir, "--accel", "4", "-q"],
                     ["sample", "--checkpoint", run_dir, "--out", tmp_path / "s", "-q"],
                     ["train", "--out", run_dir, "--resume", "-q"],
                     ["train", "--config", "tiny", "--data", data, "--out", run_dir, "--resume", "-q"]):
            code, err = run_cli(capsys, argv)
            assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (argv, err)
            assert all(w in err[0] for w in words), (argv, err)
            assert "no checkpoint in this run folder" not in err[0] and "starting a new run" not in err[0], err
            if argv[0] == "train":
                assert "--resume" in err[0] and not (run_dir / "config.yaml").exists()
    assert not (tmp_path / "PAYLOAD_RAN").exists()
    # a run folder with no checkpoint file at all still says exactly that
    code, err = run_cli(capsys, ["sample", "--checkpoint", empty, "--out", tmp_path / "s2", "-q"])
    assert code == 2 and "no checkpoint in this run folder" in err[-1] and str(empty) in err[-1], err


# ----------------------------------------------------------------------------------------------
# nothing is downloaded at run time


def test_package_source_has_no_network_calls():
    names = ("urllib.request", "urlopen", "requests.", "http.client", "socket.", "torch.hub", "hf_hub",
             "from_pretrained", "download_url", "fetch_")
    hits = []
    for folder in ("ambient_mri", "data_prep"):
        for p in (PROJECT / folder).rglob("*.py"):
            text = p.read_text()
            hits += [f"{p.name}: {n}" for n in names if n in text]
    assert hits == []


def test_prep_train_sample_recon_run_with_the_network_unusable(tmp_path):
    """The pipeline in one process whose sockets refuse to connect or resolve (a sitecustomize.py); every
    attempt is also logged, and the log must stay empty."""
    site = tmp_path / "site"
    site.mkdir()
    log = tmp_path / "network_attempts.txt"
    (site / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import socket

        def _refuse(*args, **kwargs):
            with open({str(log)!r}, "a") as f:
                f.write(repr(args)[:200] + "\\n")
            raise OSError("network disabled by the test")

        socket.socket.connect = _refuse
        socket.socket.connect_ex = _refuse
        socket.create_connection = _refuse
        socket.getaddrinfo = _refuse
    """))
    raw_volume(tmp_path / "raw" / "t0.h5", slices=4, seed=1)
    raw_volume(tmp_path / "raw_test" / "s0.h5", slices=1, seed=2)
    script = textwrap.dedent(f"""
        import socket, sys
        from ambient_mri.cli import cli
        assert socket.getaddrinfo is not None
        try:
            socket.create_connection(("example.com", 80), timeout=1)
        except OSError:
            pass
        else:
            sys.exit("the network block is not in place")
        open({str(log)!r}, "w").close()  # (that check itself was an attempt: start the log now)
        T = {str(tmp_path)!r}
        for argv in (["prep", T + "/raw", T + "/prep", "--split", "train", "--maps", "lowres", "--center-lines", "8", "-q"],
                     ["train", "--config", "tiny", "--data", T + "/prep", "--out", T + "/run", "-q", "train.steps=2"],
                     ["sample", "--checkpoint", T + "/run", "--n", "1", "--steps", "2", "--out", T + "/samples", "-q"],
                     ["recon", "--input", T + "/raw_test", "--out", T + "/rec", "--method", "dc", "--checkpoint",
                      T + "/run", "--steps", "2", "--accel", "4", "--maps", "lowres", "--center-lines", "8", "-q"],
                     ["info", T + "/run"]):
            rv = cli.main(args=argv, prog_name="ambient-mri", standalone_mode=False)
            assert rv in (None, 0), (argv[0], rv)
        print("pipeline done")
    """)
    env = dict(ENV, PYTHONPATH=os.pathsep.join([str(site), str(PROJECT), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "pipeline done" in res.stdout, res.stderr[-3000:]
    assert log.read_text() == ""  # no connection or name lookup was even attempted
    assert (tmp_path / "rec" / "s0.h5").is_file() and (tmp_path / "samples" / "samples.npy").is_file()
