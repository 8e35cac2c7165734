"""``ambient-mri`` command line: ``prep -> train -> recon -> eval`` (plus ``info``, ``sample``, ``demo``).

The commands live in :mod:`ambient_mri.commands` (one module per command, each defining a click
command named ``command``); the library modules never import click. Errors the user can act on
(:class:`~ambient_mri.errors.AmbientMRIError`) print as one line and exit 2.
"""

from __future__ import annotations

import sys

import click

from . import __version__
from .commands import demo, evaluate, info, prep, recon, sample, train
from .errors import AmbientMRIError

# name -> (command module, one-line help shown by ``ambient-mri --help``)
COMMANDS = {
    "prep": (prep, "Turn fastMRI-layout .h5 files into a prepared dataset (maps, masks, norms)."),
    "info": (info, "Describe fastMRI-layout or prepared .h5 files, a checkpoint or a run folder."),
    "train": (train, "Train an ambient (or oracle/naive baseline) diffusion prior."),
    "sample": (sample, "Draw unconditional prior samples from a checkpoint."),
    "recon": (recon, "Reconstruct undersampled scans (A-DPS, A-OS, FS-DPS, fast DC, ZF, SENSE, L1)."),
    "eval": (evaluate, "Score reconstructions against references: tables and figures."),
    "demo": (demo, "Run the whole pipeline on built-in demo data in a few minutes."),
}


class PipelineOrder(click.Group):
    """List the commands in pipeline order (prep, info, train, ...) rather than alphabetically."""

    def list_commands(self, ctx):
        return list(self.commands)


@click.group(cls=PipelineOrder, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ambient-mri")
def cli():
    """Learn clean MRI priors from undersampled k-space only, and reconstruct new scans by posterior sampling.

    Typical use: ambient-mri prep RAW PREP --split train --accel 4, then ambient-mri train --config
    CONFIG --data PREP --out RUN, ambient-mri recon --input TEST --checkpoint RUN/checkpoint.pt --out REC,
    ambient-mri eval --recon REC --reference TEST --out REPORT. Try ambient-mri demo first.
    """


for _name, (_module, _short) in COMMANDS.items():
    _module.command.short_help = _short
    cli.add_command(_module.command, name=_name)


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
