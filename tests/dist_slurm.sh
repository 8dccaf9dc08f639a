#!/usr/bin/env bash
# The distributed layer under a real Slurm (one node on localhost, scripts/slurm-local): `srun` starts
# the ranks, they find each other through the job's TCPStore (rank 0's host from SLURM_JOB_NODELIST),
# every collective and control message is right (default build, Gloo, strict device mode; and the `mpi`
# build's MPI backend under `srun --mpi=pmix`), and a failing rank ends the step fast even with
# --kill-on-bad-exit=0, through the job's abort notice.
#   tests/dist_slurm.sh          (needs scripts/install-system-deps)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/dist_common.sh"
TRAINER=$(build_trainer default)
TRAINER_MPI=$(build_trainer mpi mpi)
start_slurm
trap stop_slurm EXIT

# Each job gets a fresh rendezvous port.
s() { echo env MASTER_PORT="$(free_port)" srun --kill-on-bad-exit=0 --overcommit --time=5; }
run_case "srun -n 2 selftest (gloo, strict)" ok 60 "rank 1 of 2: dist selftest passed (gloo" -- $(s) -n 2 "$TRAINER" dist-selftest --strict
run_case "srun -n 3 selftest (gloo, strict)" ok 60 "rank 2 of 3: dist selftest passed (gloo" -- $(s) -n 3 "$TRAINER" dist-selftest --strict
run_case "srun --mpi=pmix -n 2 selftest (mpi backend)" ok 60 "rank 1 of 2: dist selftest passed (mpi" -- \
    $(s) --mpi=pmix -n 2 "$TRAINER_MPI" dist-selftest --backend mpi
run_case "srun: rank 1 errors -> step fails fast" fail 30 "ending the job: rank 1 of 2 failed: injected failure on rank 1" -- \
    $(s) -n 2 "$TRAINER" dist-selftest --fail-rank 1
run_case "srun: rank 0 panics -> step fails fast" fail 30 "injected panic on rank 0" -- \
    $(s) -n 2 "$TRAINER" dist-selftest --panic-rank 0
finish
