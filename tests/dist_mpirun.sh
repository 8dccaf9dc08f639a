#!/usr/bin/env bash
# The distributed layer under OpenMPI's mpirun (`trainer dist-selftest`: every collective and control
# message against known results): the default build (no MPI linked; TCPStore rendezvous from
# OMPI_COMM_WORLD_*, Gloo) on 2 and 3 ranks in strict device mode, the `mpi` build's MPI backend; a rank
# that fails (error or panic) stops the whole job within seconds with its message; and the strict
# device mode catches a control flag sent through a device collective (the bug that made every NCCL
# run abort after step 1), which passes unnoticed without it.
#   tests/dist_mpirun.sh          (needs scripts/install-system-deps)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/dist_common.sh"
TRAINER=$(build_trainer default)
TRAINER_MPI=$(build_trainer mpi mpi)
# Each job gets a fresh rendezvous port.
m() { echo env MASTER_PORT="$(free_port)" "${MPIRUN[@]}"; }

run_case "mpirun -np 2 selftest (gloo, strict)" ok 60 "rank 1 of 2: dist selftest passed (gloo" -- $(m) -np 2 "$TRAINER" dist-selftest --strict
run_case "mpirun -np 3 selftest (gloo, strict)" ok 60 "rank 2 of 3: dist selftest passed (gloo" -- $(m) -np 3 "$TRAINER" dist-selftest --strict
run_case "mpirun -np 2 selftest (mpi backend)" ok 60 "rank 1 of 2: dist selftest passed (mpi" -- \
    $(m) -np 2 "$TRAINER_MPI" dist-selftest --backend mpi
run_case "without a launcher: one process" ok 30 "rank 0 of 1: dist selftest passed" -- "$TRAINER" dist-selftest
# The other rank is blocked in its first collective: the abort notice ends it.
run_case "mpirun: rank 1 errors -> job aborts" fail 20 "ending the job: rank 1 of 2 failed: injected failure on rank 1" -- \
    $(m) -np 2 "$TRAINER" dist-selftest --fail-rank 1
run_case "mpirun: rank 0 panics -> job aborts" fail 20 "injected panic on rank 0" -- \
    $(m) -np 2 "$TRAINER" dist-selftest --panic-rank 0
# Every collective has a timeout (dist.timeout_s): a live rank that never joins the collective.
run_case "mpirun: a rank that stalls -> the others' collective times out" fail 20 \
    "all_reduce_sum on the gloo group failed" -- $(m) -np 2 "$TRAINER" dist-selftest --stall-rank 1 --timeout-s 3
run_case "mpirun: a flag on the device path goes unnoticed without strict mode" ok 60 "rank 1 of 2: dist selftest passed" -- \
    $(m) -np 2 "$TRAINER" dist-selftest --misroute
run_case "mpirun: strict device mode refuses a flag on the device path" fail 30 \
    "strict device mode (dist.strict_device): all_reduce_sum was given a Int64 tensor" -- \
    $(m) -np 2 "$TRAINER" dist-selftest --misroute --strict
finish
