"""Faults that really happen: SIGKILL of train / prep / recon at a random moment, a full disk (a file size
limit the kernel enforces), an unwritable output folder, and two processes on one output folder.

Each test runs the real command in a subprocess (``OMP_NUM_THREADS=1``) on tiny 32x32 data and compares
what is on disk with one clean run: checkpoints bit for bit, prepared files by sha256, reconstructions by
the sha256 of their arrays (their ``seconds_per_slice`` attribute is a timing). See docs/reliability.md.
"""

import contextlib
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ambient_mri.checkpoint import LATEST, list_snapshots, load_checkpoint
from ambient_mri.cli import main as cli_main
from ambient_mri.prep import PrepOptions, run_prep
from ambient_mri.recon import Reconstructor, run_recon
from ambient_mri.train import train
from tests.test_datasets import write_prepared
from tests.test_recon import raw_volume

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
QUIET = dict(progress=False, echo=lambda m: None)
PREP_ARGS = ["--split", "val", "--accel", "4", "--mask-type", "poisson", "--maps", "lowres", "--calib", "8",
             "--reference", "cg-sense", "--cg-iters", "60", "-q"]
PREP_OPTS = PrepOptions(split="val", accel=(4.0,), mask_type="poisson", maps="lowres", calib=8, cg_iters=60)
TRAIN_OVERRIDES = ["train.steps=30", "train.ckpt_every=2", "train.log_every=1", "train.keep=3", "model.dropout=0.1"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def ambient(*args):
    return [sys.executable, "-m", "ambient_mri.cli", *map(str, args)]


def sha(p) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def checksums(folder, pattern="*") -> dict:
    return {p.name: sha(p) for p in sorted(Path(folder).glob(pattern)) if p.is_file()}


def array_checksums(p) -> dict:
    """sha256 of every dataset of an .h5 and its attributes except timings (``seconds_per_slice``)."""
    with h5py.File(p, "r") as f:
        out = {k: hashlib.sha256(np.ascontiguousarray(f[k][()]).tobytes()).hexdigest() for k in f}
        out["attrs"] = {k: str(v) for k, v in f.attrs.items() if k != "seconds_per_slice"}
    return out


def visible(folder) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if not p.name.startswith("."))


def kill_when(proc, ready, *, timeout=180.0, delay=0.0, poll=0.005) -> int:
    """SIGKILL ``proc`` ``delay`` s after ``ready()`` first holds; returns its exit status (``-9`` if killed)."""
    t0 = time.monotonic()
    try:
        while not ready():
            if proc.poll() is not None:
                return proc.returncode
            if time.monotonic() - t0 > timeout:
                raise AssertionError("the process made no progress in time")
            time.sleep(poll)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def limited(argv, limit_bytes):
    """``ambient-mri ARGV`` under ``RLIMIT_FSIZE``: the kernel refuses every write beyond ``limit_bytes`` in
    any file with EFBIG (SIGXFSZ ignored), as a full disk refuses it with ENOSPC."""
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes})); "
            "from ambient_mri.cli import main; main(sys.argv[1:])")
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], cwd=PROJECT, env=ENV, capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(res, *words):
    """A clean failure: exit 2, the last stderr line is ``error: ...`` naming ``words``, no traceback."""
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and err and err[-1].startswith("error: "), res.stderr[-2000:]
    for w in words:
        assert w in err[-1], err[-1]


@pytest.fixture(scope="module")
def prepared_train(tmp_path_factory):
    return write_prepared(tmp_path_factory.mktemp("faults") / "train", files=2, slices=4, coils=2)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """Five raw fully sampled 32x32 4-coil volumes of 3 slices."""
    root = tmp_path_factory.mktemp("faults_raw")
    for i in range(5):
        raw_volume(root / f"vol{i}.h5", slices=3, seed=i)
    return root


@pytest.fixture(scope="module")
def clean_prep(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "prep"
    run_prep(raw, out, PREP_OPTS, **QUIET)
    return out


@pytest.fixture(scope="module")
def test_set(clean_prep, tmp_path_factory):
    """Prepared val files with 6 slices each (4 files), for recon."""
    root = tmp_path_factory.mktemp("faults_test")
    for i in range(4):
        raw_volume(root / "raw" / f"scan{i}.h5", slices=6, seed=20 + i)
    run_prep(root / "raw", root / "prep", PREP_OPTS, **QUIET)
    return root / "prep"


# ----------------------------------------------------------------------------------------------
# SIGKILL


def test_sigkill_train_three_times_then_resume_equals_an_uninterrupted_run(tmp_path, prepared_train):
    ref = train("tiny", prepared_train, tmp_path / "ref", overrides=TRAIN_OVERRIDES, **QUIET)
    out = tmp_path / "run"
    rng = np.random.default_rng(2024)  # seeded kill moments: k steps after a new snapshot, plus 0-50 ms
    newest = 0
    for kill in range(3):
        args = ["--config", "tiny", "--data", prepared_train] if kill == 0 else ["--resume"]
        target = newest + 2 + int(rng.integers(1, 4))  # past the next snapshot, at a random step

        def reached():
            m = out / "metrics.csv"
            rows = m.read_text().split() if m.exists() else []
            return len(rows) > 1 and rows[-1].split(",")[0].isdigit() and int(rows[-1].split(",")[0]) >= target

        with open(tmp_path / f"stderr{kill}.txt", "w") as err:
            p = subprocess.Popen(ambient("train", "--out", out, "-q", *args, *TRAIN_OVERRIDES), cwd=PROJECT, env=ENV,
                                 stdout=subprocess.DEVNULL, stderr=err)
            rc = kill_when(p, reached, delay=float(rng.uniform(0, 0.05)))
        log = (tmp_path / f"stderr{kill}.txt").read_text()
        assert rc == -signal.SIGKILL, log
        if kill:  # --resume continued from the newest complete checkpoint of the previous kill
            assert f"resumed from step {newest} " in log, log
        # every checkpoint on disk is complete and loads; nothing half-written looks like a checkpoint
        snaps = list_snapshots(out)
        steps = [load_checkpoint(p)["step"] for _, p in snaps]
        assert steps == [s for s, _ in snaps] and steps, snaps
        assert load_checkpoint(out / LATEST)["step"] in steps
        assert all(p.name.startswith("ckpt_") for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))
        assert max(steps) > newest
        newest = max(steps)
    assert newest < 30
    # the final resume (in this process) runs to the end and lands on the uninterrupted run's weights
    res = train(None, None, out, resume=True, **QUIET)
    assert res["step"] == 30 and res["params_sha256"] == ref["params_sha256"] and res["ema_sha256"] == ref["ema_sha256"]
    a, b = load_checkpoint(tmp_path / "ref" / LATEST), load_checkpoint(out / LATEST)
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    rows = (out / "metrics.csv").read_text().split()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 31))  # no step logged twice or lost
    assert not [p for p in out.rglob(".*") if p.name.endswith(".tmp")]  # half-written checkpoints removed


def test_sigkill_prep_midway_leaves_nothing_that_looks_finished_and_a_rerun_completes_it(raw, clean_prep, tmp_path):
    out = tmp_path / "prep"
    p = subprocess.Popen(ambient("prep", raw, out, *PREP_ARGS), cwd=PROJECT, env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    # kill while the second volume is being written (its hidden temporary file exists)
    rc = kill_when(p, lambda: any(out.glob(".vol1.h5.*.tmp")) if out.is_dir() else False)
    assert rc == -signal.SIGKILL
    finished = visible(out)
    assert finished == ["vol0.h5"]  # no manifest yet, no partial file under a finished name
    assert sha(out / "vol0.h5") == sha(clean_prep / "vol0.h5")
    assert any(out.glob(".vol1.h5.*.tmp")) and (out / ".vol1.h5.lock").exists()  # what the kill left behind
    res = run_prep(raw, out, PREP_OPTS, **QUIET)
    assert [Path(s).name for s in res.skipped] == ["vol0.h5"]  # only what was missing is prepared
    assert sorted(Path(w).name for w in res.written) == [f"vol{i}.h5" for i in range(1, 5)]
    assert checksums(out) == checksums(clean_prep)  # every file and the manifest, byte for byte
    assert not [q.name for q in out.iterdir() if q.name.startswith(".")]  # stale lock and temporary removed


def test_sigkill_recon_midway_then_a_rerun_recomputes_only_the_missing_slices(test_set, tmp_path, monkeypatch):
    args = ["--method", "sense", "--batch", "2", "--sense-iters", "40", "--no-nifti", "--no-png", "-q"]
    clean = tmp_path / "clean"
    run_recon(test_set, clean, "sense", batch=2, sense_iters=40, nifti=False, png=False, quiet=True)
    out = tmp_path / "rec"
    p = subprocess.Popen(ambient("recon", "--input", test_set, "--out", out, *args), cwd=PROJECT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    part = out / ".partial" / "scan1"
    rc = kill_when(p, lambda: (part / "s00002.npz").exists())
    assert rc == -signal.SIGKILL
    assert visible(out) == ["scan0.h5"] and array_checksums(out / "scan0.h5") == array_checksums(clean / "scan0.h5")
    done = {int(q.stem[1:]) for q in part.glob("s*.npz")}
    assert done and not (out / "scan1.h5").exists()
    computed = []
    real = Reconstructor.__call__

    def counting(self, y, *a, **k):
        computed.append(len(y))
        return real(self, y, *a, **k)

    monkeypatch.setattr(Reconstructor, "__call__", counting)
    written = run_recon(test_set, out, "sense", batch=2, sense_iters=40, nifti=False, png=False, quiet=True)
    assert [w.name for w in written] == ["scan1.h5", "scan2.h5", "scan3.h5"]
    todo_scan1 = sum(2 for b in (0, 2, 4) if not {b, b + 1} <= done)  # whole batches on the fixed grid
    assert sum(computed) == todo_scan1 + 2 * 6  # scan1's missing batches, scan2 and scan3
    for name in ("scan0.h5", "scan1.h5", "scan2.h5", "scan3.h5"):
        assert array_checksums(out / name) == array_checksums(clean / name), name
    assert visible(out) == visible(clean) and not (out / ".partial").exists()
    assert not [q.name for q in out.iterdir() if q.name.startswith(".") and q.name != ".partial"]


def test_interrupted_model_recon_resumes_bit_identically_even_mid_batch(tmp_path, prepared_train, test_set,
                                                                        monkeypatch):
    """Model samplers draw the noise of a whole batch from one seed: a resumed run must redo exactly the
    batches of a clean run, also when it was killed between the slice files of one batch, and must not mix
    in slices a run with other options left behind."""
    train("tiny", prepared_train, tmp_path / "run", overrides=["train.steps=4"], **QUIET)
    src = test_set / "scan0.h5"
    kw = dict(checkpoint=tmp_path / "run", steps=3, samples=2, batch=4, nifti=False, png=False, quiet=True)
    run_recon(src, tmp_path / "clean", "dc", **kw)
    clean = array_checksums(tmp_path / "clean" / "scan0.h5")
    real = Reconstructor.__call__

    def interrupted(out, **extra):
        calls = []

        def first_batch_only(self, *a, **k):
            if calls:
                raise KeyboardInterrupt
            calls.append(1)
            return real(self, *a, **k)

        monkeypatch.setattr(Reconstructor, "__call__", first_batch_only)
        with pytest.raises(KeyboardInterrupt):
            run_recon(src, out, "dc", **dict(kw, **extra))
        monkeypatch.setattr(Reconstructor, "__call__", real)
        part = out / ".partial" / "scan0"
        assert sorted(q.name for q in part.glob("s*.npz")) == [f"s0000{i}.npz" for i in range(4)]
        return part

    part = interrupted(tmp_path / "rec")
    (part / "s00003.npz").unlink()  # as if killed between the slice files of batch 0-3
    run_recon(src, tmp_path / "rec", "dc", **kw)
    assert array_checksums(tmp_path / "rec" / "scan0.h5") == clean
    interrupted(tmp_path / "mixed", seed=7)  # slices of another seed ...
    run_recon(src, tmp_path / "mixed", "dc", **kw)  # ... are redone, not reused
    assert array_checksums(tmp_path / "mixed" / "scan0.h5") == clean


# ----------------------------------------------------------------------------------------------
# Full disk, unwritable output


def test_full_disk_during_prep_is_one_clear_error_and_earlier_outputs_stay_intact(raw, tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    for name in ("vol0.h5", "vol1.h5"):
        shutil.copy(raw / name, src / name)
    out = tmp_path / "prep"
    run_prep(src, out, PREP_OPTS, **QUIET)
    before = checksums(out)
    shutil.copy(raw / "vol2.h5", src / "vol2.h5")  # a new input whose output no longer fits
    res = limited(["prep", src, out, *PREP_ARGS], 40_000)
    assert_one_line_error(res, "vol2.h5", "cannot write output (File too large)")
    assert checksums(out) == before  # the earlier files and the manifest are untouched
    assert visible(out) == ["manifest.json", "vol0.h5", "vol1.h5"]
    res = run_prep(src, out, PREP_OPTS, **QUIET)  # room again: the rerun completes what is missing
    assert [Path(w).name for w in res.written] == ["vol2.h5"]


@contextlib.contextmanager
def file_size_limit(limit_bytes):
    """The same kernel limit in this process, for a moment (only the soft limit is lowered, then restored)."""
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def test_full_disk_during_recon_and_train_is_one_clear_error_and_earlier_outputs_stay_intact(test_set, tmp_path,
                                                                                               prepared_train, capsys):
    out = tmp_path / "rec"
    run_recon(test_set / "scan0.h5", out, "zf", quiet=True)
    before = checksums(out)
    run_dir = tmp_path / "run"
    train("tiny", prepared_train, run_dir, overrides=["train.steps=4", "train.ckpt_every=2"], **QUIET)
    snaps = checksums(run_dir / "checkpoints")
    capsys.readouterr()
    for argv, words in ((["recon", "--input", test_set, "--out", out, "--method", "zf", "-q"], ["scan1.h5"]),
                        (["train", "--out", run_dir, "--resume", "-q", "train.steps=8"], ["ckpt_0000006.pt"])):
        with file_size_limit(60_000 if argv[0] == "recon" else 300_000), pytest.raises(SystemExit) as ex:
            cli_main([str(a) for a in argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert ex.value.code == 2 and err[-1].startswith("error: "), err
        assert "cannot write output (File too large)" in err[-1] and all(w in err[-1] for w in words), err[-1]
    after = checksums(out)
    assert {k: after.get(k) for k in before} == before  # scan0's outputs are untouched
    assert "scan1.h5" not in after  # (its NIfTI and PNG, written first and complete, may be there)
    assert checksums(run_dir / "checkpoints") == snaps and load_checkpoint(run_dir / LATEST)["step"] == 4
    assert visible(run_dir / "checkpoints") == ["ckpt_0000002.pt", "ckpt_0000004.pt"]


def _permissions_ignored() -> bool:
    """True where this process writes into a read-only folder anyway (root with CAP_DAC_OVERRIDE)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o555)
        try:
            open(os.path.join(d, "probe"), "w").close()
            return True
        except PermissionError:
            return False
        finally:
            os.chmod(d, 0o755)


def test_unwritable_output_folder_is_one_clear_error_before_any_work(raw, test_set, prepared_train, tmp_path,
                                                                     capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("a regular file where a folder is needed\n")
    bad = blocker / "out"
    cases = [["prep", str(raw), str(bad), *PREP_ARGS],
             ["recon", "--input", str(test_set), "--out", str(bad), "--method", "zf", "-q"],
             ["train", "--config", "tiny", "--data", str(prepared_train), "--out", str(bad), "-q"]]
    for argv in cases + _after_work_would_fail(tmp_path, test_set, monkeypatch):
        with pytest.raises(SystemExit) as ex:
            cli_main(argv + ["--out", str(bad)] if argv[0] in ("eval", "sample", "demo") else argv)
        err = capsys.readouterr().err.strip()
        assert ex.value.code == 2 and err.count("\n") == 0, err
        assert err.startswith("error: ") and str(bad) in err and "Not a directory" in err, err
    assert blocker.read_text().startswith("a regular file")


def _after_work_would_fail(tmp_path, test_set, monkeypatch) -> list[list[str]]:
    """Command lines of eval, sample and demo (without --out) whose first piece of work fails loudly, so that
    an output check made only after the work shows up as that failure instead."""
    from ambient_mri import demo, evaluate, sampling

    def work(*a, **k):
        raise AssertionError("work started before the output was checked")

    from ambient_mri import checkpoint

    for module, name in ((evaluate, "evaluate_folders"), (sampling, "draw_prior_samples"),
                         (checkpoint, "load_denoiser"), (demo, "prepare_demo_data")):
        monkeypatch.setattr(module, name, work)
    (tmp_path / "rec").mkdir(exist_ok=True)
    return [["eval", "--recon", str(tmp_path / "rec"), "--reference", str(test_set)],
            ["sample", "--checkpoint", str(demo.DEMO_CHECKPOINT), "--n", "1", "-q"],
            ["demo"]]


@pytest.mark.skipif(_permissions_ignored(), reason="this process (root) writes into read-only folders")
@pytest.mark.parametrize("command", ["recon", "train", "eval", "sample", "demo"])
def test_read_only_existing_output_folder_is_one_clear_error_before_any_work(test_set, prepared_train, tmp_path,
                                                                            capsys, monkeypatch, command):
    out = tmp_path / "ro"
    out.mkdir()
    argv = {"recon": ["recon", "--input", str(test_set), "--method", "zf", "-q"],
            "train": ["train", "--config", "tiny", "--data", str(prepared_train), "-q"]}
    for a in _after_work_would_fail(tmp_path, test_set, monkeypatch):
        argv[a[0]] = a
    out.chmod(0o555)
    try:
        with pytest.raises(SystemExit) as ex:
            cli_main(argv[command] + ["--out", str(out)])
    finally:
        out.chmod(0o755)
    err = capsys.readouterr().err.strip()
    assert ex.value.code == 2 and err.count("\n") == 0 and "Permission denied" in err and str(out) in err, err
    assert not any(out.iterdir())


@pytest.mark.skipif(_permissions_ignored(), reason="this process (root) writes into read-only folders")
def test_read_only_output_folder_is_one_clear_error(raw, clean_prep, tmp_path, capsys):
    out = tmp_path / "prep"
    shutil.copytree(clean_prep, out)
    before = checksums(out)
    src = tmp_path / "in"
    shutil.copytree(raw, src)
    shutil.copy(raw / "vol0.h5", src / "vol9.h5")  # one more input to prepare into the read-only folder
    out.chmod(0o555)
    try:
        with pytest.raises(SystemExit) as ex:
            cli_main(["prep", str(src), str(out), *PREP_ARGS])
    finally:
        out.chmod(0o755)
    err = capsys.readouterr().err.strip()
    assert ex.value.code == 2 and err.count("\n") == 0 and "Permission denied" in err, err
    assert checksums(out) == before


# ----------------------------------------------------------------------------------------------
# Two processes, one output folder


def _concurrently(argvs):
    procs = [subprocess.Popen(ambient(*a), cwd=PROJECT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for a in argvs]
    outs = [p.communicate(timeout=300) for p in procs]
    return [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


def test_two_recon_processes_on_one_output_folder_give_one_clean_result(test_set, tmp_path):
    args = ["--input", test_set, "--method", "sense", "--sense-iters", "40", "--batch", "2", "--no-png", "-q"]
    clean = tmp_path / "clean"
    run_recon(test_set, clean, "sense", batch=2, sense_iters=40, png=False, quiet=True)
    out = tmp_path / "both"
    for rc, _, err in _concurrently([["recon", "--out", out, *args]] * 2):
        assert rc == 0 and "Traceback" not in err, err
    assert visible(out) == visible(clean)
    for p in clean.glob("*.h5"):
        assert array_checksums(out / p.name) == array_checksums(p), p.name
    assert not [q.name for q in out.iterdir() if q.name.startswith(".")]  # no lock, partial or temporary left


def test_two_shards_run_concurrently_into_one_folder_merge_to_the_unsharded_result(test_set, tmp_path):
    clean = tmp_path / "clean"
    run_recon(test_set, clean, "zf", nifti=False, png=False, quiet=True)
    out = tmp_path / "sharded"
    args = ["--input", test_set, "--out", out, "--method", "zf", "--no-nifti", "--no-png", "-q"]
    for rc, _, err in _concurrently([["recon", *args, "--shard", "0/2"], ["recon", *args, "--shard", "1/2"]]):
        assert rc == 0 and "Traceback" not in err, err
    assert visible(out) == visible(clean) == [f"scan{i}.h5" for i in range(4)]
    for p in clean.glob("*.h5"):
        a, b = array_checksums(out / p.name), array_checksums(p)
        a["attrs"].pop("options"), b["attrs"].pop("options")  # records the shard
        assert a == b, p.name
