#!/usr/bin/env python
"""The seed paper's own MRI settings, second benchmark script (72 minutes on 2 CPU cores while the main benchmark trained beside it).

A. Block corruption: SIAT 64 x 64 training images with a random box of a quarter of the area missing
   (``prep --domain image --corruption box --level 0.25``). Train the image-domain ambient model
   (``loss.kind=ambient_image``: a second box as further corruption) and the naive model (plain EDM on the
   corrupted images, ``naive_zf``) for the same steps; the oracle is the main benchmark's FS-EDM model
   (same training volumes, fully sampled). Box-inpainting of test slices (one box of a quarter of the area):
   DC sampler and DPS for each model; PSNR/SSIM inside and outside the box.
B. Fine-tuning a pretrained prior on a small corrupted set: start from the packaged demo checkpoint
   (``ambient-mri train --init``) and fine-tune on 50 block-corrupted SIAT training slices; compare with
   training from scratch on the same 50 slices (same steps): inpainting quality, and memorisation of
   those 50 (nearest of them to each of 64 prior samples, by NCC).

Usage: python benchmarks/block_finetune.py --main OUT_OF_siat_benchmark --out OUT [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("siat_benchmark", Path(__file__).with_name("siat_benchmark.py"))
sb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sb)
AMB = sb.AMB


def settings(quick: bool) -> dict:
    if quick:
        return dict(steps=20, ft_steps=10, batch=4, dps_steps=8, dc_steps=4, test_slices=2, mem_samples=4,
                    mem_steps=6, ft_slices=8, quick=True)
    return dict(steps=1000, ft_steps=400, batch=8, dps_steps=100, dc_steps=25, test_slices=10, mem_samples=64,
                mem_steps=18, ft_slices=50, quick=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--main", type=Path, required=True, help="Output folder of benchmarks/siat_benchmark.py "
                                                             "(its data, prepared splits and oracle model).")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--docs", type=Path, default=None)
    args = ap.parse_args()
    main_out = args.main.resolve()
    if not (main_out / "runs" / "oracle" / "checkpoint.pt").exists():
        raise SystemExit(f"{main_out} holds no finished siat_benchmark run (runs/oracle/checkpoint.pt)")
    b = sb.Bench(args.out.resolve(), args.quick, main_out, args.threads)
    S = settings(args.quick)
    b.state["settings"] = S
    b.save()
    data = main_out / "data"
    box = ["--domain", "image", "--corruption", "box", "--level", 0.25, "--maps", "espirit-torch", "--workers", 1]

    def prep():
        b.cmd(AMB + ["prep", data / "train", "prep/train", "--split", "train", "--seed", 0, *box], log=b.out / "prep.log")
        b.cmd(AMB + ["prep", data / "test", "prep/test_all", "--split", "test", "--seed", 2, *box], log=b.out / "prep.log")
        files = sorted((b.out / "prep" / "test_all").glob("*.h5"))
        left = S["test_slices"]
        for f in files:
            if left <= 0:
                break
            left -= sb._subset(f, b.out / "prep" / "test" / f.name, left)
        left = S["ft_slices"]  # the first 50 training slices: the small fine-tuning set
        for f in sorted((b.out / "prep" / "train").glob("*.h5")):
            if left <= 0:
                break
            left -= sb._subset(f, b.out / "prep" / "train50" / f.name, left)

    b.stage("prep", prep)

    runs = {"ambient": ("prep/train", "block64", ["loss.kind=ambient_image", "loss.delta=0.25"], None, S["steps"]),
            "naive": ("prep/train", "block64", ["loss.kind=naive_zf"], None, S["steps"]),
            "ft_demo": ("prep/train50", "block64", ["loss.kind=ambient_image", "loss.delta=0.25"],
                        ROOT / "ambient_mri" / "assets" / "demo_ckpt.pt", S["ft_steps"]),
            "ft_scratch": ("prep/train50", "block64", ["loss.kind=ambient_image", "loss.delta=0.25"], None,
                           S["ft_steps"])}

    def train():
        procs = []
        for name, (d, cfg, ov, init, steps) in runs.items():
            a = AMB + ["train", "--config", cfg, "--data", d, "--out", f"runs/{name}", "-q", f"train.steps={steps}",
                       f"train.batch={S['batch']}", "train.sample_every=0", f"train.ckpt_every={max(steps // 4, 5)}",
                       f"train.warmup={min(100, steps // 4)}", *ov]
            if init is not None:
                a += ["--init", init]
            if (b.out / "runs" / name / "checkpoint.pt").exists():
                a.append("--resume")
            procs.append(b.cmd(a, background=True, log=b.out / f"train_{name}.log"))
            if len(procs) == 2:
                [p.wait() for p in procs]
                procs = []
        [p.wait() for p in procs]
        return {"throughput": {n: sb._throughput(b.out / "runs" / n) for n in runs}}

    b.stage("train", train)
    ck = {n: f"runs/{n}/checkpoint.pt" for n in runs}
    ck["oracle"] = str(main_out / "runs" / "oracle" / "checkpoint.pt")

    def recon():
        import time

        while not json.loads((main_out / "state.json").read_text()).get("train", {}).get("done"):
            print("waiting for the main benchmark's oracle model to finish training", flush=True)
            time.sleep(60)
        jobs = [("dc-ambient", "dc", "ambient"), ("dps-ambient", "adps", "ambient"), ("dc-oracle", "dc", "oracle"),
                ("dps-oracle", "fsdps", "oracle"), ("dc-naive", "dc", "naive"), ("dps-naive", "adps", "naive"),
                ("dc-ft_demo", "dc", "ft_demo"), ("dc-ft_scratch", "dc", "ft_scratch")]
        for label, method, model in jobs:
            steps = S["dc_steps"] if method == "dc" else S["dps_steps"]
            extra = ["--step-size", 1.0] if method != "dc" else []
            b.cmd(AMB + ["recon", "--input", "prep/test", "--out", f"rec/{label}", "--method", method, "--label", label,
                         "--checkpoint", ck[model], "--steps", steps, "--no-nifti", "-q", *extra], log=b.out / "recon.log")

    b.stage("recon", recon)

    def evaluate():
        from ambient_mri.evaluate import run_eval

        dirs = sorted(p for p in (b.out / "rec").iterdir() if p.is_dir())
        res = run_eval(dirs, b.out / "prep" / "test", b.out / "report")
        return {"summary": res["summary"], "box": _box_scores(b, dirs)}

    b.stage("eval", evaluate)

    def memorisation():
        import h5py
        import numpy as np

        from ambient_mri.memorization import nearest_ncc, summary

        refs = []
        for p in sorted((b.out / "prep" / "train50").glob("*.h5")):
            with h5py.File(main_out / "prep" / "train_oracle" / p.name) as f, h5py.File(p) as g:
                idx = list(g["slice_index"][()])
                own = list(f["slice_index"][()])
                refs.append(np.abs(f["reference"][()])[[own.index(i) for i in idx]])
        refs = np.concatenate(refs)
        out = {}
        for name in ("ft_demo", "ft_scratch"):
            d = b.out / "samples" / name
            if not (d / "samples.npy").exists():
                b.cmd(AMB + ["sample", "--checkpoint", ck[name], "--n", S["mem_samples"], "--out", d, "--seed", 0,
                             "--steps", S["mem_steps"], "-q"], log=b.out / "sample.log")
            ncc, _ = nearest_ncc(np.load(d / "samples.npy"), refs)
            out[name] = summary(ncc)
        return {"memorisation_of_the_50": out}

    b.stage("memorisation", memorisation)
    report = _report(b, S)
    dest = args.docs or (b.out / "block_finetune.md")
    dest.write_text(report)
    print(f"report: {dest}")


def _box_scores(b, dirs) -> dict:
    """PSNR inside the missing box (what inpainting must invent) per method: 10 log10(max^2 / MSE_box)."""
    import h5py
    import numpy as np

    out = {}
    for d in dirs:
        vals = []
        for p in sorted(d.glob("*.h5")):
            with h5py.File(p) as f, h5py.File(b.out / "prep" / "test" / p.name) as g:
                x, ref, m = f["reconstruction"][()], np.abs(g["reference"][()]), g["mask"][()].astype(bool)
                for s in range(x.shape[0]):
                    hole = ~m[s]
                    mse = np.mean((x[s][hole] - ref[s][hole]) ** 2)
                    vals.append(10 * np.log10(ref[s].max() ** 2 / mse))
        out[d.name] = (float(np.mean(vals)), float(np.std(vals)))
    return out


def _report(b, S) -> str:
    import os
    import platform
    import time

    st = b.state
    L = ["# Block corruption and fine-tuning (SIAT 64 x 64)", "",
         f"Machine: {platform.platform()}, {os.cpu_count()} CPU cores. Mode: {'QUICK' if b.quick else 'full'}. "
         f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Commands: `OUT/commands.log`.", "",
         "```", json.dumps(S, indent=2), "```", ""]
    L += ["## Stage wall times (s)", ""] + [f"- {k}: {v.get('seconds')}" for k, v in st.items()
                                             if isinstance(v, dict) and "seconds" in v] + [""]
    thr = st.get("train", {}).get("throughput", {})
    if thr:
        L += ["| run | steps | wall s | images/s |", "|---|---|---|---|"]
        L += [f"| {k} | {v['steps']} | {v['wall_s']:.0f} | {v['images_per_s_median']:.2f} |" for k, v in thr.items()]
        L.append("")
    ev = st.get("eval", {})
    if ev:
        L += ["## Box inpainting of test slices (whole image; A-DPS convention)", "",
              "| method | slices | PSNR | SSIM | PSNR inside the box | s/slice | NFE |", "|---|---|---|---|---|---|---|"]
        for r in ev["summary"]:
            bx = ev["box"].get(r["label"], (float("nan"), float("nan")))
            L.append(f"| {r['label']} | {r['n_slices']} | {sb._fmt_pm(r['psnr_adps'], 2)} | {sb._fmt_pm(r['ssim_adps'], 4)} | "
                     f"{bx[0]:.2f} ± {bx[1]:.2f} | {r['seconds_per_slice']:.3g} | {r['nfe']} |")
        L.append("")
    mem = st.get("memorisation", {}).get("memorisation_of_the_50")
    if mem:
        L += ["## Memorisation of the 50 fine-tuning slices (nearest of them to each prior sample, NCC)", "",
              "| run | n | mean | median | p95 | max | frac > 0.95 |", "|---|---|---|---|---|---|---|"]
        L += [f"| {k} | {v['n']} | {v['mean']:.4f} | {v['median']:.4f} | {v['p95']:.4f} | {v['max']:.4f} | "
              f"{v['frac_above_0.95']:.3f} |" for k, v in mem.items()]
        L.append("")
    return "\n".join(L)


if __name__ == "__main__":
    main()
