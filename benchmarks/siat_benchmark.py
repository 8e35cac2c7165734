#!/usr/bin/env python
"""The real-brain benchmark (issues 9 and 10), from ../shared/data alone.

Stages (each skipped when its outputs exist, so an interrupted run resumes):
 1. data   SIAT 500 complex slices -> multi-coil fastMRI volumes (real head8ch sensitivities kept as
           ``sim_coil_maps``, noise), split into train / val / test by whole series (no slice in two splits).
 2. prep   train at the training R (undersampled k-space only); the same training volumes as a val-style split
           with references (ONLY for the oracle FS-EDM baseline); val and test at every test R; ``--mask lines``
           (A-DPS 1-D random lines), ``poisson`` (2-D Poisson disc) or ``random-2d`` (2-D random points); maps
           estimated (``--maps``), and for the scored split a copy with the simulation's true maps (rows "+true maps").
 3. sets   tuning set = the first validation volume; eval set = the test split (the final run) or, with
           ``--eval-split val`` (a pilot), the other validation volumes. Every method is scored on the same slices.
 4. tune   on the tuning volume only: the L1-wavelet weight per R, and the DPS step size l of each model.
 3. train  ambient (R -> R~), oracle FS-EDM (fully sampled references), naive L1-EDM (EDM on L1-wavelet
           reconstructions of the same undersampled training data); same steps and batch for each, one model
           after another with every thread.
 5. recon  ZF, CG-SENSE, L1; ambient A-OS, DC, A-DPS; oracle DC and FS-DPS; naive DC and DPS; with true maps:
           L1 and the ambient and oracle DC samplers.
 5b. em    (``--em-rounds N``, issue 12) EM from the ambient prior: N rounds of E-step (posterior samples of every
           training scan, ``--em-sampler``) and M-step (``--em-steps`` steps of plain EDM, warm-started); each round's
           prior reconstructs with DC, the last also with FS-DPS (l tuned as above) and MMPS. Can be added to a
           finished run (the other stages are kept; eval and memorisation are redone with the new rows).
 6. eval   tables in both metric conventions; paired PSNR differences with 95 % bootstrap intervals (best
           ambient sampler vs L1, vs the naive prior's best, vs the oracle's best); prior samples of the three
           models side by side and memorisation (nearest training slice by NCC); the Markdown report.

Usage: python benchmarks/siat_benchmark.py --out DIR [--quick] [--mask lines --train-accel 4 --further-accel 5
       --test-accels 4 8] [--eval-split val]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ambient_mri.config import AUGMENTS

ROOT = Path(__file__).resolve().parents[1]


class Bench:
    def __init__(self, out: Path, quick: bool, shared: Path, threads: int = 1):
        self.out, self.quick, self.shared, self.threads = out, quick, shared, threads
        self.log_path = out / "commands.log"
        self.timings: dict = {}
        out.mkdir(parents=True, exist_ok=True)
        self.state_path = out / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    def save(self):
        self.state_path.write_text(json.dumps(self.state, indent=2))

    def cmd(self, args, *, threads=None, background=False, log=None):
        """Run (or start) one documented command; every command is appended to commands.log."""
        threads = threads or self.threads
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
        line = " ".join(str(a) for a in args)
        with open(self.log_path, "a") as f:
            f.write(f"OMP_NUM_THREADS={threads} {line}\n")
        print(f"$ {line}", flush=True)
        if args and args[0] == "ambient-mri" and (self.quick or not background):
            return self._inprocess(args[1:], line, threads, log)
        out = open(log, "a") if log else subprocess.DEVNULL
        p = subprocess.Popen([str(a) for a in args], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=self.out)
        if background:
            return p
        if p.wait() != 0:
            raise SystemExit(f"command failed ({p.returncode}): {line}" + (f"; see {log}" if log else ""))
        return p

    def _inprocess(self, argv, line, threads, log):
        """Run an ambient-mri command in this process (same code path as the console script, without the
        seconds of start-up per command); its messages go to ``log``."""
        import contextlib

        import torch

        from ambient_mri.cli import cli

        old, cwd = torch.get_num_threads(), os.getcwd()
        torch.set_num_threads(threads)
        os.chdir(self.out)
        try:
            with open(log or os.devnull, "a") as f, contextlib.redirect_stderr(f), contextlib.redirect_stdout(f):
                rv = cli.main(args=[str(a) for a in argv], prog_name="ambient-mri", standalone_mode=False)
        except SystemExit as e:
            rv = e.code
        except Exception as e:
            raise SystemExit(f"command failed ({e}): {line}") from e
        finally:
            torch.set_num_threads(old)
            os.chdir(cwd)
        if rv not in (None, 0):
            raise SystemExit(f"command failed ({rv}): {line}" + (f"; see {log}" if log else ""))

        class Done:
            returncode = 0

            def wait(self):
                return 0

        return Done()

    def stage(self, name, fn):
        if self.state.get(name, {}).get("done"):
            print(f"== {name}: done earlier", flush=True)
            return
        print(f"== {name}", flush=True)
        t = time.perf_counter()
        info = fn() or {}
        self.state[name] = dict(info, done=True, seconds=round(time.perf_counter() - t, 1))
        self.save()


AMB = ["ambient-mri"]
# --mask: (prep --mask-type, what the report calls it)
MASKS = {"lines": ("adps", "1-D random lines (A-DPS)"), "poisson": ("poisson", "2-D Poisson disc"),
         "random-2d": ("random-2d", "2-D random points (independent, variable density)")}


def settings(args) -> dict:
    """The run's settings from the command line; ``--quick`` shrinks every budget to a smoke test."""
    S = dict(mask=args.mask, train_accel=args.train_accel, further_accel=args.further_accel,
             test_accels=list(args.test_accels), center=args.center_lines, coils=args.coils, size=args.size,
             maps=args.maps or ("espirit-torch" if args.quick else "espirit-sake"), true_maps=not args.no_true_maps, eval_split=args.eval_split, slices=None,
             steps=2000, batch=8, lr=6e-4, ema_halflife=8000, dps_steps=100, dc_steps=25, mem_samples=64,
             mem_steps=18, l_candidates=[1.0, 3.0, 10.0], tune_slices=4, l1_tune_slices=8, l1_iters=100,
             l1_candidates=None, threads=args.threads, quick=False, em_rounds=args.em_rounds,
             em_steps=args.em_steps, em_sampler=args.em_sampler, em_sampler_steps=args.em_sampler_steps,
             mmps_steps=10, mmps_cg=3)
    if args.augment != "none":  # recorded only when used, so that earlier runs' settings still match
        S["augment"] = args.augment
    if args.precision != "fp32":
        S["precision"] = args.precision
    if args.quick:
        S.update(slices="0:60", steps=20, batch=4, dps_steps=8, dc_steps=4, mem_samples=4, mem_steps=6,
                 l_candidates=[1.0], tune_slices=2, l1_tune_slices=2, l1_iters=20, l1_candidates=[1e-3, 1e-2],
                 quick=True, em_steps=min(args.em_steps, 10), em_sampler_steps=3, mmps_steps=3, mmps_cg=2)
    for key in ("steps", "dps_steps"):
        if getattr(args, key):
            S[key] = getattr(args, key)
    if args.l_candidates:
        S["l_candidates"] = [float(v) for v in args.l_candidates]
    return S


# (label, method, model) of every learned reconstruction; every method runs on the same eval slices
LEARNED = [("aos", "aos", "ambient"), ("dc", "dc", "ambient"), ("adps", "adps", "ambient"),
           ("oracle-dc", "dc", "oracle"), ("fsdps", "fsdps", "oracle"),
           ("naive-dc", "dc", "naive"), ("naive-dps", "adps", "naive")]
DPS = {"ambient": "adps", "oracle": "fsdps", "naive": "adps"}  # naive: a clean-view model under the A-DPS code path
ADDABLE = ("steps", "threads", "em_rounds", "em_steps", "em_sampler", "em_sampler_steps", "mmps_steps", "mmps_cg")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="Working folder (resumable).")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data", help="The real data folder.")
    ap.add_argument("--quick", action="store_true", help="Smoke test: a subset, few steps (< 10 minutes).")
    ap.add_argument("--size", type=int, default=64, help="Matrix size of the SIAT volumes.")
    ap.add_argument("--coils", type=int, default=8, help="Coils simulated (head8ch maps: at most 8).")
    ap.add_argument("--mask", choices=list(MASKS), default="poisson",
                    help="lines: A-DPS 1-D random lines (prep --mask-type adps); poisson: 2-D Poisson disc; "
                         "random-2d: 2-D independent variable-density points (identifiable, docs/theory.md).")
    ap.add_argument("--train-accel", type=float, default=8.0, help="R of the training masks.")
    ap.add_argument("--further-accel", type=float, default=9.0, help="R~ of the ambient further masks (> R).")
    ap.add_argument("--test-accels", type=float, nargs="+", default=[8.0, 12.0], help="R of the val/test masks.")
    ap.add_argument("--center-lines", type=int, default=8, help="ACS lines (lines) or ACS block side (poisson).")
    ap.add_argument("--maps", default=None,
                    help="prep --maps for every split (estimated maps; default espirit-sake, espirit-torch with --quick).")
    ap.add_argument("--no-true-maps", action="store_true", help="Skip the rows with the simulation's true maps.")
    ap.add_argument("--eval-split", choices=["val", "test"], default="test",
                    help="Score on the test split (the final run) or on validation volumes other than the "
                         "tuning volume (a pilot: test slices untouched).")
    ap.add_argument("--prep-from", type=Path, default=None,
                    help="Reuse the data and prepared splits of another benchmark folder with the same data and prep "
                         "settings (hard links; prep then adds only what is missing, e.g. the test split's true-map copy).")
    ap.add_argument("--docs", type=Path, default=None, help="Write the Markdown report here (default: OUT/benchmarks.md).")
    ap.add_argument("--steps", type=int, default=None, help="Training steps of each model (default 2000; 20 with --quick).")
    ap.add_argument("--dps-steps", type=int, default=None, help="A-DPS / FS-DPS steps (default 100).")
    ap.add_argument("--l-candidates", nargs="+", default=None, help="DPS step sizes tried on validation.")
    ap.add_argument("--em-rounds", type=int, default=0,
                    help="EM rounds from the ambient prior (issue 12; 0 = none). May be added to a finished run.")
    ap.add_argument("--em-steps", type=int, default=500, help="M-step training steps per EM round.")
    ap.add_argument("--em-sampler", choices=["dc", "adps", "mmps"], default="dc",
                    help="E-step sampler of rounds 2.. (round 1, with the ambient prior, uses dc).")
    ap.add_argument("--em-sampler-steps", type=int, default=10, help="E-step sampler steps.")
    ap.add_argument("--augment", choices=list(AUGMENTS), default="none",
                    help="train.augment of all three priors (readout-flip: exact left-right mirror, docs/training.md).")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="train.precision of all three priors (bf16: autocast on GPUs and on CPUs with native bf16, "
                         "1.3-1.7x faster on this machine's; docs/training.md).")
    ap.add_argument("--threads", type=int, default=2,
                    help="Torch threads per command; the models train one after another with all of them.")
    args = ap.parse_args()
    if not (args.shared / "siat500_brain_t2_256_f16ri.npy").exists():
        raise SystemExit(f"{args.shared} does not hold the SIAT data (see ../shared/data/README.md)")
    b = Bench(args.out.resolve(), args.quick, args.shared.resolve(), args.threads)
    S = settings(args)
    old = b.state.get("settings")
    if old and {k: v for k, v in old.items() if k not in ADDABLE} != {k: v for k, v in S.items() if k not in ADDABLE}:
        raise SystemExit(f"{b.out} holds a run with other settings; use another --out")
    b.state["settings"] = S
    b.save()
    py = sys.executable
    R_train, accels = S["train_accel"], S["test_accels"]
    tag = lambda R: f"R{R:g}"  # noqa: E731

    # 1. data ---------------------------------------------------------------------------------
    PREP_KEYS = ("mask", "train_accel", "test_accels", "center", "coils", "size", "maps", "slices")
    if args.prep_from and not b.state.get("data", {}).get("done"):
        other = json.loads((args.prep_from / "state.json").read_text())
        if not other.get("prep", {}).get("done") or any(other["settings"].get(k) != S[k] for k in PREP_KEYS):
            raise SystemExit(f"--prep-from {args.prep_from}: its prep is not finished or its data/prep settings differ")
        for sub in ("data", "prep"):  # hard links: prep writes new files by rename, never into a linked one
            subprocess.run(["cp", "-al", str(args.prep_from.resolve() / sub), str(b.out / sub)], check=True)
        b.state["data"] = {"done": True, "seconds": 0.0, "reused_from": os.fspath(args.prep_from.resolve())}
        b.save()

    def data():
        extra = ["--slices", S["slices"]] if S["slices"] else []
        b.cmd([py, "-m", "data_prep", "siat", b.shared, "data", "--size", S["size"], "--coils", S["coils"],
               "--noise", 0.005, "--seed", 0, "--overwrite", *extra], log=b.out / "data.log")

    b.stage("data", data)

    # 2. prep ---------------------------------------------------------------------------------
    mask_type = MASKS[S["mask"]][0]
    common = ["--mask-type", mask_type, "--center-lines", S["center"], "--workers", 1 if S["quick"] else 2]
    acc = [a for R in accels for a in ("--accel", R)]

    def prep():
        log = b.out / "prep.log"
        b.cmd(AMB + ["prep", "data/train", "prep/train", "--split", "train", "--accel", R_train, "--seed", 0,
                     "--maps", S["maps"], *common], log=log)
        b.cmd(AMB + ["prep", "data/train", "prep/train_oracle", "--split", "val", "--accel", R_train, "--seed", 0,
                     "--maps", S["maps"], *common], log=log)
        for split, seed in (("val", 1), ("test", 2)):
            b.cmd(AMB + ["prep", f"data/{split}", f"prep/{split}", "--split", split, *acc, "--seed", seed,
                         "--maps", S["maps"], *common], log=log)
            if S["true_maps"] and split == S["eval_split"]:
                b.cmd(AMB + ["prep", f"data/{split}", f"prep/{split}_truemaps", "--split", split, *acc, "--seed",
                             seed, "--maps", "true", *common], log=log)

    b.stage("prep", prep)

    # tuning set: the first validation volume; eval set: the test split, or (pilot) the other val volumes
    def sets():
        val_files = sorted((b.out / "prep" / "val" / tag(accels[0])).glob("*.h5"))
        tune_name, n_eval = val_files[0].name, 0
        for R in accels:
            _subset(b.out / "prep" / "val" / tag(R) / tune_name, b.out / "sets" / f"tune_{tag(R)}" / tune_name,
                    10 ** 6)
            for variant in ("", "_truemaps") if S["true_maps"] else ("",):
                src = b.out / "prep" / f"{S['eval_split']}{variant}" / tag(R)
                files = sorted(src.glob("*.h5"))
                if S["eval_split"] == "val":
                    files = [f for f in files if f.name != tune_name]
                n = sum(_subset(f, b.out / "sets" / f"eval{variant}_{tag(R)}" / f.name, 10 ** 6) for f in files)
                n_eval = n if not variant else n_eval
        return {"tune_volume": tune_name, "eval_slices": n_eval}

    b.stage("sets", sets)
    tune_set = lambda R: b.out / "sets" / f"tune_{tag(R)}"  # noqa: E731
    eval_set = lambda R, v="": b.out / "sets" / f"eval{v}_{tag(R)}"  # noqa: E731

    # 4a. the L1 weight on the tuning volume (needed by the naive L1-EDM training data too) -------------
    def tune_l1():
        from ambient_mri.recon import tune_lambda

        out = {tag(R): tune_lambda(tune_set(R), S["l1_tune_slices"], S["l1_iters"], S["l1_candidates"])
               for R in accels}
        (b.out / "l1_lambda.json").write_text(json.dumps(out, indent=2))
        return {"lam": {k: v["lam"] for k, v in out.items()}}

    b.stage("tune_l1", tune_l1)
    lam = b.state["tune_l1"]["lam"]
    lam_train = lam[tag(min(accels, key=lambda R: abs(R - R_train)))]  # the tuned R nearest the training R

    # 3. train: three models, same steps and batch, one after another with every thread ------------
    runs = {"ambient": ("prep/train", ["loss.kind=ambient", f"loss.further_accel={S['further_accel']:g}"]),
            "oracle": ("prep/train_oracle", ["loss.kind=oracle"]),
            "naive": ("prep/train", ["loss.kind=naive_l1", f"loss.lam={lam_train}", f"loss.l1_iters={S['l1_iters']}"])}

    def train():
        for name, (data_dir, ov) in runs.items():
            args_ = AMB + ["train", "--config", "cpu64", "--data", data_dir, "--out", f"runs/{name}", "-q",
                           f"train.steps={S['steps']}", f"train.batch={S['batch']}", f"train.lr={S['lr']}",
                           f"train.warmup={min(200, S['steps'] // 4)}", f"train.ema_halflife={S['ema_halflife']}",
                           "train.sample_every=0", f"train.ckpt_every={max(S['steps'] // 6, 10)}",
                           f"train.augment={S.get('augment', 'none')}",
                           f"train.precision={S.get('precision', 'fp32')}", *ov]
            if (b.out / "runs" / name / "checkpoint.pt").exists():
                args_.append("--resume")
            if b.cmd(args_, background=True, log=b.out / f"train_{name}.log").wait() != 0:
                raise SystemExit(f"training {name} failed; see train_{name}.log")
        return {"throughput": {name: _throughput(b.out / "runs" / name) for name in runs}}

    b.stage("train", train)
    ck = {name: f"runs/{name}/checkpoint.pt" for name in runs}

    # 4b. DPS step size l per model, on the tuning volume at the first test R -----------------------
    tune_sub = b.out / "sets" / "tune_dps"

    def dps_scores(name, method, checkpoint) -> dict:
        """PSNR (A-DPS) of ``method`` with ``checkpoint`` on the tuning slices, per candidate step size l."""
        from ambient_mri.evaluate import run_eval

        if not tune_sub.exists():
            first = sorted(tune_set(accels[0]).glob("*.h5"))[0]
            _subset(first, tune_sub / first.name, S["tune_slices"])
        scores = {}
        for l in S["l_candidates"]:
            d = f"tune/{name}_l{l:g}"
            b.cmd(AMB + ["recon", "--input", tune_sub, "--out", d, "--method", method, "--checkpoint", checkpoint,
                         "--steps", S["dps_steps"], "--step-size", l, "--no-nifti", "--no-png", "-q"],
                  log=b.out / "tune.log")
            scores[f"{l:g}"] = run_eval([b.out / d], tune_sub, b.out / d / "report")["summary"][0]["psnr_adps"][0]
        return scores

    def tune_dps():
        scores = {name: dps_scores(name, method, ck[name]) for name, method in DPS.items()}
        return {"step_size": {n: float(max(sc, key=sc.get)) for n, sc in scores.items()}, "scores": scores}

    if S["quick"]:  # the smoke test does not tune: one candidate
        b.state.setdefault("tune_dps", {"step_size": {k: S["l_candidates"][0] for k in runs}, "done": True})
    b.stage("tune_dps", tune_dps)
    l = b.state["tune_dps"]["step_size"]

    # 5. recon: every method on the same eval slices -----------------------------------------------
    def recon_job(R, label, method, extra, variant=""):
        """One ``ambient-mri recon`` of the eval slices at ``R`` into ``rec/<R><variant>/<label>``."""
        b.cmd(AMB + ["recon", "--input", eval_set(R, variant), "--out", b.out / "rec" / f"{tag(R)}{variant}" / label,
                     "--method", method, "--label", label + ("+true maps" if variant else ""), "--no-nifti", "--no-png",
                     "-q", *extra], log=b.out / "recon.log")

    def recon():
        for R in accels:
            jobs = [("zf", "zf", []), ("sense", "sense", []), ("l1", "l1", ["--lam", lam[tag(R)]])]
            for label, method, model in LEARNED:
                extra = ["--checkpoint", ck[model]]
                if method == "dc":
                    extra += ["--steps", S["dc_steps"]]
                if method in ("adps", "fsdps"):
                    extra += ["--steps", S["dps_steps"], "--step-size", l[model]]
                jobs.append((label, method, extra))
            variants = [("", jobs)]
            if S["true_maps"]:
                variants.append(("_truemaps", [j for j in jobs if j[0] in ("l1", "dc", "oracle-dc")]))
            for v, js in variants:
                for label, method, extra in js:
                    recon_job(R, label, method, extra, v)

    b.stage("recon", recon)
    mmps_args = ["--steps", S["mmps_steps"], "--cg-iters", S["mmps_cg"]]

    def recon_mmps():  # MMPS (issue 12) for the clean-trained priors; the EM priors get theirs in em_recon
        for R in accels:
            for model in ("oracle", "naive"):
                recon_job(R, f"{model}-mmps", "mmps", ["--checkpoint", ck[model], *mmps_args])

    b.stage("recon_mmps", recon_mmps)

    # 5b. EM from the ambient prior (issue 12): rounds, then each round's prior on the same eval slices -----
    em_ck = {f"em{r}": f"runs/em/round_{r}/checkpoint.pt" for r in range(1, S["em_rounds"] + 1)}

    def em():
        args_ = AMB + ["train", "--em-from", ck["ambient"], "--data", "prep/train", "--out", "runs/em", "-q",
                       f"em.rounds={S['em_rounds']}", f"em.steps_per_round={S['em_steps']}", "em.first_sampler=dc",
                       f"em.sampler={S['em_sampler']}", f"em.sampler_steps={S['em_sampler_steps']}",
                       f"train.warmup={min(200, S['em_steps'] // 4)}", f"train.ckpt_every={max(S['em_steps'] // 3, 10)}"]
        if (b.out / "runs" / "em" / "em.json").exists():
            args_ += ["--resume"]
        if b.cmd(args_, background=True, log=b.out / "train_em.log").wait() != 0:
            raise SystemExit("EM failed; see train_em.log")
        state = json.loads((b.out / "runs" / "em" / "em.json").read_text())
        return {"rounds": state["rounds"], "wall_s": state["done"]["wall_s"]}

    def tune_em():
        last = list(em_ck)[-1]
        scores = dps_scores(last, "fsdps", em_ck[last])
        return {"step_size": float(max(scores, key=scores.get)), "scores": scores}

    def em_recon():
        last = list(em_ck)[-1]
        for R in accels:
            jobs = [(f"{name}-dc", "dc", ["--steps", S["dc_steps"]]) for name in em_ck]
            jobs += [(f"{last}-fsdps", "fsdps", ["--steps", S["dps_steps"], "--step-size", b.state["tune_em"]["step_size"]]),
                     (f"{last}-mmps", "mmps", mmps_args)]
            for label, method, extra in jobs:
                recon_job(R, label, method, ["--checkpoint", em_ck[label.split("-")[0]], *extra])

    if em_ck:
        b.stage(f"em_{S['em_rounds']}", em)
        if S["quick"]:  # the smoke test does not tune
            b.state.setdefault("tune_em", {"step_size": S["l_candidates"][0], "done": True})
        b.stage("tune_em", tune_em)
        b.stage(f"em_recon_{S['em_rounds']}", em_recon)
        ck.update(em_ck)
    labels = sorted(p.name for R in accels for p in (b.out / "rec" / tag(R)).iterdir() if p.is_dir())
    for name, key in (("eval", labels), ("memorisation", sorted(ck))):  # redone when rows were added
        if b.state.get(name, {}).get("done") and b.state[name].get("key") != key:
            del b.state[name]

    # 6. eval, paired differences, memorisation, report ---------------------------------------------
    def evaluate():
        from ambient_mri.evaluate import run_eval

        out = {}
        for R in accels:
            for v in ("", "_truemaps") if S["true_maps"] else ("",):
                dirs = sorted(p for p in (b.out / "rec" / f"{tag(R)}{v}").iterdir() if p.is_dir())
                out[f"{tag(R)}{v}"] = run_eval(dirs, eval_set(R, v), b.out / "report" / f"{tag(R)}{v}")["summary"]
        return {"summary": out, "paired": {tag(R): _paired(b.out / "report" / tag(R)) for R in accels}, "key": labels}

    b.stage("eval", evaluate)

    def memorisation():
        return {"memorisation": _memorisation(b, ck, S["mem_samples"]), "key": sorted(ck)}

    b.stage("memorisation", memorisation)
    report = _report(b, S, args)
    dest = args.docs or (b.out / "benchmarks.md")
    dest.write_text(report)
    print(f"report: {dest}")


def slice_psnr(report: Path) -> dict:
    """``{label: {(volume, slice): PSNR (A-DPS)}}`` from an ``ambient-mri eval`` report's ``metrics_slices.csv``."""
    import csv

    per: dict = {}
    with open(report / "metrics_slices.csv", newline="") as f:
        for r in csv.DictReader(f):
            per.setdefault(r["label"], {})[(r["volume"], int(r["slice"]))] = float(r["psnr_adps"])
    return per


def _paired(report: Path) -> list[dict]:
    """Paired PSNR (A-DPS) differences over the same slices: the best ambient sampler (highest mean) against
    L1, the naive prior's best sampler and the oracle's best sampler; plus every ambient sampler against L1."""
    import numpy as np

    from ambient_mri.metrics import paired_difference

    per = slice_psnr(report)
    keys = sorted(per["l1"])
    score = {k: np.array([v[s] for s in keys]) for k, v in per.items() if set(v) == set(keys)}
    best = lambda labels: max((x for x in labels if x in score), key=lambda x: score[x].mean())  # noqa: E731
    amb = best(["aos", "dc", "adps"])
    naive, oracle = best(["naive-dc", "naive-dps", "naive-mmps"]), best(["oracle-dc", "fsdps", "oracle-mmps"])
    pairs = [(amb, "l1"), (amb, naive), (amb, oracle)]
    pairs += [(x, "l1") for x in ("aos", "dc", "adps") if x in score and x != amb]
    rounds = sorted({x.split("-")[0] for x in score if x.startswith("em")})
    if rounds:  # EM (issue 12): the last round's best sampler against the oracle's best and the ambient start's best
        em_best = best([x for x in score if x.startswith(rounds[-1] + "-")])
        pairs += [(em_best, oracle), (em_best, amb), (em_best, "l1")]
        pairs += [(f"{r}-dc", "dc") for r in rounds if f"{r}-dc" in score]
    pairs = list(dict.fromkeys(pairs))  # the last EM round's best sampler can be its DC row, listed already
    return [dict(paired_difference(score[a], score[c]), a=a, b=c) for a, c in pairs]


def _subset(src: Path, dst: Path, n: int) -> int:
    """Copy the first ``n`` slices of a prepared file (and its manifest entry) into ``dst``; returns slices kept."""
    import h5py

    dst.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(src) as f, h5py.File(dst, "w") as g:
        S = f["slice_index"].shape[0]  # every prepared file, k-space or image domain, has one entry per slice
        k = min(n, S)
        for key in f:
            g[key] = f[key][:k] if f[key].ndim and f[key].shape[0] == S else f[key][()]
        g.attrs.update(dict(f.attrs))
    man = json.loads((src.parent / "manifest.json").read_text())
    mpath = dst.parent / "manifest.json"
    sub = json.loads(mpath.read_text()) if mpath.exists() else dict(man, files=[])
    entry = next(e for e in man["files"] if e["file"] == src.name)
    entry = dict(entry, slices=k, **{key: entry[key][:k] for key in ("slice_index", "mask_seed", "norm")
                                     if isinstance(entry.get(key), list)})
    sub["files"] = [e for e in sub["files"] if e["file"] != src.name] + [entry]
    mpath.write_text(json.dumps(sub, indent=2))
    return k


def _throughput(run: Path) -> dict:
    import csv

    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ips = [float(r["images_per_s"]) for r in rows[len(rows) // 5 :]]
    return {"steps": int(rows[-1]["step"]), "wall_s": float(rows[-1]["wall_s"]),
            "images_per_s_median": sorted(ips)[len(ips) // 2] if ips else None}


def _memorisation(b: Bench, ck: dict, n: int) -> dict:
    import h5py
    import numpy as np

    from ambient_mri.memorization import nearest_ncc, summary

    train_refs = []
    for p in sorted((b.out / "prep" / "train_oracle").glob("*.h5")):
        with h5py.File(p) as f:
            train_refs.append(np.abs(f["reference"][()]))
    train_refs = np.concatenate(train_refs)
    out, grids = {}, []
    for name, path in ck.items():
        d = b.out / "samples" / name
        if not (d / "samples.npy").exists():
            b.cmd(AMB + ["sample", "--checkpoint", path, "--n", n, "--out", d, "--seed", 0, "--steps",
                         b.state["settings"]["mem_steps"], "-q"], log=b.out / "sample.log")
        s = np.load(d / "samples.npy")
        ncc, idx = nearest_ncc(s, train_refs)
        out[name] = summary(ncc)
        grids.append(s[:8])
    _sample_figure(grids, list(ck), b.out / "report" / "prior_samples.png")
    return out


def _sample_figure(grids, names, path: Path) -> None:
    """Unconditional prior samples of each model side by side: one row per model, each image scaled to its
    99.5th percentile of magnitude."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ncol = max(len(g) for g in grids)
    fig, axes = plt.subplots(len(grids), ncol, figsize=(1.3 * ncol, 1.4 * len(grids)), squeeze=False)
    for r, (g, name) in enumerate(zip(grids, names)):
        for c in range(ncol):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(g):
                m = np.abs(g[c])
                ax.imshow(m, cmap="gray", vmin=0, vmax=np.percentile(m, 99.5) or 1)
        axes[r][0].set_title(name, fontsize=8, loc="left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt_pm(v, dec):
    return f"{v[0]:.{dec}f} ± {v[1]:.{dec}f}"


def _report(b: Bench, S: dict, args) -> str:
    import torch

    st = b.state
    what = MASKS[S["mask"]][1]
    lines = [f"# Benchmark: SIAT multi-coil brain, {S['size']} x {S['size']}, {S['coils']} coils, {what}", ""]
    lines += [f"Machine: {platform.platform()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
              f"torch {torch.__version__}. Mode: {'QUICK (smoke test)' if b.quick else 'full'}; scored on the "
              f"**{S['eval_split']}** split ({st.get('sets', {}).get('eval_slices')} slices per R; tuning volume "
              f"{st.get('sets', {}).get('tune_volume')}, never scored). Generated "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", ""]
    argv = " ".join(sys.argv[1:])
    lines += [f"Reproduce: `python benchmarks/siat_benchmark.py {argv}` (every command it ran is in "
              "`OUT/commands.log`). Seeds: data 0, train masks 0, val masks 1, test masks 2, training seed 0, "
              "sampler seed 0.", ""]
    if st.get("data", {}).get("reused_from"):
        lines += [f"Data and prepared splits reused (hard links, same data/prep settings and seeds) from "
                  f"`{st['data']['reused_from']}`; the prep wall time below covers only what was added.", ""]
    degenerate = [R for R in S["test_accels"] if S["mask"] == "lines" and S["center"] >= S["size"] / R]
    if degenerate:  # the A-DPS line mask keeps round(W / R) lines, the ACS block first
        lines += [f"**Warning:** at R = {', '.join(f'{R:g}' for R in degenerate)} the line mask keeps only the "
                  f"{S['center']} calibration lines of {S['size']} (no random line): that R tests super-resolution "
                  "along the phase-encode direction, not compressed sensing. Use fewer --center-lines or a larger "
                  "--size.", ""]
    lines += ["## Settings", "", "```", json.dumps(S, indent=2), "```", ""]
    lines += ["## Stage wall times (s)", ""] + [f"- {k}: {v.get('seconds')}" for k, v in st.items()
                                                 if isinstance(v, dict) and "seconds" in v] + [""]
    thr = st.get("train", {}).get("throughput", {})
    if thr:
        lines += [f"## Training (one model after another, {S['threads']} threads each)", "",
                  "| model | steps | wall s | images/s (median) |", "|---|---|---|---|"]
        for k, v in thr.items():
            lines.append(f"| {k} | {v['steps']} | {v['wall_s']:.0f} | {v['images_per_s_median']:.2f} |")
        lines.append("")
    lines += ["## Chosen on the tuning volume (validation)", "",
              f"- L1-wavelet weight: {st.get('tune_l1', {}).get('lam')}",
              f"- DPS step size l: {st.get('tune_dps', {}).get('step_size')} (PSNR per candidate: "
              f"{st.get('tune_dps', {}).get('scores')})", ""]
    for key, summ in st.get("eval", {}).get("summary", {}).items():
        lines += [f"## {S['eval_split'].capitalize()} {key.replace('_truemaps', ', true coil maps')}", ""]
        lines += ["| method | R | slices | PSNR (A-DPS) | SSIM (A-DPS) | NRMSE | PSNR (fastMRI) | SSIM (fastMRI) | NMSE | s/slice | NFE |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in summ:
            lines.append(f"| {r['label']} | {r['accel']} | {r['n_slices']} | {_fmt_pm(r['psnr_adps'], 2)} | "
                         f"{_fmt_pm(r['ssim_adps'], 4)} | {_fmt_pm(r['nrmse_adps'], 4)} | {_fmt_pm(r['psnr_fastmri'], 2)} | "
                         f"{_fmt_pm(r['ssim_fastmri'], 4)} | {_fmt_pm(r['nmse_fastmri'], 4)} | "
                         f"{r['seconds_per_slice']:.3g} | {r['nfe']} |")
        lines.append("")
    paired = st.get("eval", {}).get("paired", {})
    if paired:
        lines += ["## Paired differences (PSNR A-DPS, dB, same slices; 95 % bootstrap interval, 10,000 resamples)", "",
                  "| R | A | B | mean A - B | 95 % interval | slices |", "|---|---|---|---|---|---|"]
        for R, rows in paired.items():
            for r in rows:
                lines.append(f"| {R} | {r['a']} | {r['b']} | {r['mean']:+.2f} | [{r['lo']:+.2f}, {r['hi']:+.2f}] | {r['n']} |")
        lines.append("")
    em = st.get(f"em_{S['em_rounds']}")  # the EM stage of this many rounds
    if em:
        amb_s = thr.get("ambient", {}).get("wall_s", 0.0)
        lines += ["## EM from the ambient prior (wall time on this machine)", "",
                  "| round | E-step s | M-step s | prior's total s (ambient training included) |", "|---|---|---|---|"]
        total = amb_s
        for r in em["rounds"]:
            total += r["estep_s"] + r["mstep_s"]
            lines.append(f"| {r['round']} | {r['estep_s']:.0f} | {r['mstep_s']:.0f} | {total:.0f} |")
        lines.append("")
    mem = st.get("memorisation", {}).get("memorisation")
    if mem:
        lines += ["## Prior samples and memorisation (nearest training slice by NCC)", "",
                  "![prior samples](report/prior_samples.png)", "",
                  "| model | n | mean | median | p95 | max | frac > 0.95 |", "|---|---|---|---|---|---|---|"]
        for k, v in mem.items():
            lines.append(f"| {k} | {v['n']} | {v['mean']:.4f} | {v['median']:.4f} | {v['p95']:.4f} | {v['max']:.4f} | "
                         f"{v['frac_above_0.95']:.3f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
