#!/usr/bin/env bash
# Runs sdk.js (QuickBlox's official JavaScript SDK) through `qbproxy demo
# --tls`: installs the SDK (npm ci), starts the demo on free ports, reads
# the URL and CA it prints, runs the script, stops the demo.
# Usage: examples/js-sdk/run.sh [path to the qbproxy binary]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${1:-$here/../../target/debug/qbproxy}"
[ -x "$bin" ] || { echo "no qbproxy binary at $bin (cargo build first)" >&2; exit 1; }
(cd "$here" && npm ci --no-audit --no-fund --loglevel=error)

out="$(mktemp)"
"$bin" demo --tls --listen 127.0.0.1:0 --admin 127.0.0.1:0 --chat 127.0.0.1:0 --chat-tcp 127.0.0.1:0 \
    > "$out" 2> "$out.log" &
demo=$!
trap 'kill $demo 2>/dev/null; wait $demo 2>/dev/null; rm -f "$out" "$out.log"' EXIT
for _ in $(seq 200); do
    grep -q "Ctrl-C stops the demo" "$out" && break
    kill -0 $demo 2>/dev/null || { cat "$out.log" >&2; exit 1; }
    sleep 0.1
done
grep -q "Ctrl-C stops the demo" "$out" || { echo "the demo did not start" >&2; cat "$out.log" >&2; exit 1; }
field() { awk -v k="$1" '$1 == k { print $2; exit }' "$out"; }
proxy="$(field proxy)"; ca="$(field ca)"; sim="$(field simulator)"; app="$(field application)"
chat_tcp="$(field chat-tcp)"
NODE_EXTRA_CA_CERTS="$ca" QB_API="${proxy#https://}" QB_APP_ID="$app" QB_SIM="$sim" \
    QB_CHAT_TCP="$chat_tcp" node "$here/sdk.js"
