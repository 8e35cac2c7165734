"""``ambient-mri recon`` (moving here from ``ambient_mri/recon.py``)."""

from ..recon import command  # noqa: F401
