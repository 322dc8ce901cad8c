#!/usr/bin/env bash
# Runs sdk.js (QuickBlox's official JavaScript SDK, in Node) and browser.js
# (its browser build, in headless Chromium) through `qbproxy demo --tls`:
# installs the SDK (npm ci), starts the demo on free ports, reads the URLs
# and CA it prints, runs both, stops the demo.
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
chat_tcp="$(field chat-tcp)"; chat_ws="$(field chat)"
NODE_EXTRA_CA_CERTS="$ca" QB_API="${proxy#https://}" QB_APP_ID="$app" QB_SIM="$sim" \
    QB_CHAT_TCP="$chat_tcp" node "$here/sdk.js"
# The browser build in headless Chromium, chat over wss:// (Debian's
# chromium and libnss3-tools; .ci/run installs them). Chromium trusts the
# demo's CA the way a user installs one: in the NSS database of its home.
for tool in "${CHROMIUM:-chromium}" certutil; do
    command -v "$tool" >/dev/null \
        || { echo "FAIL browser: no $tool (apt-get install chromium libnss3-tools)" >&2; exit 1; }
done
home="$(mktemp -d)"
trap 'kill $demo 2>/dev/null; wait $demo 2>/dev/null; rm -rf "$out" "$out.log" "$home"' EXIT
mkdir -p "$home/.pki/nssdb"
certutil -d "sql:$home/.pki/nssdb" -N --empty-password
certutil -d "sql:$home/.pki/nssdb" -A -t "C,," -n "qbproxy demo CA" -i "$ca"
HOME="$home" QB_CHAT_WS="$chat_ws" QB_APP_ID="$app" node "$here/browser.js"
