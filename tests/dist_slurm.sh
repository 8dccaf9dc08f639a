#!/usr/bin/env bash
# The distributed layer under a real Slurm (one node on localhost, scripts/slurm-local):
# `srun --mpi=pmix` starts the ranks, they find each other through PMIx, every collective is
# right, and a failing rank makes srun fail fast. Starts the cluster if it is not running and
# stops it again at the end (then only).
#   tests/dist_slurm.sh          (needs scripts/install-system-deps)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/dist_common.sh"
build_selftest

SLURM_LOCAL=$REPO/scripts/slurm-local
eval "$("$SLURM_LOCAL" env)"
if ! "$SLURM_LOCAL" status >/dev/null 2>&1; then
    "$SLURM_LOCAL" start
    trap '"$SLURM_LOCAL" stop' EXIT
fi

# No --kill-on-bad-exit: ending the step is the failing rank's job (MPI_Abort through PMIx).
SRUN=(srun --mpi=pmix --kill-on-bad-exit=0 --time=5)
run_case "srun -n 2 selftest" ok 60 "rank 1 of 2: dist selftest passed" -- "${SRUN[@]}" -n 2 "$SELFTEST"
run_case "srun: rank 1 errors -> step fails fast" fail 30 "error on rank 1 of 2: injected failure on rank 1" -- \
    "${SRUN[@]}" -n 2 "$SELFTEST" --fail-rank 1
run_case "srun: rank 0 panics -> step fails fast" fail 30 "injected panic on rank 0" -- \
    "${SRUN[@]}" -n 2 "$SELFTEST" --panic-rank 0
finish
