#!/usr/bin/env python
"""The real-brain benchmark (issue: demo, benchmark and docs), from ../shared/data alone.

Stages (each skipped when its outputs exist, so an interrupted run resumes):
 1. data   SIAT 500 complex slices -> 8-coil fastMRI volumes at 64 x 64 (real head8ch sensitivities, noise),
           split into train / val / test by whole series (no slice in two splits).
 2. prep   train at R = 8 (undersampled k-space only); the same training volumes as a val-style split
           with references (ONLY for the oracle FS-EDM baseline); val and test at R = 8 and R = 12. 2-D
           variable-density Poisson-disc masks with an 8 x 8 calibration centre.
 3. train  ambient (R = 8, R~ = 9), oracle FS-EDM (fully sampled references), naive L1-EDM (EDM on L1-wavelet
           reconstructions of the same undersampled training data); same steps and batch for each.
 4. tune   on VALIDATION slices only: the L1-wavelet weight, and the DPS step size l of each model.
 5. recon  test slices at R = 8 and 12: ZF, CG-SENSE, L1 (all test slices); A-OS and DC (ours) with the ambient
           model (all test slices); A-DPS (ambient), FS-DPS (oracle), naive-DPS (naive), DC on a DPS subset.
 6. eval   tables in both metric conventions; memorisation (64 prior samples per model, nearest training
           slice by NCC); docs/benchmarks.md.

Usage: python benchmarks/siat_benchmark.py --out /tmp/siat_bench [--quick] [--shared ../shared/data]
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


def settings(quick: bool) -> dict:
    """Full run (about 2 hours on 2 CPU cores; DPS with 100 steps where the papers use 500, for the CPU budget) or the --quick smoke test (a few minutes)."""
    if quick:
        return dict(slices="0:60", steps=20, batch=4, dps_steps=8, dps_slices=2, dc_steps=4, mem_samples=4,
                    mem_steps=6, l_candidates=[1.0], tune_slices=2, l1_tune_slices=2, l1_iters=20,
                    l1_candidates=[1e-3, 1e-2], quick=True)
    return dict(slices=None, steps=2000, batch=8, dps_steps=100, dps_slices=20, dc_steps=25, mem_samples=64,
                mem_steps=18, l_candidates=[0.3, 1.0, 3.0], tune_slices=4, l1_tune_slices=8, l1_iters=100,
                l1_candidates=None, quick=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="Working folder (resumable).")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data", help="The real data folder.")
    ap.add_argument("--quick", action="store_true", help="Smoke test: a subset, few steps (< 10 minutes).")
    ap.add_argument("--size", type=int, default=64, help="Matrix size of the SIAT volumes.")
    ap.add_argument("--docs", type=Path, default=None, help="Write the Markdown report here (default: OUT/benchmarks.md).")
    ap.add_argument("--steps", type=int, default=None,
                    help="Training steps of each of the three models (default: 2000; 20 with --quick).")
    ap.add_argument("--threads", type=int, default=1,
                    help="Torch threads per command (1 is fastest on a busy 2-core machine; jobs run side by side).")
    args = ap.parse_args()
    if not (args.shared / "siat500_brain_t2_256_f16ri.npy").exists():
        raise SystemExit(f"{args.shared} does not hold the SIAT data (see ../shared/data/README.md)")
    b = Bench(args.out.resolve(), args.quick, args.shared.resolve(), args.threads)
    S = settings(args.quick)
    if args.steps:
        S["steps"] = args.steps
    b.state.setdefault("settings", S)
    b.state["settings"] = S
    b.save()
    py = sys.executable

    # 1. data ---------------------------------------------------------------------------------
    def data():
        extra = ["--slices", S["slices"]] if S["slices"] else []
        b.cmd([py, "-m", "data_prep", "siat", b.shared, "data", "--size", args.size, "--coils", 8, "--noise", 0.005,
               "--seed", 0, "--overwrite", *extra], log=b.out / "data.log")

    b.stage("data", data)

    # 2. prep ---------------------------------------------------------------------------------
    common = ["--mask-type", "poisson", "--center-lines", 8, "--maps", "espirit-torch", "--workers", 1 if S["quick"] else 2]

    def prep():
        b.cmd(AMB + ["prep", "data/train", "prep/train", "--split", "train", "--accel", 8, "--seed", 0, *common],
              log=b.out / "prep.log")
        b.cmd(AMB + ["prep", "data/train", "prep/train_oracle", "--split", "val", "--accel", 8, "--seed", 0, *common],
              log=b.out / "prep.log")
        for split, seed in (("val", 1), ("test", 2)):
            b.cmd(AMB + ["prep", f"data/{split}", f"prep/{split}", "--split", split, "--accel", 8, "--accel", 12,
                         "--seed", seed, *common], log=b.out / "prep.log")

    b.stage("prep", prep)

    # 4a. the L1 weight on validation (needed by the naive L1-EDM training data too) ----------------
    def tune_l1():
        from ambient_mri.recon import tune_lambda

        out = {}
        for R in (8, 12):
            out[f"R{R}"] = tune_lambda(b.out / "prep" / "val" / f"R{R}", S["l1_tune_slices"], S["l1_iters"],
                                       S["l1_candidates"])
        (b.out / "l1_lambda.json").write_text(json.dumps(out, indent=2))
        return {"lam": {k: v["lam"] for k, v in out.items()}}

    b.stage("tune_l1", tune_l1)
    lam8 = b.state["tune_l1"]["lam"]["R8"]

    # 3. train: three models, same steps and batch, run side by side with one thread each ---------
    runs = {"ambient": ("prep/train", ["loss.kind=ambient", "loss.further_accel=9"]),
            "oracle": ("prep/train_oracle", ["loss.kind=oracle"]),
            "naive": ("prep/train", ["loss.kind=naive_l1", f"loss.lam={lam8}", f"loss.l1_iters={S['l1_iters']}"])}

    def train():
        procs = {}
        for name, (data_dir, ov) in runs.items():
            args_ = AMB + ["train", "--config", "cpu64", "--data", data_dir, "--out", f"runs/{name}", "-q",
                           f"train.steps={S['steps']}", f"train.batch={S['batch']}", "train.lr=6e-4",
                           f"train.warmup={min(200, S['steps'] // 4)}", "train.ema_halflife=8000", "train.sample_every=0",
                           f"train.ckpt_every={max(S['steps'] // 6, 10)}", *ov]
            if (b.out / "runs" / name / "checkpoint.pt").exists():
                args_.append("--resume")
            procs[name] = b.cmd(args_, background=True, log=b.out / f"train_{name}.log")
        for name, p in procs.items():
            if p.wait() != 0:
                raise SystemExit(f"training {name} failed; see train_{name}.log")
        return {"throughput": {name: _throughput(b.out / "runs" / name) for name in runs}}

    b.stage("train", train)
    ck = {name: f"runs/{name}/checkpoint.pt" for name in runs}

    # 4b. DPS step size l per model, on validation slices at R = 8 -----------------------------
    def tune_dps():
        from ambient_mri.evaluate import run_eval

        chosen = {}
        scores = {}
        val = b.out / "prep" / "val" / "R8"
        first = sorted(val.glob("*.h5"))[0]
        sub = b.out / "prep" / "val_tune"
        if not sub.exists():
            _subset(first, sub / first.name, S["tune_slices"])
        for name, method in (("ambient", "adps"), ("oracle", "fsdps"), ("naive", "adps")):
            scores[name] = {}
            for l in S["l_candidates"]:
                d = f"tune/{name}_l{l:g}"
                b.cmd(AMB + ["recon", "--input", sub, "--out", d, "--method", method, "--checkpoint", ck[name],
                             "--steps", S["dps_steps"], "--step-size", l, "--no-nifti", "--no-png", "-q"],
                      log=b.out / "tune.log")
                res = run_eval([b.out / d], sub, b.out / d / "report")
                scores[name][str(l)] = res["summary"][0]["psnr_adps"][0]
            chosen[name] = float(max(scores[name], key=scores[name].get))
        return {"step_size": chosen, "scores": scores}

    if S["quick"]:  # the smoke test does not tune: one candidate
        b.state.setdefault("tune_dps", {"step_size": {k: S["l_candidates"][0] for k in runs}, "done": True})
    b.stage("tune_dps", tune_dps)
    l = b.state["tune_dps"]["step_size"]

    # 5. recon ----------------------------------------------------------------------------------
    def recon():
        secs = {}
        for R in (8, 12):
            test = f"prep/test/R{R}"
            sub = b.out / "prep" / f"test_dps_R{R}"
            if not sub.exists():
                files = sorted((b.out / test).glob("*.h5"))
                n_left = S["dps_slices"]
                for f in files:
                    if n_left <= 0:
                        break
                    n_left -= _subset(f, sub / f.name, n_left)
            jobs = [("zf", test, []), ("sense", test, []),
                    ("l1", test, ["--lam", b.state["tune_l1"]["lam"][f"R{R}"]]),
                    ("aos", test, ["--checkpoint", ck["ambient"]]),
                    ("dc", test, ["--checkpoint", ck["ambient"], "--steps", S["dc_steps"]])]
            for m, inp, extra in ([] if S["quick"] else jobs):  # the smoke test does the subset only
                b.cmd(AMB + ["recon", "--input", inp, "--out", f"rec/R{R}/full/{m}", "--method", m, "--label", m,
                             "--no-nifti", "-q", *extra], log=b.out / "recon.log")
            dps = [("adps", "adps", "ambient"), ("fsdps", "fsdps", "oracle"), ("naive-dps", "adps", "naive")]
            procs = []
            for label, method, model in dps:
                procs.append(b.cmd(AMB + ["recon", "--input", sub, "--out", f"rec/R{R}/sub/{label}", "--method",
                                          method, "--label", label, "--checkpoint", ck[model], "--steps",
                                          S["dps_steps"], "--step-size", l[model], "--no-nifti", "-q"],
                                   background=True, log=b.out / f"recon_{label}.log"))
                if len(procs) == 2:
                    [p.wait() for p in procs]
                    procs = []
            [p.wait() for p in procs]
            for m, inp, extra in jobs:
                if m in ("zf", "sense", "l1", "aos", "dc"):
                    b.cmd(AMB + ["recon", "--input", sub, "--out", f"rec/R{R}/sub/{m}", "--method", m, "--label", m,
                                 "--no-nifti", "-q", *extra], log=b.out / "recon.log")
        return secs

    b.stage("recon", recon)

    # 6. eval, memorisation, report -----------------------------------------------------------
    def evaluate():
        from ambient_mri.evaluate import run_eval

        out = {}
        for R in (8, 12):
            for part in (("sub",) if S["quick"] else ("full", "sub")):
                dirs = sorted(p for p in (b.out / "rec" / f"R{R}" / part).iterdir() if p.is_dir())
                ref = b.out / "prep" / "test" / f"R{R}" if part == "full" else b.out / "prep" / f"test_dps_R{R}"
                res = run_eval(dirs, ref, b.out / "report" / f"R{R}_{part}")
                out[f"R{R}_{part}"] = res["summary"]
        return {"summary": out}

    b.stage("eval", evaluate)

    def memorisation():
        return {"memorisation": _memorisation(b, ck, S["mem_samples"])}

    b.stage("memorisation", memorisation)
    report = _report(b, S, args)
    dest = args.docs or (b.out / "benchmarks.md")
    dest.write_text(report)
    print(f"report: {dest}")


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
    out = {}
    for name, path in ck.items():
        d = b.out / "samples" / name
        if not (d / "samples.npy").exists():
            b.cmd(AMB + ["sample", "--checkpoint", path, "--n", n, "--out", d, "--seed", 0, "--steps",
                         b.state["settings"]["mem_steps"], "-q"], log=b.out / "sample.log")
        s = np.load(d / "samples.npy")
        ncc, idx = nearest_ncc(s, train_refs)
        out[name] = summary(ncc)
    return out


def _fmt_pm(v, dec):
    return f"{v[0]:.{dec}f} ± {v[1]:.{dec}f}"


def _report(b: Bench, S: dict, args) -> str:
    import torch

    st = b.state
    lines = ["# Benchmark: SIAT multi-coil brain, 64 x 64, 8 coils", ""]
    lines += [f"Machine: {platform.platform()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
              f"torch {torch.__version__}. Mode: {'QUICK (smoke test)' if b.quick else 'full'}. "
              f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", ""]
    lines += ["Reproduce: `python benchmarks/siat_benchmark.py --out OUT" + (" --quick" if b.quick else "") + "` "
              "(every command it ran is in `OUT/commands.log`). Seeds: data 0, train masks 0, val masks 1, test "
              "masks 2, training seed 0, sampler seed 0.", ""]
    lines += ["## Settings", "", "```", json.dumps(S, indent=2), "```", ""]
    lines += ["## Stage wall times (s)", ""] + [f"- {k}: {v.get('seconds')}" for k, v in st.items()
                                                 if isinstance(v, dict) and "seconds" in v] + [""]
    thr = st.get("train", {}).get("throughput", {})
    if thr:
        lines += ["## Training (three processes side by side, one thread each)", "",
                  "| model | steps | wall s | images/s (median) |", "|---|---|---|---|"]
        for k, v in thr.items():
            lines.append(f"| {k} | {v['steps']} | {v['wall_s']:.0f} | {v['images_per_s_median']:.2f} |")
        lines.append("")
    lines += ["## Chosen on validation slices", "",
              f"- L1-wavelet weight: {st.get('tune_l1', {}).get('lam')}",
              f"- DPS step size l: {st.get('tune_dps', {}).get('step_size')} (scores: {st.get('tune_dps', {}).get('scores')})", ""]
    for key, summ in st.get("eval", {}).get("summary", {}).items():
        lines += [f"## Test {key.replace('_', ', ')}", ""]
        lines += ["| method | R | slices | PSNR (A-DPS) | SSIM (A-DPS) | NRMSE | PSNR (fastMRI) | SSIM (fastMRI) | NMSE | s/slice | NFE |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in summ:
            lines.append(f"| {r['label']} | {r['accel']} | {r['n_slices']} | {_fmt_pm(r['psnr_adps'], 2)} | "
                         f"{_fmt_pm(r['ssim_adps'], 4)} | {_fmt_pm(r['nrmse_adps'], 4)} | {_fmt_pm(r['psnr_fastmri'], 2)} | "
                         f"{_fmt_pm(r['ssim_fastmri'], 4)} | {_fmt_pm(r['nmse_fastmri'], 4)} | "
                         f"{r['seconds_per_slice']:.3g} | {r['nfe']} |")
        lines.append("")
    mem = st.get("memorisation", {}).get("memorisation")
    if mem:
        lines += ["## Memorisation (nearest training slice by NCC, prior samples)", "",
                  "| model | n | mean | median | p95 | max | frac > 0.95 |", "|---|---|---|---|---|---|---|"]
        for k, v in mem.items():
            lines.append(f"| {k} | {v['n']} | {v['mean']:.4f} | {v['median']:.4f} | {v['p95']:.4f} | {v['max']:.4f} | "
                         f"{v['frac_above_0.95']:.3f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
