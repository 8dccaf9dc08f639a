#!/usr/bin/env bash
# The distributed layer under OpenMPI's mpirun: every collective is right on 2 and 3 ranks, and a
# rank that fails (error or panic) stops the whole job within seconds with its message.
#   tests/dist_mpirun.sh          (needs scripts/install-system-deps)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/dist_common.sh"
build_selftest

MPIRUN=(mpirun --oversubscribe --bind-to none)
[[ $(id -u) == 0 ]] && MPIRUN+=(--allow-run-as-root)

run_case "mpirun -np 2 selftest" ok 60 "rank 1 of 2: dist selftest passed" -- "${MPIRUN[@]}" -np 2 "$SELFTEST"
run_case "mpirun -np 3 selftest" ok 60 "rank 2 of 3: dist selftest passed" -- "${MPIRUN[@]}" -np 3 "$SELFTEST"
run_case "without a launcher: one process" ok 30 "rank 0 of 1: dist selftest passed" -- "$SELFTEST"
# The other rank is blocked in its first all-reduce: only MPI_Abort ends the job.
run_case "mpirun: rank 1 errors -> job aborts" fail 20 "error on rank 1 of 2: injected failure on rank 1" -- \
    "${MPIRUN[@]}" -np 2 "$SELFTEST" --fail-rank 1
run_case "mpirun: rank 0 panics -> job aborts" fail 20 "injected panic on rank 0" -- \
    "${MPIRUN[@]}" -np 2 "$SELFTEST" --panic-rank 0
finish
