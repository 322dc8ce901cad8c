#!/usr/bin/env bash
# The test suite RUNS times in a row (default 20) with every core kept busy
# by stress-ng, to show no test leans on timing. Installs stress-ng if
# missing (Debian package). Builds once, then runs `cargo test` each time.
#
#   bench/stress.sh            RUNS=20
#
# Writes bench/STRESS-RESULTS.md; exits non-zero if any run failed.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-20}
mkdir -p bench/out
command -v stress-ng >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq stress-ng
}
cargo test --no-run --quiet 2>/dev/null
cores=$(nproc)
stress-ng --cpu "$cores" --cpu-method matrixprod --quiet &
stress=$!
trap 'kill $stress 2>/dev/null || true' EXIT
passed=0
failures=()
started=$(date +%s)
for i in $(seq "$RUNS"); do
    if cargo test --quiet > "bench/out/stress-$i.log" 2>&1; then
        passed=$((passed + 1))
    else
        failures+=("run $i: $(grep -E '^test .* FAILED|panicked' "bench/out/stress-$i.log" | head -3 | tr '\n' ' ')")
    fi
done
took=$(( $(date +%s) - started ))
tests=$(grep -hoE 'test result: ok\. [0-9]+ passed' bench/out/stress-1.log | awk '{s += $4} END {print s}')
{
    echo "# The suite under load"
    echo
    echo "Measured $(date -u +%Y-%m-%d) on this project's ${cores}-core machine with \`bench/stress.sh\` (RUNS=$RUNS):"
    echo "\`cargo test\` ($tests tests) run $RUNS times in a row while \`stress-ng --cpu $cores\` keeps every core busy."
    echo
    echo "**$passed of $RUNS runs passed** in ${took} s."
    for f in "${failures[@]}"; do echo "- $f"; done
} > bench/STRESS-RESULTS.md
cat bench/STRESS-RESULTS.md
[[ $passed -eq $RUNS ]]
