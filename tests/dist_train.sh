#!/usr/bin/env bash
# The trainer itself under OpenMPI and under a real (one-node, localhost) Slurm:
#  - the default build links no MPI library (`ldd`), and `mpirun -np 2` / `srun -n 2` of it train
#    configs/debug.toml to completion, leaving a checkpoint written by rank 0 (Gloo, strict device mode;
#    under srun, the run that is preempted and resumed below);
#  - the `mpi` build trains with dist.backend = "mpi" under mpirun;
#  - a preemption signal (`scancel --signal=USR1`, what Slurm's `--signal=USR1@120` sends) makes every
#    rank finish its step, rank 0 write a checkpoint, and the step exit cleanly (outside sbatch there is
#    no job to requeue, which rank 0 says); starting the same command again resumes from that checkpoint
#    and finishes the run (tests/dist_requeue.sh has the sbatch job that requeues itself).
#   tests/dist_train.sh          (needs scripts/install-system-deps)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/dist_common.sh"
TRAINER=$(build_trainer default)
TRAINER_MPI=$(build_trainer mpi mpi)

WORK=$(mktemp -d)
cleanup() {
    stop_slurm
    rm -rf "$WORK"
}
trap cleanup EXIT
cd "$WORK"
demo_data "$WORK"

check_links_no_mpi() { # check_links_no_mpi NAME BINARY
    if ldd "$2" | grep -qi "libmpi"; then
        echo "FAIL $1 links MPI:"; ldd "$2" | grep -i mpi | sed 's/^/     | /'
        FAILURES=$((FAILURES + 1))
    else
        echo "ok   $1 links no MPI library (ldd)"
    fi
}
check_links_no_mpi "the default build" "$TRAINER"
# A release build, where one was made (scripts/setup), is checked as well.
[[ -x $TARGET/release/trainer && $TARGET/release/trainer -nt $REPO/trainer/src/dist/mod.rs ]] \
    && check_links_no_mpi "target/release/trainer" "$TARGET/release/trainer"

STRICT=(--set dist.strict_device=true)
run_case "mpirun -np 2 trainer --config configs/debug.toml" ok 240 "step 20/20" -- \
    env MASTER_PORT="$(free_port)" "${MPIRUN[@]}" -np 2 "$TRAINER" --config debug.toml --set name=mpirun "${STRICT[@]}"
expect_file "mpirun run left a final checkpoint" runs/mpirun/checkpoints/step_00000020.safetensors
run_case "mpirun -np 2 trainer (mpi build, dist.backend = mpi)" ok 240 "via OpenMpi, mpi (control messages over gloo)" -- \
    "${MPIRUN[@]}" -np 2 "$TRAINER_MPI" --config debug.toml --set name=mpi --set dist.backend=mpi --set train.max_steps=6
expect_file "the MPI run left a final checkpoint" runs/mpi/checkpoints/step_00000006.safetensors

start_slurm
SRUN=(srun --kill-on-bad-exit=1 --overcommit --time=10 -n 2)
# Preemption: signal the job mid-run, then start the same command again. Its two parts are also the
# srun training run: to a final checkpoint written by rank 0, in strict device mode.
ARGS=(--config debug.toml --set name=preempt --set train.max_steps=30 --set log.every_steps=1 --set checkpoint.every_steps=1000
      "${STRICT[@]}")
MASTER_PORT=$(free_port) "${SRUN[@]}" --job-name=ferroclip-preempt "$TRAINER" "${ARGS[@]}" >preempt.log 2>&1 &
srun_pid=$!
for _ in $(seq 1 600); do grep -q "step 3/30" preempt.log 2>/dev/null && break; sleep 0.2; done
scancel --signal=USR1 --name=ferroclip-preempt
rc=0
timeout 120 tail --pid=$srun_pid -f /dev/null || rc=$?
wait $srun_pid && rc=0 || rc=$?
if [[ $rc == 0 ]] && grep -q "stopping at step" preempt.log && ls runs/preempt/checkpoints/step_*.state.safetensors >/dev/null 2>&1; then
    stopped=$(grep -o "stopping at step [0-9]*" preempt.log | grep -o "[0-9]*$")
    echo "ok   SIGUSR1 -> checkpoint at step $stopped and a clean exit"
    run_case "restarted job resumes at step $stopped and finishes" ok 600 "resumed from" -- \
        env MASTER_PORT="$(free_port)" "${SRUN[@]}" "$TRAINER" "${ARGS[@]}"
    expect_file "resumed run finished" runs/preempt/checkpoints/step_00000030.safetensors
else
    echo "FAIL preemption (exit $rc); output:"; sed 's/^/     | /' preempt.log
    FAILURES=$((FAILURES + 1))
fi
finish
