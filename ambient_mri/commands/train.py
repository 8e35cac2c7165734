"""``ambient-mri train`` (moving here from ``ambient_mri/train.py``)."""

from ..train import command  # noqa: F401
