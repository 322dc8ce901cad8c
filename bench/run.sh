#!/usr/bin/env bash
# qbproxy against nginx and HAProxy doing the same job (a static QB-Token
# header in front of QuickBlox), and against no proxy at all.
#
#   bench/run.sh                       DURATION=5s ROUNDS=2 by default
#
# Each proxy gets core 0 (taskset); wrk and the upstream share core 1. Runs
# are interleaved (qbproxy, nginx, haproxy, direct; again), because the
# machine is noisy. Writes bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-5s}
ROUNDS=${ROUNDS:-2}
MILLION_SECONDS=${MILLION_SECONDS:-60}
OUT=bench/out
mkdir -p "$OUT"
rm -f "$OUT"/runs.tsv

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || need+=(nginx-light)
command -v haproxy >/dev/null || need+=(haproxy)
if ((${#need[@]})); then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
cargo build --release --quiet --bin qbproxy --example fast-upstream --example loadgen
BIN=target/release/qbproxy
UPSTREAM=target/release/examples/fast-upstream

source bench/lib.sh

printf 'wrk.method = "POST"\nwrk.body = string.rep("x", 2048)\nwrk.headers["Content-Type"] = "application/json"\n' > "$OUT/post2k.lua"

start_targets() { # mode: http or https
    local mode=$1 up_url up_port
    if [[ $mode == https ]]; then up_port=19443; else up_port=19000; fi
    up_url="$mode://127.0.0.1:$up_port"
    # Session creation goes through the fast upstream to the simulator,
    # which checks the signature like QuickBlox.
    start_sim "run-$mode"
    local ca_out=()
    [[ $mode == https ]] && ca_out=("$OUT/upstream-ca.pem")
    SESSIONS_URL=http://127.0.0.1:19081 taskset -c 1 "$UPSTREAM" "127.0.0.1:$up_port" "${ca_out[@]}" 2>/dev/null & pids+=($!)
    wait_port "$up_port"

    local ca=""; [[ $mode == https ]] && ca="$PWD/$OUT/upstream-ca.pem"
    fast_upstream_config "$OUT/qbproxy.toml" "$up_url" "$ca" "run-$mode"
    # Like for like: nginx runs with access_log off, HAProxy logs nothing.
    # (The access log's own cost: bench/ACCESS-LOG-RESULTS.md.)
    printf '[log]\naccess = false\n' >> "$OUT/qbproxy.toml"
    RUST_LOG=warn taskset -c 0 "$BIN" --config "$OUT/qbproxy.toml" 2> "$OUT/qbproxy-$mode.log" & pids+=($!)
    QBPROXY_PID=$!
    wait_port 19100
    curl -fs -o /dev/null http://127.0.0.1:19100/users.json # a session, from the simulator

    start_nginx "$mode" "$up_port"
    start_haproxy "$mode" "$up_port"
}

port_of() { case $1 in qbproxy) echo 19100;; nginx) echo 19200;; haproxy) echo 19300;; direct) echo "$DIRECT_PORT";; esac; }
# The process doing the proxying (nginx: its one worker); none for direct.
pid_of() { case $1 in qbproxy) echo "$QBPROXY_PID";; nginx) echo "$NGINX_WORKER";; haproxy) echo "$HAPROXY_PID";; direct) echo "";; esac; }

run() { # mode scenario conns path extra-args...
    local mode=$1 scenario=$2 conns=$3 path=$4; shift 4
    for round in $(seq "$ROUNDS"); do
        for target in qbproxy nginx haproxy direct; do
            local port scheme=http hdr=()
            port=$(port_of "$target")
            if [[ $target == direct ]]; then scheme=$mode; hdr=(-H "QB-Token: $TOKEN"); fi
            local log="$OUT/wrk-$mode-${scenario//[^a-zA-Z0-9]/_}-$target-$round.txt"
            local pid t0 t1
            pid=$(pid_of "$target")
            t0=$(cpu_ticks "$pid")
            taskset -c 1 wrk -t1 -c"$conns" -d"$DURATION" --latency "${hdr[@]}" "$@" \
                "$scheme://127.0.0.1:$port$path" > "$log" 2>&1 || true
            t1=$(cpu_ticks "$pid")
            printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$mode" "$scenario" "$target" "$round" "$log" "$((t1 - t0))" >> "$OUT/runs.tsv"
        done
    done
}

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }

for mode in http https; do
    start_targets "$mode"
    if [[ $mode == https ]]; then DIRECT_PORT=19443; else DIRECT_PORT=19000; fi
    # Warm every target (pools, TLS sessions) before anything is measured.
    for target in qbproxy nginx haproxy direct; do
        hdr=(); scheme=http
        if [[ $target == direct ]]; then scheme=$mode; hdr=(-H "QB-Token: $TOKEN"); fi
        taskset -c 1 wrk -t1 -c500 -d2s "${hdr[@]}" "$scheme://127.0.0.1:$(port_of "$target")/users.json" > /dev/null 2>&1 || true
    done
    run "$mode" "GET small, 50 conns" 50 /users.json
    run "$mode" "GET small, 500 conns" 500 /users.json
    run "$mode" "POST 2 KiB, 50 conns" 50 /data/Note.json -s "$OUT/post2k.lua"
    run "$mode" "POST 2 KiB, 500 conns" 500 /data/Note.json -s "$OUT/post2k.lua"
    run "$mode" "GET 256 KiB, 50 conns" 50 /big
    # Latency below saturation: a fixed 5,000 GETs/s over 50 connections
    # (open loop, latency from when each request was due).
    for target in qbproxy nginx haproxy direct; do
        hdr=()
        if [[ $target == direct ]]; then
            [[ $mode == https ]] && continue # loadgen speaks plain HTTP only
            hdr=(--header "QB-Token: $TOKEN")
        fi
        taskset -c 1 target/release/examples/loadgen --target "127.0.0.1:$(port_of "$target")" \
            --rate 5000 --connections 50 --duration 10s --post-every 0 "${hdr[@]}" \
            > "$OUT/fixed-rate-$mode-$target.json"
    done
    if [[ $mode == http ]]; then
        # Memory in a fresh qbproxy, so the peaks of the runs above (256 KiB
        # bodies in flight) do not count: idle with its session, then the
        # peak with 1,000 connections, then before and after a long run.
        kill "$QBPROXY_PID"; wait "$QBPROXY_PID" 2>/dev/null || true
        RUST_LOG=warn taskset -c 0 "$BIN" --config "$OUT/qbproxy.toml" 2>> "$OUT/qbproxy-$mode.log" & pids+=($!)
        QBPROXY_PID=$!
        wait_port 19100
        curl -fs -o /dev/null "http://127.0.0.1:19100/users.json"
        RSS_IDLE=$(rss_kib "$QBPROXY_PID")
        taskset -c 1 wrk -t1 -c1000 -d5s "http://127.0.0.1:19100/users.json" > "$OUT/wrk-1000conns.txt" 2>&1 || true
        RSS_1000=$(hwm_kib "$QBPROXY_PID")
        before=$(rss_kib "$QBPROXY_PID")
        taskset -c 1 wrk -t1 -c50 -d"${MILLION_SECONDS}s" "http://127.0.0.1:19100/users.json" > "$OUT/wrk-million.txt" 2>&1 || true
        RSS_AFTER=$(rss_kib "$QBPROXY_PID")
        MILLION_REQS=$(awk '/requests in/ {print $1}' "$OUT/wrk-million.txt")
        RSS_BEFORE_MILLION=$before
    fi
    curl -fs http://127.0.0.1:19081/_sim/stats > "$OUT/sim-stats-run-$mode.json"
    stop_all
done

python3 bench/report.py "$OUT/runs.tsv" \
    --rss "$RSS_IDLE" "$RSS_1000" "$RSS_BEFORE_MILLION" "$RSS_AFTER" "$MILLION_REQS" \
    --duration "$DURATION" --rounds "$ROUNDS" > "$OUT/RESULTS.md"
# Written aside first: report.py keeps the sections of the old file after its own.
mv "$OUT/RESULTS.md" bench/RESULTS.md
cat bench/RESULTS.md
