#!/usr/bin/env bash
# A failing or hung rank ends the whole job quickly, with a non-zero exit and an error naming the rank;
# the real `trainer` (default build, Gloo) on 3 ranks under srun and under mpirun:
#  - SIGKILL of rank 1 mid-training: the job ends within 10 s;
#  - SIGSTOP of rank 1 (what a stuck filesystem read or a wedged GPU looks like) with
#    dist.heartbeat_timeout_s at its default of 60: the job ends within 90 s, rank 0 naming rank 1;
#  - rank 1 fails during set-up (train.device = "cuda" on a rank without a GPU): the job ends within 30 s;
#  - rank 1 waits for data that never comes (`pipe:sleep`) with dist.step_timeout_s = 8: the progress
#    watchdog ends the job, saying that rank 1 is waiting for data.
# srun runs with --kill-on-bad-exit=0 where the ranks themselves must end the job (the killed rank's
# peers see its sockets close; a failed set-up posts the job's abort notice), and with
# --kill-on-bad-exit=1, as the sbatch scripts do, for the stopped rank, which only the launcher can end.
# The two SIGSTOP jobs wait out the heartbeat timeout in the background while the other cases run.
#   tests/dist_faults.sh          (needs scripts/install-system-deps)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/dist_common.sh"
TRAINER=$(build_trainer default)

WORK=$(mktemp -d)
JOBS=()
cleanup() {
    for pid in "${JOBS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    stop_slurm
    rm -rf "$WORK"
}
trap cleanup EXIT
cd "$WORK"
demo_data "$WORK"
start_slurm
LONG=(--config debug.toml --set train.max_steps=100000 --set log.every_steps=1 --set checkpoint.every_steps=0)

# start_job NAME LAUNCHER SRUN_KILL_ON_BAD_EXIT ARGS...: 3 ranks in the background; rank r writes its pid
# to NAME.pid.r; output in NAME.log; the launcher's pid in NAME.job.
start_job() {
    local name=$1 launcher=$2 kill_on_bad_exit=$3
    shift 3
    local rank_var cmd
    case $launcher in
        srun) cmd=(srun -n 3 --overcommit --kill-on-bad-exit="$kill_on_bad_exit" --time=10) rank_var=SLURM_PROCID ;;
        mpirun) cmd=("${MPIRUN[@]}" -np 3) rank_var=OMPI_COMM_WORLD_RANK ;;
    esac
    MASTER_PORT=$(free_port) "${cmd[@]}" bash -c "echo \$\$ > $name.pid.\$$rank_var; exec $TRAINER \"\$@\"" trainer "$@" \
        >"$name.log" 2>&1 &
    echo $! > "$name.job"
    JOBS+=($!)
}

wait_for_step() { # wait_for_step NAME STEP: until the log shows that step (at most 120 s)
    for _ in $(seq 1 600); do grep -q "step $2/" "$1.log" 2>/dev/null && return 0; sleep 0.2; done
    echo "FAIL $1: never reached step $2; output:"; sed 's/^/     | /' "$1.log"
    FAILURES=$((FAILURES + 1))
    return 1
}

# expect_end CASE MAX_SECONDS MUST_CONTAIN START JOB: the job started as JOB ends non-zero within
# MAX_SECONDS of START (date +%s.%N) and its output names the rank.
expect_end() {
    local case=$1 max=$2 needle=$3 start=$4 name=$5 pid rc=0 hung=0
    pid=$(cat "$name.job")
    timeout $((max * 2)) tail --pid="$pid" -f /dev/null || true
    if kill -0 "$pid" 2>/dev/null; then
        hung=1
        kill -KILL "$pid"
    fi
    wait "$pid" && rc=0 || rc=$?
    local secs
    secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    check_case "$case" fail "$max" "$needle" "$rc" "$secs" "$name.log" "$hung"
}

# SIGSTOP first, in the background: each takes the heartbeat timeout.
for launcher in srun mpirun; do
    start_job "sigstop_$launcher" "$launcher" 1 "${LONG[@]}" --set name="stop_$launcher"
done
declare -A STOPPED_AT
for launcher in srun mpirun; do
    wait_for_step "sigstop_$launcher" 2 || continue
    kill -STOP "$(cat "sigstop_$launcher.pid.1")"
    STOPPED_AT[$launcher]=$(date +%s.%N)
done

for launcher in srun mpirun; do
    start_job "sigkill_$launcher" "$launcher" 0 "${LONG[@]}" --set name="kill_$launcher"
    if wait_for_step "sigkill_$launcher" 2; then
        t=$(date +%s.%N)
        kill -KILL "$(cat "sigkill_$launcher.pid.1")"
        case $launcher in srun) needle="task 1" ;; mpirun) needle="rank 1" ;; esac
        expect_end "SIGKILL of rank 1 under $launcher -> the job ends" 10 "$needle" "$t" "sigkill_$launcher"
    fi

    # Rank 1 alone asks for a GPU it does not have.
    t=$(date +%s.%N)
    case $launcher in
        srun) cmd=(srun -n 3 --overcommit --kill-on-bad-exit=0 --time=10) rank_var=SLURM_PROCID ;;
        mpirun) cmd=("${MPIRUN[@]}" -np 3) rank_var=OMPI_COMM_WORLD_RANK ;;
    esac
    MASTER_PORT=$(free_port) run_case "$launcher: rank 1 fails during set-up -> the job ends" fail 30 \
        "ending the job: rank 1 of 3 failed: train.device = \"cuda\"" -- "${cmd[@]}" bash -c \
        "if [ \$$rank_var = 1 ]; then set -- \"\$@\" --set train.device=cuda; fi; exec $TRAINER \"\$@\"" trainer \
        "${LONG[@]}" --set name="setup_$launcher"
done

MASTER_PORT=$(free_port) run_case "mpirun: rank 1 gets no data -> the progress watchdog names it" fail 40 \
    "rank 1 is waiting for data after step 0" -- "${MPIRUN[@]}" -np 2 bash -c \
    "if [ \$OMPI_COMM_WORLD_RANK = 1 ]; then set -- \"\$@\" --set 'data.train=pipe:sleep 3600 {0..1}'; fi; exec $TRAINER \"\$@\"" \
    trainer "${LONG[@]}" --set name=stall --set dist.step_timeout_s=8

for launcher in srun mpirun; do
    [[ -n ${STOPPED_AT[$launcher]:-} ]] || continue
    expect_end "SIGSTOP of rank 1 under $launcher -> the job ends" 90 "rank 1 stopped responding: no heartbeat for" \
        "${STOPPED_AT[$launcher]}" "sigstop_$launcher"
    kill -CONT "$(cat "sigstop_$launcher.pid.1")" 2>/dev/null || true
done
finish
