"""``ambient-mri demo`` (moving here from ``ambient_mri/demo.py``)."""

from ..demo import command  # noqa: F401
