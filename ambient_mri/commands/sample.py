"""``ambient-mri sample`` (moving here from ``ambient_mri/sampling_cli.py``)."""

from ..sampling_cli import command  # noqa: F401
