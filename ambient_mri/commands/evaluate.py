"""``ambient-mri eval`` (moving here from ``ambient_mri/evaluate.py``)."""

from ..evaluate import command  # noqa: F401
