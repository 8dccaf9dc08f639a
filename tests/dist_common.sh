# Shared by tests/dist_*.sh: the trainer binaries, free ports, the local Slurm, and small assertion
# helpers. Sourced, not run.
#
# Binaries: $TRAINER is the default build (no MPI linked: c10d's TCPStore, Gloo and NCCL), $TRAINER_MPI
# the `mpi` feature build (what `cargo test --features trainer/mpi` builds). Both are dev-profile builds
# sharing every dependency (the C++ shim, trainer/csrc, included: a crate without features), so the
# second costs one more compile of the trainer crate only.
# Ports: every rendezvous port is picked at random from $FERROCLIP_TEST_PORTS (default 20000-29999) and
# checked to be free, so concurrent test runs on one machine do not collide.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
FAILURES=0
SLURM_LOCAL=$REPO/scripts/slurm-local
MPIRUN=(mpirun --oversubscribe --bind-to none)
[[ $(id -u) == 0 ]] && MPIRUN+=(--allow-run-as-root)

# build_trainer NAME [FEATURES]: builds the trainer with FEATURES and hard-links it to
# $TARGET/dist-bin/trainer-NAME (cargo's own target/debug/trainer is whichever was built last).
build_trainer() {
    local name=$1 features=${2:-}
    mkdir -p "$TARGET/dist-bin"
    (cd "$REPO" && cargo build -q -p trainer --bin trainer ${features:+--features "$features"}) || {
        echo "FAIL: cannot build the trainer (${features:-default features})" >&2
        exit 1
    }
    ln -f "$TARGET/debug/trainer" "$TARGET/dist-bin/trainer-$name"
    echo "$TARGET/dist-bin/trainer-$name"
}

# free_port: a TCP port from $FERROCLIP_TEST_PORTS that nothing listens on.
free_port() {
    local range=${FERROCLIP_TEST_PORTS:-20000-29999} lo hi p
    lo=${range%-*}
    hi=${range#*-}
    for _ in $(seq 1 100); do
        p=$((lo + (RANDOM * 32768 + RANDOM) % (hi - lo + 1)))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    echo "no free port in $range" >&2
    return 1
}

# start_slurm: the one-node Slurm of scripts/slurm-local, started here unless it runs already (then
# stop_slurm leaves it running).
start_slurm() {
    eval "$("$SLURM_LOCAL" env)"
    if ! "$SLURM_LOCAL" status >/dev/null 2>&1; then
        "$SLURM_LOCAL" start >/dev/null
        STARTED_SLURM=1
    fi
}

stop_slurm() {
    if [[ -n ${STARTED_SLURM:-} ]]; then "$SLURM_LOCAL" stop >/dev/null; fi
}

# demo_data DIR: 4 small shards of the demo dataset and debug.toml pointing at them.
demo_data() {
    "$TRAINER" make-demo-data --out "$1/demo-data" --shards 4 --per-shard 64 2>/dev/null
    # model.arch is relative to the repository; the tests run elsewhere.
    sed -e 's/{00000..00007}/{00000..00003}/' -e "s|\"tests/models/|\"$REPO/tests/models/|" \
        "$REPO/configs/debug.toml" > "$1/debug.toml"
}

# run_case NAME EXPECT(ok|fail) MAX_SECONDS MUST_CONTAIN -- COMMAND...
# Runs COMMAND, checks its exit status, that it ended within MAX_SECONDS (a hung job is killed at
# 3x that) and that its output contains MUST_CONTAIN. With CASE_LOG=FILE set, keeps the output there.
run_case() {
    local name=$1 expect=$2 max=$3 needle=$4
    shift 5
    local out start end secs rc
    out=$(mktemp)
    start=$(date +%s.%N)
    timeout --kill-after=5 $((max * 3)) "$@" >"$out" 2>&1 && rc=0 || rc=$?
    end=$(date +%s.%N)
    secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
    local hung=0
    if [[ $rc == 124 || $rc == 137 ]] && awk -v s="$secs" -v m="$max" 'BEGIN { exit !(s >= 3 * m) }'; then hung=1; fi
    check_case "$name" "$expect" "$max" "$needle" "$rc" "$secs" "$out" "$hung"
    if [[ -n ${CASE_LOG:-} ]]; then mv "$out" "$CASE_LOG"; else rm -f "$out"; fi
}

# check_case NAME EXPECT MAX_SECONDS MUST_CONTAIN RC SECONDS OUTPUT_FILE HUNG(0|1): the verdict of run_case.
check_case() {
    local name=$1 expect=$2 max=$3 needle=$4 rc=$5 secs=$6 out=$7 hung=$8 why=""
    if [[ $expect == ok && $rc != 0 ]]; then why="exit status $rc, expected 0"; fi
    if [[ $expect == fail && $rc == 0 ]]; then why="exit status 0, expected a failure"; fi
    if [[ $hung == 1 ]]; then why="hung: killed after ${secs} s"; fi
    if [[ -z $why ]] && awk -v s="$secs" -v m="$max" 'BEGIN { exit !(s > m) }'; then why="took ${secs} s, limit ${max} s"; fi
    if [[ -z $why ]] && ! grep -qF -- "$needle" "$out"; then why="output lacks '$needle'"; fi
    if [[ -z $why ]]; then
        echo "ok   $name (${secs} s, exit $rc)"
    else
        echo "FAIL $name: $why; output:"
        sed 's/^/     | /' "$out"
        FAILURES=$((FAILURES + 1))
    fi
}

expect_file() { # expect_file NAME PATH
    if [[ -f $2 ]]; then echo "ok   $1"; else echo "FAIL $1: $2 missing"; FAILURES=$((FAILURES + 1)); fi
}

finish() {
    if [[ $FAILURES != 0 ]]; then
        echo "$FAILURES case(s) failed"
        exit 1
    fi
    echo "all cases passed"
}
