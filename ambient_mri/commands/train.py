"""``ambient-mri train``: options, then :func:`ambient_mri.train.train`; Ctrl-C / SIGTERM exit 130 / 143."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ..config import dump_yaml, load_config
from ..distributed import dist_env
from ..errors import ConfigError
from ..em import STATE, run_em
from ..train import train


@click.command(context_settings={"ignore_unknown_options": False})
@click.option("--config", "-c", "config", default=None,
              help="YAML config: a file, or a packaged name (tiny, cpu64, block64, demo, fastmri_brain). Optional with --resume "
                   "(the checkpoint's config is used).")
@click.option("--data", "-d", "data", default=None, type=click.Path(file_okay=False),
              help="Prepared dataset folder (ambient-mri prep output with manifest.json). Train split for ambient and "
                   "naive runs, a val-style split (with references) for loss.kind=oracle. Default on --resume: the recorded one.")
@click.option("--out", "-o", "out", required=True, type=click.Path(file_okay=False),
              help="Run folder: config.yaml, checkpoint.pt, checkpoints/ckpt_*.pt, metrics.csv, train.log, samples/.")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its newest complete checkpoint (bit-identical to an uninterrupted "
                   "run on CPU). Only train.steps, logging/checkpoint/sample periods, workers and device may change.")
@click.option("--init", "init", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Start a new run from another checkpoint's EMA weights (fine-tuning); fresh optimiser; recorded in "
                   "the new checkpoints.")
@click.option("--em-from", "em_from", default=None, type=click.Path(exists=True),
              help="EM from an ambient start (loss.kind=em): round 0's prior, an ambient checkpoint or run folder. "
                   "Each round posterior-samples every training scan (em.sampler, em.samples_per_scan), then trains "
                   "a plain EDM prior on the samples (em.steps_per_round); em.rounds rounds. Without --config: the "
                   "ambient model's own settings. --resume continues an EM run in --out.")
@click.option("--print-config", is_flag=True, help="Print the resolved config (after overrides) and exit.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar (log lines still go to stderr and RUN/train.log).")
@click.argument("overrides", nargs=-1)
def command(config, data, out, resume, init, em_from, print_config, quiet, overrides):
    """Train a diffusion prior on a prepared dataset.

    OVERRIDES are key=value pairs with dotted keys that replace config values, read as YAML:
    train.steps=200 train.lr=1e-4 model.channels=[16,32] loss.redraw=false loss.kind=oracle.
    EM from an ambient start: --em-from AMBIENT_CHECKPOINT (see docs/training.md); keys em.rounds,
    em.samples_per_scan, em.sampler (dc | adps | mmps), em.first_sampler, em.sampler_steps, em.steps_per_round, em.batch.
    Sections: model (channels, blocks, attention, dropout, groups, sigma_data, cond), loss (kind: ambient |
    ambient_image | oracle | naive_zf | naive_l1 | em; further_accel or delta; redraw; domain; P_mean; P_std; lam;
    l1_iters), train (steps, batch, lr, optimizer, weight_decay, warmup, grad_clip, ema_halflife, ema_rampup,
    ema_decay, precision, seed, log_every, ckpt_every, sample_every, sample_n, sample_steps, keep, num_workers,
    device), data (cache_mb). Every key is checked before any work starts. Ctrl-C or SIGTERM saves a
    checkpoint and exits (130 / 143). Multi-GPU: torchrun --nproc_per_node=N -m ambient_mri.cli train ...
    (see docs/training.md).
    """
    if print_config:
        if config is None:
            raise ConfigError("--print-config needs --config")
        click.echo(dump_yaml(load_config(config, overrides).to_dict()), nl=False)
        return
    env = dist_env()
    echo = lambda m: click.echo(m, err=True)  # noqa: E731
    if em_from is not None or (resume and (Path(out) / STATE).is_file()):
        if init is not None:
            raise ConfigError("--init does not apply to EM (round 1 starts from --em-from's weights where they fit)")
        res = run_em(config, data, out, em_from=em_from, overrides=overrides, resume=resume, progress=not quiet,
                     echo=echo)
    else:
        res = train(config, data, out, overrides=overrides, resume=resume, init=init, progress=not quiet, echo=echo)
    code = {"SIGINT": 130, "SIGTERM": 143}.get(res["interrupted"], 0)
    if env.distributed:
        # plain exits of gloo/NCCL processes sometimes abort in interpreter teardown (docs/ecosystem section 7)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:  # SystemExit (not click's Exit, whose code cli.main drops in standalone_mode=False)
        sys.exit(code)
