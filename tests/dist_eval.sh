#!/usr/bin/env bash
# Evaluation shared by all ranks, with the real `trainer` under OpenMPI's mpirun:
#  - `trainer eval` at 2 and 3 ranks gives exactly one process's results (zero-shot on shards and
#    on a class folder, retrieval, validation loss), also when a rank owns no shard;
#  - the evaluation at the end of a 2-rank training run logs exactly what `trainer eval` computes
#    for the checkpoint it saved.
#   tests/dist_eval.sh          (needs scripts/install-system-deps)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/dist_common.sh"
TRAINER=$(build_trainer default)

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
"$TRAINER" make-demo-data --out demo-data --shards 2 --per-shard 64 2>/dev/null
# Each mpirun job meets on a free rendezvous port (`env MASTER_PORT=...`); strict device mode
# (eval.toml): control data on the device path (the stop vote, row counts) would end the job.

# One libtorch thread per rank everywhere: the same kernels, so the same bits.
cat > eval.toml <<EOF
name = "train"
output_dir = "runs"
seed = 1
[model]
arch = "$REPO/tests/models/convnext_test.json"
image_size = 32
[data]
train = "demo-data/train/{00000..00001}.tar"
batch_size = 16
workers = 1
readers = 1
shuffle_buffer = 64
# Sequential (not resampled) data on several ranks fixes the epoch length: both shards.
train_num_samples = 128
[train]
max_steps = 20
threads = 1
[optim]
lr = 2e-3
[schedule]
warmup_steps = 2
[checkpoint]
every_steps = 0
[log]
every_steps = 10
[eval]
zeroshot_data = "demo-data/eval/{00000..00001}.tar"
zeroshot_classnames = "demo-data/classnames.txt"
zeroshot_templates = "demo-data/templates.txt"
retrieval_data = "demo-data/eval/{00000..00001}.tar"
val_data = "demo-data/eval/{00000..00001}.tar"
batch_size = 24
[dist]
strict_device = true
EOF

# A class folder set from the second eval shard: folders named by class, in no useful order.
mkdir raw
tar -xf demo-data/eval/00001.tar -C raw
mapfile -t NAMES < demo-data/classnames.txt
for cls in raw/*.cls; do
    key=$(basename "$cls" .cls)
    mkdir -p "classes/${NAMES[$(cat "$cls")]}"
    cp "raw/$key.jpg" "classes/${NAMES[$(cat "$cls")]}/"
done

run_case "mpirun -np 2 trainer (evaluation at the end on both ranks)" ok 300 "zeroshot_top1" -- \
    env MASTER_PORT="$(free_port)" "${MPIRUN[@]}" -np 2 "$TRAINER" --config eval.toml
MODEL=runs/train/checkpoints/step_00000020.safetensors

# same_json NAME A B: the flat results are equal, key by key, exactly.
same_json() {
    local why
    if why=$(python3 - "$2" "$3" <<'EOF'
import json, sys
def load(path):
    text = open(path).read().strip().splitlines()
    # metrics.jsonl: the eval record (keys `eval/...`); --out: one object.
    if path.endswith(".jsonl"):
        rec = [json.loads(l) for l in text if '"eval/' in l][-1]
        return {k[5:]: v for k, v in rec.items() if k.startswith("eval/")}
    return json.loads("\n".join(text))
a, b = load(sys.argv[1]), load(sys.argv[2])
if not a or a.keys() != b.keys():
    sys.exit(f"keys differ: {sorted(a)} vs {sorted(b)}")
diff = [f"{k}: {a[k]!r} vs {b[k]!r}" for k in a if float(a[k]) != float(b[k])]
if diff:
    sys.exit("; ".join(diff))
print(f"{len(a)} results equal")
EOF
    ); then
        echo "ok   $1 ($why)"
    else
        echo "FAIL $1: $why"
        FAILURES=$((FAILURES + 1))
    fi
}

EVAL=(eval --config eval.toml --checkpoint "$MODEL")
run_case "trainer eval, one process" ok 120 "zeroshot_top1" -- "$TRAINER" "${EVAL[@]}" --out r1.json
same_json "the 2-rank training run logged what one process computes" runs/train/metrics.jsonl r1.json
for np in 2 3; do
    run_case "mpirun -np $np trainer eval" ok 120 "zeroshot_top1" -- env MASTER_PORT="$(free_port)" "${MPIRUN[@]}" -np "$np" "$TRAINER" "${EVAL[@]}" --out "r$np.json"
    # 2 eval shards: at 3 ranks, rank 2 owns only a chunk of the classifier.
    same_json "$np ranks evaluate exactly as one" r1.json "r$np.json"
done

FOLDER=(--set eval.zeroshot_data=classes --set eval.zeroshot_classnames= --set eval.retrieval_data= --set eval.val_data=)
run_case "trainer eval on a class folder, one process" ok 120 "zeroshot_top1" -- "$TRAINER" "${EVAL[@]}" "${FOLDER[@]}" --out f1.json
for np in 2 3; do
    run_case "mpirun -np $np trainer eval on a class folder" ok 120 "zeroshot_top1" -- \
        env MASTER_PORT="$(free_port)" "${MPIRUN[@]}" -np "$np" "$TRAINER" "${EVAL[@]}" "${FOLDER[@]}" --out "f$np.json"
    same_json "$np ranks evaluate a class folder exactly as one" f1.json "f$np.json"
done
finish
