#!/usr/bin/env bash
# Before/after for a change: interleaved runs of two or more qbproxy binaries
# in front of bench/fast_upstream.rs, each reporting throughput and the CPU
# time it spent per request (user + system, from /proc/<pid>/stat). CPU per
# request is steadier than requests/s on a noisy machine.
#
#   cp target/release/qbproxy /tmp/qbproxy.before   # then change, rebuild
#   bench/compare.sh /tmp/qbproxy.before target/release/qbproxy
#
# An argument may start with environment settings, e.g. the floor (the least
# a hyper-based proxy does; bench/floor.rs) in both its modes:
#
#   cargo build --release --example floor
#   bench/compare.sh target/release/qbproxy target/release/examples/floor \
#       "FLOOR_MODE=bound target/release/examples/floor"
#
# An argument may also name its config with CONFIG=FILE (default
# bench/out/compare.toml, the access log on as by default; the script also
# writes bench/out/compare-no-access.toml, the same with [log] access =
# false). The access log's cost, off / on but filtered out / on and written:
#
#   bench/compare.sh "CONFIG=bench/out/compare-no-access.toml target/release/qbproxy" \
#       target/release/qbproxy "RUST_LOG=info target/release/qbproxy"
#
# qbproxy runs with RUST_LOG=warn unless the argument says otherwise; its
# log goes to /dev/null.
#
# REDIS_URL=redis://... also writes configs for the fleet's costs (below).
#
# UPSTREAM=https puts the fast upstream behind TLS, as QuickBlox is (then
# bench/out/compare-h1.toml is the same config with [upstream] http2 =
# false); SCENARIO=post2k sends POSTs of 2 KiB of JSON instead of small GETs,
# SCENARIO=big GETs of 256 KiB.
#
# `nginx` and `haproxy` as arguments put those in the same interleaved run,
# set up as bench/run.sh sets them up (the same job: a static QB-Token; its
# nginx or HAProxy worker's CPU is the one counted), e.g. the floor over
# HTTPS beside them:
#
#   UPSTREAM=https bench/compare.sh "CONFIG=bench/out/compare-no-access.toml target/release/qbproxy" \
#       "FLOOR_CA=bench/out/compare-ca.pem target/release/examples/floor" nginx haproxy
#
# ROUNDS=5 CONNS=50 by default. qbproxy on core 0, wrk and upstream on core 1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
CONNS=${CONNS:-50}
OUT=bench/out
mkdir -p "$OUT"
command -v wrk >/dev/null || { echo "compare.sh needs wrk (apt-get install wrk)" >&2; exit 1; }
cargo build --release --quiet --example fast-upstream
source bench/lib.sh
if [[ ${UPSTREAM:-http} == https ]]; then
    taskset -c 1 target/release/examples/fast-upstream 127.0.0.1:19443 "$OUT/compare-ca.pem" 2>/dev/null & pids+=($!)
    wait_port 19443
    fast_upstream_config "$OUT/compare.toml" https://127.0.0.1:19443 "$PWD/$OUT/compare-ca.pem"
else
    taskset -c 1 target/release/examples/fast-upstream 127.0.0.1:19000 2>/dev/null & pids+=($!)
    wait_port 19000
    fast_upstream_config "$OUT/compare.toml" http://127.0.0.1:19000
fi
{ cat "$OUT/compare.toml"; printf '[log]\naccess = false\n'; } > "$OUT/compare-no-access.toml"
sed '/^url = /a http2 = false' "$OUT/compare.toml" > "$OUT/compare-h1.toml"
# The fleet's costs: with REDIS_URL (a running Redis), compare-cluster.toml
# ([cluster], access log off), compare-cluster-rate.toml (plus a fleet-wide
# upstream.rate too high to wait) and compare-rate.toml (the same rate,
# local).
if [[ -n ${REDIS_URL:-} ]]; then
    { cat "$OUT/compare-no-access.toml"; printf '[cluster]\nredis_url = "%s"\n' "$REDIS_URL"; } > "$OUT/compare-cluster.toml"
    sed '/^url = /a rate = 1000000' "$OUT/compare-cluster.toml" > "$OUT/compare-cluster-rate.toml"
    sed '/^url = /a rate = 1000000' "$OUT/compare-no-access.toml" > "$OUT/compare-rate.toml"
fi
case ${SCENARIO:-get} in
    get) script=(); path=/users.json ;;
    post2k)
        printf 'wrk.method = "POST"\nwrk.body = string.rep("x", 2048)\nwrk.headers["Content-Type"] = "application/json"\n' > "$OUT/post2k.lua"
        script=(-s "$OUT/post2k.lua"); path=/data/Note.json ;;
    big) script=(); path=/big ;;
    *) echo "SCENARIO is get, post2k or big" >&2; exit 1 ;;
esac
# nginx and HAProxy run throughout; each qbproxy-like argument is started
# and stopped in its turn.
if [[ ${UPSTREAM:-http} == https ]]; then up_port=19443; else up_port=19000; fi
for bin in "$@"; do
    case $bin in
        nginx) command -v nginx >/dev/null || { echo "nginx: apt-get install nginx-light" >&2; exit 1; }
               start_nginx "${UPSTREAM:-http}" "$up_port" ;;
        haproxy) command -v haproxy >/dev/null || { echo "haproxy: apt-get install haproxy" >&2; exit 1; }
                 start_haproxy "${UPSTREAM:-http}" "$up_port" ;;
    esac
done
for round in $(seq "$ROUNDS"); do
    for bin in "$@"; do
        case $bin in
            nginx) qb=$NGINX_WORKER; port=19200 ;;
            haproxy) qb=$HAPROXY_PID; port=19300 ;;
            *)
                # shellcheck disable=SC2086 # split on purpose: VAR=value ... binary
                config=$(sed -n 's/.*CONFIG=\([^ ]*\).*/\1/p' <<< "$bin")
                RUST_LOG=warn taskset -c 0 env $bin --config "${config:-$OUT/compare.toml}" 2>/dev/null & qb=$!
                port=19100
                wait_port 19100 ;;
        esac
        load=("${script[@]}" "http://127.0.0.1:$port$path")
        taskset -c 1 wrk -t1 -c"$CONNS" -d2s "${load[@]}" > /dev/null
        t0=$(cpu_ticks "$qb")
        out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d5s "${load[@]}")
        t1=$(cpu_ticks "$qb")
        if [[ $port == 19100 ]]; then kill "$qb"; wait "$qb" 2>/dev/null || true; fi
        reqs=$(echo "$out" | awk '/requests in/ {print $1}')
        rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
        tick_us=$((1000000 / $(getconf CLK_TCK)))
        cpu=$(awk -v t=$((t1 - t0)) -v r="$reqs" -v u="$tick_us" 'BEGIN { printf "%.1f", t * u / r }')
        echo "round $round  ${bin// /_}  ${rps} req/s  ${cpu} µs CPU/request"
    done
done | sort -k3,3 -s
