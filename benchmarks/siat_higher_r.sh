#!/usr/bin/env bash
# A non-degenerate higher-R test for a finished SIAT lines benchmark run (docs/benchmarks.md): at 64 columns the
# run's R = 8 mask with 8 ACS lines keeps only the ACS lines, so this re-prepares the same validation and test
# volumes at R (default 8) with ACS lines (default 4: 4 ACS + 4 random lines at R = 8), then reconstructs the
# same 60 test slices with the run's three priors (trained at R = 4 with 8 ACS lines; not retrained) and the
# classical baselines, scores them and prints paired differences. L1's weight is chosen on the run's tuning
# volume (validation); each prior's DPS step size is the one the run chose for it there (validation).
#
#   bash benchmarks/siat_higher_r.sh OUT [R] [ACS]      # OUT: the benchmark's --out folder
set -euo pipefail
OUT=$(cd "$1" && pwd); R=${2:-8}; ACS=${3:-4}; HERE=$(cd "$(dirname "$0")" && pwd)
T="$OUT/higher_R${R}_acs${ACS}"; mkdir -p "$T"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
echo "# $0 $*  ($(hostname), $(nproc) cores, $(date -u +%F' '%H:%M) UTC); seeds: val masks 1, test masks 2, sampler 0"
set -x
cd "$OUT"
for maps in espirit-sake true; do
  ambient-mri prep data/val "$T/prep/val_$maps" --split val --accel "$R" --seed 1 --maps "$maps" --mask-type adps --center-lines "$ACS" --workers 2
  ambient-mri prep data/test "$T/prep/test_$maps" --split test --accel "$R" --seed 2 --maps "$maps" --mask-type adps --center-lines "$ACS" --workers 2
done
TUNE="$T/prep/val_espirit-sake"  # L1 is tuned on its first 8 slices: the run's tuning volume (the first by name)
l() { python -c "import json; print(json.load(open('state.json'))['tune_dps']['step_size']['$1'])"; }  # l of prior $1
TEST="$T/prep/test_espirit-sake"; TRUE="$T/prep/test_true"; REC="$T/rec"
rec() {  # INPUT SUBFOLDER NAME LABEL METHOD [options]
  ambient-mri recon --input "$1" --out "$REC/$2/$3" --label "$4" --method "$5" --no-nifti --no-png -q "${@:6}"; }
rec "$TEST" est zf zf zf
rec "$TEST" est sense sense sense
rec "$TEST" est l1 l1 l1 --tune-on "$TUNE" --tune-slices 8
LAM=$(python -c "import h5py,glob; print(h5py.File(sorted(glob.glob('$REC/est/l1/*.h5'))[0],'r').attrs['lam'])")
rec "$TEST" est aos aos aos --checkpoint runs/ambient/checkpoint.pt
rec "$TEST" est dc dc dc --checkpoint runs/ambient/checkpoint.pt --steps 25
rec "$TEST" est adps adps adps --checkpoint runs/ambient/checkpoint.pt --steps 100 --step-size "$(l ambient)"
for m in oracle naive; do
  rec "$TEST" est "$m-dc" "$m-dc" dc --checkpoint "runs/$m/checkpoint.pt" --steps 25
  rec "$TEST" est "$m-mmps" "$m-mmps" mmps --checkpoint "runs/$m/checkpoint.pt" --steps 10 --cg-iters 3
done
rec "$TEST" est fsdps fsdps fsdps --checkpoint runs/oracle/checkpoint.pt --steps 100 --step-size "$(l oracle)"
rec "$TEST" est naive-dps naive-dps fsdps --checkpoint runs/naive/checkpoint.pt --steps 100 --step-size "$(l naive)"
rec "$TRUE" true l1 "l1+true maps" l1 --lam "$LAM"
rec "$TRUE" true dc "dc+true maps" dc --checkpoint runs/ambient/checkpoint.pt --steps 25
rec "$TRUE" true oracle-dc "oracle-dc+true maps" dc --checkpoint runs/oracle/checkpoint.pt --steps 25
for v in est true; do
  dirs=(); for d in "$REC/$v"/*; do dirs+=(--recon "$d"); done
  ambient-mri eval "${dirs[@]}" --reference "$([ $v = est ] && echo "$TEST" || echo "$TRUE")" --out "$T/report/$v"
done
set +x
python - "$T" "$HERE" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from siat_benchmark import _paired
T = Path(sys.argv[1])
print("| A | B | mean A - B (dB, PSNR A-DPS) | 95 % interval | slices |\n|---|---|---|---|---|")
for p in _paired(T / "report" / "est"):
    print(f"| {p['a']} | {p['b']} | {p['mean']:+.2f} | [{p['lo']:+.2f}, {p['hi']:+.2f}] | {p['n']} |")
PY
