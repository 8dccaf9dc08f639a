# Shared by tests/dist_*.sh: builds the dist_selftest example and gives small assertion helpers.
# Sourced, not run.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
FEATURES=${FERROCLIP_DIST_FEATURES:-mpi}
SELFTEST=$TARGET/debug/examples/dist_selftest
FAILURES=0

build_selftest() {
    (cd "$REPO" && cargo build -q -p trainer --example dist_selftest --features "$FEATURES") || {
        echo "FAIL: cannot build the dist_selftest example" >&2
        exit 1
    }
}

# run_case NAME EXPECT(ok|fail) MAX_SECONDS MUST_CONTAIN -- COMMAND...
# Runs COMMAND, checks its exit status, that it ended within MAX_SECONDS (a hung job is killed at
# 3x that) and that its output contains MUST_CONTAIN.
run_case() {
    local name=$1 expect=$2 max=$3 needle=$4
    shift 5
    local out start end secs rc
    out=$(mktemp)
    start=$(date +%s.%N)
    timeout --kill-after=5 $((max * 3)) "$@" >"$out" 2>&1 && rc=0 || rc=$?
    end=$(date +%s.%N)
    secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
    local why=""
    if [[ $expect == ok && $rc != 0 ]]; then why="exit status $rc, expected 0"; fi
    if [[ $expect == fail && $rc == 0 ]]; then why="exit status 0, expected a failure"; fi
    if [[ $rc == 124 || $rc == 137 ]]; then why="hung: killed after $((max * 3)) s"; fi
    if [[ -z $why ]] && awk -v s="$secs" -v m="$max" 'BEGIN { exit !(s > m) }'; then why="took ${secs} s, limit ${max} s"; fi
    if [[ -z $why ]] && ! grep -qF -- "$needle" "$out"; then why="output lacks '$needle'"; fi
    if [[ -z $why ]]; then
        echo "ok   $name (${secs} s, exit $rc)"
    else
        echo "FAIL $name: $why; output:"
        sed 's/^/     | /' "$out"
        FAILURES=$((FAILURES + 1))
    fi
    rm -f "$out"
}

finish() {
    if [[ $FAILURES != 0 ]]; then
        echo "$FAILURES case(s) failed"
        exit 1
    fi
    echo "all cases passed"
}
