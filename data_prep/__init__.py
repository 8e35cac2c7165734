"""Converters that write real or generated MRI data in the fastMRI ``.h5`` layout."""
