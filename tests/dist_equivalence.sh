#!/usr/bin/env bash
# W ranks train exactly what one process trains: the real `trainer` binary (default build, Gloo, no MPI
# linked) at 2 and 8 ranks (oversubscribed on a small machine) under srun and at 3 under mpirun, against
# one process fed the concatenated batches. `dist.test_slices` makes every rank read the one-process
# stream at W x the batch and keep its own slice, so rank r of W sees rows r*B/W .. (r+1)*B/W of the
# one-process batch B = 24. All runs use `dist.strict_device` (control data on the device path fails).
#
# Pass: every final weight within 1e-6 of the one-process run, with the bucketed gradient all-reduce
# overlapped with backward (buckets of 0.5 MB, so there are several) and not overlapped; and the two
# bit for bit equal. The check is sensitive: a run on rank 0's slice alone differs by far more.
#
# The optimizer is AdamW with eps = 1: its update is then linear in the gradient, so the float rounding
# by which a W-rank sum differs from a one-process sum (1e-8 relative) stays far below 1e-6. With a
# small eps, Adam's m/sqrt(v) scales the rounding noise of gradients that are zero in exact arithmetic
# (the attention key bias: softmax ignores a constant added to every logit) up to a full +-lr step in a
# random direction, in any two runs, distributed or not.
#   tests/dist_equivalence.sh          (needs scripts/install-system-deps)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/dist_common.sh"
TRAINER=$(build_trainer default)
PY=$REPO/.venv/bin/python

WORK=$(mktemp -d)
cleanup() {
    stop_slurm
    rm -rf "$WORK"
}
trap cleanup EXIT
cd "$WORK"
demo_data "$WORK"
cat > eq.toml <<EOF
name = "one_process"
output_dir = "runs"
seed = 1

[model]
arch = "$REPO/tests/models/convnext_test.json"
image_size = 32
drop_path = 0.0

[data]
train = "demo-data/train/{00000..00003}.tar"
batch_size = 24
workers = 1
readers = 1
shuffle_buffer = 50

[train]
max_steps = 3
threads = 1

[optim]
lr = 0.05
eps = 1.0

[schedule]
warmup_steps = 1

[checkpoint]
every_steps = 0
keep = 1

[log]
every_steps = 1

[dist]
test_slices = true
strict_device = true
bucket_mb = 0.5
EOF
final() { echo "runs/$1/checkpoints/step_00000003.safetensors"; }

run_case "one process, batch 24" ok 120 "step 3/3" -- "$TRAINER" --config eq.toml
run_case "one process on rank 0's slice only (the check must see it)" ok 120 "step 3/3" -- \
    "$TRAINER" --config eq.toml --set name=half --set dist.test_slices=false --set data.batch_size=12
if "$PY" "$REPO/tests/compare_weights.py" "$(final one_process)" "$(final half)" 1e-4 >/dev/null; then
    echo "FAIL the comparison cannot tell a run on half the data from the full one"
    FAILURES=$((FAILURES + 1))
else
    echo "ok   a run on half the data differs by more than 1e-4"
fi

start_slurm
compare() { # compare NAME A B TOL
    local out
    if out=$("$PY" "$REPO/tests/compare_weights.py" "$2" "$3" "$4" 2>&1); then
        echo "ok   $1: $out"
    else
        echo "FAIL $1: $out"
        FAILURES=$((FAILURES + 1))
    fi
}
# One launcher per world size: what differs between launchers (the rendezvous) is tested by
# dist_slurm.sh, dist_mpirun.sh and dist_train.sh; the sum over ranks does not depend on it.
for world in 2 3 8; do
    batch=$((24 / world))
    launchers=srun
    [[ $world == 3 ]] && launchers=mpirun
    for launcher in $launchers; do
        for overlap in true false; do
            name=${launcher}_${world}_overlap_${overlap}
            port=$(free_port)
            case $launcher in
                srun) cmd=(srun -n "$world" --overcommit --kill-on-bad-exit=1 --time=10) ;;
                mpirun) cmd=("${MPIRUN[@]}" -np "$world") ;;
            esac
            CASE_LOG=$name.log MASTER_PORT=$port run_case "$launcher, $world ranks of batch $batch, overlap $overlap" ok 240 \
                "step 3/3" -- "${cmd[@]}" "$TRAINER" --config eq.toml --set name="$name" --set data.batch_size=$batch \
                --set dist.overlap=$overlap
            # With overlap, some of the 6 buckets must have started while backward was still running.
            started=$(grep -o "[0-9]* of them started during backward" "$name.log" | grep -o "^[0-9]*" || echo none)
            if [[ $overlap == true && ( $started == none || $started == 0 ) ]] || [[ $overlap == false && $started != 0 ]]; then
                echo "FAIL $name: $started bucket(s) started during backward"
                FAILURES=$((FAILURES + 1))
            fi
            compare "$launcher, $world ranks, overlap $overlap = one process" "$(final one_process)" "$(final "$name")" 1e-6
        done
        compare "$launcher, $world ranks: overlapped = not overlapped, bit for bit" \
            "$(final "${launcher}_${world}_overlap_true")" "$(final "${launcher}_${world}_overlap_false")" 0
    done
done
grep -h "started during backward" srun_8_overlap_true.log || true
finish
