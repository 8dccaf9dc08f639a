#!/usr/bin/env bash
# The trainer itself under OpenMPI and under a real (one-node, localhost) Slurm:
#  - `mpirun -np 2 trainer --config configs/debug.toml` and `srun -n 2 --mpi=pmix trainer ...` run to
#    completion and leave a checkpoint written by rank 0;
#  - a preemption signal (`scancel --signal=USR1`, what Slurm's `--signal=USR1@120` sends) makes every
#    rank finish its step, rank 0 write a checkpoint, and the step exit cleanly; starting the same
#    command again (what `--requeue` does) resumes from that checkpoint and finishes the run.
#   tests/dist_train.sh          (needs scripts/install-system-deps)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/dist_common.sh"
(cd "$REPO" && cargo build -q -p trainer --bin trainer --features "$FEATURES") || { echo "FAIL: cannot build trainer" >&2; exit 1; }
TRAINER=$TARGET/debug/trainer

WORK=$(mktemp -d)
SLURM_LOCAL=$REPO/scripts/slurm-local
cleanup() {
    [[ -n ${STARTED_SLURM:-} ]] && "$SLURM_LOCAL" stop >/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
cd "$WORK"
"$TRAINER" make-demo-data --out demo-data --shards 4 --per-shard 64 2>/dev/null
# The debug config with the 4 shards written here.
sed 's/{00000..00007}/{00000..00003}/' "$REPO/configs/debug.toml" > debug.toml

expect_file() { # expect_file NAME PATH
    if [[ -f $2 ]]; then echo "ok   $1"; else echo "FAIL $1: $2 missing"; FAILURES=$((FAILURES + 1)); fi
}

MPIRUN=(mpirun --oversubscribe --bind-to none)
[[ $(id -u) == 0 ]] && MPIRUN+=(--allow-run-as-root)
run_case "mpirun -np 2 trainer --config configs/debug.toml" ok 240 "step 20/20" -- \
    "${MPIRUN[@]}" -np 2 "$TRAINER" --config debug.toml --set name=mpirun
expect_file "mpirun run left a final checkpoint" runs/mpirun/checkpoints/step_00000020.safetensors

eval "$("$SLURM_LOCAL" env)"
if ! "$SLURM_LOCAL" status >/dev/null 2>&1; then
    "$SLURM_LOCAL" start >/dev/null
    STARTED_SLURM=1
fi
SRUN=(srun --mpi=pmix --kill-on-bad-exit=0 --time=10 -n 2)
run_case "srun -n 2 --mpi=pmix trainer --config configs/debug.toml" ok 240 "step 20/20" -- \
    "${SRUN[@]}" "$TRAINER" --config debug.toml --set name=slurm
expect_file "srun run left a final checkpoint" runs/slurm/checkpoints/step_00000020.safetensors

# Preemption: signal the job mid-run, then start the same command again.
ARGS=(--config debug.toml --set name=preempt --set train.max_steps=400 --set log.every_steps=1 --set checkpoint.every_steps=1000)
"${SRUN[@]}" --job-name=ferroclip-preempt "$TRAINER" "${ARGS[@]}" >preempt.log 2>&1 &
srun_pid=$!
for _ in $(seq 1 600); do grep -q "step 3/400" preempt.log && break; sleep 0.2; done
scancel --signal=USR1 --name=ferroclip-preempt
rc=0
timeout 120 tail --pid=$srun_pid -f /dev/null || rc=$?
wait $srun_pid && rc=0 || rc=$?
if [[ $rc == 0 ]] && grep -q "stopping at step" preempt.log && ls runs/preempt/checkpoints/step_*.state.safetensors >/dev/null 2>&1; then
    stopped=$(grep -o "stopping at step [0-9]*" preempt.log | grep -o "[0-9]*$")
    echo "ok   SIGUSR1 -> checkpoint at step $stopped and a clean exit"
    run_case "requeued start resumes at step $stopped and finishes" ok 600 "resumed from" -- \
        "${SRUN[@]}" "$TRAINER" "${ARGS[@]}"
    expect_file "resumed run finished" runs/preempt/checkpoints/step_00000400.safetensors
else
    echo "FAIL preemption (exit $rc); output:"; sed 's/^/     | /' preempt.log
    FAILURES=$((FAILURES + 1))
fi
finish
