#!/usr/bin/env bash
# The stalled-body attack: CONNS clients each send a request's headers and
# all but one byte of a BODY-byte body, then stall. Samples qbproxy's
# resident memory every 50 ms while they push and for HOLD seconds after,
# and reports the peak. qbproxy runs with its default limits
# (limits.max_buffered_bytes = 64 MiB, body_read_timeout = 10 s) in front
# of the simulator.
#
#   bench/stalled.sh                      CONNS=1000 BODY=1048576 HOLD=3
#   BASELINE_REV=2f611c5 bench/stalled.sh also measures that revision's
#                                         build (before the bound), same way
#
# Writes bench/STALLED-RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

CONNS=${CONNS:-1000}
BODY=${BODY:-1048576}
HOLD=${HOLD:-3}
OUT=bench/out
mkdir -p "$OUT"

cargo build --release --quiet --bin qbproxy
BIN=target/release/qbproxy
source bench/lib.sh

# attack NAME BINARY [EXTRA_TOML]: one run against BINARY; prints a JSON line.
attack() {
    local name=$1 bin=$2
    QBPROXY_EXTRA=${3:-} BIN=$bin qbproxy_on_sim "stalled-${name//[^a-z0-9]/-}"
    local pid=$QBPROXY_PID
    local idle
    idle=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")
    python3 - "$pid" "$CONNS" "$BODY" "$HOLD" "$idle" "$name" <<'PY'
import json, os, socket, sys, threading, time
pid, conns, body, hold, idle, name = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
def rss():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    return 0
peak = [idle]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.05)
t = threading.Thread(target=sample); t.start()
head = (f"POST /data/Note.json HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {body}\r\n\r\n").encode()
payload = b"a" * (body - 1)
socks, left = [], []
for _ in range(conns):
    s = socket.create_connection(("127.0.0.1", 19100))
    s.setblocking(False)
    socks.append(s)
    left.append(memoryview(head + payload))
start = time.time()
last_progress = time.time()
pushed = 0
while time.time() - last_progress < 1.5:
    moved = False
    for i, s in enumerate(socks):
        if len(left[i]) == 0:
            continue
        try:
            n = s.send(left[i][:262144])
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            left[i] = memoryview(b"")
            continue
        left[i] = left[i][n:]
        pushed += n
        moved = True
    if moved:
        last_progress = time.time()
    else:
        time.sleep(0.01)
push_s = time.time() - start
time.sleep(hold)
after = rss()
stop.set(); t.join()
for s in socks:
    s.close()
print(json.dumps({"name": name, "conns": conns, "body": body, "pushed_mib": round(pushed / 2**20, 1),
                  "push_s": round(push_s, 2), "idle_mib": round(idle / 1024, 1),
                  "peak_mib": round(peak[0] / 1024, 1), "after_hold_mib": round(after / 1024, 1)}))
PY
    stop_all
}

results=$(attack "current, default limits" "$BIN")
# A budget of 1 MiB leaves what every open connection costs on its own.
results="$results
$(attack "current, max_buffered_bytes = 1 MiB" "$BIN" $'[limits]\nmax_buffered_bytes = 1048576')"
if [[ -n ${BASELINE_REV:-} ]]; then
    base=target/baseline-$BASELINE_REV
    if [[ ! -x $base/release/qbproxy ]]; then
        rm -rf "$OUT/baseline-src"
        git worktree add --force "$OUT/baseline-src" "$BASELINE_REV" >/dev/null
        (cd "$OUT/baseline-src" && CARGO_TARGET_DIR="$PWD/../../../$base" cargo build --release --quiet --bin qbproxy)
        git worktree remove --force "$OUT/baseline-src"
    fi
    results="$results
$(attack "$BASELINE_REV (before the bound)" "$base/release/qbproxy")"
fi

echo "$results" > "$OUT/stalled-results.jsonl"
python3 - "$CONNS" "$BODY" "$HOLD" "${BASELINE_REV:-}" "$OUT/stalled-results.jsonl" > bench/STALLED-RESULTS.md <<'PY'
import datetime, json, os, sys
conns, body, hold, base, path = sys.argv[1:]
rows = [json.loads(l) for l in open(path) if l.strip()]
print("# The stalled-body attack: resident memory\n")
print(f"Measured {datetime.date.today()} on this project's 2-core machine with "
      f"`{'BASELINE_REV=' + base + ' ' if base else ''}bench/stalled.sh` (CONNS={conns} BODY={body} HOLD={hold}).\n")
print(f"{conns} clients each send the headers of a POST with a {int(body)//1024} KiB body and all of "
      "it but the last byte, then stall. qbproxy runs with its default limits in front of the simulator "
      "(limits.max_buffered_bytes = 64 MiB, limits.body_read_timeout = 10 s, limits.max_connections = 4096, "
      "upstream.max_connections = 256). Peak: the highest VmRSS sampled every 50 ms while they push and "
      f"for {hold} s after.\n")
print("| build | bytes the clients got in | push time | RSS idle | RSS peak | RSS after the hold |")
print("|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['name']} | {r['pushed_mib']} MiB | {r['push_s']} s | {r['idle_mib']} MiB | **{r['peak_mib']} MiB** | {r['after_hold_mib']} MiB |")
cur, small = rows[0], rows[1]
per_conn = (small["peak_mib"] - small["idle_mib"] - 1) * 1024 / int(conns)
print(f"\nBody memory is bounded by `limits.max_buffered_bytes` plus what each open connection costs "
      f"on its own (hyper's buffers, the task): the 1 MiB run puts that at about **{per_conn:.0f} KiB per "
      "stalled HTTP/1 connection**, so the peak is about `max_buffered_bytes + connections x "
      f"{per_conn:.0f} KiB` (here {small['idle_mib']} + 64 + {int(conns)} x {per_conn:.0f} KiB = "
      f"{small['idle_mib'] + 64 + int(conns) * per_conn / 1024:.0f} MiB predicted, {cur['peak_mib']} MiB measured). "
      "An HTTP/2 connection may hold up to its 256 KiB receive window besides. Bodies past the budget "
      "stream upstream (up to upstream.max_connections at once); the rest wait in kernel socket buffers, "
      "not in qbproxy's memory. RSS stays at its peak after the hold: the allocator keeps the pages.")
PY
cat bench/STALLED-RESULTS.md
