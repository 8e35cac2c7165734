"""``ambient-mri prep`` (moving here from ``ambient_mri/prep.py``)."""

from ..prep import command  # noqa: F401
