"""``ambient-mri prep``: the command line of :func:`ambient_mri.prep.run_prep` (options in
:class:`~ambient_mri.prep_options.PrepOptions`)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..coils import DEFAULT_MAPS, maps_methods
from ..errors import ConfigError
from ..prep import run_prep
from ..prep_options import CORRUPTIONS, REFERENCE_KINDS, PrepOptions
from ..prepared import DOMAINS, SPLITS


def _parse_accel(values) -> tuple[float, ...] | None:
    """``--accel`` values (each may be comma-separated) as floats, or ``None`` when none were given."""
    if not values:
        return None
    out = []
    for v in values:
        for part in str(v).split(","):
            try:
                out.append(float(part))
            except ValueError:
                raise ConfigError(f"--accel {part!r} is not a number") from None
    return tuple(out)


HELP = """Turn fastMRI-layout .h5 files (INPUT: a folder or one file) into a prepared dataset in OUTPUT.

\b
Per slice: prewhiten (noise from the 30x30 image corner), centre crop, SVD coil compression,
sampling mask (the input's own, or drawn with a per-slice seed), coil maps and the norm from the
calibration block only, k-space divided by the norm. The train split stores only the masked k-space
(zero where the mask is 0), mask, maps, norm and seeds; val/test also a reference image. Several
--accel values write OUTPUT/R<R>/ folders. Re-running skips finished files; a bad input file is
skipped with a one-line error and the exit status is 1. See docs/prep.md and docs/data_format.md.
"""


@click.command(name="prep", help=HELP)
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.argument("output", metavar="OUTPUT", type=click.Path(path_type=Path))
@click.option("--split", type=click.Choice(SPLITS), required=True,
              help="train: masked k-space only (no reference); val/test: also the reference image.")
@click.option("--accel", multiple=True, metavar="R",
              help="Nominal acceleration R >= 1 of the drawn masks; repeat or comma-separate for several "
                   "(one OUTPUT/R<R>/ folder each). Default 4. Ignored for inputs that carry a mask.")
@click.option("--mask-type", default="adps", show_default=True,
              help="Mask drawn for fully sampled inputs: random (fastMRI RandomMaskFunc), adps (floor(W/R) "
                   "lines, centre + uniform), equispaced, gaussian (variable-density lines), poisson or "
                   "sigpy-poisson (2-D Poisson disc), random-2d (2-D variable-density random points).")
@click.option("--center-lines", type=int, default=None,
              help="Fully sampled centre lines of line masks (side of the square block of 2-D masks). "
                   "Default: W/16 for adps/gaussian, 8% of W for random/equispaced, 8 for the 2-D masks.")
@click.option("--crop", nargs=2, type=int, default=None, metavar="H W",
              help="Centre crop to H x W: image space for fully sampled input (fastMRI convention); for "
                   "inputs with a mask the readout in image space and the phase encode in k-space. "
                   "Default: keep the matrix.")
@click.option("--coils", type=int, default=None,
              help="SVD-compress to this many virtual coils (matrix from the calibration block). Default: keep.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Base seed; each slice's mask seed is a hash of it, the input file name and the slice index.")
@click.option("--workers", type=int, default=1, show_default=True, help="Volumes prepared in parallel (processes).")
@click.option("--maps", type=click.Choice(maps_methods()), default=DEFAULT_MAPS, show_default=True,
              help="Coil maps: espirit-sake (ESPIRiT; below a 16x16 calibration block it first completes a larger "
                   "centred block from the measured samples by low-rank completion), espirit / espirit-torch "
                   "(ESPIRiT of the calibration block only, sigpy / torch), lowres (ACS coil images / RSS); or true: "
                   "the maps a simulated input carries (dataset sim_coil_maps), whitened, cropped and compressed "
                   "like its k-space.")
@click.option("--calib", type=int, default=None,
              help="Side of the centred square calibration block used for maps, coil compression and the "
                   "norm; at most the mask's fully sampled centre. Default: that centre (image domain: 24).")
@click.option("--whiten/--no-whiten", default=None,
              help="Prewhiten the coils with the noise of the 30x30 image corner. Default: only when the "
                   "header's readout is 2x oversampled (fastMRI 640 = 2 x 320), and per slice only when the "
                   "corner is noise (neighbouring pixels uncorrelated, not an aliased object), with a one-line "
                   "note otherwise. --whiten: whiten even without oversampling; fail if the corner is not noise.")
@click.option("--reference", type=click.Choice(REFERENCE_KINDS), default="cg-sense", show_default=True,
              help="val/test reference image: cg-sense (30 CG iterations on the fully sampled k-space and the "
                   "maps) or rss (root sum of squares).")
@click.option("--nifti", is_flag=True,
              help="Also write NIfTI magnitude volumes (reference, zero-filled) to OUTPUT/nifti/ for viewers.")
@click.option("--domain", type=click.Choice(DOMAINS), default="kspace", show_default=True,
              help="kspace: k-space masks (A-DPS). image: image-domain corruption of the coil-combined image "
                   "(the seed paper's box/pixel setting); stores image = mask * x.")
@click.option("--corruption", type=click.Choice(CORRUPTIONS), default=None,
              help="--domain image only: box (one erased square) or pixels (random erased pixels).")
@click.option("--level", type=float, default=None,
              help="--domain image only: erased area fraction (box) or erasure probability (pixels), in [0, 1).")
@click.option("--slices", default=None, metavar="SPEC",
              help="Slices of each volume to keep: a:b (python slice, e.g. 0:5), i, or i,j,k. Default: all.")
@click.option("--cg-iters", type=int, default=30, show_default=True, help="CG-SENSE iterations of the reference.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def command(input_path, output, split, accel, mask_type, center_lines, crop, coils, seed, workers, maps, calib,
            whiten, reference, nifti, domain, corruption, level, slices, cg_iters, quiet):
    acc = _parse_accel(accel)
    if domain == "image" and acc is not None:
        raise ConfigError("--accel does not apply to --domain image (use --corruption and --level)")
    opts = PrepOptions(split=split, domain=domain, accel=acc or ((4.0,) if domain == "kspace" else ()),
                       mask_type=mask_type, center_lines=center_lines, crop=tuple(crop) if crop else None,
                       coils=coils, seed=seed, maps=maps, calib=calib, whiten=whiten, reference=reference,
                       corruption=corruption, level=level, slices=slices, cg_iters=cg_iters)
    t0 = time.monotonic()
    res = run_prep(input_path, output, opts, workers=workers, nifti=nifti, progress=not quiet,
                   echo=lambda msg: click.echo(msg, err=True))
    click.echo(f"prepared {len(res.written)} file(s), skipped {len(res.skipped)} finished, "
               f"{len(res.failed)} failed in {time.monotonic() - t0:.1f} s; manifest: {', '.join(res.manifests)}")
    if res.failed:
        click.echo(f"{len(res.failed)} input file(s) failed:", err=True)
        for f in res.failed:
            click.echo(f"  {f['error']}", err=True)
        raise click.exceptions.Exit(1)
