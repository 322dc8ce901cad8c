#!/usr/bin/env bash
# Restarts under load: 240 requests/s (open loop, bench/loadgen.rs) through
# qbproxy while it is restarted, three ways:
#   drain       SIGTERM, wait for the exit, start again (what a supervisor
#               without socket activation does): the port is closed between
#   activation  the sockets held by bench/socket_holder.py as systemd holds
#               them (LISTEN_FDS); SIGTERM, and the holder starts it again
#   upgrade     a second qbproxy with the same config takes the sockets over
#               listen.handover_socket; the old one drains and exits
# First one instance restarted RESTARTS times ([state] file keeps its
# sessions), then three replicas sharing sessions through Redis, each
# restarted in turn (a rolling restart). Reports failed requests and
# sessions created during the load for each.
#
#   bench/restart.sh      RATE=240 CONNS=24 DURATION=30 RESTARTS=3 by default
#
# Needs redis-server and python3. Writes bench/RESTART-RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

RATE=${RATE:-240}
CONNS=${CONNS:-24}
DURATION=${DURATION:-30}
RESTARTS=${RESTARTS:-3}
DELAY=${DELAY:-2s}
OUT=bench/out
mkdir -p "$OUT"
command -v redis-server >/dev/null || { echo "bench/restart.sh needs redis-server (apt-get install redis-server)" >&2; exit 1; }

cargo build --release --quiet --bin qbproxy --example loadgen
BIN=target/release/qbproxy
LOADGEN=target/release/examples/loadgen

source bench/lib.sh

# config NAME R CLUSTER(yes|no): replica R's config file.
config() {
    local name=$1 r=$2 cluster=$3 file="$OUT/restart-$1-$2.toml"
    cat > "$file" <<TOML
[listen]
addr = "127.0.0.1:1910$r"
shutdown_delay = "$DELAY"
handover_socket = "$PWD/$OUT/restart-$name-$r.sock"
[admin]
addr = "127.0.0.1:1919$r"
[upstream]
url = "http://127.0.0.1:19081"
$(sim_quickblox restart)
$(if [[ $cluster == yes ]]; then printf '[cluster]\nredis_url = "redis://127.0.0.1:19379"\n'; else printf '[state]\nfile = "%s"\n' "$PWD/$OUT/restart-$name-$r.state"; fi)
TOML
    echo "$file"
}

declare -A current # replica -> pid of its qbproxy (activation: of the holder)

# launch MODE NAME R CONFIG: starts replica R.
launch() {
    local mode=$1 name=$2 r=$3 cfg=$4 log="$OUT/qbproxy-restart-$2-$3.log"
    if [[ $mode == activation ]]; then
        RUST_LOG=info python3 bench/socket_holder.py "127.0.0.1:1910$r" "127.0.0.1:1919$r" -- \
            taskset -c 0 "$BIN" --threads 1 --config "$cfg" 2>> "$log" & pids+=($!)
    else
        RUST_LOG=info taskset -c 0 "$BIN" --threads 1 --config "$cfg" 2>> "$log" & pids+=($!)
    fi
    current[$r]=$!
}

# ready R: waits (at most 20 s) until replica R's /readyz answers 200.
ready() {
    for _ in $(seq 200); do
        curl -fs -o /dev/null "http://127.0.0.1:1919$1/readyz" && return 0
        sleep 0.1
    done
    echo "replica $1 never became ready" >&2
    exit 1
}

# restart MODE NAME R CONFIG: restarts replica R, returns once the new
# process is ready.
restart() {
    local mode=$1 name=$2 r=$3 cfg=$4 old
    case $mode in
    drain)
        old=${current[$r]}
        kill -TERM "$old"
        wait "$old" || true
        launch drain "$name" "$r" "$cfg"
        ;;
    activation)
        old=$(pgrep -P "${current[$r]}" -f "$BIN")
        kill -TERM "$old"
        while kill -0 "$old" 2>/dev/null; do sleep 0.05; done
        ;;
    upgrade)
        old=${current[$r]}
        launch upgrade "$name" "$r" "$cfg"
        wait "$old" || true
        ;;
    esac
    ready "$r"
}

# run MODE REPLICAS(1|3)
run() {
    local mode=$1 n=$2 name="$1-$2" cluster=no
    [[ $n == 3 ]] && cluster=yes
    start_sim restart
    if [[ $cluster == yes ]]; then
        taskset -c 1 redis-server --port 19379 --bind 127.0.0.1 --save "" --appendonly no \
            > "$OUT/redis-restart.log" 2>&1 & pids+=($!)
        wait_port 19379
    fi
    local targets=() cfgs=()
    rm -f "$OUT"/restart-"$name"-*.state "$OUT"/qbproxy-restart-"$name"-*.log
    for r in $(seq "$n"); do
        cfgs[$r]=$(config "$name" "$r" "$cluster")
        launch "$mode" "$name" "$r" "${cfgs[$r]}"
        targets+=(--target "127.0.0.1:1910$r")
    done
    for r in $(seq "$n"); do ready "$r"; done
    curl -fs http://127.0.0.1:19081/_sim/stats > "$OUT/sim-stats-restart-$name-before.json"
    taskset -c 1 "$LOADGEN" "${targets[@]}" --rate "$RATE" --connections "$CONNS" \
        --duration "${DURATION}s" --post-every 4 > "$OUT/loadgen-restart-$name.json" & local load=$!
    sleep 4
    local restarts=0
    if [[ $n == 1 ]]; then
        for _ in $(seq "$RESTARTS"); do
            restart "$mode" "$name" 1 "${cfgs[1]}"
            restarts=$((restarts + 1))
            sleep 3
        done
    else
        for r in $(seq "$n"); do
            restart "$mode" "$name" "$r" "${cfgs[$r]}"
            restarts=$((restarts + 1))
            sleep 1
        done
    fi
    wait "$load"
    curl -fs http://127.0.0.1:19081/_sim/stats > "$OUT/sim-stats-restart-$name.json"
    echo "$restarts" > "$OUT/restarts-$name.txt"
    stop_all
    current=()
}

for mode in drain activation upgrade; do
    run "$mode" 1
    run "$mode" 3
done

python3 - "$OUT" "$RATE" "$CONNS" "$DURATION" "$DELAY" > bench/RESTART-RESULTS.md <<'PY'
import datetime, json, os, sys
out, rate, conns, duration, delay = sys.argv[1:]
print("# Restarts under load")
print()
print(f"Generated by `bench/restart.sh` on {datetime.date.today()}, {os.cpu_count()} cores. "
      f"qbproxy (release build, `--threads 1`, `listen.shutdown_delay = \"{delay}\"`) on core 0; "
      f"the simulator (`qbproxy sim`), redis-server and `bench/loadgen.rs` on core 1. "
      f"Load: {rate} requests/s at a fixed rate (open loop), {conns} keep-alive connections "
      f"(a connection the server closed is replaced before the next request, as a client's pool "
      f"does), {duration} s, one request in four a POST. Target: 0 failed requests and 0 new "
      f"sessions per restart.")
print()
print("One instance (`[state] file`), restarted several times; three replicas sharing sessions "
      "through Redis (`[cluster]`), each restarted once in turn (rolling).")
print()
print("| restart | replicas | restarts | sent | failed | sessions created | p50 / p99 / max ms |")
print("|---|---|---|---|---|---|---|")
names = {"drain": "drain (SIGTERM, then start again)",
         "activation": "socket activation (sockets held across)",
         "upgrade": "upgrade (`listen.handover_socket`)"}
failures = []
for mode in ("drain", "activation", "upgrade"):
    for n in (1, 3):
        name = f"{mode}-{n}"
        r = json.load(open(f"{out}/loadgen-restart-{name}.json"))
        before = json.load(open(f"{out}/sim-stats-restart-{name}-before.json"))
        after = json.load(open(f"{out}/sim-stats-restart-{name}.json"))
        restarts = open(f"{out}/restarts-{name}.txt").read().strip()
        a = r["all"]
        print(f"| {names[mode]} | {n} | {restarts} | {r['sent']} | {r['failed']} "
              f"| {after['creations'] - before['creations']} "
              f"| {a['p50_ms']:.1f} / {a['p99_ms']:.1f} / {a['max_ms']:.0f} |")
        if r["first_failures"]:
            failures.append(f"- {names[mode]}, {n}: " + "; ".join(r["first_failures"][:3]))
if failures:
    print()
    print("First failures:")
    print("\n".join(failures))
print()
print("Latency is from when each request was due; the max shows how long a connection waited "
      "in the kernel's accept queue while no process accepted (socket activation) or while "
      "the port was closed (drain).")
PY
cat bench/RESTART-RESULTS.md
