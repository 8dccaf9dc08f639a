#!/usr/bin/env bash
# The GPU bundle on a simulated bare GPU node (what keeps it working between GPU runs):
#  1. the release trainer NEEDs nothing but libtorch*, libc10*, glibc's libraries and the compiler's
#     runtime (readelf -d): no libjpeg, whose soname differs between distributions;
#  2. scripts/package-gpu makes a bundle of at most 48 MiB;
#  3. `run --rehearse RESULTS` passes inside a mount namespace where the checkout's .venv/ and
#     target/ are empty folders and libjpeg.so.62 is unreadable, under `env -i`, with a python3 that
#     imports torch (from a venv of its own, as a node's /opt/torch/.venv) but none of open_clip,
#     open_clip_train, ftfy, wcwidth, webdataset, braceexpand except through the bundle's site/;
#     RESULTS then holds at most 8 plain files of at most 16 MiB, no folders, env.txt among them.
# Needs root (unshare -m) and the release build (scripts/test makes it).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env"
cd "$FERROCLIP_ROOT"
ok() { echo "ok - $*"; }
die() { echo "not ok - $*" >&2; exit 1; }

trainer=target/release/trainer
[[ -x $trainer ]] || die "no $trainer: cargo build --release -p trainer first"

# 1. What the binary needs of the node's loader.
needs="$(readelf -d "$trainer" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')"
bad="$(grep -Ev '^(libtorch[^ ]*|libc10[^ ]*|libc\.so\.6|libm\.so\.6|libgcc_s\.so\.1|libstdc\+\+\.so\.6|ld-linux[^ ]*|libdl\.so\.2|libpthread\.so\.0|librt\.so\.1)$' <<<"$needs" || true)"
[[ -z "$bad" ]] || die "the release trainer NEEDs $(echo $bad)"
grep -q '^libtorch_cpu' <<<"$needs" || die "the release trainer does not NEED libtorch_cpu.so: $(echo $needs)"
ok "release trainer NEEDs only libtorch/c10, glibc and the compiler runtime: $(echo $needs)"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/bare-node.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

# 2. The bundle.
scripts/package-gpu "$tmp/bundle" 2>"$tmp/package.log" || { cat "$tmp/package.log" >&2; die "package-gpu failed"; }
size_kib="$(du -sk "$tmp/bundle" | cut -f1)"
(( size_kib <= 48 * 1024 )) || die "the bundle is $size_kib KiB, over 48 MiB"
[[ -x "$tmp/bundle/run" && -d "$tmp/bundle/site/open_clip" && -e "$tmp/bundle/site/braceexpand" || -e "$tmp/bundle/site/braceexpand.py" ]] ||
    die "the bundle lacks run or site/: $(ls "$tmp/bundle" "$tmp/bundle/site")"
"$tmp/bundle/run" --help | grep -q "logs.tgz" || die "run --help does not document its files"
ok "bundle: $((size_kib / 1024)) MiB (at most 48)"

# 3. The node's Python: a venv of its own whose site-packages links to .venv's packages, except the
# ones a bare node lacks; the links point into a folder that only the namespace below fills.
site_real="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
base_python="$(readlink -f .venv/bin/python)"
"$base_python" -m venv --without-pip "$tmp/node"
node_site="$("$tmp/node/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p "$tmp/real" "$tmp/empty" "$tmp/scratch"
for entry in "$site_real"/*; do
    name="$(basename "$entry")"
    case "$name" in
        open_clip*|ftfy*|wcwidth*|webdataset*|braceexpand*|__pycache__) continue ;;
    esac
    ln -s "$tmp/real/$name" "$node_site/$name"
done

jpeg="$(ls /usr/lib/*-linux-gnu/libjpeg.so.62 2>/dev/null | head -n 1 || true)"
unshare -m --propagation private bash -euo pipefail -c '
    tmp="$1"; root="$2"; site_real="$3"; jpeg="$4"
    mount --bind "$site_real" "$tmp/real"
    mount --bind "$tmp/empty" "$root/.venv"
    mount --bind "$tmp/empty" "$root/target"
    [[ -z "$jpeg" ]] || mount --bind /dev/null "$jpeg"
    exec env -i PATH="$tmp/node/bin:/usr/bin:/bin" HOME="$tmp/scratch" TMPDIR="$tmp/scratch" LANG=C.UTF-8 \
        "$tmp/bundle/run" --rehearse "$tmp/results"
' _ "$tmp" "$FERROCLIP_ROOT" "$site_real" "$jpeg" >"$tmp/run.log" 2>&1 || {
    cat "$tmp/run.log" >&2
    cat "$tmp/results/summary.txt" >&2 || true
    tar -xzOf "$tmp/results/logs.tgz" 2>/dev/null | tail -n 60 >&2 || true
    die "run --rehearse failed on the simulated bare node"
}

cd "$tmp/results"
files=(*)
(( ${#files[@]} <= 8 )) || die "RESULTS holds ${#files[@]} entries, more than 8: ${files[*]}"
for f in "${files[@]}"; do
    [[ -f "$f" && ! -L "$f" ]] || die "RESULTS/$f is not a plain file"
    (( $(stat -c %s "$f") <= 16 * 1024 * 1024 )) || die "RESULTS/$f is over 16 MiB"
done
for f in env.txt summary.txt report.md results.jsonl logs.tgz; do [[ -s "$f" ]] || die "RESULTS/$f missing or empty"; done
grep -q '^open_clip .*not importable' env.txt || die "the node's own python3 could import open_clip: $(grep open_clip env.txt)"
grep -q "^open_clip .*$tmp/bundle/site/open_clip" env.txt || die "site/'s open_clip was not the one imported"
grep -q 'CPU REHEARSAL' report.md || die "report.md does not say it was a CPU rehearsal"
! grep -q '^FAIL' summary.txt || die "a stage failed: $(grep '^FAIL' summary.txt)"
for s in demo-data train-debug resume-debug sync-debug dist-selftest numerics bench e2e-data e2e e2e-openclip; do
    grep -q "^PASS $s:" summary.txt || die "stage $s did not pass: $(cat summary.txt)"
done
grep -q '"check": *"normalize_erase"' results.jsonl || grep -q '"check":"normalize_erase"' results.jsonl ||
    die "no numerics result in results.jsonl"
grep -q '| ferroclip |.*| yes |' report.md && grep -q '| open_clip |.*| yes |' report.md ||
    die "the checkpointed benchmark rows are missing from report.md"
tar -tzf logs.tgz | grep -q 'logs/e2e-metrics.jsonl' || die "logs.tgz lacks the e2e run's metrics"
! tar -tzf logs.tgz | grep -qE '\.(tar|safetensors)$' || die "logs.tgz holds shards or checkpoints"
ok "run --rehearse on a simulated bare node: every stage passed, $(ls | wc -l) plain files in RESULTS"
echo "all cases passed"
