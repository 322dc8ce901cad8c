#!/usr/bin/env bash
# Reload time for a pool of MEMBERS generated members (default 100,000),
# and the GETs answered while each reload runs (bench/reload.rs).
#
#   bench/reload.sh            MEMBERS=100000
#
# Writes bench/RELOAD-RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
MEMBERS=${MEMBERS:-100000}
cargo build --release --quiet --example reload-bench
table=$(target/release/examples/reload-bench "$MEMBERS")
{
    echo "# Reloading a large pool"
    echo
    echo "Measured $(date -u +%Y-%m-%d) on this project's $(nproc)-core machine with \`bench/reload.sh\` (MEMBERS=$MEMBERS):"
    echo "qbproxy in-process on a one-thread runtime (as with \`--threads 1\`) in front of the simulator,"
    echo "one client sending GETs back to back throughout. Pool members are not started, so no session is"
    echo "created; the reload's work is the config diff and the rebuild."
    echo
    echo "$table"
    echo
    echo "Before issue 11 the issue reported a pool of 25,000 members taking 3 s to reload and 100,000"
    echo "taking 81 s (a linear search per member), with every request waiting meanwhile on one thread."
} > bench/RELOAD-RESULTS.md
cat bench/RELOAD-RESULTS.md
