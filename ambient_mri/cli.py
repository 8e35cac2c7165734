"""``ambient-mri`` command line: ``prep -> train -> recon -> eval`` (plus ``info``, ``sample``, ``demo``).

Each subcommand lives beside the code it drives (``ambient_mri/<module>.py`` defines a click command
named ``command``) and is imported only when it runs, so ``ambient-mri --help`` starts fast.
Errors the user can act on (:class:`~ambient_mri.errors.AmbientMRIError`) print as one line and exit 2.
"""

from __future__ import annotations

import importlib
import sys

import click

from . import __version__
from .errors import AmbientMRIError

# name -> (module, one-line help shown by ``ambient-mri --help``)
COMMANDS = {
    "prep": ("ambient_mri.prep", "Turn fastMRI-layout .h5 files into a prepared dataset (maps, masks, norms)."),
    "info": ("ambient_mri.info", "Describe fastMRI-layout or prepared .h5 files, a checkpoint or a run folder."),
    "train": ("ambient_mri.train", "Train an ambient (or oracle/naive baseline) diffusion prior."),
    "sample": ("ambient_mri.sampling_cli", "Draw unconditional prior samples from a checkpoint."),
    "recon": ("ambient_mri.recon", "Reconstruct undersampled scans (A-DPS, A-OS, FS-DPS, fast DC, ZF, SENSE, L1)."),
    "eval": ("ambient_mri.evaluate", "Score reconstructions against references: tables and figures."),
    "demo": ("ambient_mri.demo", "Run the whole pipeline on built-in demo data in a few minutes."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, short = COMMANDS[name]
        try:
            cmd = importlib.import_module(module).command
        except ImportError as e:
            if getattr(e, "name", None) != module:
                raise

            @click.command(name=name, help=f"{short} (not available in this build: {e})")
            def cmd():
                raise click.ClickException(f"'{name}' is not available in this build")

        cmd.short_help = short
        return cmd


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ambient-mri")
def cli():
    """Learn clean MRI priors from undersampled k-space only, and reconstruct new scans by posterior sampling.

    Typical use: ambient-mri prep RAW PREP --split train --accel 4, then ambient-mri train --config
    CONFIG --data PREP --out RUN, ambient-mri recon --input TEST --checkpoint RUN/checkpoint.pt --out REC,
    ambient-mri eval --recon REC --reference TEST --out REPORT. Try ambient-mri demo first.
    """


def main(argv=None):
    try:
        rv = cli.main(args=argv, prog_name="ambient-mri", standalone_mode=False)
    except AmbientMRIError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)  # ctx.exit(code) comes back as the return value here


if __name__ == "__main__":
    main()
