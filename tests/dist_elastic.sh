#!/usr/bin/env bash
# Elastic resume with the trainer binary: a checkpoint written by W ranks resumes on W' != W
# (2 -> 1 and 1 -> 3, started with mpirun), in sequential and in resampled mode:
#  - optimizer, schedule and counters continue: the resumed run logs step N+1 at the learning rate
#    of step N+1 with samples_seen = the checkpoint's + its own global batch, and its last
#    checkpoint holds the optimizer's full step count;
#  - sequential mode: every sample of epoch 0 is trained on exactly once across the change (every
#    rank logs its keys, log.sample_keys, and each is counted), and at every step all ranks are
#    in the same epoch;
#  - resampled mode: epoch 0 ends on the new ranks where its sample count (train_num_samples) says.
# Also: a changed data stream is refused naming the key, and a `pipe:` shard that never sends a
# byte costs data.read_timeout_s, not the run.
#   tests/dist_elastic.sh          (needs scripts/install-system-deps)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/dist_common.sh"
TRAINER=$(build_trainer default)

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
# 18 shards x 16 samples = 288, one epoch; batches of 8.
"$TRAINER" make-demo-data --out data --shards 18 --per-shard 16 2>/dev/null
cat > elastic.toml <<EOF
output_dir = "runs"
seed = 1

[model]
arch = "$REPO/tests/models/convnext_test.json"
image_size = 32

[data]
train = "data/train/{00000..00017}.tar"
batch_size = 8
workers = 1
readers = 2
shuffle_buffer = 20
train_num_samples = 288

[train]
threads = 1

[optim]
lr = 1e-3

[schedule]
warmup_steps = 2

[checkpoint]
every_steps = 0
keep = 0
resume = "latest"

[log]
every_steps = 1
sample_keys = true
EOF

launch() { # launch N: the command that starts N ranks (each launch on a free rendezvous port)
    if [[ $1 == 1 ]]; then
        LAUNCH=("$TRAINER")
    else
        LAUNCH=(env MASTER_PORT="$(free_port)" "${MPIRUN[@]}" -np "$1" "$TRAINER")
    fi
}

# check_run NAME MODE W CUT W2 TOTAL: the checks listed at the top, on runs/NAME.
check_run() {
    local out
    if out=$(python3 - "$@" <<'EOF'
import json, math, os, struct, sys
name, mode, w, cut, w2, total = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
run, batch, epoch = f"runs/{name}", 8, 288
problems = []
records = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
steps = [r["step"] for r in records]
if steps != list(range(1, total + 1)):
    problems.append(f"logged steps {steps[:3]}...{steps[-3:]}, expected 1..{total}")
first = next(r for r in records if r["step"] == cut + 1)
want_seen = cut * batch * w + batch * w2
if first["samples_seen"] != want_seen:
    problems.append(f"samples_seen at step {cut + 1} is {first['samples_seen']}, expected {want_seen}")
# OpenCLIP's cosine_lr at 0-based step `cut` of `total`, warmup 2, base 1e-3.
want_lr = 0.5 * (1 + math.cos(math.pi * (cut - 2) / (total - 2))) * 1e-3
if abs(first["lr"] - want_lr) > 1e-12:
    problems.append(f"lr at step {cut + 1} is {first['lr']}, the schedule says {want_lr}")
with open(f"{run}/checkpoints/step_{total:08d}.state.safetensors", "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    meta = json.loads(f.read(n))["__metadata__"]
counters = json.loads(meta["counters"])
final_seen = want_seen + (total - cut - 1) * batch * w2
if (int(meta["optimizer_step"]), counters["step"], counters["samples_seen"]) != (total, total, final_seen):
    problems.append(f"final state: optimizer_step {meta['optimizer_step']}, counters {counters}")
lines = []
for f in sorted(os.listdir(f"{run}/sample_keys")):
    rank = int(f[len("rank"):-len(".tsv")])
    for l in open(f"{run}/sample_keys/{f}"):
        step, ep, key = l.split()
        lines.append((rank, int(step), int(ep), key))
by_step = {}
for rank, step, ep, key in lines:
    by_step.setdefault(step, set()).add(ep)
mixed = sorted(s for s, eps in by_step.items() if len(eps) > 1)
if mixed:
    problems.append(f"ranks in different epochs at steps {mixed}")
taken = cut * batch * w
end = cut + math.ceil((epoch - taken) / (batch * w2))
first_epoch1 = min(s for s, eps in by_step.items() if 1 in eps)
if first_epoch1 != end + 1:
    problems.append(f"epoch 1 starts at step {first_epoch1}, expected {end + 1}")
if mode == "seq":
    counts = {}
    for _, _, ep, key in lines:
        if ep == 0:
            counts[key] = counts.get(key, 0) + 1
    wrong = {k: n for k, n in counts.items() if n != 1}
    if len(counts) != epoch or wrong:
        some = dict(list(wrong.items())[:5])
        problems.append(f"epoch 0 saw {len(counts)} distinct samples of {epoch}; not exactly once: {some}")
print("; ".join(problems))
sys.exit(1 if problems else 0)
EOF
    ); then
        local once=""
        [[ $2 == seq ]] && once=", each sample of epoch 0 once"
        echo "ok   $1: counters, schedule, optimizer and data stream continue$once"
    else
        echo "FAIL $1: $out"
        FAILURES=$((FAILURES + 1))
    fi
}

# elastic MODE W CUT W2 TOTAL: train CUT steps on W ranks, then resume on W2 ranks up to step TOTAL.
elastic() {
    local mode=$1 w=$2 cut=$3 w2=$4 total=$5
    local name="$mode-$w-to-$w2"
    local args=(--config elastic.toml --set "name=$name")
    [[ $mode == res ]] && args+=(--set data.resampled=true)
    launch "$w"
    run_case "$name: $w rank(s) train $cut steps" ok 240 "step $cut/$cut" -- \
        "${LAUNCH[@]}" "${args[@]}" --set "train.max_steps=$cut"
    launch "$w2"
    run_case "$name: resumed on $w2 rank(s)" ok 240 "written by $w ranks, now $w2" -- \
        "${LAUNCH[@]}" "${args[@]}" --set "train.max_steps=$total"
    check_run "$name" "$mode" "$w" "$cut" "$w2" "$total"
}

# 2 -> 1 after 6 steps (96 samples): 24 steps finish epoch 0 (step 30). 1 -> 3 after 12 steps
# (96 samples): 8 steps of 3 x 8 finish it (step 20). Each run goes one step into epoch 1.
elastic seq 2 6 1 31
elastic seq 1 12 3 21
elastic res 2 6 1 31
elastic res 1 12 3 21

# Unequal shards (3 of 16 samples, 3 of 40): each rank yields ceil(168 / (8 x 2)) = 11 batches per
# epoch whatever its shards hold, so at every step both ranks are in the same epoch.
"$TRAINER" make-demo-data --out data40 --shards 3 --per-shard 40 2>/dev/null
launch 2
run_case "unequal shards: 2 ranks train 25 steps" ok 240 "step 25/25" -- "${LAUNCH[@]}" --config elastic.toml \
    --set name=unequal --set train.max_steps=25 --set data.train_num_samples=168 \
    --set "data.train=data/train/{00000..00002}.tar::data40/train/{00000..00002}.tar"
if out=$(python3 - <<'EOF'
import os
epochs = {}
for f in os.listdir("runs/unequal/sample_keys"):
    for l in open(f"runs/unequal/sample_keys/{f}"):
        step, ep, _ = l.split()
        epochs.setdefault(int(step), set()).add(int(ep))
wrong = {s: sorted(e) for s, e in sorted(epochs.items()) if e != {(s - 1) // 11}}
if wrong or len(epochs) != 25:
    print(f"{len(epochs)} steps logged; steps whose ranks are not all in epoch (step - 1) // 11: {wrong}")
EOF
) && [[ -z $out ]]; then
    echo "ok   unequal shards: at every step both ranks are in the same epoch, epochs of 11 steps"
else
    echo "FAIL unequal shards: $out"
    FAILURES=$((FAILURES + 1))
fi

run_case "a changed data stream is refused, naming the key" fail 120 "data.readers" -- \
    "$TRAINER" --config elastic.toml --set name=seq-1-to-3 --set train.max_steps=30 --set data.readers=3

# A shard whose command never sends a byte, first for reader 0, among good ones: the other reader
# goes on meanwhile, and once its 9 shards (144 samples) are used up, the stalled one is abandoned
# after the timeout and training goes on with reader 0's next shards. The command is ended (its
# `sleep` carries a marker argument to find it by).
marker="sleep 3600 0.000$$"
run_case "a stalled pipe: shard costs data.read_timeout_s, not the run" ok 120 "no progress for 2 s" -- \
    "$TRAINER" --config elastic.toml --set name=stall --set train.max_steps=30 --set data.read_timeout_s=2 \
    --set "data.train=pipe:$marker; true::data/train/{00000..00017}.tar" --set data.shuffle_shards=false \
    --set log.sample_keys=false
lingering=0
for f in /proc/[0-9]*/cmdline; do
    [[ $(tr '\0' ' ' <"$f" 2>/dev/null) == *"$marker"* ]] && lingering=1
done
if [[ $lingering == 1 ]]; then
    echo "FAIL the stalled pipe: command still runs"; FAILURES=$((FAILURES + 1))
else
    echo "ok   the stalled pipe: command was ended"
fi
finish
