#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time and fails on any crash,
# panic, timeout (an input running over 10 s) or out-of-memory.
#
# Usage: ci/fuzz.sh [seconds per target]   (default 20)
# Environment: FUZZ_TOOLCHAIN (default nightly), FUZZ_SANITIZER (e.g. "none";
# default: cargo-fuzz's address sanitizer).
set -euo pipefail

secs="${1:-20}"
case "$secs" in
'' | *[!0-9]*)
    echo "usage: $0 [seconds per target]" >&2
    exit 2
    ;;
esac
toolchain="${FUZZ_TOOLCHAIN:-nightly}"
root="$(cd "$(dirname "$0")/.." && pwd)"

if ! rustup run "$toolchain" rustc --version >/dev/null 2>&1; then
    rustup toolchain install "$toolchain" --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

cd "$root/fuzz"
sanitizer=()
if [ -n "${FUZZ_SANITIZER:-}" ]; then
    sanitizer=(--sanitizer "$FUZZ_SANITIZER")
fi
cargo +"$toolchain" fuzz build "${sanitizer[@]}"
for target in $(cargo +"$toolchain" fuzz list); do
    echo "== $target: ${secs}s"
    cargo +"$toolchain" fuzz run "${sanitizer[@]}" "$target" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
done
echo "== every fuzz target ran ${secs}s without a crash"
