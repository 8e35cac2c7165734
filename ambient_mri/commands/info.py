"""``ambient-mri info`` (moving here from ``ambient_mri/info.py``)."""

from ..info import command  # noqa: F401
