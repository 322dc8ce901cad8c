# Sourced by the bench scripts (from the repository root): process
# bookkeeping, ports, CPU time, and the two ways qbproxy is set up.

# Every process started with `& pids+=($!)` is stopped on exit.
pids=()
stop_all() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    pids=()
}
trap stop_all EXIT

# Waits (at most 10 s) until something listens on 127.0.0.1:PORT.
wait_port() {
    for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
    echo "port $1 never opened" >&2
    exit 1
}

# User + system CPU time of a process, in clock ticks (0 for no PID).
cpu_ticks() { if [[ -n $1 ]]; then awk '{print $14 + $15}' "/proc/$1/stat"; else echo 0; fi; }

# start_sim NAME [SIM_FLAGS...]: `qbproxy sim` ($BIN) on core 1 at
# 127.0.0.1:19081; what it prints (its credentials) goes to $OUT/sim-NAME.txt.
start_sim() {
    local name=$1; shift
    taskset -c 1 "$BIN" sim --listen 127.0.0.1:19081 "$@" > "$OUT/sim-$name.txt" 2>&1 & pids+=($!)
    wait_port 19081
}

# sim_quickblox NAME: config for the simulator NAME: its application's keys
# in [quickblox] (plus $QUICKBLOX_EXTRA) and its user "demo" as the identity.
sim_quickblox() {
    cat <<TOML
[quickblox]
application_id = $(sed -n 's/^application_id = //p' "$OUT/sim-$1.txt")
auth_key = $(sed -n 's/^auth_key = //p' "$OUT/sim-$1.txt")
auth_secret = $(sed -n 's/^auth_secret = //p' "$OUT/sim-$1.txt")
${QUICKBLOX_EXTRA:-}
[[identity]]
name = "demo"
login = "demo"
password = "demo-password"
TOML
}

# fast_upstream_config FILE URL [CA_FILE [SIM_NAME]]: qbproxy on
# 127.0.0.1:19100 (admin 19190) in front of bench/fast_upstream.rs. With
# SIM_NAME, as that simulator's user (the fast upstream passes session
# creation on to it: SESSIONS_URL); without, with placeholder keys, which
# the fast upstream accepts.
fast_upstream_config() {
    cat > "$1" <<TOML
[listen]
addr = "127.0.0.1:19100"
[admin]
addr = "127.0.0.1:19190"
[upstream]
url = "$2"
${3:+ca_file = \"$3\"}
[limits]
max_connections = 8192
TOML
    if [[ -n ${4:-} ]]; then
        sim_quickblox "$4" >> "$1"
    else
        printf '[quickblox]\napplication_id = "76730"\nauth_key = "bench"\nauth_secret = "bench"\n' >> "$1"
    fi
}

# qbproxy_on_sim NAME [SIM_FLAGS...]: `qbproxy sim` on core 1
# (127.0.0.1:19081), then qbproxy on core 0 (127.0.0.1:19100) in front of
# it as the simulator's user "demo", with $QUICKBLOX_EXTRA added to its
# [quickblox] table and $QBPROXY_EXTRA (whole tables) after it; waits for
# the first session. Sets QBPROXY_PID.
qbproxy_on_sim() {
    local name=$1; shift
    start_sim "$name" "$@"
    cat > "$OUT/$name.toml" <<TOML
[listen]
addr = "127.0.0.1:19100"
[admin]
addr = "127.0.0.1:19190"
[upstream]
url = "http://127.0.0.1:19081"
$(sim_quickblox "$name")
${QBPROXY_EXTRA:-}
TOML
    RUST_LOG=warn taskset -c 0 "$BIN" --config "$OUT/$name.toml" 2> "$OUT/qbproxy-$name.log" & pids+=($!)
    QBPROXY_PID=$!
    wait_port 19100
    curl -fs -o /dev/null http://127.0.0.1:19100/users.json
}

# The static token nginx and HAProxy set (and bench/floor.rs, and `direct`).
TOKEN=0123456789abcdef0123456789abcdef01234567

# start_nginx MODE UP_PORT: nginx (one worker, core 0) on 127.0.0.1:19200 in
# front of the fast upstream on UP_PORT (MODE http or https), doing what
# qbproxy does in the bench: a static QB-Token, upstream keep-alive, access
# log off. $NGINX_KEEPALIVE idle upstream connections kept (256) and
# $NGINX_CONNECTIONS connections in all (8192). Sets NGINX_WORKER (the
# process doing the proxying).
start_nginx() {
    local mode=$1 up_port=$2 ssl=""
    [[ $mode == https ]] && ssl="proxy_ssl_verify off; proxy_ssl_session_reuse on;"
    cat > "$OUT/nginx.conf" <<NGINX
worker_processes 1;
pid $PWD/$OUT/nginx.pid;
error_log $PWD/$OUT/nginx-error.log warn;
events { worker_connections ${NGINX_CONNECTIONS:-8192}; }
http {
    access_log off;
    upstream qb { server 127.0.0.1:$up_port; keepalive ${NGINX_KEEPALIVE:-256}; }
    server {
        listen 127.0.0.1:19200 backlog=4096;
        location / {
            proxy_pass $mode://qb;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header QB-Token "$TOKEN";
            proxy_buffering on;
            $ssl
        }
    }
}
NGINX
    taskset -c 0 nginx -p "$PWD/$OUT" -c "$PWD/$OUT/nginx.conf" -g 'daemon off;' 2>/dev/null & pids+=($!)
    wait_port 19200
    NGINX_WORKER=$(pgrep -P "$!" | head -1)
}

# start_haproxy MODE UP_PORT: HAProxy (one thread, core 0) on
# 127.0.0.1:19300, the same job as start_nginx; to an HTTPS upstream with
# ALPN $HAPROXY_ALPN (http/1.1). Sets HAPROXY_PID.
start_haproxy() {
    local mode=$1 up_port=$2 hssl=""
    [[ $mode == https ]] && hssl="ssl verify none alpn ${HAPROXY_ALPN:-http/1.1}"
    cat > "$OUT/haproxy.cfg" <<HAP
global
    nbthread 1
    maxconn 8192
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    http-reuse always
frontend fe
    bind 127.0.0.1:19300
    http-request set-header QB-Token $TOKEN
    default_backend be
backend be
    server up 127.0.0.1:$up_port $hssl
HAP
    taskset -c 0 haproxy -f "$OUT/haproxy.cfg" -db 2>/dev/null & pids+=($!)
    wait_port 19300
    HAPROXY_PID=$!
}
