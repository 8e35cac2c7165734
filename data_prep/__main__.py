"""``python -m data_prep siat|head8ch|bart|brain512|demo ...``: write real or simulated data as fastMRI
``.h5`` files. Each subcommand is the click ``command`` of its module, imported only when it runs.
Errors the user can act on print as one line and exit 2."""

from __future__ import annotations

import importlib
import sys

import click

from ambient_mri.errors import AmbientMRIError

COMMANDS = {
    "siat": ("data_prep.siat", "SIAT T2 slices -> multi-coil train/val/test volumes (ESPIRiT maps of head.mat)."),
    "head8ch": ("data_prep.head8ch", "head.mat -> one fully sampled 8-coil volume."),
    "bart": ("data_prep.bart", "BART 8-coil Poisson k-space -> one test-style volume (2-D mask, BART PICS result)."),
    "brain512": ("data_prep.brain512", "brain512.mat -> one single-coil test-style volume (1-D line mask)."),
    "demo": ("data_prep.demo_data", "Simulate multi-coil demo volumes from nilearn's MNI152 template (no download)."),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, short = COMMANDS[name]
        cmd = importlib.import_module(module).command
        cmd.short_help = short
        return cmd


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Converters that write MRI data in the fastMRI .h5 layout (see docs/data_prep.md).

    Real data (read-only) come from ../shared/data; the demo data need nothing but the installed
    nilearn package. Example: python -m data_prep siat ../shared/data out/data/siat64 --size 64 --coils 8
    """


def main(argv=None):
    try:
        cli.main(args=argv, prog_name="python -m data_prep", standalone_mode=False)
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
    sys.exit(0)


if __name__ == "__main__":
    main()
