"""``ambient-mri recon``: options, then :func:`ambient_mri.recon.run_recon` (outputs: see ``ambient_mri.recon``)."""

from __future__ import annotations

import click

from ..masks import KSPACE_KINDS
from ..recon import METHODS, run_recon
from ..sampling import DC_ERROR_VAR, ERROR_VARS


@click.command(name="recon")
@click.option("--input", "inputs", required=True, type=click.Path(exists=True),
              help="A prepared val/test folder or file, or raw fastMRI-layout .h5 file(s) (folder or file).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (one .h5 per input).")
@click.option("--method", required=True, type=click.Choice(METHODS),
              help="adps: A-DPS as published (ambient model); fsdps: DPS with an oracle model; adps-noise / "
                   "fsdps-noise: the same with the likelihood step sized by the noise level; aos: one-step; dc: our "
                   "fast Heun sampler with noise-weighted CG data consistency; mmps: moment-matching posterior sampling (Rozet et al. 2024; for clean-trained priors: oracle, naive, EM); zf: zero-filled A^H y; sense: "
                   "CG-SENSE; l1: L1-wavelet.")
@click.option("--checkpoint", help="Checkpoint (or run folder) for model methods, or a packaged one by name: demo, "
                                   "siat64-lines-r4 (docs/model_card_siat64.md).")
@click.option("--steps", type=int, help="Sampler steps (default: 500 adps/fsdps, 25 dc and mmps).")
@click.option("--samples", default=1, show_default=True, help="Posterior samples per scan (mean and std are saved).")
@click.option("--seed", default=0, show_default=True, help="Sampler seed (and mask seed for --accel).")
@click.option("--accel", type=float, help="Undersample fully sampled raw inputs at this acceleration.")
@click.option("--mask-type", default="adps", show_default=True,
              type=click.Choice(KSPACE_KINDS),
              help="Mask for --accel.")
@click.option("--center-lines", type=int, help="ACS lines (or calibration side for 2-D masks) for --accel.")
@click.option("--batch", default=8, show_default=True, help="Slices reconstructed together.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--lam", type=float, help="L1-wavelet weight (or choose it with --tune-on).")
@click.option("--tune-on", type=click.Path(exists=True, file_okay=False),
              help="Prepared VALIDATION folder on which to choose the L1 weight (recorded in the outputs).")
@click.option("--tune-slices", default=8, show_default=True, help="Validation slices used by --tune-on.")
@click.option("--step-size", type=float, help="A-DPS/FS-DPS normalised step l (published: 1).")
@click.option("--cg-iters", type=int, help="CG iterations per evaluation (default: 20 for dc, 5 for mmps).")
@click.option("--error-var", type=click.Choice(ERROR_VARS),
              help="dc: the prior's error variance v_t in the data-consistency step: residual (one value per slice "
                   "from the data residual), ideal (EDM's formula), local (per pixel, following the local signal "
                   f"power of the denoised estimate). Default: {DC_ERROR_VAR}.")
@click.option("--churn", type=float, help="dc: EDM stochastic churn (default 0: deterministic given the seed).")
@click.option("--noise-std", type=float,
              help="Noise std of one k-space sample of one coil in prepared units (E|n|^2 = s^2) for dc, adps-noise "
                   "and fsdps-noise. Default: the prepared file's noise_std; where unknown, estimated from the "
                   "outermost measured k-space samples (recorded as noise_std_source).")
@click.option("--further-mask", "further", default=None, type=click.Choice(("independent", "within")),
              help="adps, adps-noise, dc with an ambient model: draw M~ from the training distribution independently "
                   "of the test mask (published A-DPS; default for adps, adps-noise), or inside the test mask (the "
                   "training rule applied to it; default for dc).")
@click.option("--shard", help="i/n: reconstruct every n-th input starting at i (run n processes; outputs merge "
                              "into the same --out folder).")
@click.option("--label", help="Name of this run in 'ambient-mri eval' tables (default: the method).")
@click.option("--matrix", default="refuse", show_default=True, type=click.Choice(("refuse", "crop", "native")),
              help="When the scan's matrix differs from the model's: refuse, crop k-space to the model's matrix, "
                   "or run the size-agnostic network at the scan's matrix.")
@click.option("--maps", "maps_method", default="espirit", show_default=True,
              help="Coil-map method for raw inputs (espirit, lowres, espirit-torch).")
@click.option("--whiten/--no-whiten", default=None,
              help="Raw inputs: prewhiten the coils with the noise of the 30x30 image corner. Default: only when "
                   "the header's readout is 2x oversampled and the corner is noise (as 'prep'); --whiten "
                   "also without oversampling, failing if the corner is not noise.")
@click.option("--sense-iters", default=30, show_default=True, help="CG-SENSE iterations.")
@click.option("--l1-iters", default=100, show_default=True, help="L1-wavelet iterations.")
@click.option("--nifti/--no-nifti", default=True, show_default=True, help="Also write a NIfTI magnitude volume.")
@click.option("--png/--no-png", default=True, show_default=True, help="Also write a PNG preview.")
@click.option("--ema/--no-ema", default=True, show_default=True, help="Use the EMA weights of the checkpoint.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or per-file lines.")
def command(inputs, out, method, checkpoint, steps, samples, seed, accel, mask_type, center_lines, batch, device,
            lam, tune_on, tune_slices, step_size, cg_iters, error_var, churn, noise_std, further, shard, label, matrix,
            maps_method, sense_iters, l1_iters, nifti, png, ema, quiet, whiten):
    """Reconstruct undersampled scans; writes fastMRI-layout reconstructions (mean, std over samples, data
    consistency), NIfTI volumes and PNG previews. Resumable per slice; --shard splits a folder over
    processes or GPUs."""
    written = run_recon(inputs, out, method, checkpoint=checkpoint, steps=steps, samples=samples, seed=seed,
                        accel=accel, mask_type=mask_type, center_lines=center_lines, batch=batch, device=device,
                        lam=lam, tune_on=tune_on, tune_slices=tune_slices, step_size=step_size, cg_iters=cg_iters,
                        error_var=error_var, churn=churn, shard=shard, label=label, matrix=matrix,
                        maps_method=maps_method, sense_iters=sense_iters, l1_iters=l1_iters, nifti=nifti, png=png,
                        ema=ema, quiet=quiet, whiten=whiten, noise_std=noise_std, further=further, echo=click.echo)
    if not quiet:
        click.echo(f"wrote {len(written)} reconstruction(s) to {out}")
