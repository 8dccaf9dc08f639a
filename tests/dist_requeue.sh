#!/usr/bin/env bash
# Requeue that requeues, on the local one-node Slurm: an sbatch job (2 ranks of the default-build
# trainer under `srun --kill-on-bad-exit=1`) is sent SIGUSR1 mid-run, as `--signal=USR1@120` does before
# the time limit. Every rank finishes its step, rank 0 writes a checkpoint and requeues the job itself
# (`scontrol requeue`); Slurm starts the batch script again, the run resumes from that checkpoint
# (`checkpoint.resume = "latest"`, decided by rank 0) and completes. Nobody calls sbatch a second time.
# Slurm keeps a requeued job pending for 120 s (Reason=BeginTime); to spare CI that wait, the test moves
# the requeued job's start time to now (`scontrol update StartTime=now`) once it is pending again.
#   tests/dist_requeue.sh          (needs scripts/install-system-deps)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/dist_common.sh"
TRAINER=$(build_trainer default)

WORK=$(mktemp -d)
JOB=""
cleanup() {
    [[ -n $JOB ]] && scancel "$JOB" 2>/dev/null || true
    stop_slurm
    rm -rf "$WORK"
}
trap cleanup EXIT
cd "$WORK"
demo_data "$WORK"
start_slurm

cat > requeue.sbatch <<EOF
#!/bin/bash
#SBATCH --job-name=ferroclip-requeue-test
#SBATCH --ntasks=2
#SBATCH --overcommit
#SBATCH --time=10
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=$WORK/job.out
set -euo pipefail
cd $WORK
echo "batch script start, restart \${SLURM_RESTART_COUNT:-0}"
srun --kill-on-bad-exit=1 $TRAINER --config debug.toml --set name=requeue --set train.max_steps=12 \
    --set log.every_steps=1 --set checkpoint.every_steps=1000
EOF
t0=$(date +%s)
JOB=$(MASTER_PORT=$(free_port) sbatch --parsable requeue.sbatch)
for _ in $(seq 1 600); do grep -q "step 3/12" job.out 2>/dev/null && break; sleep 0.2; done
scancel --signal=USR1 "$JOB"

# Wait for the job to finish (requeued, pending, running again, completed), at most 5 minutes.
state="" restarts="" hurried=""
for _ in $(seq 1 1500); do
    line=$(scontrol -o show job "$JOB" 2>/dev/null || true)
    state=$(grep -o "JobState=[A-Z_]*" <<<"$line" | cut -d= -f2)
    restarts=$(grep -o "Restarts=[0-9]*" <<<"$line" | cut -d= -f2)
    if [[ $state == PENDING && $restarts == 1 && -z $hurried ]]; then
        scontrol update JobId="$JOB" StartTime=now && hurried=1
    fi
    case $state in COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY) break ;; esac
    sleep 0.2
done
secs=$(( $(date +%s) - t0 ))
stopped=$(grep -o "stopping at step [0-9]*" job.out | head -1 | grep -o "[0-9]*$" || true)
why=""
[[ $state == COMPLETED ]] || why="job state ${state:-unknown}, expected COMPLETED"
[[ -z $why && $restarts == 1 ]] || why=${why:-"Restarts=$restarts, expected 1"}
[[ -z $why && -n $stopped ]] || why=${why:-"no preemption checkpoint"}
grep -q "requeued Slurm job $JOB" job.out || why=${why:-"rank 0 did not requeue the job"}
grep -q "resumed from .*step_$(printf %08d "${stopped:-0}").state.safetensors at step $stopped" job.out \
    || why=${why:-"the requeued run did not resume from step $stopped"}
[[ -f runs/requeue/checkpoints/step_00000012.safetensors ]] || why=${why:-"no final checkpoint"}
if [[ -z $why ]]; then
    echo "ok   sbatch job: SIGUSR1 at step $stopped -> checkpoint, requeued by rank 0, resumed, completed (${secs} s)"
    JOB=""
else
    echo "FAIL sbatch requeue: $why; job output:"
    sed 's/^/     | /' job.out
    FAILURES=$((FAILURES + 1))
fi
finish
