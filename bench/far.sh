#!/usr/bin/env bash
# qbproxy, nginx and HAProxy in front of a far upstream: Debian's nginx with
# TLS and HTTP/2 (http2_max_concurrent_streams 128, keepalive_requests at its
# default 1000), answering every request after L seconds (the echo module's
# echo_sleep), as QuickBlox answers from across a WAN. /session.json is
# passed on to the simulator, so qbproxy creates a real session.
#
#   bench/far.sh                   DURATION=15s ROUNDS=2 by default
#
# Each proxy runs on core 0 in its default configuration for the job (qbproxy
# with no [upstream] tuning; nginx with an upstream keep-alive pool of 4096;
# HAProxy with `alpn h2,http/1.1` to the backend). wrk (plain HTTP/1.1
# keep-alive clients) and the far upstream share core 1. Cells: 1,000 and
# 2,500 client connections, L = 50 ms and 150 ms; the runs are interleaved.
# The upstream logs the connection, its request count and whether its TLS
# session was resumed for every request, so connections and handshakes are
# counted the same way for every proxy. Writes bench/FAR-RESULTS.md, and the
# same table as the last section of bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-15s}
ROUNDS=${ROUNDS:-2}
LATENCIES=${LATENCIES:-"0.05 0.15"}
CLIENTS=${CLIENTS:-"1000 2500"}
# Add `floor` for bench/floor.rs, the least a hyper-based proxy does.
TARGETS=${TARGETS:-"qbproxy nginx haproxy"}
OUT=bench/out/far
mkdir -p "$OUT"
rm -f "$OUT"/runs.tsv

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || need+=(nginx-light)
[[ -e /usr/lib/nginx/modules/ngx_http_echo_module.so ]] || need+=(libnginx-mod-http-echo)
command -v haproxy >/dev/null || need+=(haproxy)
if ((${#need[@]})); then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
# QBPROXY_BIN=path runs that binary instead of building this tree's (to
# compare two builds far away: run the script once with each).
if [[ -z ${QBPROXY_BIN:-} ]]; then cargo build --release --quiet --bin qbproxy; fi
[[ " $TARGETS " == *" floor "* ]] && cargo build --release --quiet --example floor
BIN=${QBPROXY_BIN:-target/release/qbproxy}
# 2,500 clients, as many upstream connections, and the proxies' own.
ulimit -n "$(ulimit -Hn)"

source bench/lib.sh

# A CA and a certificate for 127.0.0.1 and localhost, for the far upstream.
if [[ ! -e $OUT/upstream.crt ]]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
        -subj /CN=far-ca -keyout "$OUT/ca.key" -out "$OUT/ca.crt" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=localhost \
        -keyout "$OUT/upstream.key" -out "$OUT/upstream.csr" 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > "$OUT/san.ext"
    openssl x509 -req -in "$OUT/upstream.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" \
        -CAcreateserial -days 30 -extfile "$OUT/san.ext" -out "$OUT/upstream.crt" 2>/dev/null
fi

UP_PORT=19543
# start_far L: the far upstream (nginx, one worker, core 1) on 19543,
# answering after L seconds. Its access log: one line per request.
start_far() {
    local latency=$1
    cat > "$OUT/far.conf" <<NGINX
load_module /usr/lib/nginx/modules/ngx_http_echo_module.so;
worker_processes 1;
pid $PWD/$OUT/far.pid;
error_log $PWD/$OUT/far-error.log ${FAR_LOG:-warn};
events { worker_connections 16384; }
http {
    log_format far '\$connection \$connection_requests \$ssl_session_reused \$server_protocol \$status';
    access_log $PWD/$OUT/far-access.log far buffer=256k;
    http2_max_concurrent_streams 128;
    default_type application/json;
    server {
        listen 127.0.0.1:$UP_PORT ssl http2 backlog=16384;
        ssl_certificate $PWD/$OUT/upstream.crt;
        ssl_certificate_key $PWD/$OUT/upstream.key;
        ssl_session_cache shared:far:10m;
        location = /session.json {
            proxy_pass http://127.0.0.1:19081;
        }
        location / {
            echo_sleep $latency;
            echo '{"items":[]}';
        }
    }
}
NGINX
    taskset -c 1 nginx -p "$PWD/$OUT" -c "$PWD/$OUT/far.conf" -g 'daemon off;' 2>/dev/null & pids+=($!)
    wait_port "$UP_PORT"
    FAR_PID=$!
}

start_qbproxy() {
    cat > "$OUT/qbproxy.toml" <<TOML
[listen]
addr = "127.0.0.1:19100"
[admin]
addr = "127.0.0.1:19190"
[upstream]
url = "https://localhost:$UP_PORT"
ca_file = "$PWD/$OUT/ca.crt"
[limits]
max_connections = 8192
[log]
access = false
$(sim_quickblox far)
TOML
    RUST_LOG=${QBPROXY_LOG:-warn} taskset -c 0 "$BIN" --config "$OUT/qbproxy.toml" 2> "$OUT/qbproxy.log" & pids+=($!)
    QBPROXY_PID=$!
    wait_port 19100
    curl -fs -o /dev/null http://127.0.0.1:19100/users.json
}

# nginx with an upstream keep-alive pool as large as the clients (nginx
# speaks HTTP/1.1 to upstreams: a connection per request in flight), and
# HAProxy offering h2 to the backend (bench/lib.sh).
start_nginx_proxy() { NGINX_KEEPALIVE=4096 NGINX_CONNECTIONS=16384 start_nginx https "$UP_PORT"; }
start_haproxy_proxy() { HAPROXY_ALPN=h2,http/1.1 start_haproxy https "$UP_PORT"; }

# The floor (bench/floor.rs: hyper and hyper-util's pooled client doing
# nothing but set the token), over HTTP/1.1 to the upstream: hyper-util's
# pool would hold HTTP/2 to one connection. Only with TARGETS=... floor.
start_floor() {
    FLOOR_LISTEN=127.0.0.1:19400 FLOOR_UPSTREAM=127.0.0.1:$UP_PORT FLOOR_CA=$OUT/ca.crt FLOOR_H1=1 \
        taskset -c 0 target/release/examples/floor 2>/dev/null & pids+=($!)
    FLOOR_PID=$!
    wait_port 19400
}

port_of() { case $1 in qbproxy) echo 19100;; nginx) echo 19200;; haproxy) echo 19300;; floor) echo 19400;; esac; }
pid_of() { case $1 in qbproxy) echo "$QBPROXY_PID";; nginx) echo "$NGINX_WORKER";; haproxy) echo "$HAPROXY_PID";; floor) echo "$FLOOR_PID";; esac; }

# Connections, resumed handshakes and requests the far upstream logged
# since line FROM (a connection counts once, resumed if its first request
# says so).
upstream_counts() {
    sleep 1 # nginx writes its buffered access log within a second
    kill -USR1 "$FAR_PID" 2>/dev/null || true # reopen: flushes the buffer
    sleep 0.5
    tail -n +"$(($1 + 1))" "$OUT/far-access.log" | awk '
        { n++; if (!($1 in seen)) { seen[$1] = 1; c++; if ($3 == "r") r++ } }
        END { printf "%d\t%d\t%d\n", c, r, n }'
}

for latency in $LATENCIES; do
    start_sim far
    start_far "$latency"
    for target in $TARGETS; do
        case $target in
            qbproxy) start_qbproxy;;
            nginx) start_nginx_proxy;;
            haproxy) start_haproxy_proxy;;
            floor) start_floor;;
        esac
    done
    # Warm each proxy (connections, TLS sessions) before anything counts.
    for target in $TARGETS; do
        taskset -c 1 wrk -t1 -c500 -d3s "http://127.0.0.1:$(port_of "$target")/users.json" > /dev/null 2>&1 || true
    done
    for round in $(seq "$ROUNDS"); do
        for clients in $CLIENTS; do
            for target in $TARGETS; do
                log="$OUT/wrk-$latency-$clients-$target-$round.txt"
                pid=$(pid_of "$target")
                from=$(wc -l < "$OUT/far-access.log")
                t0=$(cpu_ticks "$pid")
                taskset -c 1 wrk -t1 -c"$clients" -d"$DURATION" --timeout 10s --latency \
                    "http://127.0.0.1:$(port_of "$target")/users.json" > "$log" 2>&1 || true
                t1=$(cpu_ticks "$pid")
                counts=$(upstream_counts "$from")
                printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$latency" "$clients" "$target" "$round" \
                    "$log" "$((t1 - t0))" "$counts" >> "$OUT/runs.tsv"
                echo "L=$latency clients=$clients $target round $round: $(awk '/Requests\/sec/ {print $2}' "$log") req/s, upstream conns/resumed/requests $counts"
            done
        done
    done
    if [[ " $TARGETS " == *" qbproxy "* ]]; then
        curl -fs http://127.0.0.1:19190/metrics | grep '^qbproxy_upstream' > "$OUT/qbproxy-metrics-$latency.txt" || true
    fi
    stop_all
done

python3 bench/far_report.py "$OUT/runs.tsv" --duration "$DURATION" --rounds "$ROUNDS" > bench/FAR-RESULTS.md
# The same table as the last section of bench/RESULTS.md (bench/run.sh keeps it).
python3 bench/far_report.py --section bench/RESULTS.md bench/FAR-RESULTS.md
cat bench/FAR-RESULTS.md
