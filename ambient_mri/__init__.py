"""ambient_mri: learn clean MRI priors from undersampled k-space only, then reconstruct by posterior sampling."""

__version__ = "0.1.0"
